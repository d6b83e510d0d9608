"""What devices this host has, and which of them a task may lease.

Sources, by kind:
    npu  `npu-smi info` (ids, health, HBM, processes), else `npu-list` (ids only), else an injected count probe
         (the real one runs torch_npu in the engine environment; the orchestrator never imports torch)
    gpu  `nvidia-smi --query-gpu` and `--query-compute-apps`
    cpu  `cpu_virtual_devices` virtual devices, so the same lease path runs on CPU-only machines
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from npu_sft.devices.errors import DeviceError, DeviceToolMissing
from npu_sft.devices.models import VISIBLE_DEVICES_VAR, Device, DeviceKind, DeviceProcess, Inventory, InventoryEntry
from npu_sft.devices.parsing import (
    parse_npu_list,
    parse_npu_smi_info,
    parse_nvidia_smi_apps,
    parse_nvidia_smi_gpus,
    parse_visible_devices,
)
from npu_sft.devices.records import read_live_records
from npu_sft.devices.settings import DeviceSettings

CommandRunner = Callable[[Sequence[str]], str]
# Returns how many NPUs the host has, ignoring ASCEND_RT_VISIBLE_DEVICES (run it with the variable unset).
NpuCountProbe = Callable[[], int]

PROBE_TIMEOUT_S = 60.0  # npu-smi can take several seconds on a loaded 8-card host
NPU_SMI_INFO = ("npu-smi", "info")
NPU_LIST = ("npu-list",)
NVIDIA_SMI_GPUS = (
    "nvidia-smi",
    "--query-gpu=index,uuid,name,memory.used,memory.total",
    "--format=csv,noheader,nounits",
)
# Compute apps name their GPU by uuid only, hence the uuid in the GPU query above.
NVIDIA_SMI_APPS = (
    "nvidia-smi",
    "--query-compute-apps=gpu_uuid,pid,used_memory,process_name",
    "--format=csv,noheader,nounits",
)


def run_probe(argv: Sequence[str]) -> str:
    """Run a device tool and return its stdout; any failure becomes a DeviceError naming the command."""
    command = " ".join(argv)
    try:
        completed = subprocess.run(list(argv), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except FileNotFoundError as error:
        raise DeviceToolMissing(f"`{command}`: {argv[0]} is not on PATH") from error
    except subprocess.TimeoutExpired as error:
        raise DeviceError(f"`{command}` did not answer within {PROBE_TIMEOUT_S:.0f} s") from error
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip()[-500:]
        raise DeviceError(f"`{command}` failed with exit code {completed.returncode}: {detail}")
    return completed.stdout


def resolve_kind(kind: str) -> DeviceKind:
    """`auto` picks the accelerator whose management tool is on PATH."""
    if kind in ("npu", "gpu", "cpu"):
        return kind  # type: ignore[return-value]
    if kind != "auto":
        raise DeviceError(f"unknown device kind {kind!r}; expected auto, npu, gpu or cpu")
    if shutil.which(NPU_SMI_INFO[0]) or shutil.which(NPU_LIST[0]):
        return "npu"
    if shutil.which(NVIDIA_SMI_GPUS[0]):
        return "gpu"
    return "cpu"


def probe_npus(run_command: CommandRunner, npu_count_probe: NpuCountProbe | None) -> tuple[str, tuple[Device, ...]]:
    if shutil.which(NPU_SMI_INFO[0]):
        return "npu-smi info", parse_npu_smi_info(run_command(NPU_SMI_INFO)).devices
    if shutil.which(NPU_LIST[0]):
        return "npu-list", parse_npu_list(run_command(NPU_LIST))
    if npu_count_probe is not None:
        count = npu_count_probe()
        if count < 1:
            raise DeviceError(f"torch_npu reports {count} NPUs on this host")
        return "torch_npu device count", tuple(Device(kind="npu", id=i, name="npu") for i in range(count))
    raise DeviceToolMissing(
        "devices.kind is npu but neither npu-smi nor npu-list is on PATH: not an Ascend host, or CANN's tools are "
        "not on PATH (source its set_env.sh)"
    )


def probe_gpus(run_command: CommandRunner) -> tuple[str, tuple[Device, ...]]:
    gpus = parse_nvidia_smi_gpus(run_command(NVIDIA_SMI_GPUS))
    if not gpus:
        raise DeviceError("nvidia-smi listed no GPUs")
    apps = parse_nvidia_smi_apps(run_command(NVIDIA_SMI_APPS))
    devices = tuple(
        Device(
            kind="gpu",
            id=gpu.index,
            name=gpu.name,
            memory_used_mb=gpu.memory_used_mb,
            memory_total_mb=gpu.memory_total_mb,
            processes=tuple(
                DeviceProcess(pid=app.pid, name=app.name, memory_mb=app.memory_mb)
                for app in apps
                if app.gpu_uuid == gpu.uuid
            ),
            processes_known=True,
        )
        for gpu in gpus
    )
    return "nvidia-smi", devices


def cpu_devices(count: int) -> tuple[str, tuple[Device, ...]]:
    return "cpu_virtual_devices", tuple(Device(kind="cpu", id=i, name="cpu", health="OK") for i in range(count))


def probe_devices(
    kind: DeviceKind,
    settings: DeviceSettings,
    *,
    run_command: CommandRunner = run_probe,
    npu_count_probe: NpuCountProbe | None = None,
) -> tuple[str, tuple[Device, ...]]:
    """Ask the host what devices of `kind` it has: (source description, devices)."""
    if kind == "npu":
        return probe_npus(run_command, npu_count_probe)
    if kind == "gpu":
        return probe_gpus(run_command)
    return cpu_devices(settings.cpu_virtual_devices)


def visible_restriction(kind: DeviceKind, environ: Mapping[str, str]) -> tuple[int, ...] | None:
    """The ids the user restricted the pool to by exporting the kind's visible-devices variable, if any."""
    variable = VISIBLE_DEVICES_VAR.get(kind)
    if variable is None or variable not in environ:
        return None
    return parse_visible_devices(environ[variable], variable)


