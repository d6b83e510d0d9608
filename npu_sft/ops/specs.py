"""The project's four services as specs for the supervisor: argv, environment, port and readiness check."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from npu_sft.ops.settings import HOST, ServiceSettings
from npu_sft.ops.supervisor import MARKER_VAR, ServiceSpec, marker
from npu_sft.service_env import MLFLOW_SERVER_STORE_VAR, MLFLOW_SERVER_VAR, PROJECT_DIR_VAR

WORK_POOL = "device-hosts"  # must match work_pool.name in deployments/prefect.yaml
# Variables of the caller's shell that would point our processes at another Prefect server, profile or database.
_FOREIGN_PREFECT_VARS = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_HOME",
    "PREFECT_PROFILE",
    "PREFECT_PROFILES_PATH",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_API_HOST",
    "PREFECT_SERVER_API_PORT",
)


def reconciler_ready_file(settings: ServiceSettings) -> Path:
    return settings.services_dir / "reconciler.ready"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_online(settings: ServiceSettings) -> bool:
    try:
        response = httpx.post(f"{settings.api_url}/work_pools/{WORK_POOL}/workers/filter", json={}, timeout=5)
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    return any(w.get("name") == settings.worker_name and w.get("status") == "ONLINE" for w in response.json())


def base_env(settings: ServiceSettings, token: str, name: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _FOREIGN_PREFECT_VARS}
    env.update(
        {
            MARKER_VAR: marker(token, name),
            "PREFECT_HOME": str(settings.prefect_home),
            "PREFECT_API_URL": settings.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def service_specs(settings: ServiceSettings, token: str) -> dict[str, ServiceSpec]:
    bin_dir = settings.bin_dir
    server_env = base_env(settings, token, "prefect-server")
    if settings.prefect_database_url:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = settings.prefect_database_url
    # The worker's flow runs write to the project's store through the MLflow server (one writer for the SQLite
    # file) and link to its UI.
    worker_env = {**base_env(settings, token, "worker"), PROJECT_DIR_VAR: str(settings.project),
                  MLFLOW_SERVER_VAR: settings.mlflow_url, MLFLOW_SERVER_STORE_VAR: settings.backend_store_uri}
    specs = [
        ServiceSpec(
            name="prefect-server",
            argv=[str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(settings.prefect_port)],
            env=server_env,
            port=settings.prefect_port,
            describe=settings.ui_url,
            is_ready=lambda _: _http_ok(f"{settings.api_url}/health"),
            ready_timeout_s=120,
        ),
        ServiceSpec(
            name="mlflow",
            argv=[
                str(bin_dir / "mlflow"), "server",
                "--backend-store-uri", settings.backend_store_uri,
                "--default-artifact-root", settings.artifacts_location,
                "--host", HOST, "--port", str(settings.mlflow_port),
                "--workers", "1",  # a UI for a few people; more workers only cost memory on a training host
            ],
            env=base_env(settings, token, "mlflow"),
            port=settings.mlflow_port,
            describe=settings.mlflow_url,
            is_ready=lambda _: _http_ok(f"{settings.mlflow_url}/health"),
            ready_timeout_s=120,
        ),
        ServiceSpec(
            name="worker",
            argv=[
                str(bin_dir / "prefect"), "worker", "start",
                "--pool", WORK_POOL, "--type", "process", "--name", settings.worker_name,
            ],
            env=worker_env,
            port=None,
            describe=f"pool {WORK_POOL}, worker {settings.worker_name}",
            is_ready=lambda _: _worker_online(settings),
            ready_timeout_s=90,
        ),
        ServiceSpec(
            name="reconciler",
            argv=[
                str(bin_dir / "python"), "-m", "npu_sft.ops.reconcile",
                "--worker-name", settings.worker_name,
                "--tracking-uri", settings.mlflow_url,
                "--ready-file", str(reconciler_ready_file(settings)),
            ],
            env=base_env(settings, token, "reconciler"),
            port=None,
            describe="marks crashed flow runs and their MLflow runs",
            is_ready=lambda record: _read_text(reconciler_ready_file(settings)) == str(record.pid),
            ready_timeout_s=60,
        ),
    ]
    return {spec.name: spec for spec in specs}
