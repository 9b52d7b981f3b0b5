#!/usr/bin/env python
"""Offline sweep agent: runs a W&B sweep YAML with Optuna instead of the W&B service.

    python sweep.py SWEEP.yaml --count N [--study-name NAME] [--storage URL] [--sweep-dir DIR]

Run it from the project root, like `wandb agent`. Start it several times (same machine: same
command; other machines: the same --storage DB URL) and the agents share one Optuna study.
Rerunning a command resumes its study.

What a run gets (the env var contract), and how the agent reads what it logs:
    WANDB_SWEEP_PARAM_PATH a wandb config YAML with the trial's parameters, as `wandb agent` sets
                           it: wandb.init() in the run then puts them in run.config.
    WANDB_DIR              <trial dir>: wandb writes the run's files there (offline or online mode),
                           and the agent reads what the run logs with wandb.log from its .wandb file,
                           as the run writes it (WANDB__TRANSACTION_LOG_FLUSH_INTERVAL=2 s unless set).
    SWEEP_METRICS_FILE     <trial dir>/metrics.jsonl, for programs without wandb: append one JSON
                           object per logged record, W&B names as keys ({"eval/loss": 1.9}).
                           A run is read from whichever of the two it writes first.
    SWEEP_TRIAL_DIR        <sweep dir>/trial-<number>/ (command.txt, params.json, log.txt, ...).
    WANDB_RUN_ID, WANDB_NAME   unique per trial.
The metric's value for a run is its summary value of metric.name: the LAST value it logged, unless it
set run.summary itself (W&B's rule). Hyperband counts one iteration per logged record that holds a
finite metric.name value. A run that logs nothing the agent can read is reported after it ends.

How agents share a sweep: the study lives in an Optuna storage (default: a journal file in the
sweep dir, safe for many processes on one machine; --storage URL for several machines). The agent
that creates the study queues every grid point as a WAITING trial (agents that join meanwhile wait while
it shows progress); agents pop them atomically, and a point queued twice (by an agent that took over
from one that died queueing) runs once. run_cap counts every trial that started, across agents. Each
running trial carries its agent's id and a heartbeat; a trial whose agent died (same machine, boot and
PID namespace: its pid is gone; elsewhere: no heartbeat for 5 minutes; killed before it named itself
on the trial: 30 s) is marked "lost" and its parameters re-queued. Ctrl-C marks the current trial
"interrupted" and re-queues it too, so rerunning the command resumes the sweep. Failed runs count
towards wandb agent's flapping and failing guards only when they exit with a code > 0, as there.
Each logged metric value is reported to Optuna as an intermediate value (step = iteration), and a
custom pruner applies W&B's hyperband rule to those values of all trials in the study.
Trial states: finished, failed, pruned, interrupted, lost.

Where this differs from W&B (deliberately):
  * q_* distributions without `q` give ints (q=1); W&B's schema default q=1.0 gives 32.0, which
    argparse type=int rejects. Quantized floats are rounded to 12 significant digits (0.3, not
    0.30000000000000004).
  * ${envvar:NAME} is resolved against the environment the run gets, so
    `--output_dir=${envvar:SWEEP_TRIAL_DIR}` gives each trial its own output folder. As in wandb,
    an unset NAME expands to the text NAME.
  * An unknown ${macro} is a config error (wandb silently drops it).
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import warnings
from pathlib import Path

import optuna

from sweep_agent.agent import Agent, SweepResult
from sweep_agent.config import load_sweep
from sweep_agent.hyperband import WandbHyperbandPruner
from sweep_agent.runs import KILL_TIMEOUT
from sweep_agent.schema import ConfigError
from sweep_agent.space import grid_points
from sweep_agent.storage import make_storage, open_study


def main(argv=None) -> SweepResult:
    parser = argparse.ArgumentParser(
        description="Run a W&B sweep YAML offline with Optuna (like `wandb agent`).")
    parser.add_argument("config", help="sweep YAML (W&B sweep config format)")
    parser.add_argument("--count", type=int, help="trials this agent runs (default: until the "
                        "sweep is done: grid exhausted, run_cap or metric.target reached)")
    parser.add_argument("--study-name", help="Optuna study name (default: the sweep's name or "
                        "the YAML file name)")
    parser.add_argument("--storage", help="Optuna DB URL shared by agents on several machines "
                        "(e.g. postgresql://...), or a journal file path (default: "
                        "<sweep dir>/optuna-journal.log)")
    parser.add_argument("--sweep-dir", help="where trial folders, trials.csv and plots go "
                        "(default: sweeps_runs/<study name>/)")
    parser.add_argument("--seed", type=int, help="sampler seed (give each agent its own)")
    parser.add_argument("--no-plots", action="store_true",
                        help="skip the PNG plots at the end (they take a few seconds)")
    parser.add_argument("--kill-timeout", type=float, default=KILL_TIMEOUT,
                        help="seconds between SIGTERM and SIGKILL when stopping a run")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be >= 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        sweep = load_sweep(args.config)
        study_name = args.study_name or re.sub(r"[^A-Za-z0-9_.-]+", "-", sweep.name)
        sweep_dir = Path(args.sweep_dir or Path("sweeps_runs") / study_name)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        grid = grid_points(sweep.params) if sweep.method == "grid" else None
        sampler = (optuna.samplers.TPESampler(seed=args.seed) if sweep.method == "bayes"
                   else optuna.samplers.RandomSampler(seed=args.seed))
        pruner = (WandbHyperbandPruner(**sweep.hyperband) if sweep.hyperband
                  else optuna.pruners.NopPruner())
        study = open_study(sweep, make_storage(args.storage, sweep_dir), study_name, sampler,
                           pruner, grid)
    except ConfigError as e:
        print(f"sweep config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    agent = Agent(sweep, study, sweep_dir, study_name, count=args.count,
                  kill_timeout=args.kill_timeout, grid=grid, plots=not args.no_plots)

    def on_signal(signum, frame):
        if agent.signal is not None:
            raise KeyboardInterrupt
        agent.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing up (again to force)", flush=True)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (embedded use): leave signals alone
            pass
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main().exit_code)
