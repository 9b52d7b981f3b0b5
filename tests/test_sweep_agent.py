"""Tests for sweep.py, the offline W&B sweep agent. Hermetic: no network, no W&B service.

Sweeps run against tests/fixtures/sweep_program.py, a stdlib-only stand-in for the training
scripts, in a temporary folder with its own `python` on PATH.
"""
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sweep  # noqa: E402
from sweep_agent import config, hyperband, liveness, schema, space, storage  # noqa: E402

PROGRAM = ROOT / "tests" / "fixtures" / "sweep_program.py"


def write_sweep(folder, parameters, method="grid", name="sweep", **extra):
    cfg = {"program": str(PROGRAM), "method": method, "parameters": parameters, **extra}
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path, *args):
    return sweep.main([str(path), "--no-plots", *args])


def agent_cmd(path, *args):
    return [sys.executable, str(ROOT / "sweep.py"), str(path), "--no-plots", *args]


def load_trials(folder):
    with open(Path(folder) / "trials.csv") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- command rendering

PARAMS = {"lr": 0.0001, "bs": 16, "fp16": True, "debug": False, "opt": "adam w", "none": None}


@pytest.mark.parametrize("macro, expected", [
    ("${env}", ["/usr/bin/env"]),
    ("${interpreter}", ["python"]),
    ("${program}", ["train.py"]),
    ("${args}", ["--lr=0.0001", "--bs=16", "--fp16=True", "--debug=False", "--opt=adam w",
                 "--none=None"]),
    ("${args_no_hyphens}", ["lr=0.0001", "bs=16", "fp16=True", "debug=False", "opt=adam w",
                            "none=None"]),
    ("${args_no_boolean_flags}", ["--lr=0.0001", "--bs=16", "--fp16", "--opt=adam w",
                                  "--none=None"]),
    ("${args_json}", ['{"lr": 0.0001, "bs": 16, "fp16": true, "debug": false, '
                      '"opt": "adam w", "none": null}']),
    ("${args_json_file}", ["/trial/params.json"]),
    ("${args_no_equals}", ["--lr", "0.0001", "--bs", "16", "--fp16", "True", "--debug", "False",
                           "--opt", "adam w", "--none", "None"]),
    ("${args_append_hydra}", ["+lr=0.0001", "+bs=16", "+fp16=True", "+debug=False",
                              "+opt=adam w", "+none=None"]),
    ("${args_override_hydra}", ["++lr=0.0001", "++bs=16", "++fp16=True", "++debug=False",
                                "++opt=adam w", "++none=None"]),
    ("${envvar:MY_VAR}", ["from-env"]),
    ("--out=${envvar:MY_VAR}/x", ["--out=from-env/x"]),
    ("${envvar:UNSET_VAR_XYZ}", ["UNSET_VAR_XYZ"]),  # wandb falls back to the name
    ("plain", ["plain"]),
])
def test_render_each_macro(macro, expected):
    argv = space.render_command([macro], "train.py", PARAMS, args_json_file="/trial/params.json",
                                environ={"MY_VAR": "from-env"}, windows=False)
    assert argv == expected


def test_render_default_command_and_windows():
    params = {"learning_rate": 3e-05, "epochs": 3}
    assert space.render_command(None, "train.py", params, windows=False) == [
        "/usr/bin/env", "python", "train.py", "--learning_rate=3e-05", "--epochs=3"]
    assert space.render_command(None, "train.py", params, windows=True)[0] == "python"
    custom = ["${env}", "python3", "${program}", "-b", "cfg", 7, "${args}"]
    assert space.render_command(custom, "t.py", {"x": 1}, windows=False) == [
        "/usr/bin/env", "python3", "t.py", "-b", "cfg", "7", "--x=1"]
    assert space.render_command(["${args}"], "t.py", {"opt": {"lr": 0.1}}) == ["--opt={'lr': 0.1}"]
    with pytest.raises(ValueError):
        space.render_command(["${nope}"], "t.py", {})


def test_render_keeps_hostile_values_literal():
    hostile = {"a": "$(touch /tmp/pwned)", "b": "; rm -rf x", "c": "`id` && echo 'q' \"x\""}
    argv = space.render_command(None, "t.py", hostile, windows=False)
    assert argv[3:] == ["--a=$(touch /tmp/pwned)", "--b=; rm -rf x", "--c=`id` && echo 'q' \"x\""]


# --------------------------------------------------------------------------- parameter forms

def sample(parameters, n=40, sampler=None, method="random"):
    sw = config.validate_config({"program": str(PROGRAM), "method": method,
                                "metric": {"name": "loss"}, "parameters": parameters})
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    values = []
    for i in range(n):
        trial = study.ask()
        values.append(space.sample_params(trial, sw.params))
        study.tell(trial, float(i % 7))
    return values


def is_multiple(x, q):
    return math.isclose(x / q, round(x / q), abs_tol=1e-9)


