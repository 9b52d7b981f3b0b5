"""Benchmark: what a sweep trial pays before it trains, the seconds from its launch to its first training step.

    python benchmarks/sweep_overhead.py             # 3 trials
    python benchmarks/sweep_overhead.py --trials 5

Runs the offline agent (`python sweep.py SWEEP.yaml --count N --sweep-dir DIR`) on a small generated grid
sweep of run_mlm.py shaped like sweeps/mlm_lr_wd.yaml (default model, embedded corpus, tokenizer trained on
the fly, batch 16), a few steps per trial, with an empty cache folder: the first trial builds the raw-data
cache, trains the tokenizer and tokenizes; later trials load all three. Each trial's
`train/seconds_to_first_step` (train_utils.ThroughputCallback: process start to the end of the first
optimizer step) is read from its metrics.jsonl. The import time of run_mlm.py is measured on its own, as
the floor no cache can remove. Other code can call `run(quick=False, trials=3)`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

from mlm_throughput import offline_env  # noqa: E402

METRIC = "train/seconds_to_first_step"


def sweep_config(cache_dir, steps):
    return {
        "program": "run_mlm.py",
        "method": "grid",
        "metric": {"name": "eval/loss", "goal": "minimize"},
        "parameters": {"learning_rate": {"values": [5e-4, 1e-3, 2e-3, 3e-3, 5e-3]}},
        "command": ["${env}", "${interpreter}", "${program}", "${args}", f"--max_steps={steps}",
                    "--per_device_train_batch_size=16", "--per_device_eval_batch_size=16", "--max_eval_samples=64",
                    "--logging_steps=1", "--save_strategy=no", "--report_to=none", "--disable_tqdm=True",
                    f"--cache_dir={cache_dir}", "--output_dir=${envvar:SWEEP_TRIAL_DIR}/out"],
    }


def import_seconds(env):
    """(wall, CPU) seconds to import run_mlm.py in a fresh interpreter, the second of two tries (files cached).
    The CPU figure is what an idle machine would roughly take; the wall one includes waiting for a core."""
    code = ("import time; t, c = time.perf_counter(), time.process_time(); import run_mlm; "
            "print(time.perf_counter() - t, time.process_time() - c)")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             check=True)
        wall, cpu = map(float, out.stdout.strip().splitlines()[-1].split())
    return wall, cpu


def run(quick=False, trials=3, steps=3, work_dir=None):
    """Run the sweep; returns each trial's seconds to first step and wall seconds, and the import floor."""
    scratch = tempfile.mkdtemp(prefix="sweep_bench_", dir=work_dir)
    try:
        cache = os.path.join(scratch, "cache")
        env = offline_env(cache)
        config_path = os.path.join(scratch, "sweep.yaml")
        with open(config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(sweep_config(cache, steps), f, sort_keys=False)
        sweep_dir = os.path.join(scratch, "sweep")
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "sweep.py", config_path, "--count", str(trials), "--sweep-dir", sweep_dir,
                               "--no-plots"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        agent_seconds = time.perf_counter() - start
        rows = []
        for number in range(trials):
            trial_dir = os.path.join(sweep_dir, f"trial-{number}")
            row = {"trial": number, "seconds_to_first_step": None}
            metrics = os.path.join(trial_dir, "metrics.jsonl")
            if os.path.isfile(metrics):
                with open(metrics, encoding="utf-8") as f:
                    records = [json.loads(line) for line in f if line.strip()]
                row["seconds_to_first_step"] = next((r[METRIC] for r in records if METRIC in r), None)
                row["eval_loss"] = next((r["eval/loss"] for r in reversed(records) if "eval/loss" in r), None)
            rows.append(row)
        if proc.returncode != 0 or any(r["seconds_to_first_step"] is None for r in rows):
            logs = [os.path.join(sweep_dir, f"trial-{n}", "log.txt") for n in range(trials)]
            tail = ""
            for log in logs:
                if os.path.isfile(log):
                    with open(log, encoding="utf-8", errors="replace") as f:
                        tail += f"--- {os.path.basename(os.path.dirname(log))}\n" + "".join(f.readlines()[-8:])
            raise RuntimeError(f"sweep.py exited with {proc.returncode} or a trial logged no {METRIC}:\n"
                               f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}\n{tail}")
        later = [r["seconds_to_first_step"] for r in rows[1:]]
        import_wall, import_cpu = import_seconds(env)
        return {
            "trials": rows, "steps_per_trial": steps, "agent_seconds": agent_seconds,
            "first_trial_seconds": rows[0]["seconds_to_first_step"],
            "later_trials_max_seconds": max(later) if later else None,
            "import_seconds": import_wall, "import_cpu_seconds": import_cpu, "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "setup": "run_mlm.py, default model (configs/bert-tiny.json), embedded corpus, WordPiece tokenizer "
                     f"trained on the fly, batch 16, {steps} steps, grid over learning_rate, fresh cache folder",
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    result = run(trials=args.trials, steps=args.steps)
    for row in result["trials"]:
        print(f"trial {row['trial']}: first step after {row['seconds_to_first_step']:.1f} s")
    print(f"import run_mlm: {result['import_seconds']:.1f} s ({result['import_cpu_seconds']:.1f} s CPU); "
          f"agent total {result['agent_seconds']:.0f} s")


if __name__ == "__main__":
    main()
