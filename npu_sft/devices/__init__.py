"""Device inventory (npu-smi, npu-list, nvidia-smi, CPU virtual devices) and exclusive cross-process leases.

with lease_devices(settings, task="train", flow_run_id=run_id, on_wait=log.info) as lease:
    run(engine_command, env={**os.environ, **lease.env()}, nproc_per_node=lease.nproc_per_node)
"""

from npu_sft.devices.errors import DeviceBusyError, DeviceError, DeviceToolMissing
from npu_sft.devices.inventory import processes_on_devices, resolve_kind, take_inventory
from npu_sft.devices.leases import Lease, acquire_lease, current_leases, lease_devices, lease_history
from npu_sft.devices.models import VISIBLE_DEVICES_VAR, Device, DeviceProcess, Inventory, InventoryEntry
from npu_sft.devices.records import LeaseEvent
from npu_sft.devices.parsing import parse_visible_devices
from npu_sft.devices.report import render_device_report
from npu_sft.devices.settings import DeviceSettings

__all__ = [
    "VISIBLE_DEVICES_VAR",
    "Device",
    "DeviceBusyError",
    "DeviceError",
    "DeviceProcess",
    "DeviceSettings",
    "DeviceToolMissing",
    "Inventory",
    "InventoryEntry",
    "Lease",
    "LeaseEvent",
    "acquire_lease",
    "current_leases",
    "lease_devices",
    "lease_history",
    "parse_visible_devices",
    "processes_on_devices",
    "render_device_report",
    "resolve_kind",
    "take_inventory",
]
