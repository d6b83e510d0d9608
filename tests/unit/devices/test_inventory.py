"""The inventory end to end: fake npu-smi / npu-list / nvidia-smi executables on PATH, real subprocesses."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from npu_sft.devices import (
    DeviceError,
    DeviceSettings,
    lease_devices,
    processes_on_devices,
    resolve_kind,
    take_inventory,
)
from tests.fakes.devices import fixture_text, npu_smi_with_processes, put_fake_tools_on_path


def settings_for(tmp_path: Path, **overrides: object) -> DeviceSettings:
    return DeviceSettings.model_validate({"state_dir": str(tmp_path / "state"), **overrides})


@pytest.mark.parametrize(
    ("tools", "expected"),
    [(("npu-smi", "nvidia-smi"), "npu"), (("npu-list",), "npu"), (("nvidia-smi",), "gpu"), ((), "cpu")],
)
def test_auto_kind_follows_the_tools_on_path(
    tools: tuple[str, ...], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", *tools)

    assert resolve_kind("auto") == expected
    assert resolve_kind("cpu") == "cpu"  # an explicit kind is taken as given


def test_inventory_of_the_8x910B3_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B3")

    inventory = take_inventory(settings_for(tmp_path), environ={})

    assert (inventory.kind, inventory.source) == ("npu", "npu-smi info")
    assert inventory.usable_ids == tuple(range(8))
    assert inventory.entry(0).device.memory_used_mb == 3318


def test_unhealthy_cards_are_left_out_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B1_unhealthy")

    inventory = take_inventory(settings_for(tmp_path), environ={})

    assert inventory.usable_ids == (0, 1, 2, 3, 4, 6)
    assert {e.device.id: e.excluded_reason for e in inventory.excluded} == {
        5: "health is Warning",
        7: "health is Critical",
    }


def test_cards_running_foreign_processes_are_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B3_busy")

    inventory = take_inventory(settings_for(tmp_path), environ={})

    assert inventory.usable_ids == (0, 1, 3, 4, 5, 7)
    reasons = {e.device.id: e.excluded_reason for e in inventory.excluded}
    assert reasons[2] == "runs processes npu-sft did not start (pid 1333928)"
    assert reasons[6] == "runs processes npu-sft did not start (pid 3085960, 3085961)"


@pytest.fixture
def engine_child() -> Iterator[subprocess.Popen[bytes]]:
    """A child of the test process, standing in for the torchrun worker a lease holder starts."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait()


def test_processes_started_under_a_lease_do_not_exclude_the_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_child: subprocess.Popen[bytes]
) -> None:
    idle = fixture_text("npu_smi_info_8x910B3_idle.txt")
    fixture = tmp_path / "npu_smi.txt"
    fixture.write_text(idle)
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE=str(fixture))
    settings = settings_for(tmp_path, kind="npu", train=[3])

    with lease_devices(settings, task="train", environ={}):
        # Now the engine runs: our child on the leased card 3, and also on card 4 which it did not lease;
        # card 5 runs a pid that is nobody's descendant here (init's).
        running = {
            3: [(engine_child.pid, "python3", 30000)],
            4: [(engine_child.pid, "python3", 100)],
            5: [(1, "", 100)],
        }
        fixture.write_text(npu_smi_with_processes(idle, running))
        inventory = take_inventory(settings, environ={})

    assert [e.device.id for e in inventory.excluded] == [4, 5]
    assert inventory.entry(3).device.processes[0].pid == engine_child.pid


def test_a_card_whose_lease_holder_is_gone_counts_as_foreign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_child: subprocess.Popen[bytes]
) -> None:
    fixture = tmp_path / "npu_smi.txt"
    fixture.write_text(
        npu_smi_with_processes(fixture_text("npu_smi_info_8x910B3_idle.txt"), {3: [(engine_child.pid, "", 1)]})
    )
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE=str(fixture))

    # No lease is held, so the process on card 3 is nobody's we know of: the card must not be handed out.
    inventory = take_inventory(settings_for(tmp_path), environ={})

    assert [e.device.id for e in inventory.excluded] == [3]


def test_visible_devices_variable_restricts_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B3")

    inventory = take_inventory(settings_for(tmp_path), environ={"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"})

    assert inventory.usable_ids == (0, 1, 2, 3)
    assert inventory.entry(6).excluded_reason == "not in ASCEND_RT_VISIBLE_DEVICES=0,1,2,3"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0,1,8", r"names npu \[8\], which npu-smi info does not list"),
        ("0,,1", "empty entry"),
        ("a,b", "not a device id"),
    ],
)
def test_bad_visible_devices_variable_is_an_error(
    value: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B3")

    with pytest.raises(DeviceError, match=message):
        take_inventory(settings_for(tmp_path), environ={"ASCEND_RT_VISIBLE_DEVICES": value})


def test_cpu_kind_ignores_the_accelerator_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin")

    inventory = take_inventory(
        settings_for(tmp_path, cpu_virtual_devices=3), environ={"ASCEND_RT_VISIBLE_DEVICES": "a,b"}
    )

    assert (inventory.kind, inventory.usable_ids) == ("cpu", (0, 1, 2))


def test_npu_smi_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_EXIT="3")

    with pytest.raises(DeviceError, match=r"`npu-smi info` failed with exit code 3: dcmi module initialize failed"):
        take_inventory(settings_for(tmp_path), environ={})


def test_npu_list_is_the_fallback_without_npu_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-list", FAKE_NPU_LIST_FIXTURE="4")

    inventory = take_inventory(settings_for(tmp_path), environ={})

    assert (inventory.kind, inventory.source, inventory.usable_ids) == ("npu", "npu-list", (0, 1, 2, 3))


def test_torch_npu_count_is_the_last_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin")
    settings = settings_for(tmp_path, kind="npu")

    inventory = take_inventory(settings, environ={}, npu_count_probe=lambda: 2)

    assert (inventory.source, inventory.usable_ids) == ("torch_npu device count", (0, 1))
    with pytest.raises(DeviceError, match="neither npu-smi nor npu-list is on PATH"):
        take_inventory(settings, environ={})


def test_gpu_inventory_leaves_out_busy_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(
        monkeypatch, tmp_path / "bin", "nvidia-smi", FAKE_NVIDIA_SMI_GPUS="3", FAKE_NVIDIA_SMI_APPS="1busy"
    )

    inventory = take_inventory(settings_for(tmp_path), environ={"CUDA_VISIBLE_DEVICES": "0,1"})

    assert (inventory.kind, inventory.usable_ids) == ("gpu", (0,))
    assert inventory.entry(1).excluded_reason == "runs processes npu-sft did not start (pid 48211)"
    assert inventory.entry(2).excluded_reason == "not in CUDA_VISIBLE_DEVICES=0,1"


def test_processes_on_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B3_busy")

    found = processes_on_devices([2, 3, 6])

    assert {device_id: [p.pid for p in processes] for device_id, processes in found.items()} == {
        2: [1333928],
        3: [],
        6: [3085960, 3085961],
    }
    with pytest.raises(DeviceError, match=r"does not list NPU \[8\]"):
        processes_on_devices([8])


def test_processes_on_devices_refuses_without_a_process_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The docs' captures end before the process table; "no rows" must not be read as "idle".
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B1")

    with pytest.raises(DeviceError, match="no process table"):
        processes_on_devices([0])
