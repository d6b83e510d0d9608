"""Where the services keep their state and listen: every knob is an environment variable (deployments/README.md)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from npu_sft.ops.errors import ServiceError

HOST = "127.0.0.1"  # loopback only: nothing here has authentication


@dataclass(frozen=True)
class ServiceSettings:
    """Where the services keep their state and listen; every knob is an environment variable."""

    project: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    worker_name: str = socket.gethostname()
    stop_grace_s: float = 10.0
    # Flow runs need time to stop torchrun (process.stop_process_group waits up to 15 s) and fail their MLflow run.
    flow_run_stop_grace_s: float = 30.0
    prefect_database_url: str | None = None  # e.g. postgresql+asyncpg://...; default: SQLite in the Prefect home
    mlflow_backend_uri: str | None = None  # e.g. postgresql://...; default: sqlite:///mlruns/mlflow.db
    mlflow_artifacts: str | None = None  # default: mlruns/artifacts

    @classmethod
    def from_env(cls, project: Path, environ: Mapping[str, str]) -> ServiceSettings:
        return cls(
            project=project,
            prefect_port=_port(environ, "NPU_SFT_PREFECT_PORT", 4200),
            mlflow_port=_port(environ, "NPU_SFT_MLFLOW_PORT", 5000),
            worker_name=environ.get("NPU_SFT_WORKER_NAME") or socket.gethostname(),
            stop_grace_s=_seconds(environ, "NPU_SFT_STOP_GRACE_S", 10.0),
            flow_run_stop_grace_s=_seconds(environ, "NPU_SFT_FLOW_RUN_STOP_GRACE_S", 30.0),
            prefect_database_url=environ.get("NPU_SFT_PREFECT_DATABASE_URL") or None,
            mlflow_backend_uri=environ.get("NPU_SFT_MLFLOW_BACKEND_URI") or None,
            mlflow_artifacts=environ.get("NPU_SFT_MLFLOW_ARTIFACTS") or None,
        )

    @property
    def services_dir(self) -> Path:
        return self.project / ".npu-sft" / "services"

    @property
    def prefect_home(self) -> Path:
        return self.services_dir / "prefect"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def bin_dir(self) -> Path:
        # The orchestrator env running this module; not resolved, so a venv's bin/ stays the venv's.
        return Path(sys.executable).parent

    @property
    def backend_store_uri(self) -> str:
        return self.mlflow_backend_uri or f"sqlite:///{self.project / 'mlruns' / 'mlflow.db'}"

    @property
    def artifacts_location(self) -> str:
        return self.mlflow_artifacts or str(self.project / "mlruns" / "artifacts")


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1024 <= int(raw) <= 65535:
        raise ServiceError(f"{name}={raw!r}: expected a port number between 1024 and 65535")
    return int(raw)


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ServiceError(f"{name}={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise ServiceError(f"{name}={raw!r}: expected a number of seconds >= 0")
    return value
