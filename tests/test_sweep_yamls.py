"""Every YAML in sweeps/ is a valid W&B sweep config whose parameters parse in its program's parser
exactly as `wandb agent` renders them, and whose metric is a key the program logs. No training."""

import dataclasses
import glob
import json
import importlib
import os
import re

import pytest
import yaml
from transformers import TrainingArguments

from sweep_agent import config, space
from arguments import DataArguments, ModelArguments, parse_args
from conftest import ROOT

YAMLS = sorted(glob.glob(os.path.join(ROOT, "sweeps", "*.yaml")))
# The metric keys each program logs at evaluation (W&B names), by task where it matters.
LOGGED = {
    "run_mlm.py": {"eval/loss", "eval/accuracy", "train/loss"},
    "run_span_t5.py": {"eval/loss", "eval/accuracy", "train/loss"},
}
GLUE_KEYS = {
    "cola": {"eval/matthews_correlation"}, "stsb": {"eval/pearson", "eval/spearmanr", "eval/combined_score"},
    "mrpc": {"eval/accuracy", "eval/f1", "eval/combined_score"}, "qqp": {"eval/accuracy", "eval/f1", "eval/combined_score"},
    "sst2": {"eval/accuracy"}, "rte": {"eval/accuracy"}, "qnli": {"eval/accuracy"}, "wnli": {"eval/accuracy"},
    "mnli": {"eval/accuracy"},
}


def test_there_is_a_sweep_for_each_job():
    names = {os.path.basename(p) for p in YAMLS}
    programs = {yaml.safe_load(open(p))["program"] for p in YAMLS}
    assert {"run_mlm.py", "run_span_t5.py", "fine_tune_glue.py"} <= programs
    assert any("accelerate" in open(p).read() for p in YAMLS)
    for task in ("sst2", "cola", "mrpc", "stsb", "rte"):
        assert f"glue_{task}.yaml" in names


