"""Running one program: reading what it logs, stopping it, and naming the process space it runs in."""
from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import subprocess
from pathlib import Path

from .schema import _is_num

KILL_TIMEOUT = 30.0
FLAPPING_SECONDS, FLAPPING_FAILURES, MAX_INITIAL_FAILURES = 60, 3, 5
POLL_SECONDS = 0.2


class MetricsTail:
    """Reads the records a run appends to metrics.jsonl, a complete line at a time."""

    def __init__(self, path: Path, metric: str | None):
        self.path, self.metric = path, metric
        self.offset, self.count, self.last = 0, 0, None

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
            value = record.get(self.metric) if isinstance(record, dict) else None
            if not _is_num(value):
                continue
            self.last = float(value)
            if math.isfinite(value):
                self.count += 1
                new.append(float(value))
        return new


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


def _first_line_of(*paths) -> str:
    """The first 12 characters of the first of these files that can be read ("" if none)."""
    for path in paths:
        try:
            return Path(path).read_text().strip()[:12]
        except OSError:
            pass
    return ""


def _process_space() -> str:
    """Where a pid means the same process: the machine (machine-id), its boot (cloned VMs share a machine-id, not
    a boot id) and the PID namespace (containers share both). Agents that differ here judge each other only by
    heartbeat, never by whether a pid exists."""
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        pid_namespace = ""
    return "/".join((_first_line_of("/etc/machine-id", "/var/lib/dbus/machine-id"),
                     _first_line_of("/proc/sys/kernel/random/boot_id"), pid_namespace))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
