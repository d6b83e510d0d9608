"""The cards a config would lease, as the device tool reports them: present, healthy, not busy, a supported chip,
and enough of them for each task."""

from __future__ import annotations

from collections.abc import Mapping

from npu_sft.devices import DeviceError, DeviceSettings, DeviceToolMissing, Inventory, take_inventory
from npu_sft.devices.settings import DeviceRequest
from npu_sft.doctor.models import Finding, ok

# LLaMA-Factory trains on the 910 series; 310P cards are inference cards it does not support (LLaMA-Factory #10418).
UNSUPPORTED_CHIPS = {"310P": "an inference card LLaMA-Factory does not train on (LLaMA-Factory #10418); use 910B cards"}


def check_devices(settings: DeviceSettings, environ: Mapping[str, str]) -> tuple[list[Finding], Inventory | None]:
    """The findings, and the inventory when the device tool answered."""
    try:
        inventory = take_inventory(settings, environ=environ)
    except DeviceToolMissing as err:
        return [Finding("devices", "error", str(err), _install_hint(settings.kind))], None
    except DeviceError as err:
        return [Finding("devices", "error", str(err), "check the driver: `npu-smi info` (or nvidia-smi) must answer")], None
    return [_summary(inventory), *_cards(inventory), *_requests(settings, inventory)], inventory


def train_ids(settings: DeviceSettings, inventory: Inventory) -> tuple[int, ...]:
    """The cards a training lease would get if it started now: the listed ids, or the first usable ones."""
    request = settings.train
    if isinstance(request, int):
        return inventory.usable_ids[:request]
    return tuple(request)


def _install_hint(kind: str) -> str:
    if kind == "gpu":
        return "install the NVIDIA driver (nvidia-smi), or set devices.kind to the host's kind"
    if kind == "npu":
        return "install the Ascend driver and firmware (npu-smi), or set devices.kind to the host's kind"
    return "set devices.kind to the host's kind"


def _summary(inventory: Inventory) -> Finding:
    names = sorted({entry.device.name for entry in inventory.entries})
    return ok(
        "devices",
        f"{len(inventory.entries)} {inventory.kind} ({', '.join(names)}) from {inventory.source}, "
        f"{len(inventory.usable_ids)} usable",
    )


def _cards(inventory: Inventory) -> list[Finding]:
    findings = []
    for entry in inventory.entries:
        device = entry.device
        label = f"{device.kind.upper()} {device.id}"
        unsupported = next((reason for chip, reason in UNSUPPORTED_CHIPS.items() if chip in device.name), None)
        if unsupported is not None:
            findings.append(Finding(label, "error", f"{device.name}: {unsupported}", "lease other cards"))
        elif not device.healthy:
            findings.append(Finding(
                label, "error", f"{device.name} health {device.health}",
                f"`npu-smi info -t health -i {device.id}` says why; until it is OK the leases leave it out",
            ))
        elif device.processes:
            pids = ", ".join(str(process.pid) for process in device.processes)
            used = f", {device.memory_used_mb} MB in use" if device.memory_used_mb is not None else ""
            findings.append(Finding(
                label, "warning", f"processes {pids} on it{used}",
                "a lease waits for it or takes another card; stop them if they are left over",
            ))
    return findings


def _requests(settings: DeviceSettings, inventory: Inventory) -> list[Finding]:
    findings = []
    for task in ("train", "eval", "serve"):
        request: DeviceRequest = getattr(settings, task)
        if isinstance(request, int):
            needed, missing = request, []
        else:
            needed, missing = len(request), [i for i in request if i not in inventory.usable_ids]
        usable = len(inventory.usable_ids)
        if missing:
            findings.append(Finding(
                f"devices.{task}", "error", f"asks for {inventory.kind} {missing}, not usable on this host",
                f"give devices.{task} usable ids ({', '.join(map(str, inventory.usable_ids)) or 'none'})",
            ))
        elif needed > usable:
            findings.append(Finding(
                f"devices.{task}", "error", f"needs {needed} {inventory.kind}, {usable} usable on this host",
                f"lower devices.{task} or free cards",
            ))
    return findings
