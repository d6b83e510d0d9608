"""Leases: exclusivity, the launch environment, waiting, bad requests, and reclaiming a killed holder's cards."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from npu_sft.devices import (
    DeviceBusyError,
    DeviceError,
    DeviceSettings,
    acquire_lease,
    current_leases,
    lease_devices,
    lease_history,
)
from npu_sft.devices import leases as leases_module
from npu_sft.devices.records import LEASES_SUBDIR, device_lock_path, try_lock, unlock
from tests.fakes.devices import (
    LEASE_WORKER,
    fixture_text,
    npu_smi_with_processes,
    put_fake_tools_on_path,
    worker_env,
)

FAST_POLL_S = 0.01


def settings_for(tmp_path: Path, **overrides: object) -> DeviceSettings:
    return DeviceSettings.model_validate({"state_dir": str(tmp_path / "state"), "lease_timeout_s": 5, **overrides})


@pytest.fixture
def npu_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An 8 x 910B3 host whose npu-smi shows the process table with every card idle."""
    return put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B3_idle")


@pytest.fixture
def cpu_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return put_fake_tools_on_path(monkeypatch, tmp_path / "bin")


def test_npu_lease_and_its_launch_environment(tmp_path: Path, npu_host: Path) -> None:
    settings = settings_for(tmp_path, train=4)

    with lease_devices(settings, task="train", flow_run_id="run-1", environ={}) as lease:
        assert (lease.kind, lease.ids, lease.nproc_per_node) == ("npu", (0, 1, 2, 3), 4)
        assert lease.env() == {"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3", "MASTER_PORT": str(lease.master_port)}
        assert 29500 <= lease.master_port <= 29999
        [record] = current_leases(settings)
        assert (record.ids, record.task, record.flow_run_id, record.pid) == (
            (0, 1, 2, 3),
            "train",
            "run-1",
            os.getpid(),
        )

    assert current_leases(settings) == []
    assert lease.released


def test_gpu_lease_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(
        monkeypatch, tmp_path / "bin", "nvidia-smi", FAKE_NVIDIA_SMI_GPUS="3", FAKE_NVIDIA_SMI_APPS="none"
    )

    with lease_devices(settings_for(tmp_path, eval=[2]), task="eval", environ={}) as lease:
        assert lease.env() == {
            "CUDA_VISIBLE_DEVICES": "2",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # so CUDA's ids mean what nvidia-smi's ids mean
            "MASTER_PORT": str(lease.master_port),
        }


def test_cpu_lease_sets_no_visible_devices_variable(tmp_path: Path, cpu_host: Path) -> None:
    with lease_devices(settings_for(tmp_path, train=2), task="train") as lease:
        assert (lease.kind, lease.ids, lease.nproc_per_node) == ("cpu", (0, 1), 2)
        assert lease.env() == {"MASTER_PORT": str(lease.master_port)}


def test_concurrent_tasks_in_one_process_get_disjoint_devices_and_ports(tmp_path: Path, npu_host: Path) -> None:
    settings = settings_for(tmp_path, train=4, eval=1, serve=1)

    with (
        lease_devices(settings, task="train", environ={}) as train,
        lease_devices(settings, task="eval", environ={}) as evaluation,
        lease_devices(settings, task="serve", environ={}) as serve,
    ):
        assert (train.ids, evaluation.ids, serve.ids) == ((0, 1, 2, 3), (4,), (5,))
        assert len({train.master_port, evaluation.master_port, serve.master_port}) == 3
        assert len(current_leases(settings)) == 3


def test_the_visible_devices_variable_limits_what_is_leased(tmp_path: Path, npu_host: Path) -> None:
    with lease_devices(
        settings_for(tmp_path, train=2), task="train", environ={"ASCEND_RT_VISIBLE_DEVICES": "6,7"}
    ) as lease:
        assert lease.env()["ASCEND_RT_VISIBLE_DEVICES"] == "6,7"


def test_a_lease_is_released_when_the_task_fails(tmp_path: Path, npu_host: Path) -> None:
    settings = settings_for(tmp_path, train=8)

    with pytest.raises(RuntimeError, match="training crashed"), lease_devices(settings, task="train", environ={}):
        raise RuntimeError("training crashed")

    with lease_devices(settings, task="train", environ={}) as again:
        assert again.ids == tuple(range(8))
    assert list((tmp_path / "state" / LEASES_SUBDIR).iterdir()) == []


def test_the_history_shows_the_train_lease_given_back_before_the_eval_lease_is_taken(
    tmp_path: Path, npu_host: Path
) -> None:
    settings = settings_for(tmp_path, train=8, eval=2)
    with lease_devices(settings, task="train", flow_run_id="run-1", environ={}):
        pass
    with lease_devices(settings, task="eval", flow_run_id="run-1", environ={}) as evaluation:
        assert evaluation.ids == (0, 1)  # cards the training held: free only because it gave them back
    with pytest.raises(RuntimeError), lease_devices(settings, task="serve", environ={}):
        raise RuntimeError("the server did not start")
    history = [(event.event, event.record.task, event.record.ids) for event in lease_history(settings)]
    assert history == [
        ("acquired", "train", tuple(range(8))),
        ("released", "train", tuple(range(8))),
        ("acquired", "eval", (0, 1)),
        ("released", "eval", (0, 1)),
        ("acquired", "serve", (0,)),
        ("released", "serve", (0,)),
    ]
    times = [event.at for event in lease_history(settings)]
    assert times == sorted(times)


