"""`make up`'s scripts on a scratch project, for real: Prefect server, worker, MLflow, reconciler, the deployments.

One project for the module, in test order: up, deploy, up again, sft/tiny and serve/tiny from the CLI, serving
until cancelled or sent SIGTERM, a worker killed mid-run, a flow process killed mid-run, down mid-run. About six minutes
on 2 cores.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import httpx
import openai
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from prefect.blocks.system import Secret
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from npu_sft import host_processes
from npu_sft.devices import DeviceSettings, acquire_lease, current_leases
from npu_sft.ops import HOST
from npu_sft.ops.reconcile import RECONCILED_TAG, RUN_ID_VAR, is_flow_engine
from npu_sft.ops.settings import ServiceSettings
from npu_sft.ops.supervisor import MARKER_VAR, read_record
from npu_sft.ports import port_is_free, unused_port
from npu_sft.tracking import END_REASON_TAG

pytestmark = pytest.mark.e2e

# The project's code, shared with the repository; everything else (.npu-sft/, mlruns/) is the scratch project's own.
LINKED = ("configs", "flows", "tasks", "npu_sft", "scripts", "deployments", ".venv", "Makefile")
SERVICES = ("prefect-server", "mlflow", "worker", "reconciler")
DEPLOYMENTS = {"sft/qwen7b", "sft/tiny", "serve/qwen7b", "serve/tiny"}
# Two epochs instead of three keeps the run short; with one the tiny model's smoke-test reply is empty.
EPOCHS_OVERRIDE = "llamafactory.overrides.num_train_epochs=2"
T = TypeVar("T")


@dataclass
class Project:
    root: Path
    env: dict[str, str]  # what a user's shell would have: the ports, nothing pointing Prefect anywhere
    settings: ServiceSettings
    up_output: str

    @property
    def devices(self) -> DeviceSettings:
        # The scratch project's own lease directory, so other test runs on this host never compete for the CPUs.
        return DeviceSettings(kind="cpu", train=2, state_dir=self.root / ".npu-sft" / "devices", lease_timeout_s=0)

    @property
    def overrides(self) -> list[str]:
        return [EPOCHS_OVERRIDE, f"devices.state_dir={self.devices.state_dir}"]

    def script(self, name: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([f"scripts/{name}"], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def prefect_cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The Prefect CLI as a user runs it after `make up`: through the profile `make up` wrote."""
        env = {**self.env, "PREFECT_HOME": str(self.settings.prefect_home)}
        return subprocess.run([str(self.root / ".venv" / "bin" / "prefect"), *args], cwd=self.root, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def prefect(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.settings.api_url)

    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.settings.mlflow_url, registry_uri=self.settings.mlflow_url)

    def pid(self, service: str) -> int:
        record = read_record(self.settings, service)
        if record is None:
            raise AssertionError(f"{service} has no pid record")
        return record.pid


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 1.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, repo: Path, engine_python: Path) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("services-project")
    for name in LINKED:
        (root / name).symlink_to(repo / name)
    (root / ".npu-sft").mkdir()
    (root / ".npu-sft" / "engine").symlink_to(repo / ".npu-sft" / "engine")  # the default engine.python path
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "NPU_SFT_"))}
    env.update(
        NPU_SFT_PREFECT_PORT=str(unused_port()),
        NPU_SFT_MLFLOW_PORT=str(unused_port()),
        NPU_SFT_WORKER_NAME=f"e2e-{uuid.uuid4().hex[:8]}",
        NPU_SFT_STOP_GRACE_S="5",
        NPU_SFT_FLOW_RUN_STOP_GRACE_S="20",
        NPU_SFT_API_KEY=secrets.token_urlsafe(24),  # in the worker's environment, as a host's unit would set it
    )
    settings = ServiceSettings.from_env(root, env)
    up = subprocess.run(["scripts/up"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Project(root, env, settings, up.stdout)
    finally:
        subprocess.run(["scripts/down"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def mlflow_run_of(project: Project, flow_run_id: UUID) -> Run | None:
    client = project.mlflow()
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    return runs[0] if runs else None


def start_sft_tiny(project: Project) -> UUID:
    with project.prefect() as client:
        deployment = client.read_deployment_by_name("sft/tiny")
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": project.overrides})
    return flow_run.id


def wait_until_training(project: Project, flow_run_id: UUID) -> None:
    wait_for(
        "the run's train task to lease the devices",
        lambda: [lease for lease in current_leases(project.devices)
                 if lease.flow_run_id == str(flow_run_id) and lease.task == "train"],
        timeout_s=240,
    )
    time.sleep(3)  # into torchrun, not just past the lease


def processes_of(flow_run_id: UUID) -> list[host_processes.ProcessInfo]:
    return [info for info in host_processes.list_processes([RUN_ID_VAR]) if info.env.get(RUN_ID_VAR) == str(flow_run_id)]


def assert_run_crashed_and_cleaned_up(project: Project, flow_run_id: UUID) -> Run:
    def crashed() -> bool:
        with project.prefect() as client:
            state = client.read_flow_run(flow_run_id).state
        return state is not None and state.type == StateType.CRASHED

    def failed_mlflow_run() -> Run | None:
        run = mlflow_run_of(project, flow_run_id)
        return run if run is not None and run.info.status == "FAILED" else None

    wait_for("the flow run to be Crashed", crashed, timeout_s=120)
    run = wait_for("its MLflow run to be FAILED", failed_mlflow_run, timeout_s=60)
    wait_for("no process of the run to be left", lambda: not processes_of(flow_run_id), timeout_s=90)

    def devices_free() -> bool:
        lease = acquire_lease(project.devices, "train")  # lease_timeout_s=0: raises at once if any device is held
        lease.release()
        return True

    assert devices_free()
    return run


def test_up_started_every_service_on_loopback(project: Project) -> None:
    for service in SERVICES:
        assert f"{service}" in project.up_output
        assert project.pid(service) > 0
    assert project.up_output.count("started") >= len(SERVICES)
    ui = httpx.get(project.settings.ui_url, timeout=10)
    assert ui.status_code == 200 and "<html" in ui.text.lower()
    assert httpx.get(f"{project.settings.api_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{project.settings.mlflow_url}/health", timeout=10).status_code == 200
    assert f"export PREFECT_API_URL={project.settings.api_url}" in project.up_output
    assert (project.root / ".npu-sft" / "services" / "prefect" / "prefect.db").is_file()  # its database is ours


def test_deploy_all_registers_every_deployment_without_a_prompt(project: Project) -> None:
    deployed = project.prefect_cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml",
                                   timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with project.prefect() as client:
        deployments = client.read_deployments()
        flows = {flow.id: flow.name for flow in client.read_flows()}
    by_name = {f"{flows[d.flow_id]}/{d.name}": d for d in deployments}
    assert set(by_name) == DEPLOYMENTS
    for name, deployment in by_name.items():
        assert deployment.work_pool_name == "device-hosts"
        assert deployment.enforce_parameter_schema
        assert {"config", "overrides"} <= set(deployment.parameter_openapi_schema["properties"])
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $NPU_SFT_PROJECT_DIR }}"}}
        ]
        assert deployment.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert by_name["sft/qwen7b"].job_variables["env"]["USE_MODELSCOPE_HUB"] == "1"
    assert by_name["sft/qwen7b"].parameters == {"config": "configs/qwen7b.yaml", "overrides": []}
    assert by_name["serve/qwen7b"].parameters["keep_serving"] is True


def test_up_again_starts_nothing_twice(project: Project) -> None:
    before = {service: project.pid(service) for service in SERVICES}
    again = project.script("up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == len(SERVICES)
    assert {service: project.pid(service) for service in SERVICES} == before


def test_sft_tiny_deployment_runs_from_the_cli(project: Project) -> None:
    ran = project.prefect_cli("deployment", "run", "sft/tiny", "--watch",
                              "--param", f"overrides={json.dumps(project.overrides)}")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "Completed" in ran.stdout
    client = project.mlflow()
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    assert run.info.status == "FINISHED"
    flow_run_id = run.data.tags["prefect_flow_run_id"]
    assert run.data.params["num_train_epochs"] == "2"
    (version,) = client.search_model_versions("name='tiny-qwen2-lora'")
    assert version.run_id == run.info.run_id
    # Both ways between the two UIs: the MLflow run names its deployment and flow run page, the flow run links to
    # the MLflow run and sums up what it achieved.
    assert run.data.tags["mlflow.source.name"] == "sft/tiny" and run.data.tags["mlflow.source.type"] == "JOB"
    assert run.data.tags["prefect.flow_run_url"] == f"{project.settings.ui_url}/flow-runs/flow-run/{flow_run_id}"
    mlflow_page = (f"{project.settings.mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                   "?workflowType=machine_learning")  # MLflow's model-training view, not its GenAI one
    with project.prefect() as prefect:
        artifacts = {artifact.key: artifact for artifact in prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mlflow-run", "sft-summary"])))}
    assert str(artifacts["mlflow-run"].flow_run_id) == flow_run_id and mlflow_page in str(artifacts["mlflow-run"].data)
    summary = str(artifacts["sft-summary"].data)
    assert f"[{run.info.run_id}]({mlflow_page})" in summary
    assert "version 1: promoted to **champion**" in summary and "| rouge_l |" in summary


def test_serve_tiny_smoke_serves_the_registered_version(project: Project) -> None:
    ran = project.prefect_cli("deployment", "run", "serve/tiny", "--watch",
                              "--param", f"overrides={json.dumps(project.overrides[1:])}")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    version = project.mlflow().get_model_version("tiny-qwen2-lora", "1")
    assert version.tags["npu_sft.smoke_reply"].strip()


def _answers(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def start_serving(project: Project, port: int, **parameters: object) -> UUID:
    """serve/tiny with keep_serving, as a user starts it from the UI; returns its flow run id."""
    with project.prefect() as client:
        deployment = client.read_deployment_by_name("serve/tiny")
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"keep_serving": True, "port": port, **parameters}
        )
    return flow_run.id


def test_serve_keeps_serving_until_the_run_is_cancelled(project: Project) -> None:
    # The key from a Prefect Secret block, as a team keeps it; the worker's NPU_SFT_API_KEY is then not the key.
    api_key = secrets.token_urlsafe(24)
    with temporary_settings({PREFECT_API_URL: project.settings.api_url}):
        Secret(value=api_key).save("e2e-serve-key", overwrite=True)
    published_by = project.mlflow().get_model_version("tiny-qwen2-lora", "1").run_id
    port = unused_port()
    flow_run_id = start_serving(
        project, port, model_version=f"runs:/{published_by}",
        overrides=[*project.overrides[1:], "serve.api_key_secret=e2e-serve-key"],
    )
    base = f"http://127.0.0.1:{port}/v1"
    wait_for("the API server to answer", lambda: _answers(f"{base}/models", {"Authorization": f"Bearer {api_key}"}),
             timeout_s=240)
    assert not _answers(f"{base}/models", {"Authorization": f"Bearer {project.env['NPU_SFT_API_KEY']}"})
    try:
        use_the_endpoint(project, base, api_key, str(flow_run_id))
    finally:  # a failed check must not leave the server holding the serve devices for the tests after this one
        cancel = project.prefect_cli("flow-run", "cancel", str(flow_run_id), timeout=60)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr

    def cancelled() -> bool:
        with project.prefect() as client:
            state = client.read_flow_run(flow_run_id).state
        return state is not None and state.type == StateType.CANCELLED

    wait_for("the flow run to be Cancelled", cancelled, timeout_s=90)
    wait_for("the API server to be gone", lambda: not processes_of(flow_run_id), timeout_s=60)
    assert not _answers(f"{base}/models", {"Authorization": f"Bearer {api_key}"})
    assert project.mlflow().get_model_version("tiny-qwen2-lora", "1").tags["serving.status"] == "stopped"
    assert any("stopped" in str(artifact.data) for artifact in endpoint_artifacts(project))
    acquire_lease(project.devices, "serve").release()  # the serve devices are free again
    # The key was in no MLflow field: no run's params or tags, no version's tags.
    registry = project.mlflow()
    runs = registry.search_runs([e.experiment_id for e in registry.search_experiments()])
    fields = [*(str(run.data.params) + str(run.data.tags) for run in runs),
              *(str(version.tags) for version in registry.search_model_versions("name='tiny-qwen2-lora'"))]
    assert runs and not [field for field in fields if api_key in field]
    # Nor in the server's log, which holds no request body either (LLaMA-Factory logs them unless API_VERBOSE=0).
    server_log = (project.root / ".npu-sft" / "serve" / str(flow_run_id) / "serve.log").read_text()
    assert "Uvicorn running" in server_log or "Application startup complete" in server_log, server_log[-2000:]
    assert api_key not in server_log and "What is 17 + 1?" not in server_log


def test_sigterm_to_a_serving_flow_stops_the_server_and_frees_its_devices(project: Project) -> None:
    """What `kill`, systemd or a container runtime sends the flow's process: the same clean stop as a cancel."""
    port = unused_port()
    flow_run_id = start_serving(project, port, overrides=project.overrides[1:])  # the champion, the worker's key
    headers = {"Authorization": f"Bearer {project.env['NPU_SFT_API_KEY']}"}
    base = f"http://127.0.0.1:{port}/v1"
    wait_for("the API server to answer", lambda: _answers(f"{base}/models", headers), timeout_s=240)
    (engine,) = [info for info in processes_of(flow_run_id) if is_flow_engine(info)]
    os.kill(engine.pid, signal.SIGTERM)
    wait_for("the flow's processes and the API server to be gone", lambda: not processes_of(flow_run_id),
             timeout_s=60)
    assert not _answers(f"{base}/models", headers)
    acquire_lease(project.devices, "serve").release()  # the serve devices are free again
    assert project.mlflow().get_model_version("tiny-qwen2-lora", "1").tags["serving.status"] == "stopped"


def use_the_endpoint(project: Project, base: str, api_key: str, flow_run_id: str) -> None:
    """As a user would, with the official client: the listed model says which registered version answers."""
    api = openai.OpenAI(base_url=base, api_key=api_key, max_retries=0, timeout=120)
    assert [model.id for model in api.models.list()] == ["tiny-qwen2-lora:v1"]
    question = [{"role": "user", "content": "Who are you?"}]
    reply = api.chat.completions.create(model="tiny-qwen2-lora:v1", messages=question, max_tokens=8)
    assert reply.choices[0].message.content.strip()
    stream = api.chat.completions.create(model="tiny-qwen2-lora:v1", messages=question, max_tokens=8, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed.strip()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{base}/models", timeout=5).status_code == 401  # no key at all

    def ask(index: int) -> str:
        question = [{"role": "user", "content": f"What is {index} + 1?"}]
        reply = api.chat.completions.create(model="tiny-qwen2-lora:v1", messages=question, max_tokens=8)
        return reply.choices[0].message.content or ""

    # Load: 200 chat requests, 8 in flight at a time, every one answered (greedy by default: no empty reply).
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(200)))
    assert len(replies) == 200 and all(reply.strip() for reply in replies)
    # Where it is served is on the version and in the Prefect UI while it serves.
    registry = project.mlflow()
    wait_for("the version to say it is served",
             lambda: registry.get_model_version("tiny-qwen2-lora", "1").tags.get("serving.status") == "up", timeout_s=30)
    tags = registry.get_model_version("tiny-qwen2-lora", "1").tags
    assert tags["serving.url"] == base and tags["serving.model"] == "tiny-qwen2-lora:v1"
    assert tags["serving.flow_run"] == flow_run_id
    wait_for("the endpoint's link artifact",
             lambda: any(f"]({base})" in str(a.data) for a in endpoint_artifacts(project)), timeout_s=30)


def endpoint_artifacts(project: Project) -> list:
    with project.prefect() as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["serve-endpoint"])))


