"""Parsers for the text the device tools print, and for visible-devices variables. Pure functions."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, replace

from npu_sft.devices.errors import DeviceError
from npu_sft.devices.models import Device, DeviceProcess

# A PCI address such as 0000:C1:00.0 marks the second ("Chip  Bus-Id ...") line of a card in `npu-smi info`.
_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$")
_NPU_ID_AND_NAME = re.compile(r"^(\d+)\s+(\S.*)$")
_NPU_ID_AND_CHIP = re.compile(r"^(\d+)\s+(\d+)$")
# Real output drops the space when the number is wide ("41052/ 65536"), so the spaces are optional.
_USAGE_PAIR = re.compile(r"(\d+)\s*/\s*(\d+)")
_NO_PROCESS = re.compile(r"No running processes found in NPU\s+(\d+)")
_PROCESS_TABLE_HEADER = re.compile(r"\|\s*NPU\s+Chip\s*\|\s*Process id\s*\|")
_DAVINCI_DEVICE = re.compile(r"^/dev/davinci(\d+)$")
_DEVICE_ID = re.compile(r"^\d+$")


@dataclass(frozen=True)
class NpuSmiInfo:
    devices: tuple[Device, ...]
    # Older captures (and the tables copied into docs) stop before the process table; then nothing is known
    # about processes and callers that must prove a card idle have to refuse.
    process_table_present: bool


@dataclass(frozen=True)
class GpuRow:
    index: int
    uuid: str
    name: str
    memory_used_mb: int | None
    memory_total_mb: int | None


@dataclass(frozen=True)
class GpuAppRow:
    gpu_uuid: str
    pid: int
    memory_mb: int | None
    name: str


def _table_cells(line: str) -> list[str] | None:
    """The cells of a `| a | b |` row, or None for borders and text outside the table."""
    stripped = line.strip()
    if len(stripped) < 2 or not stripped.startswith("|") or not stripped.endswith("|"):
        return None
    return [cell.strip() for cell in stripped[1:-1].split("|")]


def _optional_int(text: str) -> int | None:
    """nvidia-smi prints [N/A] (MIG, some passthrough setups) where a number is not available."""
    return int(text) if text.isdigit() else None


def _excerpt(text: str, limit: int = 300) -> str:
    return text.strip()[:limit] or "(empty output)"


def parse_npu_smi_info(text: str) -> NpuSmiInfo:
    """Parse `npu-smi info`: the card table (id, name, health, HBM) and, when present, the process table."""
    lines = text.splitlines()
    header_index = next((i for i, line in enumerate(lines) if _PROCESS_TABLE_HEADER.search(line)), None)
    card_lines = lines if header_index is None else lines[:header_index]
    devices = _parse_npu_card_table(card_lines)
    if not devices:
        raise DeviceError(f"`npu-smi info` listed no NPUs; its output begins: {_excerpt(text)!r}")
    if header_index is None:
        return NpuSmiInfo(devices=tuple(devices), process_table_present=False)
    processes = _parse_npu_process_table(lines[header_index + 1 :])
    unknown = sorted(set(processes) - {device.id for device in devices})
    if unknown:
        raise DeviceError(f"`npu-smi info` lists processes on NPU {unknown} but no such card in its table")
    with_processes = [
        replace(device, processes=tuple(processes.get(device.id, ())), processes_known=True) for device in devices
    ]
    return NpuSmiInfo(devices=tuple(with_processes), process_table_present=True)


def _parse_npu_card_table(lines: list[str]) -> list[Device]:
    """Each card is two rows: `| id name | health | power temp hugepages |` then `| chip | bus-id | ... HBM |`."""
    devices: list[Device] = []
    for line in lines:
        cells = _table_cells(line)
        if cells is None or len(cells) != 3:
            continue
        first, second, third = cells
        if _BUS_ID.match(second):
            if devices:
                devices[-1] = _add_chip_memory(devices[-1], third)
            continue
        match = _NPU_ID_AND_NAME.match(first)
        if match:
            devices.append(Device(kind="npu", id=int(match.group(1)), name=match.group(2), health=second))
    return devices


def _add_chip_memory(device: Device, usage_cell: str) -> Device:
    """The last `used / total` pair of a chip row is HBM on 910 cards; cards with several chips add up."""
    pairs = _USAGE_PAIR.findall(usage_cell)
    if not pairs:
        return device
    used, total = (int(value) for value in pairs[-1])
    return replace(
        device,
        memory_used_mb=(device.memory_used_mb or 0) + used,
        memory_total_mb=(device.memory_total_mb or 0) + total,
    )


def _parse_npu_process_table(lines: list[str]) -> dict[int, list[DeviceProcess]]:
    """Rows are `| npu chip | pid | name | memory |`; idle cards say "No running processes found in NPU N"."""
    processes: dict[int, list[DeviceProcess]] = {}
    for line in lines:
        idle = _NO_PROCESS.search(line)
        if idle:
            processes.setdefault(int(idle.group(1)), [])
            continue
        cells = _table_cells(line)
        if cells is None or len(cells) != 4:
            continue
        location = _NPU_ID_AND_CHIP.match(cells[0])
        if location is None or not cells[1].isdigit():
            continue
        process = DeviceProcess(pid=int(cells[1]), name=cells[2], memory_mb=_optional_int(cells[3]))
        processes.setdefault(int(location.group(1)), []).append(process)
    return processes


def parse_npu_list(text: str) -> tuple[Device, ...]:
    """Parse `npu-list`: one `| /dev/davinciN | container name | container id |` row per card."""
    devices: list[Device] = []
    for line in text.splitlines():
        cells = _table_cells(line)
        if cells is None or len(cells) != 3:
            continue
        match = _DAVINCI_DEVICE.match(cells[0])
        if match is None:
            continue
        container = cells[1]
        note = "" if container in ("", "None") else f"container {container}"
        devices.append(Device(kind="npu", id=int(match.group(1)), name=f"davinci{match.group(1)}", note=note))
    if not devices:
        raise DeviceError(f"`npu-list` listed no /dev/davinci devices; its output begins: {_excerpt(text)!r}")
    return tuple(devices)


def _csv_rows(text: str) -> list[list[str]]:
    """nvidia-smi's csv separates fields with ", "."""
    return [row for row in csv.reader(text.splitlines(), skipinitialspace=True) if row]


