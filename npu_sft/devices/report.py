"""Rich tables for `npu-sft devices`: the inventory and the leases alive on this host."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from npu_sft.devices.errors import DeviceError
from npu_sft.devices.inventory import CommandRunner, NpuCountProbe, run_probe, take_inventory
from npu_sft.devices.leases import current_leases
from npu_sft.devices.models import Device, Inventory
from npu_sft.devices.records import LeaseRecord
from npu_sft.devices.settings import DeviceSettings


def _memory(device: Device) -> str:
    if device.memory_used_mb is None:
        return "-"
    total = f" / {device.memory_total_mb}" if device.memory_total_mb is not None else ""
    return f"{device.memory_used_mb}{total} MB"


def _processes(device: Device) -> str:
    if not device.processes_known:
        return "not reported"
    if not device.processes:
        return "none"
    return ", ".join(
        f"{p.pid}" + (f" {p.name}" if p.name else "") + (f" ({p.memory_mb} MB)" if p.memory_mb is not None else "")
        for p in device.processes
    )


def _holder(device: Device, leases: list[LeaseRecord]) -> LeaseRecord | None:
    return next((r for r in leases if r.kind == device.kind and device.id in r.ids), None)


def inventory_table(inventory: Inventory, leases: list[LeaseRecord]) -> Table:
    table = Table(title=f"{inventory.kind.upper()} devices (from {inventory.source})", title_justify="left")
    for column in ("Kind", "Id", "Name", "Health", "Memory in use", "Processes", "Status"):
        table.add_column(column, overflow="fold")
    for entry in inventory.entries:
        device = entry.device
        holder = _holder(device, leases)
        if entry.excluded_reason is not None:
            status = Text(f"left out: {entry.excluded_reason}", style="red")
        elif holder is not None:
            status = Text(f"leased by {holder.task} (pid {holder.pid})", style="yellow")
        else:
            status = Text("free", style="green")
        table.add_row(
            device.kind,
            str(device.id),
            device.name + (f" ({device.note})" if device.note else ""),
            device.health or "n/a",
            _memory(device),
            _processes(device),
            status,
        )
    return table


def leases_table(leases: list[LeaseRecord]) -> Table:
    table = Table(title="Device leases", title_justify="left", caption=None if leases else "no active leases")
    for column in ("Devices", "Task", "Flow run", "PID", "Since (UTC)", "MASTER_PORT", "Lease"):
        table.add_column(column, overflow="fold")
    for record in leases:
        table.add_row(
            f"{record.kind} {','.join(map(str, record.ids))}",
            record.task,
            record.flow_run_id or "-",
            str(record.pid),
            record.since,
            str(record.master_port),
            record.lease_id[:12],
        )
    return table


def render_device_report(
    settings: DeviceSettings,
    *,
    environ: Mapping[str, str] | None = None,
    run_command: CommandRunner = run_probe,
    npu_count_probe: NpuCountProbe | None = None,
) -> list[RenderableType]:
    """The inventory table (or why it could not be taken) followed by the leases table."""
    leases = current_leases(settings)
    try:
        inventory = take_inventory(settings, environ=environ, run_command=run_command, npu_count_probe=npu_count_probe)
    except DeviceError as error:
        # The leases are still worth showing when a probe fails (driver not loaded, bad variable).
        return [Text(f"Device inventory failed: {error}", style="bold red"), leases_table(leases)]
    return [inventory_table(inventory, leases), leases_table(leases)]
