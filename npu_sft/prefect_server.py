"""Prefect's temporary server, started as soon as a run's config is checked rather than at the flow's first call.

Without PREFECT_API_URL a flow runs against Prefect's temporary server (`SubprocessASGIServer`): a uvicorn process
that Prefect starts on the flow's first API call, and that takes seconds to answer (a Python process importing
Prefect's server and opening its database), all of them before the first task. `npu-sft run` starts that same
process (Prefect's command line and environment) right after the config checks, lets it come up while the flow's
modules are imported, and hands it to Prefect, which then uses it, and stops it at exit, as one it started itself.

    with temporary_server_started_early():
        from flows.sft import sft        # imported while the server starts
    sft(config)                          # Prefect finds its temporary server running

When Prefect does not take it (a server configured, the temporary one disabled, one already running in this process,
or the process failed to come up), nothing changes: Prefect starts its own at the first call, as it always did.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import httpx

from npu_sft.ports import unused_port

log = logging.getLogger(__name__)

# What SubprocessASGIServer._run_uvicorn_command sets (Prefect 3.8): no UI, the server is the temporary one.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
POLL_S = 0.1


@dataclass
class StartingServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


@contextmanager
def temporary_server_started_early() -> Iterator[None]:
    """Start Prefect's temporary server if the run will use one; on leaving, wait for it and hand it to Prefect."""
    server = start_if_used()
    try:
        yield
    except BaseException:
        if server is not None:
            _stop(server)
        raise
    if server is not None:
        hand_to_prefect(server)


def start_if_used() -> StartingServer | None:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    port = unused_port()
    env = {**os.environ, **SERVER_ENV, **get_current_settings().to_environment_variables(exclude_unset=True)}
    process = subprocess.Popen(uvicorn_argv(port), env=env)  # noqa: S603 (our interpreter, Prefect's app)
    log.debug("Prefect's temporary server starting on port %d (pid %d)", port, process.pid)
    return StartingServer(process, port)


def uvicorn_argv(port: int) -> list[str]:
    """Prefect's own command for its temporary server (SubprocessASGIServer._run_uvicorn_command)."""
    spec = find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("prefect is not importable in this environment")
    app_dir = Path(next(iter(spec.submodule_search_locations))).parent
    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir),
        "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]


def hand_to_prefect(server: StartingServer) -> None:
    """Wait until the server answers, then make it the temporary server Prefect uses (and stops at exit)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    prefect_server = SubprocessASGIServer()  # Prefect's one temporary server of this process
    if prefect_server.running or not _answers(server, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()):
        _stop(server)  # Prefect uses the one it has, or starts its own and reports what goes wrong there
        return
    prefect_server.port = server.port
    prefect_server.server_process = server.process
    prefect_server.running = True
    atexit.register(prefect_server.stop)  # as SubprocessASGIServer.start does
    log.debug("Prefect's temporary server answers at %s", server.api_url)


def _answers(server: StartingServer, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False  # e.g. exit 3: the port was taken meanwhile
            try:
                if client.get(f"{server.api_url}/health", timeout=5).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(POLL_S)
    return False


def _stop(server: StartingServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
