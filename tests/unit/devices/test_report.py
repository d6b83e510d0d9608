"""`render_device_report`: what `npu-sft devices` prints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from npu_sft.devices import DeviceSettings, lease_devices, render_device_report
from tests.fakes.devices import put_fake_tools_on_path


def _render(settings: DeviceSettings, environ: dict[str, str]) -> str:
    console = Console(record=True, width=240, color_system=None)
    for renderable in render_device_report(settings, environ=environ):
        console.print(renderable)
    return console.export_text()


def _row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.split("│")[1:-1]]


def test_report_shows_inventory_exclusions_and_leases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B3_busy")
    settings = DeviceSettings(state_dir=tmp_path / "state", train=[0, 1])

    with lease_devices(settings, task="train", flow_run_id="flow-run-42", environ={}) as lease:
        text = _render(settings, {"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3,4,5,6"})

    assert "NPU devices (from npu-smi info)" in text
    assert _cells(_row(text, "│ npu  │ 0 ")) == [
        "npu",
        "0",
        "910B3",
        "OK",
        "3318 / 65536 MB",
        "none",
        f"leased by train (pid {os.getpid()})",
    ]
    assert "41052 / 65536 MB" in _row(text, "│ npu  │ 2 ")
    assert "left out: runs processes npu-sft did not start (pid 1333928)" in _row(text, "│ npu  │ 2 ")
    assert "left out: not in ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6" in _row(text, "│ npu  │ 7 ")
    assert "free" in _row(text, "│ npu  │ 5 ")
    lease_row = _row(text, "│ npu 0,1 ")
    for expected in ("train", "flow-run-42", str(lease.master_port), lease.since):
        assert expected in lease_row


def test_report_still_lists_leases_when_the_probe_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_EXIT="1")
    settings = DeviceSettings(state_dir=tmp_path / "state")

    text = _render(settings, {})

    assert "Device inventory failed: `npu-smi info` failed with exit code 1" in text
    assert "no active leases" in text


def test_report_on_a_cpu_only_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin")

    text = _render(DeviceSettings(state_dir=tmp_path / "state", cpu_virtual_devices=2), {})

    assert "CPU devices (from cpu_virtual_devices)" in text
    assert "free" in _row(text, "│ cpu  │ 1 ")
