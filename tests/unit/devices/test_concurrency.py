"""Many processes leasing from one pool at once: no device (or MASTER_PORT) is ever held twice."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from npu_sft.devices import DeviceSettings, current_leases, lease_devices
from npu_sft.devices.records import LEASES_SUBDIR
from tests.fakes.devices import LEASE_WORKER, put_fake_tools_on_path, worker_env

WORKERS = 8
ATTEMPTS_PER_WORKER = 25  # 200 leases in all
DEVICES = 8
MAX_HOLD_S = 0.02


def _overlaps(intervals: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    ordered = sorted(intervals)
    return [(a, b) for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1]]


def test_no_device_is_ever_held_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin")
    settings = DeviceSettings(kind="cpu", cpu_virtual_devices=DEVICES, lease_timeout_s=60, state_dir=tmp_path / "state")
    logs = [tmp_path / f"worker-{seed}.jsonl" for seed in range(WORKERS)]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(LEASE_WORKER),
                "cycle",
                "--settings",
                settings.model_dump_json(),
                "--attempts",
                str(ATTEMPTS_PER_WORKER),
                "--log",
                str(log),
                "--seed",
                str(seed),
                "--max-hold-s",
                str(MAX_HOLD_S),
            ],
            env=worker_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, log in enumerate(logs)
    ]
    failures = []
    for worker in workers:
        _, stderr = worker.communicate(timeout=60)
        if worker.returncode != 0:
            failures.append(stderr)
    assert failures == []

    leases = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    assert len(leases) == WORKERS * ATTEMPTS_PER_WORKER
    by_device: dict[int, list[tuple[int, int]]] = defaultdict(list)
    by_port: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for lease in leases:
        interval = (lease["acquired"], lease["released"])
        for device_id in lease["ids"]:
            by_device[device_id].append(interval)
        by_port[lease["port"]].append(interval)
    assert set(by_device) <= set(range(DEVICES))
    # Leases really did run side by side, or the test proves nothing.
    everything = sorted((lease["acquired"], lease["released"]) for lease in leases)
    assert _overlaps(everything), "no two leases ever overlapped in time; the test exercised no concurrency"
    assert {device_id: _overlaps(spans) for device_id, spans in by_device.items() if _overlaps(spans)} == {}
    assert {port: _overlaps(spans) for port, spans in by_port.items() if _overlaps(spans)} == {}

    # Every lease was given back: no live records, and the whole pool can be leased at once right away.
    assert current_leases(settings) == []
    assert list((tmp_path / "state" / LEASES_SUBDIR).glob("*.json")) == []
    with lease_devices(settings.model_copy(update={"train": DEVICES, "lease_timeout_s": 0}), task="train") as lease:
        assert lease.ids == tuple(range(DEVICES))
