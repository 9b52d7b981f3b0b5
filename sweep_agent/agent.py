"""The agent loop: claims trials of the shared study, runs them, and keeps the study's bookkeeping."""
from __future__ import annotations

import itertools
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .hyperband import WandbHyperbandPruner
from .liveness import HEARTBEAT_SECONDS, _given_up_at, _pid_alive, _process_space
from .report import report
from .runs import (KILL_TIMEOUT, POLL_SECONDS, TrialMetrics, _die_with_parent, _fmt, _log_tail, _params_text,
                   prepare_run, stop_process)
from .schema import Sweep
from .space import sample_params
from .storage import missing_grid_points, queue_grid_point

# Mirrors wandb agent: 3 failures in the first 60 s is "flapping"; 5 failures with at most one success is "failing".
FLAPPING_SECONDS, FLAPPING_FAILURES, MAX_INITIAL_FAILURES = 60, 3, 5
GRID_FINISHED = "grid finished: every point has been run or is running"
PRUNE_RECHECK_SECONDS = 5.0  # thresholds tighten as other runs report, so re-check now and then


@dataclass
class SweepResult:
    records: list  # the trials this agent ran, in order
    best: dict | None  # best finished trial of the whole study
    stop_reason: str
    exit_code: int
    sweep_dir: Path
    study_name: str


