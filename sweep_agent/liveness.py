"""Who runs a trial, and whether it is still alive: an agent's process space, its pid, its heartbeat.

The heartbeat is the agent's own (a trial user attribute), the same on every storage: Optuna's heartbeat exists
only in RDBStorage and only inside Study.optimize (Study.ask warns that it "is supposed to be used with
Study.optimize"), while the agent asks and tells to run programs of its own."""
from __future__ import annotations

import os
from pathlib import Path

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # no heartbeat for this long: the agent that ran the trial is gone
OWNERLESS_SECONDS = 30.0  # a running trial no agent has named itself on for this long was orphaned when taken


def _given_up_at(t) -> float:
    """When a running trial is taken for dead: STALE_SECONDS after its agent's last heartbeat, or, when no agent
    named itself on it (agents do right after taking a trial), OWNERLESS_SECONDS after it was taken."""
    if t.user_attrs.get("sweep_agent"):
        return (t.user_attrs.get("sweep_heartbeat") or t.datetime_start.timestamp()) + STALE_SECONDS
    return t.datetime_start.timestamp() + OWNERLESS_SECONDS


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