def exclusion_reason(
    device: Device,
    restriction: tuple[int, ...] | None,
    variable: str | None,
    leased: bool,
) -> str | None:
    """Why a task may not lease this device, or None if it may.

    Processes on a card with a live lease are taken to be that lease's: the engine may run in a container
    (`docker exec`), whose pids npu-smi reports in the host's pid namespace, so they cannot be traced back
    to the holder's pid. Processes on a card nobody leases are someone else's, or a run that has not let go
    of the card yet (HCCL's "Maybe the last training process is running"): either way the card is not free.
    """
    reasons: list[str] = []
    if not device.healthy:
        reasons.append(f"health is {device.health}")
    if device.processes and not leased:
        pids = ", ".join(str(process.pid) for process in device.processes)
        reasons.append(f"runs processes npu-sft did not start (pid {pids})")
    if restriction is not None and device.id not in restriction:
        reasons.append(f"not in {variable}={','.join(map(str, restriction))}")
    return "; ".join(reasons) or None


def take_inventory(
    settings: DeviceSettings,
    *,
    environ: Mapping[str, str] | None = None,
    run_command: CommandRunner = run_probe,
    npu_count_probe: NpuCountProbe | None = None,
) -> Inventory:
    """Probe the host and mark each device usable or left out (with the reason)."""
    kind = resolve_kind(settings.kind)
    environment = os.environ if environ is None else environ
    restriction = visible_restriction(kind, environment)
    source, devices = probe_devices(kind, settings, run_command=run_command, npu_count_probe=npu_count_probe)
    variable = VISIBLE_DEVICES_VAR.get(kind)
    if restriction is not None:
        missing = sorted(set(restriction) - {device.id for device in devices})
        if missing:
            raise DeviceError(
                f"{variable}={','.join(map(str, restriction))} names {kind} {missing}, which {source} does not list "
                f"(this host has {', '.join(str(d.id) for d in devices)})"
            )
    leased_ids = {
        device_id
        for record in read_live_records(Path(settings.state_dir).absolute())
        if record.kind == kind
        for device_id in record.ids
    }
    entries = tuple(
        InventoryEntry(
            device=device,
            excluded_reason=exclusion_reason(device, restriction, variable, leased=device.id in leased_ids),
        )
        for device in sorted(devices, key=lambda d: d.id)
    )
    return Inventory(kind=kind, source=source, entries=entries)


def processes_on_devices(
    ids: Sequence[int], *, run_command: CommandRunner = run_probe
) -> dict[int, tuple[DeviceProcess, ...]]:
    """Processes `npu-smi info` lists on the given NPUs, e.g. to confirm a crashed run left the cards.

    An empty tuple means npu-smi says the card is idle. If npu-smi prints no process table at all, nothing
    can be confirmed and this raises rather than report the cards idle.
    """
    info = parse_npu_smi_info(run_command(NPU_SMI_INFO))
    if not info.process_table_present:
        raise DeviceError("`npu-smi info` printed no process table, so the processes on the NPUs are unknown")
    by_id = {device.id: device for device in info.devices}
    unknown = sorted(set(ids) - set(by_id))
    if unknown:
        raise DeviceError(f"npu-smi does not list NPU {unknown}; this host has {sorted(by_id)}")
    return {device_id: by_id[device_id].processes for device_id in ids}
