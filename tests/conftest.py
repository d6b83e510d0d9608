from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# As `npu-sft` does: with telemetry on, every fresh PREFECT_HOME (one per test) races its heartbeat against the first
# migration of the local server's SQLite database ("database is locked"). Inherited by the CLIs the tests start.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# As `npu-sft` does: the temporary server's 20 s start-up limit is too short for a busy 2-core host.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
ENGINE_PYTHON = REPO / ".npu-sft" / "engine" / "bin" / "python"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def engine_python() -> Path:
    """The engine env made by scripts/setup-envs (`make test` runs it first). Without it the tests that need it are
    skipped, saying so, except under CI, where a suite passed by skipping would hide the missing coverage."""
    if not ENGINE_PYTHON.exists():
        reason = f"{ENGINE_PYTHON} missing: run scripts/setup-envs (make test does) to run the tests that need the engine"
        if os.environ.get("CI"):
            raise RuntimeError(reason)
        pytest.skip(reason)
    return ENGINE_PYTHON


@pytest.fixture
def in_tmp_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch project directory as the cwd, with its own Prefect home, so runs never touch the repo's state."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    return tmp_path
