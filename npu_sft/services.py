"""`make up` / `make down`: the project's services on 127.0.0.1, each started at most once, and the deployments.

    scripts/up      python -m npu_sft.services up
    scripts/down    python -m npu_sft.services down

Services (state under .npu-sft/services/: <name>.json pid record, <name>.log output):
    prefect-server  Prefect API and UI on NPU_SFT_PREFECT_PORT (4200); database in .npu-sft/services/prefect/
    worker          Prefect process worker for the `device-hosts` pool (runs flow runs from the project directory)
    mlflow          MLflow server (UI) on NPU_SFT_MLFLOW_PORT (5000) over the project's store (mlruns/)
    reconciler      marks crashed flow runs and their MLflow runs (npu_sft.reconcile)

Every process a service starts inherits NPU_SFT_SERVICES=<token>/<service>, so `down` also stops what left the
service's process group: Prefect starts each flow run in its own session, torchrun each rank in its own.
Settings are environment variables (ServiceSettings.from_env; the table is in deployments/README.md).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import yaml

from npu_sft import host_processes
from npu_sft.errors import NpuSftError
from npu_sft.service_env import MLFLOW_SERVER_STORE_VAR, MLFLOW_SERVER_VAR, PROJECT_DIR_VAR

HOST = "127.0.0.1"  # loopback only: nothing here has authentication
WORK_POOL = "device-hosts"  # must match work_pool.name in deployments/prefect.yaml
DEPLOYMENTS_FILE = Path("deployments/prefect.yaml")
AUTOMATIONS_FILE = Path("deployments/automations.yaml")
MARKER_VAR = "NPU_SFT_SERVICES"
START_ORDER = ("prefect-server", "mlflow", "worker", "reconciler")
# The worker goes first so its flow runs end (and report Crashed) while the server can still record it.
STOP_ORDER = ("worker", "reconciler", "mlflow", "prefect-server")
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


class ServiceError(NpuSftError, RuntimeError):
    """A service could not be started or checked; the message says which and shows its log."""


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


def _base_env(settings: ServiceSettings, token: str, name: str) -> dict[str, str]:
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
    server_env = _base_env(settings, token, "prefect-server")
    if settings.prefect_database_url:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = settings.prefect_database_url
    # The worker's flow runs write to the project's store through the MLflow server (one writer for the SQLite
    # file) and link to its UI.
    worker_env = {**_base_env(settings, token, "worker"), PROJECT_DIR_VAR: str(settings.project),
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
            env=_base_env(settings, token, "mlflow"),
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
                str(bin_dir / "python"), "-m", "npu_sft.reconcile",
                "--worker-name", settings.worker_name,
                "--tracking-uri", settings.mlflow_url,
                "--ready-file", str(reconciler_ready_file(settings)),
            ],
            env=_base_env(settings, token, "reconciler"),
            port=None,
            describe="marks crashed flow runs and their MLflow runs",
            is_ready=lambda record: _read_text(reconciler_ready_file(settings)) == str(record.pid),
            ready_timeout_s=60,
        ),
    ]
    return {spec.name: spec for spec in specs}


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def log_tail(settings: ServiceSettings, name: str, lines: int = 25) -> str:
    path = log_path(settings, name)
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def start(settings: ServiceSettings, spec: ServiceSpec) -> ServiceRecord:
    if spec.port is not None and port_in_use(spec.port):
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


def _check_same_port(spec: ServiceSpec, record: ServiceRecord) -> None:
    if spec.port is not None and record.port != spec.port:
        raise ServiceError(
            f"{spec.name} already runs on port {record.port} (pid {record.pid}), not {spec.port}; "
            "run `make down` first to move it"
        )


def write_cli_access(settings: ServiceSettings) -> Path:
    """A Prefect profile in the services' PREFECT_HOME and a shell snippet, both pointing the CLI at our server."""
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    (settings.prefect_home / "profiles.toml").write_text(
        f'active = "npu-sft"\n\n[profiles.npu-sft]\nPREFECT_API_URL = "{settings.api_url}"\n', encoding="utf-8"
    )
    env_file = settings.services_dir / "env"
    env_file.write_text(f"export PREFECT_API_URL={settings.api_url}\n", encoding="utf-8")
    return env_file


