"""The deployment files: prefect.yaml, the automations and the Kubernetes work pool template, checked offline."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.templating import apply_values

from npu_sft.engine.llamafactory_config import resolve_deepspeed
from npu_sft.ops.deploy import deployment_names
from npu_sft.ops.prefect_setup import load_automations
from npu_sft.ops.specs import WORK_POOL
from npu_sft.settings import load_pipeline

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = REPO / "deployments"
ASCEND_RESOURCE = "huawei.com/Ascend910"

# The seeds' measured variants of the qwen7b deployment, each one `overrides` parameter away (deployments/README.md).
QWEN7B_VARIANTS: dict[str, tuple[list[str], int, str | None]] = {
    "1 NPU": (["devices.train=1"], 1, "ds_z0_config.json"),
    "4 NPUs DDP": (["devices.train=4", "llamafactory.overrides.deepspeed=null"], 4, None),
    "4 NPUs ZeRO-2": (["devices.train=4", "llamafactory.overrides.deepspeed=ds_z2"], 4, "ds_z2_config.json"),
    "4 NPUs ZeRO-3": (["devices.train=4", "llamafactory.overrides.deepspeed=ds_z3"], 4, "ds_z3_config.json"),
}


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def deployments(prefect_yaml: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in zip(deployment_names(DEPLOYMENTS / "prefect.yaml"), prefect_yaml["deployments"])}


@pytest.fixture
def at_repo(monkeypatch: pytest.MonkeyPatch, engine_python: Path) -> Path:
    # Configs name the engine relative to the project directory, as the worker (pull step) sees it.
    monkeypatch.chdir(REPO)
    return REPO


def test_prefect_yaml_is_valid_for_prefect_deploy(prefect_yaml: dict[str, Any]) -> None:
    PrefectYamlModel.model_validate(prefect_yaml)


def test_every_deployment_of_issue_7_is_there(deployments: dict[str, dict[str, Any]]) -> None:
    assert set(deployments) == {"sft/qwen7b", "sft/tiny", "serve/qwen7b", "serve/tiny"}
    for spec in deployments.values():
        assert spec["work_pool"]["name"] == WORK_POOL
        assert spec["enforce_parameter_schema"] is True
        assert spec["description"].strip()


def test_the_flow_runs_from_the_project_directory(prefect_yaml: dict[str, Any]) -> None:
    (step,) = prefect_yaml["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $NPU_SFT_PROJECT_DIR }}"}}


def test_job_env_sends_heartbeats_and_modelscope_only_to_npu_runs(deployments: dict[str, dict[str, Any]]) -> None:
    automation = load_automations(DEPLOYMENTS / "automations.yaml")[0]
    for name, spec in deployments.items():
        env = spec["work_pool"]["job_variables"]["env"]
        frequency = int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        assert frequency >= 30  # Prefect's minimum
        # The automation must allow at least two missed heartbeats before it calls a run dead.
        assert automation.trigger.within.total_seconds() >= 2 * frequency
        assert ("USE_MODELSCOPE_HUB" in env) == name.endswith("qwen7b"), name
        if name.endswith("qwen7b"):
            assert env["USE_MODELSCOPE_HUB"] == "1"


def test_shared_settings_are_yaml_anchors_not_copies() -> None:
    text = (DEPLOYMENTS / "prefect.yaml").read_text(encoding="utf-8")
    for anchor in ("base_env", "npu_env", "npu_hosts", "cpu_hosts", "qwen7b_params", "tiny_params"):
        assert f"&{anchor}" in text and f"*{anchor}" in text, anchor


def test_parameters_fit_each_flows_schema(deployments: dict[str, dict[str, Any]], at_repo: Path) -> None:
    for name, spec in deployments.items():
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        schema = parameter_schema(flow).model_dump()
        assert set(spec["parameters"]) <= set(schema["properties"]), name
        assert set(schema.get("required", [])) <= set(spec["parameters"]), name
        assert schema["properties"]["config"]["type"] == "string"
        overrides = schema["properties"]["overrides"]["anyOf"]
        assert {"items": {"type": "string"}, "type": "array"} in overrides


def test_every_deployment_config_loads(deployments: dict[str, dict[str, Any]], at_repo: Path) -> None:
    for name, spec in deployments.items():
        pipeline = load_pipeline(spec["parameters"]["config"], spec["parameters"]["overrides"])
        assert pipeline.settings.engine.python.endswith(".npu-sft/engine/bin/python"), name


@pytest.mark.parametrize("variant", sorted(QWEN7B_VARIANTS))
def test_qwen7b_variants_are_one_parameter_away(variant: str, at_repo: Path) -> None:
    overrides, devices, deepspeed = QWEN7B_VARIANTS[variant]
    pipeline = load_pipeline("configs/qwen7b.yaml", overrides)
    assert pipeline.settings.devices.train == devices
    configured = pipeline.llamafactory.get("deepspeed")
    if deepspeed is None:
        assert configured is None
    else:
        assert resolve_deepspeed(str(configured), pipeline).name == deepspeed


def test_automations_file_validates_and_crashes_silent_runs() -> None:
    (automation,) = load_automations(DEPLOYMENTS / "automations.yaml")
    assert automation.trigger.posture == "Proactive"
    assert automation.trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= automation.trigger.expect
    assert automation.actions[0].type == "change-flow-run-state"
    assert automation.actions[0].state == "CRASHED"


# --- the Kubernetes work pool -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_template() -> dict[str, Any]:
    return yaml.safe_load((DEPLOYMENTS / "kubernetes-npu-pool.yaml").read_text(encoding="utf-8"))


def _render(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """What a Kubernetes worker does with a deployment's job variables: defaults, then values, then placeholders."""
    properties = template["variables"]["properties"]
    variables = {key: spec["default"] for key, spec in properties.items() if "default" in spec}
    env = {**variables.get("env", {}), **values.pop("env", {})}
    variables.update(values, env=env)
    return apply_values(copy.deepcopy(template["job_configuration"]), variables)