FORMS = [
    ({"value": "adamw"}, lambda v: v == "adamw"),
    ({"values": [16, 32, 64]}, lambda v: type(v) is int and v in (16, 32, 64)),
    ({"values": [True, False]}, lambda v: type(v) is bool),
    ({"values": [1, "a", None, [1, 2], 1.5]}, lambda v: v in [1, "a", None, [1, 2], 1.5]),
    ({"values": ["a", "b", "c"], "probabilities": [0.0, 1.0, 0.0]}, lambda v: v == "b"),
    ({"min": 1, "max": 5}, lambda v: type(v) is int and 1 <= v <= 5),
    ({"min": 0.0, "max": 1}, lambda v: type(v) is float and 0 <= v <= 1),
    ({"distribution": "int_uniform", "min": -3, "max": 3}, lambda v: type(v) is int and -3 <= v <= 3),
    ({"distribution": "uniform", "min": 0.5, "max": 0.75}, lambda v: 0.5 <= v <= 0.75),
    ({"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
     lambda v: type(v) is float and 0 <= v <= 1 and is_multiple(v, 0.25)),
    ({"distribution": "q_uniform", "min": 0, "max": 100, "q": 10},
     lambda v: type(v) is int and 0 <= v <= 100 and v % 10 == 0),
    ({"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
     lambda v: type(v) is float and 1e-5 <= v <= 1e-2),
    ({"distribution": "q_log_uniform_values", "min": 8, "max": 128, "q": 8},
     lambda v: type(v) is int and 8 <= v <= 128 and v % 8 == 0),
    ({"distribution": "inv_log_uniform_values", "min": 0.01, "max": 1.0},
     lambda v: type(v) is float and 0.01 <= v <= 1.0),
    ({"distribution": "log_uniform", "min": -5, "max": -1},  # deprecated: bounds are exponents
     lambda v: type(v) is float and math.exp(-5) <= v <= math.exp(-1)),
    ({"distribution": "q_log_uniform", "min": 2, "max": 4},  # q defaults to 1: ints
     lambda v: type(v) is int and 7 <= v <= 55),
    ({"distribution": "inv_log_uniform", "min": 1, "max": 3},
     lambda v: type(v) is float and math.exp(-3) <= v <= math.exp(-1)),
    ({"distribution": "normal", "mu": 10.0, "sigma": 2.0}, lambda v: type(v) is float and 0 < v < 20),
    ({"distribution": "q_normal", "mu": 10, "sigma": 3, "q": 2},
     lambda v: type(v) is int and v % 2 == 0),
    ({"distribution": "log_normal", "mu": 0.0, "sigma": 1.0}, lambda v: type(v) is float and v > 0),
    ({"distribution": "q_log_normal", "mu": 2.0, "sigma": 0.5, "q": 0.5},
     lambda v: type(v) is float and v >= 0 and is_multiple(v, 0.5)),
    ({"distribution": "beta", "a": 2.0, "b": 5.0}, lambda v: type(v) is float and 0 <= v <= 1),
    ({"distribution": "q_beta", "a": 2.0, "b": 2.0, "q": 0.1},
     lambda v: type(v) is float and 0 <= v <= 1 and is_multiple(v, 0.1)),
]


@pytest.mark.parametrize("spec, ok", FORMS, ids=[str(f[0]) for f in FORMS])
@pytest.mark.parametrize("method", ["random", "bayes"])
def test_parameter_forms_sample_in_range(spec, ok, method):
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=5) if method == "bayes" else None
    for params in sample({"p": spec}, n=25, sampler=sampler, method=method):
        assert ok(params["p"]), params["p"]


def test_probabilities_are_respected_and_nested_params_nest():
    values = [p["c"] for p in sample({"c": {"values": ["a", "b"], "probabilities": [0.9, 0.1]}},
                                     n=300)]
    assert 230 < values.count("a") < 295
    nested = sample({"opt": {"parameters": {"lr": {"value": 0.1}, "m": {"min": 0.0, "max": 1.0}}},
                     "bs": {"value": 8}}, n=3)
    assert list(nested[0]) == ["bs", "opt"] and nested[0]["opt"]["lr"] == 0.1
    assert 0 <= nested[0]["opt"]["m"] <= 1


def test_grid_points_enumerate_like_wandb():
    sw = config.validate_config({"program": str(PROGRAM), "method": "grid", "parameters": {
        "b": {"min": 1, "max": 3}, "a": {"values": ["x", "y"]},
        "c": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.5}, "d": {"value": 7}}})
    points = space.grid_points(sw.params)
    assert len(points) == 2 * 3 * 2 and len({json.dumps(p) for p in points}) == 12
    # sorted names, first one slowest; q_uniform grid is arange(min, max, q) as in W&B
    assert points[0] == {"a": "x", "b": 1, "c": 0.0, "d": 7}
    assert points[1] == {"a": "x", "b": 1, "c": 0.5, "d": 7}
    assert points[-1] == {"a": "y", "b": 3, "c": 0.5, "d": 7}


