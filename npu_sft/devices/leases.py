"""Exclusive, cross-process device leases, and the launch environment they give a task.

A lease is a set of flock'd lock files (one per device, one for the MASTER_PORT) plus a record for display.
Prefect cannot hand a task specific device ids, so every task that touches devices goes through here.
"""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from npu_sft.devices.errors import DeviceBusyError, DeviceError
from npu_sft.devices.inventory import CommandRunner, NpuCountProbe, run_probe, take_inventory
from npu_sft.devices.models import VISIBLE_DEVICES_VAR, DeviceKind, Inventory
from npu_sft.devices.records import (
    LeaseEvent,
    LeaseRecord,
    append_history,
    device_lock_path,
    port_lock_path,
    prepare_state_dir,
    publish_record,
    read_history,
    read_live_records,
    try_lock,
    unlock,
    withdraw_record,
)
from npu_sft.devices.settings import DeviceRequest, DeviceSettings
from npu_sft.ports import port_is_free

WaitCallback = Callable[[str], None]

DEFAULT_POLL_INTERVAL_S = 0.5
# Waiting is reported when what we wait for changes, and otherwise at most this often, so a long wait
# does not flood the task log.
WAIT_REPORT_INTERVAL_S = 30.0
# While waiting, the host is probed again this often (and whenever free devices are found).
INVENTORY_REFRESH_S = 5.0


@dataclass
class Lease:
    """Devices (and a MASTER_PORT) held exclusively by this process until `release()`."""

    kind: DeviceKind
    ids: tuple[int, ...]
    master_port: int
    task: str
    flow_run_id: str | None
    lease_id: str
    since: str
    _locks: ExitStack | None = field(repr=False, compare=False)

    @property
    def nproc_per_node(self) -> int:
        return len(self.ids)

    @property
    def released(self) -> bool:
        return self._locks is None

    def env(self) -> dict[str, str]:
        """Variables the launched task needs: its visible devices and its MASTER_PORT."""
        env = {"MASTER_PORT": str(self.master_port)}
        variable = VISIBLE_DEVICES_VAR.get(self.kind)
        if variable is not None:
            env[variable] = ",".join(str(device_id) for device_id in self.ids)
        if self.kind == "gpu":
            # CUDA numbers GPUs fastest-first by default; nvidia-smi (our inventory) numbers them by PCI bus.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    def release(self) -> None:
        """Give the devices and the port back. Safe to call twice."""
        locks, self._locks = self._locks, None
        if locks is not None:
            locks.close()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _describe_request(request: DeviceRequest, kind: DeviceKind) -> str:
    if isinstance(request, int):
        return f"{request} {kind} device{'s' if request != 1 else ''}"
    return f"{kind} device{'s' if len(request) != 1 else ''} {','.join(map(str, request))}"


def candidate_ids(inventory: Inventory, request: DeviceRequest, task: str) -> tuple[tuple[int, ...], int]:
    """The ids that may serve `request` and how many of them are needed; DeviceError if it can never be served."""
    kind = inventory.kind
    if isinstance(request, int):
        usable = inventory.usable_ids
        if request > len(usable):
            left_out = "; ".join(f"{e.device.id}: {e.excluded_reason}" for e in inventory.excluded)
            raise DeviceError(
                f"task {task} asks for {_describe_request(request, kind)} but this host has "
                f"{len(inventory.entries)}, of which {len(usable)} may be leased"
                + (f" (left out: {left_out})" if left_out else "")
            )
        return usable, request
    unknown = [device_id for device_id in request if inventory.entry(device_id) is None]
    if unknown:
        raise DeviceError(
            f"task {task} asks for {kind} {unknown}, which {inventory.source} does not list "
            f"(this host has {', '.join(map(str, inventory.ids))})"
        )
    for device_id in request:
        entry = inventory.entry(device_id)
        if entry is not None and entry.excluded_reason is not None:
            raise DeviceError(f"task {task} asks for {kind} {device_id}, which is left out: {entry.excluded_reason}")
    return tuple(request), len(request)