def sample_values(spec):
    """A few values from each parameter form, as Python objects the way the agent produces them."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    low, high = spec["min"], spec["max"]
    if isinstance(low, int) and isinstance(high, int) and spec.get("distribution", "int_uniform").startswith(("int", "q_")):
        return [low, high, (low + high) // 2]
    return [float(low), float(high), (float(low) + float(high)) / 2]


def argument_types(program):
    module = importlib.import_module(program[:-3])
    own = [obj for obj in vars(module).values()
           if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
           and obj.__name__.endswith("Arguments")]
    training = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, TrainingArguments)]
    return (ModelArguments, DataArguments, *own, max(training, key=lambda t: len(t.__mro__)))


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_yaml_follows_wandb_rules(path):
    text = open(path).read()
    cfg = yaml.safe_load(text)
    config.validate_config(cfg, cwd=ROOT)  # W&B's schema: keys, methods, parameter forms
    assert "log_uniform:" not in text.replace("log_uniform_values", ""), "use log_uniform_values"
    assert not re.search(r"\b\d+e-?\d+\b", re.sub(r"\d\.\d+e", "", text)), "write floats as 1.0e-5 so YAML reads numbers"
    for name, spec in cfg["parameters"].items():
        for key in ("min", "max"):
            if key in spec and spec.get("distribution", "") not in ("int_uniform",) and not isinstance(spec[key], int):
                assert isinstance(spec[key], float), f"{name}.{key} must be a number, not {spec[key]!r}"
    assert isinstance(cfg["command"], list) and "command: [" not in text, "commands in block style"
    assert "${args}" in cfg["command"] and "${args_no_boolean_flags}" not in text
    assert os.path.exists(os.path.join(ROOT, cfg["program"]))


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_every_parameter_parses_as_wandb_renders_it(path):
    cfg = yaml.safe_load(open(path))
    program = cfg["program"]
    types = argument_types(program)
    fixed = space.render_command(cfg["command"], program, {}, environ={})
    fixed = fixed[fixed.index(program) + 1:]
    for name, spec in cfg["parameters"].items():
        for value in sample_values(spec):
            argv = space.render_command(cfg["command"], program, {name: value}, environ={})
            argv = argv[argv.index(program) + 1:]
            assert f"--{name}={value}" in argv
            parsed = parse_args(types, argv)
            got = [getattr(obj, name) for obj in parsed if hasattr(obj, name)]
            assert got, f"--{name} is not a flag of {program}"
            assert got[0] == value or str(got[0]) == str(value) or float(got[0]) == float(value), (name, value, got)
    assert parse_args(types, fixed)  # the fixed part of the command parses on its own too

    metric = cfg["metric"]["name"]
    task = next((a.split("=", 1)[1] for a in fixed if a.startswith("--task_name=")), None)
    logged = GLUE_KEYS[task] if task else LOGGED[program]
    assert metric in logged, f"{metric} is not a key {program} logs (it logs {sorted(logged)})"
    if "goal" in cfg["metric"]:
        assert cfg["metric"]["goal"] == ("minimize" if metric.endswith("loss") else "maximize")


def command_flags(path):
    return [item for item in yaml.safe_load(open(path))["command"] if isinstance(item, str) and item.startswith("--")]


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_each_trial_gets_its_own_folder_and_data_is_named(path):
    """No YAML points every trial at one folder (the best trial's model would be overwritten by later trials);
    the default folder is per trial. A YAML that needs data from the Hub names it, in its flags and a comment."""
    flags = command_flags(path)
    assert not [f for f in flags if f.startswith(("--output_dir", "--overwrite_output_dir"))], flags
    text = open(path).read()
    needs_hub = any(f.startswith(("--task_name", "--dataset_name", "--model_name_or_path")) for f in flags)
    if needs_hub:
        assert re.search(r"^# Data: .*Hugging Face Hub \(.*public", text, re.M), "say which public dataset it downloads"


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_hyperband_sweeps_evaluate_often_enough_to_stop_trials(path):
    """Hyperband compares trials at min_iter * eta**k evaluations: a trial must log at least min_iter * eta."""
    cfg = yaml.safe_load(open(path))
    if cfg.get("early_terminate", {}).get("type") != "hyperband":
        return
    flags = dict(f[2:].split("=", 1) for f in command_flags(path) if "=" in f)
    assert flags.get("eval_strategy") in ("steps", "epoch"), "evaluations during training"
    early = cfg["early_terminate"]
    if flags["eval_strategy"] == "steps":
        steps = float(flags["eval_steps"])
        evaluations = 1 / steps if steps < 1 else float(flags["max_steps"]) / steps
    else:
        evaluations = min(cfg["parameters"].get("num_train_epochs", {}).get("values", [3]))
    assert evaluations >= early["min_iter"] * early["eta"], (evaluations, early)


@pytest.mark.slow
def test_the_offline_sweep_runs_as_shipped_and_reports_the_best_trials_folder(tmp_path):
    """`python sweep.py sweeps/mlm_lr_wd.yaml --count 2` on the embedded corpus: two trials, each in its own
    folder, learning (eval loss well below the untrained model's ~8.6); the best trial's folder holds the model
    and the eval loss the report names."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), os.path.join(ROOT, "sweeps", "mlm_lr_wd.yaml"),
                           "--count", "2", "--sweep-dir", str(tmp_path / "sweep"), "--no-plots"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    best = re.search(r"best: trial (\d+), eval/loss=([\d.]+)\s+\((.*?)\)", proc.stdout)
    assert best, proc.stdout
    folder = best.group(3)
    results = json.loads(open(os.path.join(folder, "all_results.json")).read())
    assert results["eval_loss"] == pytest.approx(float(best.group(2)), rel=1e-4)
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    losses = [float(x) for x in re.findall(r"finished\s+([\d.]+)", proc.stdout)]
    assert len(losses) == 2 and max(losses) < 7.0, proc.stdout
