"""Helpers for the device tests: put fake npu-smi / npu-list / nvidia-smi on PATH, build fixtures, run workers."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

FAKES_DIR = Path(__file__).resolve().parent
FAKE_BIN = FAKES_DIR / "bin"
DEVICE_FIXTURES = FAKES_DIR / "fixtures" / "devices"
LEASE_WORKER = FAKES_DIR / "lease_worker.py"

FAKE_TOOLS = ("npu-smi", "npu-list", "nvidia-smi")
# What the fake shell scripts themselves call; linked in so PATH can hold nothing but the chosen fakes.
SCRIPT_UTILITIES = ("cat", "dirname", "readlink")


def fixture_text(name: str) -> str:
    return (DEVICE_FIXTURES / name).read_text(encoding="utf-8")


def put_fake_tools_on_path(monkeypatch: pytest.MonkeyPatch, bin_dir: Path, *tools: str, **env: str) -> Path:
    """Make PATH exactly a directory holding the chosen fakes, so a real tool on the machine cannot leak in.

    `env` sets the fakes' fixture variables, e.g. FAKE_NPU_SMI_FIXTURE="8x910B3".
    """
    unknown = set(tools) - set(FAKE_TOOLS)
    if unknown:
        raise ValueError(f"no fake for {sorted(unknown)}")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        (bin_dir / tool).symlink_to(FAKE_BIN / tool)
    for utility in SCRIPT_UTILITIES:
        real = shutil.which(utility)
        if real is None:
            raise RuntimeError(f"{utility} is needed by the fake device tools but is not on PATH")
        (bin_dir / utility).symlink_to(real)
    monkeypatch.setenv("PATH", str(bin_dir))
    for variable in (
        "FAKE_NPU_SMI_FIXTURE",
        "FAKE_NPU_SMI_EXIT",
        "FAKE_NPU_LIST_FIXTURE",
        "FAKE_NVIDIA_SMI_GPUS",
        "FAKE_NVIDIA_SMI_APPS",
    ):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    for variable in ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(variable, raising=False)
    return bin_dir


def npu_smi_with_processes(base: str, processes: dict[int, list[tuple[int, str, int]]]) -> str:
    """An `npu-smi info` text whose process table lists `processes` ({npu: [(pid, name, MB)]}).

    `base` must already have a process table (the *_idle fixtures); rows are laid out as npu-smi prints them.
    """
    text = base
    for npu, rows in processes.items():
        idle_line = re.compile(rf"^\| No running processes found in NPU {npu}\s+\|$", re.MULTILINE)
        if not idle_line.search(text):
            raise ValueError(f"the base text has no idle line for NPU {npu}")
        busy_rows = "\n".join(f"| {npu:<7} {0:<17} | {pid:<13} | {name:<24} | {mb:<23} |" for pid, name, mb in rows)
        text = idle_line.sub(busy_rows, text)
    return text


def worker_env() -> dict[str, str]:
    """Environment for lease worker processes: the current one (PATH with the fakes, fixture variables)."""
    return dict(os.environ)