def lock_devices(
    state_dir: Path, kind: DeviceKind, candidates: Sequence[int], needed: int, locks: ExitStack
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Lock the first `needed` free candidates into `locks`: (taken, busy). All or nothing."""
    taken: list[int] = []
    busy: list[int] = []
    attempt = ExitStack()
    for device_id in candidates:
        if len(taken) == needed:
            break
        fd = try_lock(device_lock_path(state_dir, kind, device_id))
        if fd is None:
            busy.append(device_id)
            continue
        attempt.callback(unlock, fd)
        taken.append(device_id)
    if len(taken) < needed:
        # Holding a partial set while waiting could deadlock two tasks that each hold half of what both need.
        attempt.close()
        return (), tuple(busy)
    locks.enter_context(attempt)
    return tuple(taken), tuple(busy)


def reserve_master_port(state_dir: Path, port_range: tuple[int, int], locks: ExitStack) -> int:
    """Pick a MASTER_PORT and keep it reserved (flock'd) for the lease's lifetime.

    Binding to port 0 and closing leaves a window in which another launch can get the same port; the lock
    file closes that window between our processes, and the bind check skips ports something else listens on.
    """
    low, high = port_range
    ports = list(range(low, high + 1))
    # Starting at a random place keeps concurrent launches from all probing the same first ports.
    start = random.randrange(len(ports))
    for port in ports[start:] + ports[:start]:
        fd = try_lock(port_lock_path(state_dir, port))
        if fd is None:
            continue
        if port_is_free(port):
            locks.callback(unlock, fd)
            return port
        unlock(fd)
    raise DeviceError(f"no free MASTER_PORT in {low}-{high}: every port is reserved by a lease or in use")


def _holders_of(busy: Sequence[int], state_dir: Path, kind: DeviceKind) -> str:
    """Who holds each busy device, for the wait message: `0 (eval, flow run X, pid 1); 1 (...)`."""
    records = [record for record in read_live_records(state_dir) if record.kind == kind]
    parts: list[str] = []
    for device_id in busy:
        holder = next((record for record in records if device_id in record.ids), None)
        if holder is None:
            parts.append(f"{device_id} (holder being set up or gone)")
        else:
            parts.append(f"{device_id} ({holder.task}, flow run {holder.flow_run_id or '-'}, pid {holder.pid})")
    return "; ".join(parts)


@dataclass
class _WaitReporter:
    """Calls on_wait when the situation changes, and otherwise every WAIT_REPORT_INTERVAL_S."""

    on_wait: WaitCallback | None
    clock: Callable[[], float]
    last_situation: str = ""
    last_time: float = float("-inf")

    def report(self, situation: str, message: str) -> None:
        """`situation` is what is waited for and who holds it; `message` may add a countdown."""
        now = self.clock()
        if self.on_wait is None:
            return
        if situation != self.last_situation or now - self.last_time >= WAIT_REPORT_INTERVAL_S:
            self.on_wait(message)
            self.last_situation, self.last_time = situation, now


def acquire_lease(
    settings: DeviceSettings,
    task: str,
    flow_run_id: str | None = None,
    on_wait: WaitCallback | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    run_command: CommandRunner = run_probe,
    npu_count_probe: NpuCountProbe | None = None,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
) -> Lease:
    """Take the devices `settings.<task>` asks for; wait up to `lease_timeout_s` while they are busy.

    Requests that can never be served (more devices than usable, unknown or left-out ids, a malformed
    visible-devices variable) raise DeviceError at once. The caller must `release()` the lease;
    `lease_devices` does that for you.
    """
    try:
        request = settings.request_for(task)
    except ValueError as error:
        raise DeviceError(str(error)) from error
    state_dir = Path(settings.state_dir).absolute()
    prepare_state_dir(state_dir)
    deadline = clock() + settings.lease_timeout_s
    reporter = _WaitReporter(on_wait=on_wait, clock=clock)

    def take() -> Inventory:
        return take_inventory(settings, environ=environ, run_command=run_command, npu_count_probe=npu_count_probe)

    inventory, inventory_time = take(), clock()
    # A request this host cannot serve fails now, before any waiting.
    candidate_ids(inventory, request, task)
    while True:
        try:
            candidates, needed = candidate_ids(inventory, request, task)
            blocked = ""
        except DeviceError as error:
            # It could be served when we started, so whatever left cards out since (typically a released
            # run's processes still exiting) is waited out like a busy card, up to the timeout.
            candidates, needed, blocked = (), 0, str(error)
        locks = ExitStack()
        taken, busy = lock_devices(state_dir, inventory.kind, candidates, needed, locks) if needed else ((), ())
        if taken:
            # Check the cards again now that they are ours. Until a lease ends, processes on its cards count
            # as its own; if it ended after our inventory, its run may still be on the cards.
            with locks:
                inventory, inventory_time = take(), clock()
                if set(taken) <= set(inventory.usable_ids):
                    return _finish_lease(
                        state_dir=state_dir,
                        settings=settings,
                        kind=inventory.kind,
                        ids=taken,
                        task=task,
                        flow_run_id=flow_run_id,
                        locks=locks.pop_all(),
                    )
            continue  # the with gave the locks back; the next round works from the fresh inventory
        remaining = deadline - clock()
        situation = f"task {task} waits for {_describe_request(request, inventory.kind)}; " + (
            blocked or f"busy: {_holders_of(busy, state_dir, inventory.kind)}"
        )
        if remaining <= 0:
            raise DeviceBusyError(f"gave up after {settings.lease_timeout_s:g} s: {situation}")
        reporter.report(situation, f"{situation} (giving up in {remaining:.0f} s)")
        # Jitter keeps processes that woke up together from colliding again in lock step.
        time.sleep(min(remaining, poll_interval_s * random.uniform(0.5, 1.5)))
        # Probing every poll would run npu-smi (slow on a loaded host) several times a second for the whole
        # wait; trying locks against an older inventory is safe because a win is checked again above.
        if clock() - inventory_time >= INVENTORY_REFRESH_S:
            inventory, inventory_time = take(), clock()


def _finish_lease(
    *,
    state_dir: Path,
    settings: DeviceSettings,
    kind: DeviceKind,
    ids: tuple[int, ...],
    task: str,
    flow_run_id: str | None,
    locks: ExitStack,
) -> Lease:
    """Reserve a port and publish the record; on any failure give the devices back before raising."""
    with locks:
        master_port = reserve_master_port(state_dir, settings.master_port_range, locks)
        record = LeaseRecord(
            lease_id=uuid.uuid4().hex,
            kind=kind,
            ids=ids,
            task=task,
            flow_run_id=flow_run_id,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            master_port=master_port,
        )
        alive_fd = publish_record(state_dir, record)
        append_history(state_dir, "acquired", record)
        # Closing the stack runs callbacks last-in first-out: the history line, then the record, go before the port
        # and the devices, so a lease taken on the freed cards is always written after this one's release.
        locks.callback(withdraw_record, state_dir, record.lease_id, alive_fd)
        locks.callback(append_history, state_dir, "released", record)
        held = locks.pop_all()
    return Lease(
        kind=kind,
        ids=ids,
        master_port=master_port,
        task=task,
        flow_run_id=flow_run_id,
        lease_id=record.lease_id,
        since=record.since,
        _locks=held,
    )


# `with lease_devices(settings, task="train", flow_run_id=..., on_wait=log.info) as lease: ...`: a Lease is its own
# context manager, given back when the block ends however it ends.
lease_devices = acquire_lease


def lease_history(settings: DeviceSettings) -> list[LeaseEvent]:
    """Every lease taken and given back on this host's state dir, oldest first."""
    return read_history(Path(settings.state_dir).absolute())


def current_leases(settings: DeviceSettings) -> list[LeaseRecord]:
    """Leases alive on this host (records of dead holders are cleaned up on the way)."""
    return read_live_records(Path(settings.state_dir).absolute())