def parse_nvidia_smi_gpus(text: str) -> tuple[GpuRow, ...]:
    """Parse `nvidia-smi --query-gpu=index,uuid,name,memory.used,memory.total --format=csv,noheader,nounits`."""
    gpus: list[GpuRow] = []
    for row in _csv_rows(text):
        if len(row) != 5 or not row[0].isdigit():
            raise DeviceError(f"unexpected line from nvidia-smi --query-gpu: {', '.join(row)!r}")
        gpus.append(
            GpuRow(
                index=int(row[0]),
                uuid=row[1],
                name=row[2],
                memory_used_mb=_optional_int(row[3]),
                memory_total_mb=_optional_int(row[4]),
            )
        )
    return tuple(gpus)


def parse_nvidia_smi_apps(text: str) -> tuple[GpuAppRow, ...]:
    """Parse `nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory,process_name --format=csv,noheader,nounits`.

    The process name comes last because it is a command line and may itself contain commas.
    """
    apps: list[GpuAppRow] = []
    for row in _csv_rows(text):
        if len(row) < 3 or not row[1].isdigit():
            raise DeviceError(f"unexpected line from nvidia-smi --query-compute-apps: {', '.join(row)!r}")
        apps.append(
            GpuAppRow(gpu_uuid=row[0], pid=int(row[1]), memory_mb=_optional_int(row[2]), name=", ".join(row[3:]))
        )
    return tuple(apps)


def parse_visible_devices(value: str, variable: str) -> tuple[int, ...]:
    """Parse a visible-devices value such as "0,1,2,3"; anything the runtimes could read differently is an error."""
    if not value.strip():
        raise DeviceError(
            f"{variable} is set but empty, which hides every device; unset it or list device ids such as 0,1"
        )
    ids: list[int] = []
    for position, item in enumerate(value.split(","), start=1):
        token = item.strip()
        if not token:
            raise DeviceError(f"{variable}={value!r} has an empty entry at position {position}; expected e.g. 0,1,2,3")
        if token.startswith("-") and token[1:].isdigit():
            raise DeviceError(
                f"{variable}={value!r}: negative id {token} (a way to hide every device) cannot be leased; "
                "unset the variable or list the device ids to use"
            )
        if not _DEVICE_ID.match(token):
            raise DeviceError(
                f"{variable}={value!r}: {token!r} is not a device id; expected non-negative integers such as 0,1,2,3"
            )
        device_id = int(token)
        if device_id in ids:
            raise DeviceError(f"{variable}={value!r} names device {device_id} twice")
        ids.append(device_id)
    return tuple(ids)
