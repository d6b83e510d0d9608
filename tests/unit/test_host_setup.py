"""Which engine env setup-envs builds: the host seen through the device tools' doubles and a fake CANN tree (the
install-info file CANN writes, in its old and new layouts), and the repository's own lock and pins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from npu_sft.host_setup import (
    ASCEND_ROOT_VAR,
    CONTAINER_VAR,
    HostSetupError,
    cann_order,
    cann_version,
    plan_engine,
)
from tests.fakes.devices import FAKE_BIN

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "engine.lock"
PYPROJECT = REPO / "pyproject.toml"
ARCH = f"{platform.machine()}-linux"


def host(tmp_path: Path, *tools: str, cann: str | None = None, layout: str = "ascend-toolkit/latest") -> dict[str, str]:
    """An environment whose PATH holds only the chosen device-tool doubles, CANN `cann` installed under a fake root."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        (bin_dir / tool).symlink_to(FAKE_BIN / tool)
    root = tmp_path / "Ascend"
    if cann is not None:
        info = root / layout / ARCH / "ascend_toolkit_install.info"
        info.parent.mkdir(parents=True)
        info.write_text(f"package_name=Ascend-cann-toolkit\nversion={cann}\narch={platform.machine()}\n")
    return {"PATH": str(bin_dir), ASCEND_ROOT_VAR: str(root)}


def pins(tmp_path: Path, *group: str) -> Path:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[dependency-groups]\nengine-npu = [" + ", ".join(f'"{pin}"' for pin in group) + "]\n")
    return pyproject


def test_a_host_without_device_tools_keeps_the_locked_cpu_env(tmp_path: Path) -> None:
    plan = plan_engine(host(tmp_path), LOCK, PYPROJECT)
    assert (plan.host, plan.extra, plan.container) == ("cpu", (), None)
    assert "torch 2.14.1 on the CPU" in plan.said


def test_a_gpu_host_keeps_the_locked_cuda_build(tmp_path: Path) -> None:
    plan = plan_engine(host(tmp_path, "nvidia-smi"), LOCK, PYPROJECT)
    assert plan.host == "gpu" and plan.extra == () and "nvidia-smi at" in plan.said


def test_an_ascend_host_gets_torch_npu_and_the_torch_it_is_built_for(tmp_path: Path) -> None:
    plan = plan_engine(host(tmp_path, "npu-smi", cann="9.1.0", layout="cann-9.1.0"), LOCK, PYPROJECT)
    assert plan.host == "ascend"
    assert plan.extra == ("torch==2.14.0", "torchvision==0.29.0", "torch-npu==2.14.0")
    assert "npu-smi at" in plan.said and "CANN 9.1.0" in plan.said and "torch-npu 2.14.0" in plan.said


def test_a_cann_older_than_torch_npu_needs_is_one_line_with_both_versions(tmp_path: Path) -> None:
    with pytest.raises(HostSetupError) as raised:
        plan_engine(host(tmp_path, "npu-smi", cann="8.0.RC1"), LOCK, PYPROJECT)
    message = str(raised.value)
    assert "\n" not in message
    assert "CANN 8.0.RC1" in message and "torch-npu 2.14.0" in message and "CANN 9.1.0 or newer" in message
    assert CONTAINER_VAR in message


def test_a_release_in_the_table_is_held_to_its_own_cann(tmp_path: Path) -> None:
    pyproject = pins(tmp_path, "torch==2.9.0", "torch-npu==2.9.0.post2")
    with pytest.raises(HostSetupError, match=r"CANN 8\.5\.0 .* \(CANN 9\.0\.0 or newer\): upgrade CANN"):
        plan_engine(host(tmp_path / "old", "npu-smi", cann="8.5.0", layout="cann"), LOCK, pyproject)
    plan = plan_engine(host(tmp_path / "new", "npu-smi", cann="9.0.0", layout="cann"), LOCK, pyproject)
    assert plan.extra == ("torch==2.9.0", "torch-npu==2.9.0.post2") and "newer than this check's table" not in plan.said


def test_torch_npu_for_another_torch_than_the_env_gets_is_refused(tmp_path: Path) -> None:
    # torch-npu 2.14.0's wheel requires torch==2.14.0.*; the lock alone has 2.14.1.
    with pytest.raises(HostSetupError, match=r"torch-npu 2\.14\.0 is built for torch 2\.14\.0, .* torch 2\.14\.1 \(engine\.lock\)"):
        plan_engine(host(tmp_path, "npu-smi", cann="9.1.0"), LOCK, pins(tmp_path, "torch-npu==2.14.0"))


def test_npu_smi_without_cann_says_to_install_it_or_use_the_container(tmp_path: Path) -> None:
    with pytest.raises(HostSetupError, match=rf"no CANN toolkit under {tmp_path}/Ascend: .*{CONTAINER_VAR}=NAME"):
        plan_engine(host(tmp_path, "npu-smi"), LOCK, PYPROJECT)


def test_a_configured_container_replaces_the_local_engine_env(tmp_path: Path) -> None:
    plan = plan_engine({**host(tmp_path, "npu-smi"), CONTAINER_VAR: "llamafactory"}, LOCK, PYPROJECT)
    assert plan.container == "llamafactory" and plan.extra == ()
    assert "command_prefix: [docker, exec, -i, llamafactory]" in plan.said


def test_cann_versions_order_release_candidates_before_their_release(tmp_path: Path) -> None:
    ordered = ["7.0.0", "8.0.RC1", "8.0.RC2.alpha001", "8.0.0.beta1", "8.3.RC1", "8.5.0", "9.1.0"]
    assert sorted(ordered, key=cann_order) == ordered
    assert cann_version(tmp_path) is None


def setup_envs(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "setup-envs"), "--dry-run", "engine"],
        env={**os.environ, **env, "PATH": f"{env['PATH']}:{os.environ['PATH']}", "PYTHON": sys.executable,
             "NPU_SFT_ENV_CACHE": str(tmp_path / "envs")},
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_setup_envs_dry_run_on_an_ascend_host_says_the_install_it_would_do(tmp_path: Path) -> None:
    done = setup_envs(tmp_path, host(tmp_path, "npu-smi", cann="9.1.0"))
    assert done.returncode == 0, done.stderr
    assert f"would create the engine env in {tmp_path}/envs/engine-" in done.stdout
    assert "then pip install torch==2.14.0 torchvision==0.29.0 torch-npu==2.14.0" in done.stdout
    assert "Ascend host (npu-smi at" in done.stderr
    assert not (tmp_path / "envs").exists()


def test_setup_envs_refuses_an_old_cann_in_one_line_before_building(tmp_path: Path) -> None:
    done = setup_envs(tmp_path, host(tmp_path, "npu-smi", cann="8.0.RC1"))
    assert done.returncode == 2
    assert done.stderr.startswith("setup-envs: error: CANN 8.0.RC1") and done.stderr.count("\n") == 1
    assert not (tmp_path / "envs").exists()