# --------------------------------------------------------------------------- hyperband rule

def test_hyperband_rule_uses_logged_iterations():
    done = [3.0, 2.0, 1.5, 1.2]  # a finished run
    for strict in (True, False):
        assert hyperband.hyperband_should_stop([5.0], [done, [5.0]], [1, 3], 3, strict) == (True, 1, 3.0)
        assert hyperband.hyperband_should_stop([2.5], [done, [2.5]], [1, 3], 3, strict) == (False, 1, 2.5)
        # past band 3: 3rd values are [1.5, 1.9] -> threshold 1.5; 1.9 > 1.5
        assert hyperband.hyperband_should_stop([2.5, 2.0, 1.9], [done, [2.5, 2.0, 1.9]], [1, 3], 3, strict)[0]
        # before the first band nothing stops
        assert hyperband.hyperband_should_stop([9.0], [done, [9.0]], [2, 6], 3, strict) == (False, None, None)
    # strict (W&B's default) compares the value at the band, not the best so far
    histories = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.5, 3.0, 3.0]]
    assert not hyperband.hyperband_should_stop(histories[2], histories, [1, 3], 3, strict=False)[0]
    assert hyperband.hyperband_should_stop(histories[2], histories, [1, 3], 3)[0]


def test_hyperband_strict_defaults_to_true_as_in_wandbs_schema():
    cfg = {"program": str(PROGRAM), "method": "random", "metric": {"name": "loss"},
           "parameters": {"x": {"value": 1}}, "early_terminate": {"type": "hyperband", "min_iter": 2}}
    assert config.validate_config(cfg).hyperband["strict"] is True
    cfg["early_terminate"]["strict"] = False
    assert config.validate_config(cfg).hyperband["strict"] is False


def test_hyperband_brackets_from_config():
    sw = config.validate_config({"program": str(PROGRAM), "method": "random",
                                "metric": {"name": "loss"}, "parameters": {"x": {"value": 1}},
                                "early_terminate": {"type": "hyperband", "max_iter": 27, "s": 2}})
    assert sw.hyperband["bands"] == [3, 9] and sw.hyperband["eta"] == 3
    sw.config["early_terminate"] = {"type": "hyperband", "min_iter": 2, "eta": 2}
    assert config.validate_config(sw.config).hyperband["bands"][:4] == [2, 4, 8, 16]


# --------------------------------------------------------------------------- whole sweeps

def test_grid_runs_every_point_once_and_resume_adds_nothing(workdir):
    path = write_sweep(workdir, {"a": {"values": ["x", "y"]}, "steps": {"min": 1, "max": 3}},
                       metric={"name": "eval/loss"})
    result = run(path)
    assert result.exit_code == 0 and "grid finished" in result.stop_reason
    points = [(r["params"]["a"], r["params"]["steps"]) for r in result.records]
    assert sorted(points) == [(a, s) for a in "xy" for s in (1, 2, 3)]
    assert all(r["state"] == "finished" for r in result.records)
    assert run(path).records == []  # rerunning the command continues the finished study


def test_bayes_sweep_finishes_with_outputs(workdir):
    path = write_sweep(workdir, {
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "x": {"min": -2.0, "max": 2.0}, "steps": {"value": 3}},
        method="bayes", name="bayes-demo", metric={"name": "eval/loss", "goal": "minimize"})
    result = run(path, "--count", "4")
    assert [r["state"] for r in result.records] == ["finished"] * 4
    assert result.best["value"] == min(r["value"] for r in result.records)
    out = workdir / "sweeps_runs" / "bayes-demo"
    assert result.sweep_dir == Path("sweeps_runs/bayes-demo")
    assert len(load_trials(out)) == 4
    for number in range(4):
        trial = out / f"trial-{number}"
        for name in ("command.txt", "params.json", "log.txt", "metrics.jsonl"):
            assert (trial / name).is_file(), name
        seen = json.loads((trial / "seen.json").read_text())
        assert shlex.split((trial / "command.txt").read_text())[3:] == seen["argv"]
        assert seen["argv"][1] == "--steps=3"  # an int stays an int
        env = seen["env"]
        assert env["SWEEP_TRIAL_DIR"] == str(trial.resolve())
        assert env["SWEEP_METRICS_FILE"] == str((trial / "metrics.jsonl").resolve())
        assert yaml.safe_load(Path(env["WANDB_SWEEP_PARAM_PATH"]).read_text())["steps"] == \
            {"value": 3}
    run_ids = {json.loads((out / f"trial-{n}" / "seen.json").read_text())["env"]["WANDB_RUN_ID"]
               for n in range(4)}
    assert len(run_ids) == 4


def test_plots_are_written(workdir):
    path = write_sweep(workdir, {"x": {"min": -2.0, "max": 2.0}, "quality": {"min": 0.0, "max": 1.0},
                                 "steps": {"value": 2}},
                       method="random", name="plots", metric={"name": "eval/accuracy", "goal": "maximize"})
    sweep.main([str(path), "--count", "20"])  # 20: what an importance of two parameters needs
    out = workdir / "sweeps_runs" / "plots"
    for name in ("optimization_history.png", "parallel_coordinates.png",
                 "param_importances.png", "intermediate_values.png"):
        assert (out / name).stat().st_size > 1000, name


