"""`make up` / `make down` machinery without Prefect: settings, pid records, and stopping process trees."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npu_sft import host_processes
from npu_sft.ops import deploy, services, specs, supervisor
from npu_sft.ops.supervisor import (
    MARKER_VAR,
    ServiceRecord,
    marker,
    running_record,
    services_token,
    stop,
    write_record,
)
from npu_sft.ops.errors import ServiceError
from npu_sft.ops.settings import ServiceSettings
from npu_sft.service_env import PROJECT_DIR_VAR

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")

# A "service" that starts a child in a session of its own (as the Prefect worker starts flow runs and torchrun its
# ranks), prints the child's pid, and optionally ignores SIGTERM (as a Prefect 3.8 worker effectively does).
SERVICE_SCRIPT = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(child.pid, flush=True)
time.sleep(120)
"""


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    defaults = ServiceSettings.from_env(tmp_path, {})
    assert (defaults.prefect_port, defaults.mlflow_port) == (4200, 5000)
    assert defaults.api_url == "http://127.0.0.1:4200/api"
    assert defaults.backend_store_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert defaults.prefect_home == tmp_path / ".npu-sft" / "services" / "prefect"
    custom = ServiceSettings.from_env(
        tmp_path, {"NPU_SFT_PREFECT_PORT": "4300", "NPU_SFT_MLFLOW_PORT": "5300", "NPU_SFT_STOP_GRACE_S": "2.5"}
    )
    assert (custom.prefect_port, custom.mlflow_port, custom.stop_grace_s) == (4300, 5300, 2.5)


@pytest.mark.parametrize("bad", ["http", "80", "70000", "-1"])
def test_a_bad_port_is_one_clear_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ServiceError, match="NPU_SFT_PREFECT_PORT"):
        ServiceSettings.from_env(tmp_path, {"NPU_SFT_PREFECT_PORT": bad})


def test_every_service_listens_on_loopback_only(tmp_path: Path) -> None:
    settings = ServiceSettings.from_env(tmp_path, {})
    by_name = specs.service_specs(settings, "token")
    assert list(by_name) == ["prefect-server", "mlflow", "worker", "reconciler"]
    for spec in by_name.values():
        if "--host" in spec.argv:
            assert spec.argv[spec.argv.index("--host") + 1] == "127.0.0.1"
        assert spec.env[MARKER_VAR] == marker("token", spec.name)
    assert by_name["worker"].env[PROJECT_DIR_VAR] == str(tmp_path)


def test_the_workers_flows_write_the_project_store_through_the_mlflow_server(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from npu_sft.settings import MlflowSettings
    from npu_sft.tracking import tracking_uri

    settings = ServiceSettings.from_env(tmp_path, {"NPU_SFT_MLFLOW_PORT": "5123"})
    worker_env = specs.service_specs(settings, "token")["worker"].env
    monkeypatch.chdir(tmp_path)  # the deployments run in the project directory
    project_store = MlflowSettings()  # sqlite:///mlruns/mlflow.db, relative to it
    assert tracking_uri(project_store, worker_env) == "http://127.0.0.1:5123"
    other_store = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert tracking_uri(other_store, worker_env) == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert tracking_uri(project_store, {}) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def test_a_dead_services_record_is_removed(tmp_path: Path) -> None:
    settings = ServiceSettings.from_env(tmp_path, {})
    settings.services_dir.mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_record(settings, ServiceRecord("worker", int(finished.stdout), None, None, ["x"]))
    assert running_record(settings, "worker") is None
    assert not supervisor.record_path(settings, "worker").exists()


def test_a_reused_pid_is_not_taken_for_the_service(tmp_path: Path) -> None:
    settings = ServiceSettings.from_env(tmp_path, {})
    settings.services_dir.mkdir(parents=True)
    ticks = host_processes.start_ticks(os.getpid())
    write_record(settings, ServiceRecord("mlflow", os.getpid(), (ticks or 0) + 1, 5000, ["x"]))
    assert running_record(settings, "mlflow") is None
    write_record(settings, ServiceRecord("mlflow", os.getpid(), ticks, 5000, ["x"]))
    assert running_record(settings, "mlflow") is not None


def _start_fake_service(settings: ServiceSettings, token: str, mode: str) -> tuple[ServiceRecord, int]:
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    spec = supervisor.ServiceSpec(
        name="worker",
        argv=[sys.executable, "-c", SERVICE_SCRIPT, mode],
        env={**os.environ, MARKER_VAR: marker(token, "worker")},
        port=None,
        describe="fake",
        is_ready=lambda _: supervisor.log_path(settings, "worker").read_text().strip() != "",
        ready_timeout_s=20,
    )
    record = supervisor.start(settings, spec)
    supervisor.wait_ready(settings, spec, record)
    child = int(supervisor.log_path(settings, "worker").read_text().split()[0])
    return record, child


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
def test_stop_takes_the_service_and_children_that_left_its_group(tmp_path: Path, mode: str) -> None:
    settings = ServiceSettings.from_env(tmp_path, {"NPU_SFT_STOP_GRACE_S": "1"})
    token = services_token(settings)
    record, child = _start_fake_service(settings, token, mode)
    assert os.getpgid(child) != record.pid  # out of the service's process group, like a flow run
    started = time.monotonic()
    message = stop(settings, "worker", token)
    assert not host_processes.is_alive(*record.identity)
    assert not host_processes.is_alive(child)
    assert ("SIGKILL" in message) == (mode == "stubborn")
    assert time.monotonic() - started < 15
    assert not supervisor.record_path(settings, "worker").exists()
    assert stop(settings, "worker", token) == "worker: not running"


def test_down_with_nothing_started_is_harmless(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    services.down(ServiceSettings.from_env(tmp_path, {}))
    assert "nothing to stop" in capsys.readouterr().out


def test_start_refuses_a_port_someone_else_holds(tmp_path: Path) -> None:
    settings = ServiceSettings.from_env(tmp_path, {})
    settings.services_dir.mkdir(parents=True)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        spec = supervisor.ServiceSpec("mlflow", [sys.executable, "-c", "pass"], dict(os.environ), port, "x",
                                    lambda _: True, 1)
        with pytest.raises(ServiceError, match=f"port {port}"):
            supervisor.start(settings, spec)


def test_cli_access_points_at_the_server(tmp_path: Path) -> None:
    settings = ServiceSettings.from_env(tmp_path, {"NPU_SFT_PREFECT_PORT": "4321"})
    settings.services_dir.mkdir(parents=True)
    env_file = deploy.write_cli_access(settings)
    assert env_file.read_text() == "export PREFECT_API_URL=http://127.0.0.1:4321/api\n"
    profile = (settings.prefect_home / "profiles.toml").read_text()
    assert 'active = "npu-sft"' in profile and 'PREFECT_API_URL = "http://127.0.0.1:4321/api"' in profile


def test_processes_with_env_finds_children_by_marker() -> None:
    value = f"test-{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             env={**os.environ, MARKER_VAR: value})
    try:
        deadline = time.monotonic() + 5
        found: list[int] = []
        while not found and time.monotonic() < deadline:
            found = [info.pid for info in host_processes.processes_with_env(MARKER_VAR, value)]
        assert found == [child.pid]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
