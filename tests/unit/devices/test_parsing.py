"""Parsers on the exact `npu-smi info` / `npu-list` captures from the seed docs, and variants of them."""

from __future__ import annotations

import pytest

from npu_sft.devices import DeviceError, DeviceProcess, parse_visible_devices
from npu_sft.devices.parsing import (
    parse_npu_list,
    parse_npu_smi_info,
    parse_nvidia_smi_apps,
    parse_nvidia_smi_gpus,
)
from tests.fakes.devices import fixture_text


def test_npu_smi_info_8x910B1_seed_capture() -> None:
    info = parse_npu_smi_info(fixture_text("npu_smi_info_8x910B1.txt"))

    assert [d.id for d in info.devices] == list(range(8))
    assert {d.name for d in info.devices} == {"910B1"}
    assert {d.health for d in info.devices} == {"OK"}
    assert [d.memory_used_mb for d in info.devices] == [3306, 3307, 3307, 3306, 3307, 3307, 3306, 3305]
    assert {d.memory_total_mb for d in info.devices} == {65536}
    # The docs' capture stops before the process table: processes are unknown, not "none".
    assert info.process_table_present is False
    assert not any(d.processes_known for d in info.devices)


def test_npu_smi_info_8x910B3_seed_capture() -> None:
    info = parse_npu_smi_info(fixture_text("npu_smi_info_8x910B3.txt"))

    assert [(d.id, d.name, d.health) for d in info.devices] == [(i, "910B3", "OK") for i in range(8)]
    assert [d.memory_used_mb for d in info.devices] == [3318, 3314, 3314, 3314, 3314, 3314, 3314, 3315]
    assert all(d.healthy for d in info.devices)


def test_npu_smi_info_with_an_idle_process_table() -> None:
    info = parse_npu_smi_info(fixture_text("npu_smi_info_8x910B3_idle.txt"))

    assert info.process_table_present is True
    assert all(d.processes_known and d.processes == () for d in info.devices)
    assert len(info.devices) == 8


def test_npu_smi_info_with_processes_on_cards() -> None:
    info = parse_npu_smi_info(fixture_text("npu_smi_info_8x910B3_busy.txt"))
    by_id = {d.id: d for d in info.devices}

    # A nameless process, as npu-smi prints for processes in another container.
    assert by_id[2].processes == (DeviceProcess(pid=1333928, name="", memory_mb=37709),)
    assert by_id[6].processes == (
        DeviceProcess(pid=3085960, name="python3.10", memory_mb=47426),
        DeviceProcess(pid=3085961, name="python3.10", memory_mb=122),
    )
    # Wide numbers lose the space before the slash: "41052/ 65536".
    assert by_id[2].memory_used_mb == 41052
    assert [d.id for d in info.devices if d.processes] == [2, 6]


def test_npu_smi_info_unhealthy_cards() -> None:
    info = parse_npu_smi_info(fixture_text("npu_smi_info_8x910B1_unhealthy.txt"))

    assert {d.id: d.health for d in info.devices if not d.healthy} == {5: "Warning", 7: "Critical"}


@pytest.mark.parametrize(
    "text",
    ["", "dcmi module initialize failed. ret is -8005\n", "+----+\n| npu-smi 24.1.rc1   Version: 24.1.rc1 |\n+----+\n"],
)
def test_npu_smi_info_without_cards_is_an_error(text: str) -> None:
    with pytest.raises(DeviceError, match="listed no NPUs"):
        parse_npu_smi_info(text)


def test_npu_smi_process_on_a_card_missing_from_the_table_is_an_error() -> None:
    text = fixture_text("npu_smi_info_8x910B3_idle.txt").replace(
        "| No running processes found in NPU 7 ", "| No running processes found in NPU 9 "
    )
    with pytest.raises(DeviceError, match=r"processes on NPU \[9\]"):
        parse_npu_smi_info(text)


def test_npu_list_seed_capture() -> None:
    devices = parse_npu_list(fixture_text("npu_list_4.txt"))

    assert [(d.id, d.name, d.note) for d in devices] == [(i, f"davinci{i}", "") for i in range(4)]
    assert all(d.health is None and not d.processes_known for d in devices)


def test_npu_list_shows_the_container_a_card_is_given_to() -> None:
    text = fixture_text("npu_list_4.txt").replace(
        "| /dev/davinci1 |      None      |     None     |",
        "| /dev/davinci1 |  llamafactory  | 3f2c1a9e8b7d |",
    )
    devices = parse_npu_list(text)

    assert devices[1].note == "container llamafactory"


def test_npu_list_without_devices_is_an_error() -> None:
    with pytest.raises(DeviceError, match="no /dev/davinci"):
        parse_npu_list("npu-list: command failed\n")


def test_nvidia_smi_queries() -> None:
    gpus = parse_nvidia_smi_gpus(fixture_text("nvidia_smi_gpus_3.csv"))
    apps = parse_nvidia_smi_apps(fixture_text("nvidia_smi_apps_1busy.csv"))

    assert [(g.index, g.name, g.memory_used_mb, g.memory_total_mb) for g in gpus] == [
        (0, "NVIDIA A100-SXM4-80GB", 0, 81920),
        (1, "NVIDIA A100-SXM4-80GB", 40210, 81920),
        (2, "NVIDIA A100-SXM4-80GB", None, None),  # [N/A]
    ]
    assert len(apps) == 1
    assert (apps[0].gpu_uuid, apps[0].pid, apps[0].memory_mb) == (gpus[1].uuid, 48211, 40200)
    assert apps[0].name == "/usr/bin/python3 -m vllm, serve"  # a comma inside the command line survives
    assert parse_nvidia_smi_apps("") == ()


def test_nvidia_smi_unexpected_output_is_an_error() -> None:
    with pytest.raises(DeviceError, match="--query-gpu"):
        parse_nvidia_smi_gpus("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\n")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0,1,2,3", (0, 1, 2, 3)), ("5", (5,)), (" 4, 6 ", (4, 6)), ("7,0", (7, 0))],
)
def test_visible_devices_values(value: str, expected: tuple[int, ...]) -> None:
    assert parse_visible_devices(value, "ASCEND_RT_VISIBLE_DEVICES") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0,,1", "empty entry at position 2"),
        ("0,1,", "empty entry at position 3"),
        ("a,b", "'a' is not a device id"),
        ("-1", "negative id -1"),
        ("0,1,1", "names device 1 twice"),
        ("", "set but empty"),
        ("GPU-5f2a1c3e", "is not a device id"),
        ("1.5", "is not a device id"),
    ],
)
def test_malformed_visible_devices_values(value: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message) as raised:
        parse_visible_devices(value, "ASCEND_RT_VISIBLE_DEVICES")
    assert "ASCEND_RT_VISIBLE_DEVICES" in str(raised.value)