def test_a_cancelled_sft_run_ends_its_mlflow_run_killed(project: Project) -> None:
    flow_run_id = start_sft_tiny(project)
    wait_until_training(project, flow_run_id)
    cancel = project.prefect_cli("flow-run", "cancel", str(flow_run_id), timeout=60)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr

    def killed_mlflow_run() -> Run | None:
        run = mlflow_run_of(project, flow_run_id)
        return run if run is not None and run.info.status == "KILLED" else None

    # The worker kills the flow's process, runs its cancellation hooks (the MLflow run), then marks it Cancelled.
    run = wait_for("its MLflow run to be KILLED", killed_mlflow_run, timeout_s=120)
    assert run.data.tags[END_REASON_TAG].startswith("Cancel")

    def cancelled() -> bool:
        with project.prefect() as client:
            state = client.read_flow_run(flow_run_id).state
        return state is not None and state.type == StateType.CANCELLED

    wait_for("the flow run to be Cancelled", cancelled, timeout_s=90)
    wait_for("no process of the run to be left", lambda: not processes_of(flow_run_id), timeout_s=90)
    lease = acquire_lease(project.devices, "train")  # the training's devices are free again
    lease.release()


def test_a_killed_worker_leaves_a_crashed_run_free_devices_and_a_failed_mlflow_run(project: Project) -> None:
    flow_run_id = start_sft_tiny(project)
    wait_until_training(project, flow_run_id)
    os.kill(project.pid("worker"), signal.SIGKILL)
    assert_run_crashed_and_cleaned_up(project, flow_run_id)
    # The next `make up` brings back just the worker.
    server = project.pid("prefect-server")
    again = project.script("up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == len(SERVICES) - 1
    assert project.pid("prefect-server") == server


def test_a_sigkilled_flow_process_is_reconciled(project: Project) -> None:
    flow_run_id = start_sft_tiny(project)
    wait_until_training(project, flow_run_id)
    (engine,) = [info for info in processes_of(flow_run_id) if is_flow_engine(info)]
    os.kill(engine.pid, signal.SIGKILL)  # what the OOM killer does: no hook, no except clause runs
    run = assert_run_crashed_and_cleaned_up(project, flow_run_id)
    # Nobody in the dead process could end the MLflow run. Whichever came first did and says why: the worker, which
    # runs the flow's on_crashed hooks once it sees the process exit, or the reconciler.
    reasons = [run.data.tags.get(END_REASON_TAG, ""), run.data.tags.get(RECONCILED_TAG, "")]
    assert any("Crashed" in reason for reason in reasons), run.data.tags


def test_down_stops_everything_up_started_even_mid_run(project: Project) -> None:
    token = (project.settings.services_dir / "token").read_text().strip()
    pids = {service: read_record(project.settings, service) for service in SERVICES}
    flow_run_id = start_sft_tiny(project)
    wait_until_training(project, flow_run_id)
    down = project.script("down")
    assert down.returncode == 0, down.stdout + down.stderr
    # The run was told to stop while the server still answered: it failed its own MLflow run on the way out.
    store = MlflowClient(tracking_uri=f"sqlite:///{project.root / 'mlruns' / 'mlflow.db'}")
    experiment = store.get_experiment_by_name("sft-tiny").experiment_id
    (run,) = store.search_runs([experiment], filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    assert run.info.status == "FAILED"
    assert not processes_of(flow_run_id)
    lease = acquire_lease(project.devices, "train")
    lease.release()
    for service, record in pids.items():
        assert record is not None and not host_processes.is_alive(*record.identity), service
        assert read_record(project.settings, service) is None
    stray = [info for info in host_processes.list_processes([MARKER_VAR])
             if info.env.get(MARKER_VAR, "").startswith(f"{token}/")]
    assert stray == []
    assert port_is_free(project.settings.prefect_port, HOST) and port_is_free(project.settings.mlflow_port, HOST)
    again = project.script("down")
    assert again.returncode == 0 and again.stdout.count("not running") == len(SERVICES)