def test_k8s_template_is_a_valid_work_pool_template(k8s_template: dict[str, Any]) -> None:
    # Prefect's own check: every placeholder in job_configuration is a declared variable.
    WorkPoolCreate(name="npu-k8s", type="kubernetes", base_job_template=k8s_template)
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(k8s_template)


def test_k8s_job_asks_the_ascend_device_plugin_for_npus(k8s_template: dict[str, Any]) -> None:
    rendered = _render(k8s_template, {"npu_count": 4, "image": "registry.example.com/npu-sft:test",
                                      "command": "python -m prefect.engine", "env": {"EXTRA": "1"}})
    job = rendered["job_manifest"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job"  # the Kubernetes worker finds its container by this name
    resources = container["resources"]
    # An extended resource must be a whole number with requests equal to limits.
    assert resources["limits"][ASCEND_RESOURCE] == 4
    assert resources["requests"][ASCEND_RESOURCE] == resources["limits"][ASCEND_RESOURCE]
    assert container["image"] == "registry.example.com/npu-sft:test"
    env = rendered["env"]
    assert env["NPU_SFT_PROJECT_DIR"] == container["workingDir"]  # where the deployments' pull step goes
    assert env["USE_MODELSCOPE_HUB"] == "1" and env["EXTRA"] == "1"
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert {"/dev/shm", "/usr/local/Ascend/driver"} <= mounts
    volumes = {volume["name"] for volume in pod["volumes"]}
    assert {mount["name"] for mount in container["volumeMounts"]} <= volumes


def test_k8s_npu_count_is_bounded(k8s_template: dict[str, Any]) -> None:
    npu_count = k8s_template["variables"]["properties"]["npu_count"]
    assert npu_count["type"] == "integer" and npu_count["minimum"] == 1


class FakeAutomationClient:
    def __init__(self, existing: dict[str, str]) -> None:
        self.existing = existing  # name -> id
        self.calls: list[tuple[str, str]] = []

    def read_automations_by_name(self, name: str) -> list[Any]:
        return [type("A", (), {"id": self.existing[name]})()] if name in self.existing else []

    def update_automation(self, automation_id: str, automation: Any) -> None:
        self.calls.append(("update", automation_id))

    def create_automation(self, automation: Any) -> str:
        self.calls.append(("create", automation.name))
        return "new"


def test_automations_are_updated_by_name_not_duplicated() -> None:
    from npu_sft.ops.prefect_setup import apply_automations

    automations = load_automations(DEPLOYMENTS / "automations.yaml")
    fresh = FakeAutomationClient({})
    assert apply_automations(fresh, automations) == [f"created automation {automations[0].name!r}"]
    known = FakeAutomationClient({automations[0].name: "id-1"})
    apply_automations(known, automations)
    assert known.calls == [("update", "id-1")]


def test_make_up_and_down_run_the_scripts() -> None:
    import subprocess

    dry = subprocess.run(["make", "-n", "up", "down"], cwd=REPO, capture_output=True, text=True, check=True)
    # Under `make test` a nested make announces the directories it enters; those lines are not commands.
    commands = [line.strip() for line in dry.stdout.splitlines() if not line.startswith("make")]
    assert commands == ["scripts/setup-envs", "scripts/up", "scripts/down"]
