"""`npu-sft doctor`: hosts seen through the npu-smi / nvidia-smi doubles and a fake CANN tree, each failure the Ascend
users report ending as one finding that names what was seen and the fix."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest

from npu_sft.cli import main
from npu_sft.devices import Lease
from npu_sft.doctor import CardsNotWorking, Finding, diagnose, diagnose_host, require_working_cards
from npu_sft.doctor.ascend import check_hccl
from npu_sft.engine import EngineSettings
from npu_sft.host_setup import ASCEND_ROOT_VAR
from npu_sft.ports import unused_port
from npu_sft.settings import load_pipeline
from tests.fakes.devices import put_fake_tools_on_path

REPO = Path(__file__).resolve().parents[3]
TORCH_NPU_STANDIN = REPO / "tests" / "fakes" / "torch_npu_standin"
QWEN7B = REPO / "configs" / "qwen7b.yaml"
TINY = REPO / "configs" / "tiny_cpu.yaml"


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.check: finding for finding in findings}


def npu_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, cann: str | None = "9.1.0"
) -> dict[str, str]:
    bash = shutil.which("bash")  # engine.env_script is sourced by bash; PATH is about to hold only the doubles
    bin_dir = put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE=fixture)
    if bash is not None:
        (bin_dir / "bash").symlink_to(bash)
    root = tmp_path / "Ascend"
    if cann is not None:
        info = root / "ascend-toolkit" / "latest" / f"{platform.machine()}-linux" / "ascend_toolkit_install.info"
        info.parent.mkdir(parents=True)
        info.write_text(f"version={cann}\n")
        (root / "ascend-toolkit" / "set_env.sh").write_text("export ASCEND_HOME_PATH=...\n")
    return {ASCEND_ROOT_VAR: str(root)}


def qwen7b(tmp_path: Path, *overrides: str, torch_npu: str | None = "ok:8"):
    """The recipe's config on the fake host; the engine env's torch gets the torch_npu stand-in in mode `torch_npu`."""
    standin = [f"engine.env.PYTHONPATH={TORCH_NPU_STANDIN}", f"engine.env.FAKE_TORCH_NPU={torch_npu}"]
    return load_pipeline(QWEN7B, [f"devices.state_dir={tmp_path / 'leases'}",
                                  f"engine.env_script={tmp_path / 'Ascend' / 'ascend-toolkit' / 'set_env.sh'}",
                                  *(standin if torch_npu else []), *overrides])


def test_a_healthy_910b_host_is_ready_for_the_qwen7b_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_python: Path
) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3")
    found = by_check(diagnose_host(qwen7b(tmp_path, "llamafactory.overrides.ddp_timeout=1800"), environ))
    assert found["devices"].status == "ok" and "8 npu (910B3) from npu-smi info, 8 usable" in found["devices"].detail
    assert found["CANN"].status == "ok" and found["CANN"].detail.startswith("9.1.0 (")
    assert found["HCCL timeout"].status == "ok"
    assert "torch_npu 2.14.0: a small matmul on each card (npu 0,1,2,3)" in found["engine"].detail
    assert {finding.status for finding in found.values()} == {"ok"}


def test_a_card_without_kernels_is_named_with_cann_s_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_python: Path
) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3")
    # The lease would get cards 2 and 5, seen by torch as 0 and 1; the second has no Cast kernel.
    pipeline = qwen7b(tmp_path, "devices.train=[2, 5]", torch_npu="no-kernels:1")
    found = by_check(diagnose_host(pipeline, environ))
    assert found["NPU 5"].status == "error" and "Op Cast does not has any binary" in found["NPU 5"].detail
    assert "Ascend-cann-kernels" in found["NPU 5"].fix and "NPU 2" not in found


@pytest.mark.parametrize(
    ("torch_npu", "said", "fix"),
    [
        ("no-cann", "import torch_npu: ImportError: libhccl.so: cannot open shared object file", "engine.env_script"),
        ("unavailable", "torch_npu 2.14.0: no npu available to torch (it would run on the CPU)", "/dev/davinci"),
        (None, "import torch_npu: ModuleNotFoundError: No module named 'torch_npu'", "scripts/setup-envs"),
    ],
)
def test_torch_npu_that_cannot_reach_the_cards_says_why(
    torch_npu: str | None, said: str, fix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_python: Path
) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3")
    found = by_check(diagnose_host(qwen7b(tmp_path, torch_npu=torch_npu), environ))["engine"]
    assert found.status == "error" and said in found.detail and fix in found.fix


def test_a_310p_card_is_refused_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "2x310P3")
    found = by_check(diagnose_host(qwen7b(tmp_path, "devices.train=2"), environ))
    assert found["NPU 0"].status == "error" and "#10418" in found["NPU 0"].detail
    assert found["NPU 1"].status == "error"


def test_an_unhealthy_card_and_too_few_usable_cards_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B1_unhealthy")
    found = by_check(diagnose_host(qwen7b(tmp_path, "devices.train=8"), environ))
    unhealthy = [finding for finding in found.values() if finding.check.startswith("NPU ")]
    assert unhealthy and all(f.status == "error" and "health" in f.detail and "npu-smi info -t health" in f.fix
                             for f in unhealthy)
    assert found["devices.train"].status == "error" and "needs 8 npu" in found["devices.train"].detail


def test_busy_cards_are_a_warning_naming_the_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_python: Path
) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3_busy")
    busy = [f for f in diagnose_host(qwen7b(tmp_path, "devices.train=1"), environ) if f.check.startswith("NPU ")]
    assert busy and all(finding.status == "warning" and "processes" in finding.detail for finding in busy)


def test_no_cann_and_a_missing_env_script_say_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3", cann=None)
    found = by_check(diagnose_host(qwen7b(tmp_path), environ))
    assert found["CANN"].status == "error" and "NPU_SFT_ENGINE_CONTAINER" in found["CANN"].fix
    script = found["engine.env_script"]
    assert script.status == "error" and "set_env.sh does not exist" in script.detail


def test_a_container_engine_leaves_cann_to_the_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3", cann=None)
    pipeline = qwen7b(tmp_path, "engine.python=python", "engine.command_prefix=[docker, exec, -i, llamafactory]")
    found = by_check(diagnose_host(pipeline, environ))
    assert found["CANN"].status == "warning" and "docker exec -i llamafactory" in found["CANN"].detail
    assert found["engine"].status == "error" and found["engine"].detail.startswith("cannot start docker: ")


@pytest.mark.parametrize(
    ("ddp_timeout", "engine_env", "environ", "status", "said"),
    [
        (180000000, {}, {}, "warning", "ddp_timeout 180000000 s (recipe.yaml) but HCCL_EXEC_TIMEOUT unset (1800 s)"),
        (1800, {}, {}, "ok", "HCCL_EXEC_TIMEOUT unset (1800 s) covers ddp_timeout 1800 s"),
        (7200, {"HCCL_EXEC_TIMEOUT": "7200"}, {}, "ok", "HCCL_EXEC_TIMEOUT=7200 s (engine.env)"),
        (7200, {}, {"HCCL_EXEC_TIMEOUT": "3600"}, "warning", "HCCL_EXEC_TIMEOUT=3600 s (the environment)"),
        (7200, {}, {"HCCL_EXEC_TIMEOUT": "1h"}, "error", "HCCL_EXEC_TIMEOUT='1h' in the environment"),
    ],
)
def test_hccl_timeout_against_ddp_timeout(
    ddp_timeout: int, engine_env: dict[str, str], environ: dict[str, str], status: str, said: str
) -> None:
    (finding,) = check_hccl({"ddp_timeout": ddp_timeout}, Path("recipe.yaml"), EngineSettings(env=engine_env), environ)
    assert finding.status == status and said in finding.detail


def test_without_a_device_tool_the_npu_config_reports_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin")
    found = by_check(diagnose_host(qwen7b(tmp_path), {ASCEND_ROOT_VAR: str(tmp_path / "none")}))
    assert found["devices"].status == "error" and "npu-smi" in found["devices"].detail
    assert found["CANN"].status == "error"


def test_the_cli_passes_the_demo_config_here_and_fails_qwen7b_in_a_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    store = f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert main(["doctor", str(TINY), "--set", f"devices.state_dir={tmp_path}", "--set", store]) == 0
    out = capsys.readouterr().out
    assert "ready: 0 errors, 0 warnings" in out and "a small matmul on the CPU" in out
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin")
    monkeypatch.setenv(ASCEND_ROOT_VAR, str(tmp_path / "none"))
    silent_hub = f"http://127.0.0.1:{unused_port()}"  # this host has no way to modelscope.cn either
    assert main(["doctor", str(QWEN7B), "--set", f"model.endpoint={silent_hub}", "--set", store]) == 1
    out = capsys.readouterr().out
    assert "not ready: 4 errors, 2 warnings" in out and "Traceback" not in out
    assert "Connection refused" in out and "MLflow" in out and "Prefect" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_without_a_config_it_checks_this_hosts_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3")
    (found, prefect) = diagnose(None, environ)  # devices.kind auto finds npu-smi; one card per task is there
    assert found.check == "devices" and found.status == "ok" and "8 npu (910B3)" in found.detail
    assert prefect.check == "Prefect"


def npu_lease(*ids: int) -> Lease:
    return Lease(kind="npu", ids=ids, master_port=29500, task="train", flow_run_id=None, lease_id="test", since="",
                 _locks=None)


def test_a_training_lease_with_a_broken_card_is_refused_naming_it(engine_python: Path) -> None:
    engine = EngineSettings(python=str(engine_python),
                            env={"PYTHONPATH": str(TORCH_NPU_STANDIN), "FAKE_TORCH_NPU": "no-kernels:1"})
    with pytest.raises(CardsNotWorking, match=r"^the npu lease \(4,6\) cannot train: NPU 6: a small matmul failed: "
                       r"RuntimeError: call aclnnCast failed.*Op Cast does not has any binary.*\(fix: CANN's kernels"):
        require_working_cards(engine, npu_lease(4, 6))
    require_working_cards(engine.model_copy(update={"env": {**engine.env, "FAKE_TORCH_NPU": "ok:8"}}), npu_lease(4, 6))


def test_a_training_lease_on_310p_cards_is_refused_naming_the_chip(engine_python: Path) -> None:
    """The run path has no npu-smi table of its own: torch_npu names the chip of each leased card."""
    engine = EngineSettings(python=str(engine_python), env={"PYTHONPATH": str(TORCH_NPU_STANDIN),
                                                           "FAKE_TORCH_NPU": "ok:8", "FAKE_TORCH_NPU_CHIP": "310P3"})
    with pytest.raises(CardsNotWorking, match=r"^the npu lease \(0,1\) cannot train: NPU 0: Ascend310P3: an inference "
                       r"card LLaMA-Factory does not train on \(LLaMA-Factory #10418\).*NPU 1: Ascend310P3"):
        require_working_cards(engine, npu_lease(0, 1))


def test_a_cpu_lease_is_not_probed() -> None:
    cpu = Lease(kind="cpu", ids=(0, 1), master_port=29500, task="train", flow_run_id=None, lease_id="t", since="",
                _locks=None)
    require_working_cards(EngineSettings(python="/nonexistent/python", command_prefix=["no-such-tool"]), cpu)
