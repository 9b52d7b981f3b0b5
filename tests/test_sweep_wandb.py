"""The sweep agent reads what any W&B program logs (issue 20, item 3): a plain wandb.init + wandb.log program
and a Hugging Face Trainer with report_to="wandb" run as bayes sweeps with hyperband, unchanged, in wandb's
offline mode; the agent reads their history from the run's own transaction log (the .wandb file)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sweep  # noqa: E402
from sweep_agent.runs import WandbTail  # noqa: E402
from test_sweep_agent import load_trials  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def write(folder, program, parameters, **extra):
    cfg = {"program": str(FIXTURES / program), "method": "bayes", "parameters": parameters,
           "metric": {"name": "eval/loss", "goal": "minimize"}, **extra}
    path = Path(folder) / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_wandb_file_is_read_as_it_grows_across_blocks_and_torn_writes(tmp_path):
    """3,000 rows (1.5 MB: records cross 32 KiB blocks) read from a file that grows by random amounts, cut
    mid-record and mid-block: every value once, in order; the summary set at the end is the run's result."""
    pytest.importorskip("wandb")
    log = ("import wandb; run = wandb.init(project='p', id='growing')\n"
           "for i in range(3000): run.log({'eval/loss': 1.0 / (i + 1), 'text': 'x' * (i % 97), 'nested': {'step': i}})\n"
           "run.summary['eval/loss'] = 0.25; run.finish()")
    (tmp_path / "run").mkdir()  # in a process of its own: wandb.init leaves its service's address in os.environ
    subprocess.run([sys.executable, "-c", log], check=True, capture_output=True,
                   env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "run")})
    expected = [1.0 / (i + 1) for i in range(3000)]
    full = next((tmp_path / "run").glob("wandb/offline-run-*/run-growing.wandb")).read_bytes()
    assert len(full) > 40 * 32768

    target = tmp_path / "copy" / "wandb" / "offline-run-x-growing" / "run-growing.wandb"
    target.parent.mkdir(parents=True)
    tail, seen, cut, rng = WandbTail(tmp_path / "copy", "eval/loss", "growing"), [], 0, random.Random(0)
    while cut < len(full):
        cut = min(len(full), cut + rng.randint(1, 70_000))
        target.write_bytes(full[:cut])
        seen += tail.poll(final=cut == len(full))
    assert seen == expected
    assert tail.count == 3000 and tail.last == 0.25
    assert {"eval/loss", "text", "nested.step"} <= tail.keys


def test_a_plain_wandb_log_program_runs_as_a_bayes_sweep_with_hyperband(workdir, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # what a process that ran wandb.init leaves in its environment: runs must not inherit it (they failed to connect)
    monkeypatch.setenv("WANDB_SERVICE", "3-99999-unix-/tmp/wandb-service-long-gone/socket")
    path = write(workdir, "wandb_log_program.py", {"x": {"min": 0.0, "max": 1.0}, "epochs": {"value": 6},
                                                   "sleep": {"value": 0.7}},
                 early_terminate={"type": "hyperband", "min_iter": 2, "eta": 3})
    result = sweep.main([str(path), "--no-plots", "--count", "5", "--seed", "0"])
    out = capsys.readouterr().out
    trials = load_trials(workdir / "sweeps_runs" / "sweep")
    finished = [t for t in trials if t["state"] == "finished"]
    for t in finished:  # the program's own curve: (x - 0.3)^2 + 1/epoch, last logged at epoch 6
        assert float(t["eval/loss"]) == pytest.approx((float(t["x"]) - 0.3) ** 2 + 1 / 6, abs=1e-12)
        assert t["iterations"] == "6"
    best = min(finished, key=lambda t: float(t["eval/loss"]))
    assert result.best["number"] == int(best["trial"])
    assert f"best: trial {best['trial']}, eval/loss={float(best['eval/loss']):.6g}" in out
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned and "stopped by hyperband at iteration 2 " in out  # judged while it ran, at the first band


def test_a_trainer_with_report_to_wandb_runs_as_a_bayes_sweep_with_hyperband(workdir, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = write(workdir, "trainer_wandb_program.py",
                 {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 0.3}},
                 early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2},
                 command=["${env}", "${interpreter}", "${program}", "${args}", "--output_dir=${envvar:SWEEP_TRIAL_DIR}"])
    result = sweep.main([str(path), "--no-plots", "--count", "3", "--seed", "0"])
    out = capsys.readouterr().out
    trials = load_trials(workdir / "sweeps_runs" / "sweep")
    assert [t["state"] for t in trials].count("failed") == 0
    for t in trials:
        if t["state"] == "finished":
            evals = [r["eval_loss"] for r in json.loads((Path(t["dir"]) / "log_history.json").read_text())
                     if "eval_loss" in r]
            assert float(t["eval/loss"]) == pytest.approx(evals[-1], rel=1e-6) and t["iterations"] == str(len(evals))
    finished = [t for t in trials if t["state"] == "finished"]
    best = min(finished, key=lambda t: float(t["eval/loss"]))
    assert result.best["number"] == int(best["trial"]) and f"best: trial {best['trial']}," in out


def test_a_program_that_logs_nothing_readable_is_reported_loudly_once(workdir, capsys):
    """WANDB_MODE=disabled (the test default) writes no run files: the agent says so after the first trial."""
    path = write(workdir, "wandb_log_program.py", {"x": {"values": [0.0, 0.5]}, "epochs": {"value": 1}},
                 method="grid")
    result = sweep.main([str(path), "--no-plots"])
    out = capsys.readouterr().out
    assert out.count("WARNING: trial 0 logged nothing this agent can read") == 1
    assert "WANDB_MODE=disabled writes none" in out and out.count("WARNING") == 1
    assert result.best is None and "eval/loss was never logged" in out


def test_a_program_that_logs_other_names_is_told_which(workdir, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = write(workdir, "wandb_log_program.py", {"epochs": {"value": 1}}, method="grid",
                 metric={"name": "eval/accuracy", "goal": "maximize"})
    sweep.main([str(path), "--no-plots"])
    out = capsys.readouterr().out
    assert "eval/accuracy was never logged (it logged eval/loss, train.epoch)" in out and "WARNING" not in out