class Agent:
    def __init__(self, sweep: Sweep, study, sweep_dir: Path, study_name: str, count=None,
                 kill_timeout=KILL_TIMEOUT, grid=None, plots=True):
        self.sweep, self.study, self.dir, self.study_name = sweep, study, sweep_dir, study_name
        self.count, self.kill_timeout, self.grid, self.plots = count, kill_timeout, grid, plots
        self.host = f"{socket.gethostname()}/{_process_space()}"
        self.agent_id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.records: list[dict] = []
        self.failed = 0
        self.started = time.time()
        self.signal = None  # set by the first Ctrl-C / SIGTERM
        self.warned_blind = False  # said that a trial logged nothing we can read
        self.pruned_at = None  # the iteration at which hyperband stopped the last pruned trial

    # ----- shared-study bookkeeping
    def _trials(self, states=None):
        return self.study.get_trials(deepcopy=False, states=states)

    def _counted(self, t) -> bool:
        return t.state != TrialState.WAITING and not t.user_attrs.get("sweep_discount")

    def _requeue(self, t):
        """Queue an unfinished trial's parameters again: the next trial of the study (any agent's) runs them."""
        index = t.user_attrs.get("sweep_grid_index")
        if self.grid is not None and index is not None:
            queue_grid_point(self.study, self.sweep, self.grid, index)
        elif self.grid is None:
            self.study.enqueue_trial(dict(t.params), user_attrs={"sweep_requeued_from": t.number})

    def reap_dead_trials(self):
        """Fail and re-queue trials left RUNNING by agents that are gone."""
        now = time.time()
        for t in self._trials((TrialState.RUNNING,)):
            owner = t.user_attrs.get("sweep_agent")
            if owner == self.agent_id:
                continue
            dead = now > _given_up_at(t)
            host, pid, _ = (owner or "::").rsplit(":", 2)
            if host == self.host and pid.isdigit():  # same machine: no need to wait
                dead = dead or not _pid_alive(int(pid))
            if not dead:
                continue
            storage = self.study._storage  # attrs of a trial this process did not ask for
            try:
                storage.set_trial_user_attr(t._trial_id, "sweep_state", "lost")
                storage.set_trial_user_attr(t._trial_id, "sweep_discount", True)
                self.study.tell(t.number, state=TrialState.FAIL)
            except Exception:  # another agent got there first
                continue
            self._requeue(t)
            print(f"  trial {t.number} was left running by a dead agent ({owner or 'unknown'}); "
                  f"marked lost and re-queued")

    def _target_reached(self) -> bool:
        target = self.sweep.target
        if target is None:
            return False
        better = (lambda v: v <= target) if self.sweep.goal == "minimize" else \
            (lambda v: v >= target)
        for t in self._trials():
            values = list(t.intermediate_values.values())
            if t.state == TrialState.COMPLETE and t.value is not None:
                values.append(t.value)
            if any(math.isfinite(v) and better(v) for v in values):
                return True
        return False

    def _stop_reason(self) -> str | None:
        if self._target_reached():
            return f"metric.target {self.sweep.target} reached"
        trials = self._trials()
        if self.sweep.run_cap and sum(map(self._counted, trials)) >= self.sweep.run_cap:
            return f"run_cap {self.sweep.run_cap} reached"
        if self.grid is not None and not any(t.state == TrialState.WAITING for t in trials):
            return GRID_FINISHED + self._held_elsewhere(trials)
        return None

    def _held_elsewhere(self, trials) -> str:
        """The grid points other agents still run, and until when each stays theirs if their heartbeat stops."""
        held = []
        for t in trials:
            if t.state == TrialState.RUNNING and t.user_attrs.get("sweep_agent") != self.agent_id:
                until = time.strftime("%H:%M:%S", time.localtime(_given_up_at(t)))
                held.append(f"trial {t.number} (grid point {t.user_attrs.get('sweep_grid_index')}, agent "
                            f"{t.user_attrs.get('sweep_agent', '?')}; re-queued at {until} if its heartbeat stops)")
        return ("; still running elsewhere: " + ", ".join(held) + ". Start an agent after that to run any "
                "point whose agent died") if held else ""

    def _requeue_missing_points(self) -> int:
        """Queue again the grid points that no trial holds (queued, running, or run to an end that counts): an
        agent killed between failing a lost or interrupted trial and queueing it again dropped them. Returns how
        many; a point that two agents queue again at once runs once (see _point_taken)."""
        missing = missing_grid_points(self._trials(), len(self.grid))
        for index in missing:
            queue_grid_point(self.study, self.sweep, self.grid, index)
        if missing:
            print(f"  grid points {', '.join(map(str, missing))} had no trial (an agent died re-queueing them); "
                  f"queued again")
        return len(missing)

    def _orphans(self) -> list:
        """Running trials no agent named itself on: their agent died as it took them. Unlike points held by live
        agents elsewhere, they come back soon (OWNERLESS_SECONDS), so an agent with nothing else to run waits."""
        return [t for t in self._trials((TrialState.RUNNING,)) if not t.user_attrs.get("sweep_agent")]

    def _discard(self, trial, requeue: bool):
        trial.set_user_attr("sweep_discount", True)
        self.study.tell(trial, state=TrialState.FAIL)
        if requeue:
            self._requeue(trial)

    def _point_taken(self, trial, index) -> bool:
        """Whether another trial runs or ran this grid point. Agents that join while the grid is being queued can
        queue a point twice; the copy is dropped here, so no point runs twice (of two copies started at the same
        moment, the earlier start, then the lower number, runs)."""
        mine = (trial.datetime_start, trial.number)
        return any(t.number != trial.number and t.user_attrs.get("sweep_grid_index") == index
                   and t.state != TrialState.WAITING and not t.user_attrs.get("sweep_discount")
                   and (t.datetime_start, t.number) < mine for t in self._trials())

    def _claim(self):
        """Ask for a trial; returns (trial, None) or (None, reason to stop)."""
        while True:
            trial = self.study.ask()
            trial.set_user_attr("sweep_agent", self.agent_id)
            grid_index = trial.user_attrs.get("sweep_grid_index")
            if self.grid is not None and grid_index is None:  # the queue ran dry under us
                self._discard(trial, requeue=False)
                return None, self._stop_reason() or GRID_FINISHED
            if grid_index is None or not self._point_taken(trial, grid_index):
                break
            self._discard(trial, requeue=False)
            print(f"  trial {trial.number}: grid point {grid_index} was queued twice; it runs in another trial")
        if self.sweep.run_cap:
            earlier = sum(self._counted(t) for t in self._trials() if t.number < trial.number)
            if earlier >= self.sweep.run_cap:  # another agent took the last slot
                self._discard(trial, requeue=True)
                return None, f"run_cap {self.sweep.run_cap} reached"
        return trial, None

    # ----- one trial
    def _trial_dir(self, number: int) -> Path:
        for k in itertools.count():
            path = self.dir / (f"trial-{number}" if k == 0 else f"trial-{number}-{k}")
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:  # left by another study in this folder: keep it
                continue

    def run_trial(self, trial) -> dict:
        sweep = self.sweep
        params = sample_params(trial, sweep.params, grid=self.grid is not None)
        tdir = self._trial_dir(trial.number).resolve()
        argv, env = prepare_run(tdir, params, sweep, f"{self.study_name}-trial-{trial.number}")
        metrics_file, log_file = tdir / "metrics.jsonl", tdir / "log.txt"
        for key, value in dict(sweep_params=params, sweep_dir=str(tdir), sweep_heartbeat=time.time(),
                               sweep_state="running").items():  # sweep_agent: set by _claim
            trial.set_user_attr(key, value)
        self._line(trial.number, "started", None, None, params)

        start = time.time()
        tail = TrialMetrics(metrics_file, tdir, sweep.metric, env["WANDB_RUN_ID"])
        pruner = self.study.pruner if isinstance(self.study.pruner, WandbHyperbandPruner) else None
        state, rc, note = None, None, ""
        with open(log_file, "wb") as log:
            try:
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent
                                        if sys.platform.startswith("linux") else None)
            except OSError as e:
                log.write(f"sweep agent: cannot start {argv[0]!r}: {e}\n".encode())
                proc, rc = None, 127
        if proc is not None:
            try:
                state, rc = self._watch(trial, proc, tail, pruner)
            except KeyboardInterrupt:  # Ctrl-C twice: no grace period
                self.signal = self.signal or signal.SIGINT
                stop_process(proc, timeout=0)
                state, rc = "interrupted", proc.returncode
        tail.poll(final=True)
        duration = time.time() - start
        value = tail.last
        if state is None:
            state = "finished" if rc == 0 else "failed"
        if state == "failed":
            self.failed += rc > 0  # as wandb agent: a run killed by a signal is not a failure of the program
            note = f"exit code {rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 else "")
        elif state == "pruned":
            band, threshold = pruner.last
            note = f"stopped by hyperband at iteration {self.pruned_at} (band {band}, " \
                   f"threshold {_fmt(threshold)})"
        elif state == "finished" and sweep.metric and value is None:
            note = f"{sweep.metric} was never logged" + (
                f" (it logged {', '.join(sorted(k for k in tail.keys if not k.startswith('_'))[:8])})"
                if tail.keys else "")
        record = dict(number=trial.number, state=state, value=value, iterations=tail.count,
                      exit_code=rc, duration_s=round(duration, 3), params=params, dir=str(tdir),
                      log_tail=_log_tail(log_file) if state == "failed" else "", note=note)
        self._finish(trial, record)
        self._line(trial.number, state, value, duration, params, note)
        if state == "failed":
            print("        " + "\n        ".join(record["log_tail"].splitlines()[-5:]))
        if state == "finished" and sweep.metric and not tail.keys and not self.warned_blind:
            self.warned_blind = True
            mode = os.environ.get("WANDB_MODE")
            print(f"  WARNING: trial {trial.number} logged nothing this agent can read, so bayes, hyperband and "
                  f"metric.target cannot see {sweep.metric}: no wandb run under {tdir / 'wandb'}"
                  + (f" (WANDB_MODE={mode} writes none; use offline or online)" if mode == "disabled" else "")
                  + " and nothing in $SWEEP_METRICS_FILE. Log it with wandb.log (after wandb.init) or append "
                  f"JSON lines such as {{\"{sweep.metric}\": 0.5}} to $SWEEP_METRICS_FILE", flush=True)
        return record

    def _watch(self, trial, proc, tail, pruner):
        last_beat = last_check = time.time()
        while True:
            rc = proc.poll()
            new = tail.poll()
            now = time.time()
            try:
                first = tail.count - len(new) + 1
                for i, value in enumerate(new):  # step = iteration number, as hyperband counts
                    trial.report(value, step=first + i)
                    # values arrive in bursts (wandb writes its history every few seconds): judge each one
                    if pruner and trial.should_prune():
                        stop_process(proc, self.kill_timeout)
                        self.pruned_at = first + i
                        return "pruned", proc.returncode
                if rc is not None:
                    return None, rc
                if self.signal is not None:
                    print(f"  stopping trial {trial.number} (SIGTERM, SIGKILL after "
                          f"{self.kill_timeout:g} s)")
                    stop_process(proc, self.kill_timeout)
                    return "interrupted", proc.returncode
                if pruner and tail.count and now - last_check > PRUNE_RECHECK_SECONDS:
                    last_check = now  # thresholds tighten as other runs report
                    if trial.should_prune():
                        stop_process(proc, self.kill_timeout)
                        self.pruned_at = tail.count
                        return "pruned", proc.returncode
                if now - last_beat > HEARTBEAT_SECONDS:
                    trial.set_user_attr("sweep_heartbeat", now)
                    last_beat = now
            except optuna.exceptions.UpdateFinishedTrialError:
                # We missed heartbeats (agent suspended?) and another agent re-queued the trial.
                print(f"  trial {trial.number} was marked lost by another agent; stopping it")
                stop_process(proc, self.kill_timeout)
                return "lost", proc.returncode
            time.sleep(POLL_SECONDS)

    def _finish(self, trial, record):
        state, value = record["state"], record["value"]
        attrs = dict(sweep_state=state, sweep_value=value, sweep_exit_code=record["exit_code"],
                     sweep_duration_s=record["duration_s"], sweep_iterations=record["iterations"],
                     sweep_log_tail=record["log_tail"][-2000:])
        if state == "interrupted":
            attrs["sweep_discount"] = True  # did not run to the end: resume runs it again
        if state == "lost":
            return  # already recorded by the agent that took it over
        try:
            for key, val in attrs.items():
                trial.set_user_attr(key, val)
            if state == "pruned":
                self.study.tell(trial, state=TrialState.PRUNED)
            elif state == "finished" and not self.sweep.metric:
                self.study.tell(trial, 0.0)  # optuna needs a value; without a metric it is moot
            elif state == "finished" and value is not None and math.isfinite(value):
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        except Exception as e:  # e.g. another agent took us for dead and failed the trial
            print(f"  warning: could not record trial {trial.number} in the study: {e}")
            return
        if state == "interrupted":
            self._requeue(trial)

    def _failure_guard(self) -> str | None:
        ran = len(self.records)
        flapping = os.environ.get("WANDB_AGENT_DISABLE_FLAPPING") != "true"
        max_initial = int(os.environ.get("WANDB_AGENT_MAX_INITIAL_FAILURES", MAX_INITIAL_FAILURES))
        last = self.records[-1]["dir"] + "/log.txt" if self.records else ""
        if flapping and time.time() - self.started < FLAPPING_SECONDS \
                and self.failed >= FLAPPING_FAILURES:
            return (f"{self.failed} runs failed within {FLAPPING_SECONDS} s of starting; the "
                    f"program looks broken, see {last}")
        if self.failed >= max_initial and self.failed >= ran - 1:
            return f"{self.failed} of the first {ran} runs failed; see {last}"
        return None

    # ----- output
    def _line(self, number, state, value, duration, params, note=""):
        dur = "-" if duration is None else f"{duration:.1f}s"
        value = "-" if value is None else _fmt(value)
        extra = f"  [{note}]" if note else ""
        print(f"{number:>6}  {state:<11} {value:>12} {dur:>8}  {_params_text(params)}{extra}",
              flush=True)

    def run(self) -> SweepResult:
        s = self.sweep
        goal = f"{s.goal} {s.metric}" if s.metric else "no metric"
        print(f"sweep {s.name!r}: {s.method}, {goal}; study {self.study_name!r}; "
              f"dir {self.dir}")
        for note in s.notes:
            print(f"  note: {note}")
        print(f"{'trial':>6}  {'state':<11} {(s.metric or 'metric')[-12:]:>12} {'time':>8}  "
              f"params", flush=True)
        reason, exit_code = None, 0
        try:
            while self.signal is None:
                if self.count is not None and len(self.records) >= self.count:
                    reason = f"--count {self.count} reached"
                    break
                self.reap_dead_trials()
                trial, reason = None, self._stop_reason()
                if not reason:
                    trial, reason = self._claim()
                if trial is None and reason.startswith(GRID_FINISHED):
                    if self._requeue_missing_points():
                        continue
                    if self._orphans():
                        time.sleep(1)  # an orphaned point is re-queued within OWNERLESS_SECONDS: stay to run it
                        continue
                if trial is None:
                    break
                self.records.append(self.run_trial(trial))
                reason = self._failure_guard()
                if reason:
                    exit_code = 1
                    break
        except KeyboardInterrupt:  # the second Ctrl-C: stop at once
            self.signal = self.signal or signal.SIGINT
        if self.signal is not None:
            reason, exit_code = "interrupted", 128 + int(self.signal)
        return self._summary(reason or "done", exit_code)

    def _summary(self, reason, exit_code) -> SweepResult:
        print(f"\nstopped: {reason}")
        best = report(self.study, self.sweep, self.records, self.dir, self.plots)
        return SweepResult(self.records, best, reason, exit_code, self.dir, self.study_name)
