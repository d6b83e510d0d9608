"""Lock files and lease records under the state directory.

Layout (all under one state dir per host):
    locks/<kind>-<id>.lock    flock'd exclusively by the lease holder: who holds it owns the card
    ports/<port>.lock         flock'd by the lease holder: its MASTER_PORT is reserved for it
    leases/<lease_id>.json    what the lease is (for display and to tell our processes from others)
    leases/<lease_id>.lock    flock'd by the holder while the lease lives; lockable by anyone else = holder died
    history.jsonl             one line per lease taken and per lease given back (a killed holder writes no
                              "released" line): which task held which cards when, after the fact

The kernel drops a flock when its holder dies, so a SIGKILLed holder's cards free themselves; its record is
recognised as stale because its .lock can be taken, and removed by whoever reads it next.
Lock files are never deleted while in use (deleting a lock file another process may be waiting on would let
two processes lock two different inodes under one name); only a dead lease's record .lock is removed.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from npu_sft.devices.errors import DeviceError
from npu_sft.devices.models import DeviceKind

DEVICE_LOCKS_SUBDIR = "locks"
PORT_LOCKS_SUBDIR = "ports"
LEASES_SUBDIR = "leases"
HISTORY_FILE = "history.jsonl"


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    kind: DeviceKind
    ids: tuple[int, ...]
    task: str
    flow_run_id: str | None
    pid: int
    hostname: str
    since: str  # ISO 8601, UTC
    master_port: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> LeaseRecord:
        data = json.loads(text)
        data["ids"] = tuple(data["ids"])
        return cls(**data)


def prepare_state_dir(state_dir: Path) -> None:
    for subdir in (DEVICE_LOCKS_SUBDIR, PORT_LOCKS_SUBDIR, LEASES_SUBDIR):
        try:
            (state_dir / subdir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DeviceError(f"cannot create the device state directory {state_dir / subdir}: {error}") from error


def device_lock_path(state_dir: Path, kind: DeviceKind, device_id: int) -> Path:
    return state_dir / DEVICE_LOCKS_SUBDIR / f"{kind}-{device_id}.lock"


def port_lock_path(state_dir: Path, port: int) -> Path:
    return state_dir / PORT_LOCKS_SUBDIR / f"{port}.lock"


def try_lock(path: Path, *, create: bool = True, shared: bool = False) -> int | None:
    """Take a non-blocking flock on `path`; the open fd is the lock. None if someone else holds it.

    Read-only opens suffice for flock, so lock files created by another user (mode 0644) still work.
    os.open fds are not inherited by child processes (PEP 446): the engine we start never holds our locks.
    """
    flags = os.O_RDONLY | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o666)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    """Unlock explicitly before closing: a forked child sharing the fd must not keep the lock alive."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _record_paths(state_dir: Path, lease_id: str) -> tuple[Path, Path]:
    base = state_dir / LEASES_SUBDIR / lease_id
    return base.with_suffix(".json"), base.with_suffix(".lock")


def publish_record(state_dir: Path, record: LeaseRecord) -> int:
    """Write the record and return the fd whose lock marks it alive.

    The alive-lock is taken before the .json appears, and the .json is written to a temporary name and
    renamed, so a reader never sees a record that is half written or not yet locked.
    """
    json_path, lock_path = _record_paths(state_dir, record.lease_id)
    alive_fd = try_lock(lock_path)
    if alive_fd is None:
        raise DeviceError(f"lease id {record.lease_id} is already in use")
    temporary = json_path.with_suffix(".tmp")
    temporary.write_text(record.to_json(), encoding="utf-8")
    os.replace(temporary, json_path)
    return alive_fd


def withdraw_record(state_dir: Path, lease_id: str, alive_fd: int) -> None:
    json_path, lock_path = _record_paths(state_dir, lease_id)
    json_path.unlink(missing_ok=True)
    lock_path.unlink(missing_ok=True)
    unlock(alive_fd)


@dataclass(frozen=True)
class LeaseEvent:
    event: str  # "acquired" or "released"
    at: str  # ISO 8601, UTC, milliseconds
    record: LeaseRecord


def append_history(state_dir: Path, event: str, record: LeaseRecord) -> None:
    """One line in history.jsonl, written with a single O_APPEND write so that lines of concurrent holders never
    interleave."""
    at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    line = json.dumps({"event": event, "at": at, **asdict(record)}) + "\n"
    fd = os.open(state_dir / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_history(state_dir: Path) -> list[LeaseEvent]:
    path = state_dir / HISTORY_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        data = json.loads(line)
        event, at = data.pop("event"), data.pop("at")
        data["ids"] = tuple(data["ids"])
        events.append(LeaseEvent(event, at, LeaseRecord(**data)))
    return events


def read_live_records(state_dir: Path) -> list[LeaseRecord]:
    """The records of leases whose holder is alive; records of dead holders are deleted on the way."""
    leases_dir = state_dir / LEASES_SUBDIR
    if not leases_dir.is_dir():
        return []
    records: list[LeaseRecord] = []
    for json_path in sorted(leases_dir.glob("*.json")):
        if _remove_if_holder_gone(json_path):
            continue
        try:
            text = json_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue  # released between the liveness check and the read
        records.append(LeaseRecord.from_json(text))
    return records


def _remove_if_holder_gone(json_path: Path) -> bool:
    lock_path = json_path.with_suffix(".lock")
    try:
        probe_fd = try_lock(lock_path, create=False, shared=True)
    except FileNotFoundError:
        # The holder removes the .json before its .lock, so a .json without a .lock is a leftover.
        json_path.unlink(missing_ok=True)
        return True
    if probe_fd is None:
        return False
    json_path.unlink(missing_ok=True)
    lock_path.unlink(missing_ok=True)
    unlock(probe_fd)
    return True
