"""Prefect's temporary server started early: the same process Prefect would start, handed to Prefect, which then runs
the flow on it and stops it at exit; nothing started when a server is configured."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prefect.server.api import server as prefect_server_module
from prefect.settings import PREFECT_API_URL, temporary_settings

from npu_sft.prefect_server import SERVER_ENV, start_if_used, uvicorn_argv


def test_the_command_is_prefect_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    started: dict[str, Any] = {}

    def popen(args: list[str], env: dict[str, str], **_: object) -> None:
        started.update(args=args, env=env)

    monkeypatch.setattr(prefect_server_module.subprocess, "Popen", popen)
    prefect_server_module.SubprocessASGIServer(port=8765)._run_uvicorn_command()
    prefect_server_module.SubprocessASGIServer._instances.pop(8765, None)
    assert uvicorn_argv(8765) == started["args"]
    assert SERVER_ENV.items() <= started["env"].items()


def test_nothing_starts_when_a_server_is_configured() -> None:
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert start_if_used() is None


def test_a_flow_runs_on_the_server_started_early_and_it_stops_at_exit(tmp_path: Path) -> None:
    # A fresh interpreter: Prefect keeps one temporary server per process, and this one may have one already.
    script = textwrap.dedent("""
        import os
        from pathlib import Path
        from prefect import flow
        from npu_sft.host_processes import descendants
        from npu_sft.prefect_server import temporary_server_started_early
        from prefect.server.api.server import SubprocessASGIServer

        with temporary_server_started_early():
            pass

        @flow
        def hello() -> int:
            return 42

        assert hello() == 42
        server = SubprocessASGIServer()
        servers = [pid for pid in descendants(os.getpid()) if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        print(server.running, server.port, servers == [server.server_process.pid])
    """)
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PATH": "/usr/bin:/bin",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    running, port, one_server = done.stdout.split()
    assert running == "True" and one_server == "True"
    assert f"Stopping temporary server on http://127.0.0.1:{port}" in done.stderr + done.stdout
