"""A pid-file supervisor: start a service in its own session, wait until it is ready, tell ours from a reused pid,
and stop it with everything that inherited its marker.

    record = start(settings, spec); wait_ready(settings, spec, record)
    stop(settings, spec.name, token)
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from npu_sft import host_processes
from npu_sft.ops.errors import ServiceError
from npu_sft.ops.settings import HOST, ServiceSettings
from npu_sft.ports import port_is_free

MARKER_VAR = "NPU_SFT_SERVICES"


@dataclass(frozen=True)
class ServiceRecord:
    """The pid file's content: enough to tell our process from a later one that reuses the pid."""

    name: str
    pid: int
    start_ticks: int | None
    port: int | None
    argv: list[str]

    @property
    def identity(self) -> tuple[int, int | None]:
        return self.pid, self.start_ticks


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int | None
    describe: str  # for the summary: where to reach it, or what it serves
    is_ready: Callable[[ServiceRecord], bool]
    ready_timeout_s: float


def record_path(settings: ServiceSettings, name: str) -> Path:
    return settings.services_dir / f"{name}.json"


def log_path(settings: ServiceSettings, name: str) -> Path:
    return settings.services_dir / f"{name}.log"


def read_record(settings: ServiceSettings, name: str) -> ServiceRecord | None:
    path = record_path(settings, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        path.unlink(missing_ok=True)  # a torn write from an interrupted `up`; the process check below decides
        return None
    return ServiceRecord(**data)


def write_record(settings: ServiceSettings, record: ServiceRecord) -> None:
    path = record_path(settings, record.name)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(record), indent=2), encoding="utf-8")
    os.replace(temporary, path)


def running_record(settings: ServiceSettings, name: str) -> ServiceRecord | None:
    """The service's record if its process still runs; a stale record is removed."""
    record = read_record(settings, name)
    if record is None:
        return None
    if host_processes.is_alive(*record.identity):
        return record
    record_path(settings, name).unlink(missing_ok=True)
    return None


def services_token(settings: ServiceSettings) -> str:
    """The project's marker value, created once: processes carrying it were started by this project's services."""
    path = settings.services_dir / "token"
    if not path.is_file():
        settings.services_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(8), encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()


def marker(token: str, name: str) -> str:
    return f"{token}/{name}"


def log_tail(settings: ServiceSettings, name: str, lines: int = 25) -> str:
    path = log_path(settings, name)
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def start(settings: ServiceSettings, spec: ServiceSpec) -> ServiceRecord:
    if spec.port is not None and not port_is_free(spec.port, HOST):
        raise ServiceError(
            f"{spec.name}: port {spec.port} on {HOST} is taken by another program; "
            f"choose another with NPU_SFT_{'PREFECT' if spec.name == 'prefect-server' else 'MLFLOW'}_PORT"
        )
    with log_path(settings, spec.name).open("ab") as log:
        # Its own session: the service and what it starts do not get the caller's terminal signals (Ctrl+C in
        # the shell that ran `make up`), and `down` can signal the whole group.
        proc = subprocess.Popen(
            spec.argv,
            env=spec.env,
            cwd=settings.project,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    record = ServiceRecord(spec.name, proc.pid, host_processes.start_ticks(proc.pid), spec.port, spec.argv)
    write_record(settings, record)
    return record


def wait_ready(settings: ServiceSettings, spec: ServiceSpec, record: ServiceRecord) -> None:
    deadline = time.monotonic() + spec.ready_timeout_s
    while not spec.is_ready(record):
        if not host_processes.is_alive(*record.identity):
            raise ServiceError(f"{spec.name} exited during start-up; its log ends:\n{log_tail(settings, spec.name)}")
        if time.monotonic() > deadline:
            raise ServiceError(
                f"{spec.name} did not become ready within {spec.ready_timeout_s:.0f} s; its log ends:\n"
                f"{log_tail(settings, spec.name)}"
            )
        time.sleep(0.5)


def check_same_port(spec: ServiceSpec, record: ServiceRecord) -> None:
    if spec.port is not None and record.port != spec.port:
        raise ServiceError(
            f"{spec.name} already runs on port {record.port} (pid {record.pid}), not {spec.port}; "
            "run `make down` first to move it"
        )


def stop(settings: ServiceSettings, name: str, token: str) -> str:
    """Stop a service and everything that inherited its marker: children first, then the service itself."""
    record = running_record(settings, name)
    main = record.identity if record is not None else None
    children = [
        info.identity
        for info in host_processes.processes_with_env(MARKER_VAR, marker(token, name))
        if info.identity != main
    ]
    if children:
        # For the worker these are flow runs: SIGTERM lets each mark itself Crashed, stop torchrun and fail its
        # MLflow run while the worker and the server still answer.
        host_processes.terminate(children, settings.flow_run_stop_grace_s)
    if record is None:
        return f"{name}: not running" + (f" (stopped {len(children)} leftover processes)" if children else "")
    if not host_processes.PROC.is_dir():
        # Without /proc the marker search finds nothing; the service's own group is the best we can do.
        host_processes.send_group_signal(record.pid, signal.SIGTERM)
    # A Prefect 3.8 worker does not always exit on SIGTERM (its handler re-sends SIGINT to itself): escalate.
    killed = host_processes.terminate([record.identity], settings.stop_grace_s)
    host_processes.send_group_signal(record.pid, signal.SIGKILL)  # anything still in its group
    record_path(settings, name).unlink(missing_ok=True)
    how = "SIGKILL after the grace period" if killed else "SIGTERM"
    return f"{name}: stopped pid {record.pid} ({how})" + (f" and {len(children)} child processes" if children else "")


@contextmanager
def exclusive(settings: ServiceSettings) -> Iterator[None]:
    """One `up` or `down` at a time per project: two at once could both find a service missing and start it."""
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    with (settings.services_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
