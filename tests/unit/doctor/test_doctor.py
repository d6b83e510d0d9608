"""`npu-sft doctor`: hosts seen through the npu-smi / nvidia-smi doubles and a fake CANN tree, each failure the Ascend
users report ending as one finding that names what was seen and the fix."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from npu_sft.cli import main
from npu_sft.doctor import Finding, diagnose
from npu_sft.doctor.ascend import check_hccl
from npu_sft.engine import EngineSettings
from npu_sft.host_setup import ASCEND_ROOT_VAR
from npu_sft.settings import load_pipeline
from tests.fakes.devices import put_fake_tools_on_path

REPO = Path(__file__).resolve().parents[3]
QWEN7B = REPO / "configs" / "qwen7b.yaml"
TINY = REPO / "configs" / "tiny_cpu.yaml"


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.check: finding for finding in findings}


def npu_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, cann: str | None = "9.1.0") -> dict[str, str]:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE=fixture)
    root = tmp_path / "Ascend"
    if cann is not None:
        info = root / "ascend-toolkit" / "latest" / f"{platform.machine()}-linux" / "ascend_toolkit_install.info"
        info.parent.mkdir(parents=True)
        info.write_text(f"version={cann}\n")
        (root / "ascend-toolkit" / "set_env.sh").write_text("export ASCEND_HOME_PATH=...\n")
    return {ASCEND_ROOT_VAR: str(root)}


def qwen7b(tmp_path: Path, *overrides: str):
    return load_pipeline(QWEN7B, [f"devices.state_dir={tmp_path / 'leases'}",
                                  f"engine.env_script={tmp_path / 'Ascend' / 'ascend-toolkit' / 'set_env.sh'}",
                                  *overrides])


def test_a_healthy_910b_host_is_ready_for_the_qwen7b_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3")
    found = by_check(diagnose(qwen7b(tmp_path, "llamafactory.overrides.ddp_timeout=1800"), environ))
    assert found["devices"].status == "ok" and "8 npu (910B3) from npu-smi info, 8 usable" in found["devices"].detail
    assert found["CANN"].status == "ok" and found["CANN"].detail.startswith("9.1.0 (")
    assert found["HCCL timeout"].status == "ok"
    assert {finding.status for finding in found.values()} == {"ok"}


def test_a_310p_card_is_refused_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "2x310P3")
    found = by_check(diagnose(qwen7b(tmp_path, "devices.train=2"), environ))
    assert found["NPU 0"].status == "error" and "#10418" in found["NPU 0"].detail
    assert found["NPU 1"].status == "error"


def test_an_unhealthy_card_and_too_few_usable_cards_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B1_unhealthy")
    found = by_check(diagnose(qwen7b(tmp_path, "devices.train=8"), environ))
    unhealthy = [finding for finding in found.values() if finding.check.startswith("NPU ")]
    assert unhealthy and all(f.status == "error" and "health" in f.detail and "npu-smi info -t health" in f.fix
                             for f in unhealthy)
    assert found["devices.train"].status == "error" and "needs 8 npu" in found["devices.train"].detail


def test_busy_cards_are_a_warning_naming_the_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3_busy")
    busy = [f for f in diagnose(qwen7b(tmp_path, "devices.train=1"), environ) if f.check.startswith("NPU ")]
    assert busy and all(finding.status == "warning" and "processes" in finding.detail for finding in busy)


def test_no_cann_and_a_missing_env_script_say_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3", cann=None)
    found = by_check(diagnose(qwen7b(tmp_path), environ))
    assert found["CANN"].status == "error" and "NPU_SFT_ENGINE_CONTAINER" in found["CANN"].fix
    assert found["engine.env_script"].status == "error" and "set_env.sh does not exist" in found["engine.env_script"].detail


def test_a_container_engine_leaves_cann_to_the_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3", cann=None)
    pipeline = qwen7b(tmp_path, "engine.python=python", "engine.command_prefix=[docker, exec, -i, llamafactory]")
    found = by_check(diagnose(pipeline, environ))
    assert found["CANN"].status == "warning" and "docker exec -i llamafactory" in found["CANN"].detail


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
    found = by_check(diagnose(qwen7b(tmp_path), {ASCEND_ROOT_VAR: str(tmp_path / "none")}))
    assert found["devices"].status == "error" and "npu-smi" in found["devices"].detail
    assert found["CANN"].status == "error"


def test_the_cli_passes_the_demo_config_here_and_fails_qwen7b_in_a_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["doctor", str(TINY), "--set", f"devices.state_dir={tmp_path}"]) == 0
    assert "ready: 0 errors, 0 warnings" in capsys.readouterr().out
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin")
    monkeypatch.setenv(ASCEND_ROOT_VAR, str(tmp_path / "none"))
    assert main(["doctor", str(QWEN7B)]) == 1
    out = capsys.readouterr().out
    assert "not ready: 3 errors, 1 warning" in out and "Traceback" not in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_without_a_config_it_checks_this_hosts_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = npu_host(tmp_path, monkeypatch, "8x910B3")
    (found,) = diagnose(None, environ)  # devices.kind auto finds npu-smi; one card per task is there
    assert found.check == "devices" and found.status == "ok" and "8 npu (910B3)" in found.detail