def test_plots_skip_importances_with_one_trial(workdir, capsys):
    path = write_sweep(workdir, {"x": {"values": [1.0]}}, name="one",
                       metric={"name": "eval/loss"})
    sweep.main([str(path)])
    out = workdir / "sweeps_runs" / "one"
    assert (out / "optimization_history.png").is_file()
    assert not (out / "param_importances.png").exists()
    assert "skipped param_importances.png: 0 parameter(s) took more than one value" in capsys.readouterr().out


def test_plots_show_the_values_the_runs_got_under_their_names(workdir, capsys):
    """Optuna samples normal, log_normal, beta and q_* through a quantile or a raw value, and lists by index; the
    plots show what each run was given (x, not x[quantile]), on a log axis where the distribution is log."""
    from sweep_agent import report

    params = {"quality": {"distribution": "normal", "mu": 1.0, "sigma": 0.3},
              "batch": {"distribution": "q_log_uniform_values", "min": 8, "max": 256, "q": 8},
              "layers": {"values": [[1, 2], [3, 4], [5]]},
              "opt": {"distribution": "categorical_w_probabilities", "values": ["adam", "sgd"],
                      "probabilities": [0.5, 0.5]},
              "steps": {"value": 1}}
    path = write_sweep(workdir, params, method="random", metric={"name": "eval/loss"})
    sweep.main([str(path), "--count", "8", "--seed", "3"])
    assert "skipped param_importances.png: 8 finished trials; with 4 parameters that varied an importance needs 40" \
        in capsys.readouterr().out
    study = optuna.load_study(study_name="sweep", storage=storage.make_storage(None, workdir / "sweeps_runs" / "sweep"))
    assert any("[" in name for t in study.trials for name in t.params)  # what Optuna sampled
    shown = report.plot_study(study, config.load_sweep(str(path)))
    rows = {int(r["trial"]): r for r in load_trials(workdir / "sweeps_runs" / "sweep")}
    for t in shown.trials:
        assert set(t.params) == {"quality", "batch", "layers", "opt"}  # steps took one value: left out
        row = rows[t.number]
        assert t.params["quality"] == float(row["quality"]) and t.params["batch"] == int(row["batch"])
        assert t.params["layers"] == row["layers"] and t.params["opt"] == row["opt"]
        assert t.value == float(row["eval/loss"])
    assert shown.trials[0].distributions["batch"].log and not shown.trials[0].distributions["quality"].log