def _run_cli(settings: ServiceSettings, argv: Sequence[str], what: str, token: str) -> str:
    env = _base_env(settings, token, "cli")
    env.pop(MARKER_VAR)  # a one-off command, not a service: `down` must not look for it
    completed = subprocess.run(
        list(argv), cwd=settings.project, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=600,
    )
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip().splitlines()
        raise ServiceError(f"{what} failed (exit {completed.returncode}):\n" + "\n".join(output[-30:]))
    return completed.stdout


def deploy(settings: ServiceSettings, token: str) -> list[str]:
    """Create the work pool and the automations if missing, then `prefect deploy --all`, non-interactively."""
    _run_cli(
        settings,
        [str(settings.bin_dir / "python"), "-m", "npu_sft.prefect_setup",
         "--pool", WORK_POOL, "--automations", str(AUTOMATIONS_FILE)],
        "work pool and automations set-up",
        token,
    )
    _run_cli(
        settings,
        [str(settings.bin_dir / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(DEPLOYMENTS_FILE)],
        f"prefect deploy --all --prefect-file {DEPLOYMENTS_FILE}",
        token,
    )
    return deployment_names(settings.project / DEPLOYMENTS_FILE)


def deployment_names(deployments_file: Path) -> list[str]:
    """`flow/deployment` for every deployment in the file (the flow name is the entrypoint function's flow name)."""
    document = yaml.safe_load(deployments_file.read_text(encoding="utf-8"))
    names: list[str] = []
    for deployment in document.get("deployments", []):
        flow_function = str(deployment["entrypoint"]).rsplit(":", 1)[-1]
        names.append(f"{flow_function}/{deployment['name']}")
    return names


def up(settings: ServiceSettings) -> None:
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    token = services_token(settings)
    specs = service_specs(settings, token)
    write_cli_access(settings)
    status: dict[str, str] = {}
    records: dict[str, ServiceRecord] = {}

    def ensure(name: str) -> None:
        spec = specs[name]
        record = running_record(settings, name)
        if record is not None:
            _check_same_port(spec, record)
            status[name] = "already running"
        else:
            record = start(settings, spec)
            status[name] = "started"
        records[name] = record

    # MLflow starts beside the Prefect server; both take several seconds and neither needs the other.
    ensure("prefect-server")
    ensure("mlflow")
    wait_ready(settings, specs["prefect-server"], records["prefect-server"])
    deployed = deploy(settings, token)
    ensure("worker")
    ensure("reconciler")
    for name in ("mlflow", "worker", "reconciler"):
        wait_ready(settings, specs[name], records[name])

    print(f"npu-sft services for {settings.project}:")
    for name in START_ORDER:
        print(f"  {name:<15} {status[name]:<16} pid {records[name].pid:<8} {specs[name].describe}")
    print(f"  deployments     {', '.join(deployed)}")
    print("Point the Prefect CLI at this server (or: source .npu-sft/services/env):")
    print(f"  export PREFECT_API_URL={settings.api_url}")
    print("then, for example:")
    print(f"  {settings.bin_dir / 'prefect'} deployment run sft/tiny --watch")


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


def down(settings: ServiceSettings) -> None:
    if not (settings.services_dir / "token").is_file():
        print("npu-sft services: nothing to stop (never started here)")
        return
    token = services_token(settings)
    for name in STOP_ORDER:
        print(stop(settings, name, token))
    leftovers = [
        info.identity
        for info in host_processes.list_processes([MARKER_VAR])
        if info.env.get(MARKER_VAR, "").startswith(f"{token}/")
    ]
    if leftovers:
        host_processes.terminate(leftovers, settings.stop_grace_s)
        print(f"stopped {len(leftovers)} leftover processes")
    (settings.services_dir / "env").unlink(missing_ok=True)


@contextmanager
def exclusive(settings: ServiceSettings) -> Iterator[None]:
    """One `up` or `down` at a time per project: two at once could both find a service missing and start it."""
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    with (settings.services_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu_sft.services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args(argv)
    try:
        settings = ServiceSettings.from_env(Path.cwd(), os.environ)
        with exclusive(settings):
            if args.action == "up":
                up(settings)
            else:
                down(settings)
    except ServiceError as err:
        print(f"npu-sft {args.action}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
