"""Processes on this host, read from Linux's /proc: parents, identity across pid reuse, inherited markers.

`make down` uses it to stop everything a service started, including children that left the service's process
group (Prefect starts each flow run in its own session, and so does torchrun with its ranks). The crash
reconciler uses it to find a flow run's processes by the PREFECT__FLOW_RUN_ID that every one of them inherits.
Without /proc (macOS) every lookup finds nothing, and callers fall back to process groups.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
_POLL_S = 0.1


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    start_ticks: int  # /proc/<pid>/stat field 22; with the pid it names one process even after the pid is reused
    cmdline: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # only the variables the caller asked for

    @property
    def identity(self) -> tuple[int, int]:
        return self.pid, self.start_ticks


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start_ticks) of a live process; None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces and parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _read_env(pid: int, keys: Collection[str]) -> dict[str, str]:
    if not keys:
        return {}
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}  # another user's process, or already gone
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        name = key.decode("utf-8", errors="replace")
        if sep and name in keys:
            env[name] = value.decode("utf-8", errors="replace")
    return env


def read_process(pid: int, env_keys: Collection[str] = ()) -> ProcessInfo | None:
    """A live process (zombies count as gone: they only wait to be reaped), or None."""
    stat = _read_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return None
    state, ppid, start_ticks = stat
    try:
        raw_cmdline = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    cmdline = tuple(part.decode("utf-8", errors="replace") for part in raw_cmdline.split(b"\0") if part)
    return ProcessInfo(pid, ppid, start_ticks, cmdline, _read_env(pid, env_keys))


def list_processes(env_keys: Collection[str] = ()) -> list[ProcessInfo]:
    if not PROC.is_dir():
        return []
    found: list[ProcessInfo] = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            info = read_process(int(entry.name), env_keys)
            if info is not None:
                found.append(info)
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc; empty without /proc."""
    if not PROC.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for info in list_processes():
        children.setdefault(info.ppid, []).append(info.pid)
    found, pending = [], list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, []))
    return found


def processes_with_env(key: str, value: str) -> list[ProcessInfo]:
    """Live processes that inherited `key=value`; only this user's processes are readable, which is all we stop."""
    return [info for info in list_processes([key]) if info.env.get(key) == value]


def start_ticks(pid: int) -> int | None:
    stat = _read_stat(pid)
    return None if stat is None else stat[2]


def is_alive(pid: int, expected_start_ticks: int | None = None) -> bool:
    """Whether `pid` is running and, when /proc can tell, is still the process that was recorded."""
    if PROC.is_dir():
        stat = _read_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return expected_start_ticks is None or stat[2] == expected_start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def send_signal(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # exited meanwhile


def send_group_signal(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty (PermissionError: only zombies of another parent are left in it)


def wait_until_gone(processes: Collection[tuple[int, int | None]], timeout_s: float) -> list[tuple[int, int | None]]:
    """Wait up to `timeout_s` for (pid, start_ticks) processes to exit; returns those still running."""
    deadline = time.monotonic() + timeout_s
    remaining = [proc for proc in processes if is_alive(*proc)]
    while remaining and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        remaining = [proc for proc in remaining if is_alive(*proc)]
    return remaining


def terminate(processes: Collection[tuple[int, int | None]], grace_s: float) -> list[int]:
    """SIGTERM, then SIGKILL whatever still runs after `grace_s`. Returns the pids that needed SIGKILL."""
    alive = [proc for proc in processes if is_alive(*proc)]
    send_signal((pid for pid, _ in alive), signal.SIGTERM)
    stubborn = wait_until_gone(alive, grace_s)
    send_signal((pid for pid, _ in stubborn), signal.SIGKILL)
    wait_until_gone(stubborn, 5.0)
    return [pid for pid, _ in stubborn]