def test_release_is_idempotent(tmp_path: Path, cpu_host: Path) -> None:
    lease = acquire_lease(settings_for(tmp_path), task="train")
    lease.release()
    lease.release()

    assert lease.released


def _assert_fails_at_once(settings: DeviceSettings, task: str, message: str, *, environ: dict[str, str]) -> None:
    started = time.monotonic()
    with pytest.raises(DeviceError, match=message) as raised:
        acquire_lease(settings, task=task, environ=environ, poll_interval_s=FAST_POLL_S)
    assert not isinstance(raised.value, DeviceBusyError)
    assert time.monotonic() - started < 2.0, "an impossible request must not wait for the lease timeout"


@pytest.mark.parametrize(
    ("overrides", "task", "environ", "message"),
    [
        ({"train": 9}, "train", {}, r"task train asks for 9 npu devices but this host has 8, of which 8 may be leased"),
        ({"train": [3, 8]}, "train", {}, r"asks for npu \[8\], which npu-smi info does not list \(this host has 0, 1,"),
        ({"train": 5}, "train", {"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}, r"of which 4 may be leased"),
        ({"train": [5]}, "train", {"ASCEND_RT_VISIBLE_DEVICES": "0,1"}, r"npu 5, which is left out: not in ASCEND_RT"),
        ({}, "train", {"ASCEND_RT_VISIBLE_DEVICES": "0,,1"}, r"ASCEND_RT_VISIBLE_DEVICES='0,,1' has an empty entry"),
        ({}, "train", {"ASCEND_RT_VISIBLE_DEVICES": "-1"}, r"negative id -1"),
        ({}, "predict", {}, r"unknown task 'predict'"),
    ],
)
def test_impossible_requests_fail_at_once_even_while_devices_are_busy(
    overrides: dict[str, object], task: str, environ: dict[str, str], message: str, tmp_path: Path, npu_host: Path
) -> None:
    settings = settings_for(tmp_path, lease_timeout_s=60, **overrides)
    holder_settings = settings_for(tmp_path, train=8)

    with lease_devices(holder_settings, task="train", environ={}):
        _assert_fails_at_once(settings, task, message, environ=environ)


def test_cards_left_out_by_the_inventory_cannot_be_requested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE="8x910B3_busy")

    _assert_fails_at_once(
        settings_for(tmp_path, train=[2]),
        "train",
        r"npu 2, which is left out: runs processes npu-sft did not start",
        environ={},
    )
    _assert_fails_at_once(
        settings_for(tmp_path, train=7), "train", r"of which 6 may be leased \(left out: 2: runs processes", environ={}
    )


@pytest.mark.parametrize("count", [0, -1])
def test_zero_or_negative_counts_are_rejected_by_the_settings(count: int) -> None:
    with pytest.raises(ValueError, match="a device count must be a positive integer"):
        DeviceSettings(train=count)


def test_busy_devices_are_waited_for_and_reported(tmp_path: Path, npu_host: Path) -> None:
    settings = settings_for(tmp_path, train=[0, 1], eval=[1], lease_timeout_s=10)
    messages: list[str] = []

    holder = acquire_lease(settings, task="train", flow_run_id="run-A", environ={})
    threading.Timer(0.3, holder.release).start()
    started = time.monotonic()
    with lease_devices(
        settings, task="eval", flow_run_id="run-B", on_wait=messages.append, environ={}, poll_interval_s=FAST_POLL_S
    ) as lease:
        waited = time.monotonic() - started
        assert lease.ids == (1,)

    assert 0.25 < waited < 5
    # Reported when the situation changes, not once per poll (~30 polls here). A second message may come
    # when the poll falls between the holder dropping its record and its lock ("holder being set up or gone").
    assert 1 <= len(messages) <= 2
    assert messages[0].startswith(
        f"task eval waits for npu device 1; busy: 1 (train, flow run run-A, pid {os.getpid()})"
    )


def test_a_released_card_whose_engine_is_still_exiting_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HCCL fails with "Maybe the last training process is running" if a card is reused too early.
    monkeypatch.setattr(leases_module, "INVENTORY_REFRESH_S", 0.05)
    idle = fixture_text("npu_smi_info_8x910B3_idle.txt")
    fixture = tmp_path / "npu_smi.txt"
    fixture.write_text(idle)
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE=str(fixture))
    settings = settings_for(tmp_path, train=[0, 1], eval=[1], lease_timeout_s=10)
    messages: list[str] = []

    holder = acquire_lease(settings, task="train", environ={})
    fixture.write_text(npu_smi_with_processes(idle, {1: [(4242, "python3", 30000)]}))  # its engine runs
    threading.Timer(0.2, holder.release).start()  # the lease ends, the engine is still exiting
    threading.Timer(0.6, fixture.write_text, args=(idle,)).start()  # and now it is gone
    started = time.monotonic()
    with lease_devices(
        settings, task="eval", on_wait=messages.append, environ={}, poll_interval_s=FAST_POLL_S
    ) as lease:
        assert lease.ids == (1,)
        assert time.monotonic() - started >= 0.55

    assert any("left out: runs processes npu-sft did not start (pid 4242)" in message for message in messages)