def test_plots_are_readable_with_many_trials():
    """Optuna's parallel coordinates colour the best trial white on a grey background, and its intermediate
    values legend lists every trial (past the figure at 30)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.colors import to_rgb
    from optuna.visualization import matplotlib as vis

    from sweep_agent import report

    study = optuna.create_study()
    for i in range(30):
        study.add_trial(optuna.trial.create_trial(
            params={"x": i / 30, "y": float(i % 7)}, value=float(i), intermediate_values={1: i + 1.0, 2: float(i)},
            distributions={"x": optuna.distributions.FloatDistribution(0, 1),
                           "y": optuna.distributions.FloatDistribution(0, 6)}))
    ax = vis.plot_parallel_coordinate(study)
    lines = next(c for c in ax.collections if c.get_array() is not None)
    assert max(min(to_rgb(lines.get_cmap()(q))) for q in (0.0, 1.0)) > 0.95  # Optuna's: white at one end
    report._readable("parallel_coordinates.png", ax, study.trials)
    assert all(min(to_rgb(lines.get_cmap()(q))) < 0.9 for q in (0.0, 0.5, 1.0))
    ax = vis.plot_intermediate_values(study)
    assert len(ax.get_legend().get_texts()) == 30
    report._readable("intermediate_values.png", ax, study.trials)
    assert ax.get_legend() is None and "(30 trials)" in ax.get_title()


def test_hyperband_stops_weak_runs_early(workdir):
    # quality 1 runs first; 3 and 4 are worse at iteration 1 and are stopped there; 0.5 is better.
    # ignore_sigterm makes the agent escalate to SIGKILL after --kill-timeout.
    path = write_sweep(workdir, {"quality": {"values": [1.0, 3.0, 4.0, 0.5]},
                                 "steps": {"value": 6}, "sleep": {"value": 0.25},
                                 "ignore_sigterm": {"value": True}},
                       metric={"name": "eval/loss"},
                       early_terminate={"type": "hyperband", "min_iter": 1, "eta": 3})
    result = run(path, "--kill-timeout", "0.5")
    states = {r["params"]["quality"]: r for r in result.records}
    assert states[1.0]["state"] == "finished" and states[0.5]["state"] == "finished"
    for q in (3.0, 4.0):
        assert states[q]["state"] == "pruned"
        assert states[q]["iterations"] < 6
        assert states[q]["exit_code"] == -signal.SIGKILL


def test_failing_trial_does_not_stop_the_sweep(workdir):
    path = write_sweep(workdir, {"fail": {"values": [False, True]}, "x": {"values": [1, 2]},
                                 "steps": {"value": 1}}, metric={"name": "eval/loss"})
    result = run(path)
    assert result.exit_code == 0 and len(result.records) == 4
    failed = [r for r in result.records if r["state"] == "failed"]
    assert len(failed) == 2
    assert all(r["exit_code"] == 3 and "boom" in r["log_tail"] for r in failed)
    rows = load_trials(workdir / "sweeps_runs" / "sweep")
    assert sorted(row["state"] for row in rows) == ["failed", "failed", "finished", "finished"]


def test_flapping_guard_stops_a_broken_program(workdir, capsys):
    path = write_sweep(workdir, {"fail": {"value": True}, "x": {"min": 0.0, "max": 1.0}},
                       method="random")
    result = run(path, "--count", "10")
    assert result.exit_code == 1 and len(result.records) == 3
    assert "failed within 60 s" in result.stop_reason
    assert "failed within 60 s" in capsys.readouterr().out


def test_runs_killed_by_a_signal_are_failed_but_not_counted_by_the_failure_guards(workdir, capsys):
    """wandb agent counts only exit codes > 0 towards flapping and failing; a run killed by a signal (say, the
    OOM killer) is recorded as failed but does not stop the agent."""
    path = write_sweep(workdir, {"killed": {"value": True}, "x": {"min": 0.0, "max": 1.0}}, method="random")
    result = run(path, "--count", "6")
    assert result.exit_code == 0 and len(result.records) == 6 and result.stop_reason == "--count 6 reached"
    assert {r["state"] for r in result.records} == {"failed"} and {r["exit_code"] for r in result.records} == {-9}
    assert "exit code -9 (SIGKILL)" in capsys.readouterr().out


def test_run_cap_counts_across_agent_runs(workdir):
    path = write_sweep(workdir, {"x": {"min": 0.0, "max": 1.0}, "steps": {"value": 1}},
                       method="random", run_cap=3, metric={"name": "eval/loss"})
    assert len(run(path, "--count", "2").records) == 2
    second = run(path, "--count", "5")
    assert len(second.records) == 1 and "run_cap 3" in second.stop_reason
    assert len(load_trials(workdir / "sweeps_runs" / "sweep")) == 3


def test_metric_target_stops_the_sweep(workdir):
    path = write_sweep(workdir, {"quality": {"values": [5.0, 0.2, 3.0, 4.0]},
                                 "steps": {"value": 2}},
                       metric={"name": "eval/loss", "goal": "minimize", "target": 1.0})
    result = run(path)
    assert [r["params"]["quality"] for r in result.records] == [5.0, 0.2]
    assert "target" in result.stop_reason


def test_hostile_values_reach_the_program_literally(workdir):
    canary = workdir / "pwned"
    values = [f"$(touch {canary})", "; rm -rf x", f"`touch {canary}`", f"x && touch {canary}"]
    path = write_sweep(workdir, {"payload": {"values": values}, "steps": {"value": 1}})
    result = run(path)
    assert len(result.records) == 4 and not canary.exists()
    for record in result.records:
        seen = json.loads((Path(record["dir"]) / "seen.json").read_text())
        assert f"--payload={record['params']['payload']}" in seen["argv"]


def test_custom_command_with_json_file_and_boolean_flags(workdir):
    command = ["${env}", "${interpreter}", "${program}", "--cfg", "${args_json_file}",
               "${args_no_boolean_flags}"]
    path = write_sweep(workdir, {"fp16": {"values": [True, False]}, "steps": {"value": 1}},
                       command=command)
    result = run(path)
    for record in result.records:
        seen = json.loads((Path(record["dir"]) / "seen.json").read_text())
        assert seen["argv"][0] == "--cfg"
        assert json.loads(Path(seen["argv"][1]).read_text()) == record["params"]
        assert ("--fp16" in seen["argv"]) == record["params"]["fp16"]
        assert not any(a.startswith("--fp16=") for a in seen["argv"])


# --------------------------------------------------------------------------- several agents

@pytest.mark.parametrize("storage", ["journal", pytest.param("sqlite", marks=pytest.mark.slow)])
def test_two_agents_split_a_grid_without_duplicates(workdir, storage):
    path = write_sweep(workdir, {"quality": {"values": [float(i) for i in range(10)]},
                                 "steps": {"value": 2}, "sleep": {"value": 0.25}},
                       metric={"name": "eval/loss"})
    extra = ["--storage", f"sqlite:///{workdir}/optuna.db"] if storage == "sqlite" else []
    agents = [subprocess.Popen(agent_cmd(path, *extra), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [a.communicate(timeout=120)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs
    assert sum(out.count(" started ") for out in outputs) == 10, outputs  # nothing ran twice
    rows = [r for r in load_trials(workdir / "sweeps_runs" / "sweep")]
    assert sorted(float(r["quality"]) for r in rows) == [float(i) for i in range(10)]
    assert all(r["state"] == "finished" for r in rows)
    assert len({r["agent"] for r in rows}) == 2, outputs  # both agents did some of the work
    assert len(list((workdir / "sweeps_runs" / "sweep").glob("trial-*"))) == 10


def wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def started_logging(folder):
    metrics = Path(folder) / "trial-0" / "metrics.jsonl"
    return metrics.exists() and metrics.stat().st_size > 0


def held_agent(workdir, path, **popen):
    """An agent subprocess whose first run blocks after logging once (see sweep_program.py)."""
    hold = workdir / "hold"
    hold.touch()
    agent = subprocess.Popen(agent_cmd(path), env={**os.environ, "SWEEP_TEST_HOLD": str(hold)},
                             **popen)
    wait_for(lambda: started_logging(workdir / "sweeps_runs" / "sweep"))
    return agent


def test_ctrl_c_stops_cleanly_and_rerun_resumes(workdir):
    path = write_sweep(workdir, {"quality": {"values": [1.0, 2.0, 3.0]}, "steps": {"value": 3}},
                       metric={"name": "eval/loss"})
    agent = held_agent(workdir, path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent.send_signal(signal.SIGINT)
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    result = run(path)
    assert sorted(r["params"]["quality"] for r in result.records) == [1.0, 2.0, 3.0]
    rows = load_trials(workdir / "sweeps_runs" / "sweep")
    assert [r["state"] for r in rows if r["trial"] == "0"] == ["interrupted"]
    assert sorted(float(r["quality"]) for r in rows if r["state"] == "finished") == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_ctrl_c_requeues_the_interrupted_parameters_for_every_method(workdir, method):
    """The docstring's promise for all methods, not only grid: the rerun's first trial runs what was cut off."""
    path = write_sweep(workdir, {"quality": {"min": 0.0, "max": 10.0}, "steps": {"value": 3}}, method=method,
                       metric={"name": "eval/loss"})
    agent = held_agent(workdir, path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent.send_signal(signal.SIGINT)
    out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 130, out
    cut = json.loads((workdir / "sweeps_runs" / "sweep" / "trial-0" / "params.json").read_text())
    result = run(path, "--count", "1")
    assert [r["params"]["quality"] for r in result.records] == [cut["quality"]]
    assert result.records[0]["state"] == "finished"


def test_grid_points_queued_twice_run_once(workdir):
    """Agents that join while the first still queues a big grid queue "what is missing" too (2,000 points on
    PostgreSQL: 251 queued twice). Every copy after the first is dropped when it is claimed."""
    path = write_sweep(workdir, {"quality": {"values": [1.0, 2.0, 3.0]}, "steps": {"value": 1}},
                       metric={"name": "eval/loss"})
    sw = config.load_sweep(str(path))
    grid = space.grid_points(sw.params)
    store = storage.make_storage(None, workdir / "sweeps_runs" / "sweep")
    study = storage.open_study(sw, store, "sweep", optuna.samplers.RandomSampler(), optuna.pruners.NopPruner(), grid)
    for index, point in enumerate(grid):  # what a racing agent queued as missing
        study.enqueue_trial(space._optuna_grid_params(sw.params, point), user_attrs={"sweep_grid_index": index})
    result = run(path)
    assert sorted(r["params"]["quality"] for r in result.records) == [1.0, 2.0, 3.0]
    finished = [r for r in load_trials(workdir / "sweeps_runs" / "sweep") if r["state"] == "finished"]
    assert sorted(float(r["quality"]) for r in finished) == [1.0, 2.0, 3.0]


def test_a_grid_point_whose_requeue_was_cut_off_is_queued_again(workdir, capsys):
    """An agent killed between failing a lost trial and queueing its point again (it happened in a chaos run on
    PostgreSQL) left the point with no trial: the other agents said "grid finished" without it."""
    path = write_sweep(workdir, {"quality": {"values": [1.0, 2.0, 3.0]}, "steps": {"value": 1}},
                       metric={"name": "eval/loss"})
    sw = config.load_sweep(str(path))
    study = storage.open_study(sw, storage.make_storage(None, workdir / "sweeps_runs" / "sweep"), "sweep",
                               optuna.samplers.RandomSampler(), optuna.pruners.NopPruner(), space.grid_points(sw.params))
    cut = study.ask()  # grid point 0, run by an agent that died; the reaper failed it, then died too
    cut.set_user_attr("sweep_state", "lost")
    cut.set_user_attr("sweep_discount", True)
    study.tell(cut, state=optuna.trial.TrialState.FAIL)
    result = run(path)
    assert sorted(r["params"]["quality"] for r in result.records) == [1.0, 2.0, 3.0]
    assert "grid points 0 had no trial (an agent died re-queueing them); queued again" in capsys.readouterr().out


def test_agents_in_another_pid_namespace_are_judged_by_heartbeat(workdir, capsys):
    """Two containers (or cloned VMs) share hostname and machine-id but not pids: an agent's identity includes the
    boot id and PID namespace, so a live trial of the other is not declared lost because its pid is not visible
    here; the agent that finds the grid done says which points are held elsewhere and until when."""
    import shutil
    import socket

    if shutil.which("unshare"):
        probe = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from sweep_agent import liveness; print(liveness._process_space())"]
        inside = subprocess.run(["unshare", "--pid", "--fork", "--map-root-user", "--mount-proc", *probe],
                                capture_output=True, text=True)
        if inside.returncode == 0:
            assert inside.stdout.strip() != liveness._process_space()
    path = write_sweep(workdir, {"quality": {"values": [1.0, 2.0]}, "steps": {"value": 1}}, metric={"name": "eval/loss"})
    sw = config.load_sweep(str(path))
    grid = space.grid_points(sw.params)
    study = storage.open_study(sw, storage.make_storage(None, workdir / "sweeps_runs" / "sweep"), "sweep",
                             optuna.samplers.RandomSampler(), optuna.pruners.NopPruner(), grid)
    other = study.ask()  # grid point 0, running in a container beside us: same host name and machine-id
    elsewhere = liveness._process_space().rsplit("/", 1)[0] + "/4026599999"
    other.set_user_attr("sweep_agent", f"{socket.gethostname()}/{elsewhere}:{2**22 + 7}:0123abcd")
    other.set_user_attr("sweep_heartbeat", time.time())
    capsys.readouterr()
    result = run(path)
    assert [r["params"]["quality"] for r in result.records] == [2.0]
    assert study.trials[other.number].state == optuna.trial.TrialState.RUNNING  # not taken for lost
    out = capsys.readouterr().out
    assert f"still running elsewhere: trial {other.number} (grid point 0" in out and "re-queued at" in out


def test_trial_of_a_killed_agent_is_requeued(workdir):
    path = write_sweep(workdir, {"quality": {"values": [1.0, 2.0]}, "steps": {"value": 3}},
                       metric={"name": "eval/loss"})
    agent = held_agent(workdir, path, stdout=subprocess.DEVNULL)
    agent.kill()
    agent.wait()
    orphan = json.loads((workdir / "sweeps_runs" / "sweep" / "trial-0" / "seen.json").read_text())

    def gone(pid=orphan["pid"]):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
        except FileNotFoundError:
            return True
    wait_for(gone, timeout=10)  # the run died with its agent instead of running on unwatched
    result = run(path)
    assert sorted(r["params"]["quality"] for r in result.records) == [1.0, 2.0]
    rows = load_trials(workdir / "sweeps_runs" / "sweep")
    assert [r["state"] for r in rows if r["trial"] == "0"] == ["lost"]


def test_changed_parameters_do_not_silently_join_an_old_study(workdir, capsys):
    path = write_sweep(workdir, {"x": {"values": [1]}})
    run(path)
    write_sweep(workdir, {"x": {"values": [1, 2]}})
    with pytest.raises(SystemExit) as exc:
        run(path)
    assert exc.value.code == 2
    assert "different method/parameters/metric" in capsys.readouterr().err


# --------------------------------------------------------------------------- config errors

GOOD = {"program": str(PROGRAM), "method": "random", "metric": {"name": "eval/loss"},
        "parameters": {"lr": {"min": 0.0, "max": 1.0}}}


@pytest.mark.parametrize("change, message", [
    ({"method": "hyperopt"}, "method 'hyperopt' is not valid; use one of: grid, random, bayes"),
    ({"parameters": {"lr": {"distribution": "loguniform", "min": 1e-5, "max": 1e-3}}},
     "parameters.lr.distribution 'loguniform' is not valid"),
    ({"method": "bayes", "metric": {"goal": "minimize"}}, "metric.name is missing"),
    ({"method": "bayes", "metric": None}, "method 'bayes' needs a metric"),
    ({"paramters": {}}, "unknown top-level key 'paramters' (did you mean 'parameters'?)"),
    ({"program": "does_not_exist.py"}, "program 'does_not_exist.py' does not exist"),
    ({"method": "grid"}, "grid search needs discrete parameters"),
    ({"parameters": {"lr": {"min": "1e-5", "max": 1.0}}}, "write it with a dot"),
    ({"parameters": {"lr": {"distribution": "int_uniform", "min": 0.5, "max": 2}}},
     "int_uniform needs integer min and max"),
    ({"parameters": {"c": {"values": [1, 2], "probabilities": [0.5]}}},
     "parameters.c.probabilities must be a list with one number per value"),
    ({"early_terminate": {"type": "asha", "min_iter": 1}}, "early_terminate.type 'asha'"),
    ({"command": ["${env}", "${interpeter}", "${program}"]}, "'${interpeter}' is not a known"),
    ({"run_cap": 0}, "run_cap must be a positive integer"),
    ({"parameters": {"lr": {"min": 0.1, "max": 0.1}}}, "min (0.1) must be < max (0.1); for one value use `value:`"),
])
def test_invalid_config_is_one_line_and_exit_2(workdir, capsys, change, message):
    cfg = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = workdir / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        run(path)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sweep config error: "), err
    assert message in err, err
    assert not (workdir / "sweeps_runs").exists() or not list(workdir.glob("sweeps_runs/*/trial-*"))


def test_invalid_config_from_the_command_line(workdir):
    (workdir / "bad.yaml").write_text("method: random\nparameters:\n  lr: {min: 0.0, max: [\n")
    proc = subprocess.run(agent_cmd(workdir / "bad.yaml"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("sweep config error: ") and proc.stderr.count("\n") == 1
    assert "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("url, words", [
    ("postgresql://sweeper:secret@db-host/sweeps", ["needs the psycopg driver", "pip install 'psycopg[binary]'", "***"]),
    ("postgresql+psycopg2://sweeper@db-host/sweeps", ["needs the psycopg2 driver", "pip install 'psycopg2-binary'"]),
    ("mysql+pymysql://sweeper@db-host/sweeps", ["pip install 'PyMySQL'"]),
    ("nosuchdb://db-host/sweeps", ["not a database URL SQLAlchemy knows", "postgresql://"]),
])
def test_storage_url_without_its_driver_fails_at_once_naming_the_package(workdir, monkeypatch, url, words):
    """Before: ~6 s of retries, then "Failed to import DB access module". Now: no retry, the pip package named.
    The driver is made missing (an entry of None in sys.modules fails its import), installed or not."""
    for module in ("psycopg", "psycopg2", "pymysql"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(storage.time, "sleep", lambda s: pytest.fail("retried a configuration error"))
    with pytest.raises(schema.ConfigError) as info:
        storage.make_storage(url, workdir / "sweeps_runs" / "x")
    for word in words:
        assert word in str(info.value), str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.slow
def test_a_lock_left_by_a_killed_agent_is_released_and_the_sweep_goes_on(workdir):
    """An agent killed while holding the journal's lock leaves Optuna's lock symlink behind. The journal path is
    absolute, so the link points at a real file, Optuna's grace period (30 s) finds it stale and the next agent
    runs; with the relative default path the link dangled and every later agent spun on it forever."""
    path = write_sweep(workdir, {"x": {"values": [1]}})
    journal = storage.make_storage(None, Path("sweeps_runs") / "sweep")._backend._file_path
    assert os.path.isabs(journal)
    os.symlink(journal, journal + ".lock")  # what Optuna's JournalFileSymlinkLock leaves when its holder dies
    proc = subprocess.run(agent_cmd(path, "--count", "1"), capture_output=True, text=True, timeout=120, cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished" in proc.stdout


@pytest.mark.slow
def test_bayes_sweep_of_run_mlm_finishes_offline_and_reuses_the_cache(workdir, text_corpus, monkeypatch):
    """The real thing, end to end: 4 bayes trials of run_mlm.py (tiny BERT, 3 steps each), each reporting
    through its metrics file; trials after the first load the tokenizer and tokenized data from the cache."""
    from conftest import TINY_BERT

    monkeypatch.setenv("HF_SCRIPTS_CACHE", str(workdir / "cache"))  # empty: the first trial builds it

    cfg = {
        "program": str(ROOT / "run_mlm.py"), "method": "bayes", "name": "mlm-bayes",
        "metric": {"name": "eval/loss", "goal": "minimize"},
        "parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                       "weight_decay": {"values": [0.0, 0.01]}},
        "command": ["${env}", "${interpreter}", "${program}", "${args}", *TINY_BERT, "--max_steps=3",
                    f"--train_file={text_corpus / 'train.txt'}", f"--validation_file={text_corpus / 'validation.txt'}",
                    "--save_strategy=no", "--output_dir=${envvar:SWEEP_TRIAL_DIR}"],
    }
    path = workdir / "mlm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = run(path, "--count", "4")
    assert [r["state"] for r in result.records] == ["finished"] * 4, [r.get("log_tail") for r in result.records]
    assert all(math.isfinite(r["value"]) for r in result.records)
    assert result.best["value"] == min(r["value"] for r in result.records)
    out = workdir / "sweeps_runs" / "mlm-bayes"
    for number in range(4):
        trial = out / f"trial-{number}"
        records = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
        assert any("eval/loss" in r for r in records) and any("train/seconds_to_first_step" in r for r in records)
        assert (trial / "all_results.json").is_file()  # the trial's own output_dir
        log = (trial / "log.txt").read_text()
        if number == 0:
            assert "Trained a tokenizer (wordpiece" in log and "Saved tokenized data to cache" in log
        else:
            assert "Loaded the tokenizer trained earlier" in log and "Loaded tokenized data from cache" in log
