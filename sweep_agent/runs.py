"""Running one program: reading what it logs (its wandb run file or $SWEEP_METRICS_FILE) and stopping it."""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shlex
import signal
import subprocess
import uuid
from pathlib import Path

import yaml

from .schema import _is_num
from .space import render_command

KILL_TIMEOUT = 30.0  # wandb agent's grace between SIGTERM and SIGKILL
POLL_SECONDS = 0.2
WANDB_FLUSH_SECONDS = "2"  # how often a run's wandb writes its history to disk (wandb's default: 15 s)


def prepare_run(tdir: Path, params: dict, sweep, name: str) -> tuple[list[str], dict]:
    """Write a trial's files (params.json, wandb's sweep config, metrics.jsonl, command.txt) in its folder and
    return its command line and environment (the contract in sweep.py's docstring)."""
    params_file, wandb_config, metrics_file = tdir / "params.json", tdir / "wandb-sweep-config.yaml", tdir / "metrics.jsonl"
    params_file.write_text(json.dumps(params))
    wandb_config.write_text("wandb_version: 1\n\n" + yaml.safe_dump(  # the format wandb agent writes
        {k: {"value": v} for k, v in params.items()}, sort_keys=False))
    metrics_file.touch()
    env = dict(os.environ)
    env.pop("WANDB_SERVICE", None)  # the address of some other process's wandb service: each run starts its own
    env.update(SWEEP_METRICS_FILE=str(metrics_file), SWEEP_TRIAL_DIR=str(tdir), WANDB_NAME=name,
               WANDB_RUN_ID=f"{re.sub(r'[^A-Za-z0-9_-]+', '-', name)[-40:]}-{uuid.uuid4().hex[:6]}",
               WANDB_SWEEP_PARAM_PATH=str(wandb_config), WANDB_DIR=str(tdir))
    env.setdefault("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", WANDB_FLUSH_SECONDS)  # so we see values while it runs
    env.setdefault("PYTHONUNBUFFERED", "1")  # so log.txt follows the run live
    for key in ("project", "entity"):
        if key in sweep.config:
            env.setdefault(f"WANDB_{key.upper()}", sweep.config[key])
    argv = render_command(sweep.command, sweep.program, params, args_json_file=params_file, environ=env)
    (tdir / "command.txt").write_text(shlex.join(argv) + "\n")
    return argv, env


class _Tail:
    """What a run has logged so far: `count` finite values of the metric (one per logged record: the iterations
    hyperband counts), `last` its last value (the run's result, as W&B's summary), `keys` every name logged."""

    def __init__(self, metric: str | None):
        self.metric, self.count, self.last, self.keys = metric, 0, None, set()

    def _take(self, record: dict, new: list):
        self.keys.update(record)
        value = record.get(self.metric)
        if _is_num(value):
            self.last = float(value)
            if math.isfinite(value):
                self.count += 1
                new.append(float(value))


class MetricsTail(_Tail):
    """Reads the records a run appends to $SWEEP_METRICS_FILE (JSON lines), a complete line at a time."""

    def __init__(self, path: Path, metric: str | None):
        super().__init__(metric)
        self.path, self.offset = path, 0

    def poll(self, final=False) -> list[float]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        end = len(chunk) if final else chunk.rfind(b"\n") + 1
        self.offset += end
        new = []
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._take(record, new)
        return new


class WandbTail(_Tail):
    """Reads what a run logs with wandb.log from its transaction log, <WANDB_DIR>/wandb/*run-*/run-<id>.wandb,
    which wandb writes in offline and online mode alike (and flushes every x_transaction_log_flush_interval s).

    The file: a 7-byte header, then blocks of 32 KiB holding records, each a 7-byte head (CRC-32 of type and
    data, data length, type: 1 whole, 2/3/4 first/middle/last piece) and a serialized wandb Record; a block's
    last < 7 bytes are padding. History records are the logged rows; summary records set the run's summary,
    whose metric value (the last logged, unless the program set the summary itself) is the run's result."""

    HEADER, BLOCK, HEAD = 7, 32768, 7

    def __init__(self, wandb_dir: Path, metric: str | None, run_id: str | None = None):
        super().__init__(metric)
        self.wandb_dir, self.run_id = wandb_dir, run_id
        self.path, self.offset, self.pieces, self.summary = None, self.HEADER, b"", None

    def _find(self):
        files = [p for p in self.wandb_dir.glob("wandb/*run-*/run-*.wandb") if p.parent.name != "latest-run"]
        ours = [p for p in files if p.name == f"run-{self.run_id}.wandb"]
        return max(ours or files, key=lambda p: p.stat().st_mtime, default=None)

    def poll(self, final=False) -> list[float]:
        import zlib

        from wandb.proto import wandb_internal_pb2

        self.path = self.path or self._find()
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except (OSError, TypeError):
            return []
        new, pos = [], 0
        while True:
            room = self.BLOCK - (self.offset + pos) % self.BLOCK
            if room < self.HEAD:
                if pos + room > len(data):
                    break
                pos += room
                continue
            head = data[pos:pos + self.HEAD]
            if len(head) < self.HEAD:
                break
            crc, length, kind = int.from_bytes(head[:4], "little"), int.from_bytes(head[4:6], "little"), head[6]
            body = data[pos + self.HEAD:pos + self.HEAD + length]
            if len(body) < length or kind == 0:  # not flushed yet
                break
            if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
                break  # a torn write: read it again next time
            pos += self.HEAD + length
            self.pieces = body if kind in (1, 2) else self.pieces + body
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(self.pieces)
                self._take_record(record, new)
        self.offset += pos
        if final and self.summary is not None:
            self.last = self.summary
        return new

    def _take_record(self, record, new):
        kind = record.WhichOneof("record_type")
        items = record.history.item if kind == "history" else record.summary.update if kind == "summary" else ()
        row = {}
        for item in items:
            try:
                row[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
            except ValueError:
                continue
        if kind == "history":
            self._take(row, new)
        elif _is_num(row.get(self.metric)):
            self.summary = float(row[self.metric])


class TrialMetrics:
    """What a trial's program logs, from whichever of the two it writes first: $SWEEP_METRICS_FILE or wandb.log
    (a program that writes both, like this collection's scripts under report_to=wandb, is read once)."""

    def __init__(self, metrics_file: Path, wandb_dir: Path, metric: str | None, run_id: str | None):
        self.sources = [MetricsTail(metrics_file, metric), WandbTail(wandb_dir, metric, run_id)]
        self.source = None

    def poll(self, final=False) -> list[float]:
        if self.source is not None:
            return self.source.poll(final)
        for source in self.sources:
            new = source.poll(final)
            if source.keys:
                self.source = source
                return new
        return []

    @property
    def count(self) -> int:
        return self.source.count if self.source else 0

    @property
    def last(self) -> float | None:
        return self.source.last if self.source else None

    @property
    def keys(self) -> set:
        return self.source.keys if self.source else set()


def _die_with_parent():
    # Linux: the run gets SIGTERM if the agent is killed outright, instead of holding a GPU.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc, timeout=KILL_TIMEOUT):
    """SIGTERM the run's process group, SIGKILL it if still alive after `timeout` seconds."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    _signal_group(proc, signal.SIGKILL)  # stragglers (dataloader workers) in the group


def _log_tail(path: Path, lines=20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _flat(params: dict, prefix="") -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in _flat(params).items())