def test_a_card_still_in_use_after_its_lease_ends_times_out_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    idle = fixture_text("npu_smi_info_8x910B3_idle.txt")
    fixture = tmp_path / "npu_smi.txt"
    fixture.write_text(idle)
    put_fake_tools_on_path(monkeypatch, tmp_path / "bin", "npu-smi", FAKE_NPU_SMI_FIXTURE=str(fixture))
    settings = settings_for(tmp_path, train=[0, 1], eval=[1], lease_timeout_s=0.6)

    holder = acquire_lease(settings, task="train", environ={})
    fixture.write_text(npu_smi_with_processes(idle, {1: [(4242, "", 2048)]}))
    threading.Timer(0.2, holder.release).start()
    with pytest.raises(DeviceBusyError, match=r"gave up after 0.6 s: .*npu 1, which is left out: runs processes"):
        acquire_lease(settings, task="eval", environ={}, poll_interval_s=FAST_POLL_S)

    # The lock it took on card 1 to re-check the card was given back.
    assert current_leases(settings) == []
    card_1_lock = try_lock(device_lock_path(tmp_path / "state", "npu", 1))
    assert card_1_lock is not None
    unlock(card_1_lock)


def test_waiting_is_bounded_by_the_lease_timeout(tmp_path: Path, npu_host: Path) -> None:
    settings = settings_for(tmp_path, train=8, eval=1, lease_timeout_s=0.3)

    with lease_devices(settings, task="train", environ={}):
        started = time.monotonic()
        with pytest.raises(
            DeviceBusyError, match=r"gave up after 0.3 s: task eval waits for 1 npu device; busy: 0 \(train"
        ):
            acquire_lease(settings, task="eval", environ={}, poll_interval_s=FAST_POLL_S)

    assert 0.3 <= time.monotonic() - started < 3


def test_master_port_in_use_by_another_program_is_skipped(tmp_path: Path, cpu_host: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("", 0))
        squatter.listen()
        taken_port = squatter.getsockname()[1]
        settings = settings_for(tmp_path, master_port_range=(taken_port, taken_port))

        with pytest.raises(DeviceError, match=f"no free MASTER_PORT in {taken_port}-{taken_port}"):
            acquire_lease(settings, task="train")

    # The devices taken before the port search failed were given back.
    with lease_devices(settings_for(tmp_path, train=2), task="train") as lease:
        assert lease.ids == (0, 1)


def test_a_reserved_master_port_is_not_handed_out_twice(tmp_path: Path, cpu_host: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    settings = settings_for(tmp_path, master_port_range=(port, port))

    with lease_devices(settings, task="train") as first:
        assert first.master_port == port
        # Nothing listens on the port yet (the engine has not started): the reservation alone must protect it.
        with pytest.raises(DeviceError, match="no free MASTER_PORT"):
            acquire_lease(settings, task="eval")


@pytest.fixture
def spawn_holder(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def _start_holder(
    settings: DeviceSettings, task: str, started: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], dict[str, object]]:
    process = subprocess.Popen(
        [sys.executable, str(LEASE_WORKER), "hold", "--settings", settings.model_dump_json(), "--task", task],
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    started.append(process)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 20)
    if not ready:
        raise TimeoutError("the lease holder did not report its lease within 20 s")
    return process, json.loads(process.stdout.readline())


def test_a_killed_holders_devices_and_port_are_reclaimed(
    tmp_path: Path, npu_host: Path, spawn_holder: list[subprocess.Popen[str]]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    settings = settings_for(tmp_path, train=[2, 3], lease_timeout_s=0.2, master_port_range=(port, port))
    holder, held = _start_holder(settings, "train", spawn_holder)
    assert held["ids"] == [2, 3] and held["port"] == port
    [record] = current_leases(settings)
    assert record.pid == holder.pid

    with pytest.raises(DeviceBusyError, match=rf"busy: 2 \(train, flow run holder, pid {holder.pid}\); 3 \("):
        acquire_lease(settings, task="train", environ={}, poll_interval_s=FAST_POLL_S)

    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)

    # The kernel dropped the dead holder's flocks: the same cards and the same single port are free at once.
    with lease_devices(settings, task="train", flow_run_id="after-kill", environ={}) as lease:
        assert (lease.ids, lease.master_port) == ((2, 3), port)
        [record] = current_leases(settings)
        assert (record.flow_run_id, record.pid) == ("after-kill", os.getpid())
    # The dead holder's record was cleaned up, not just hidden.
    assert sorted(p.name for p in (tmp_path / "state" / LEASES_SUBDIR).iterdir()) == []
