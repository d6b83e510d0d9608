"""Plain records of what the inventory found. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DeviceKind = Literal["npu", "gpu", "cpu"]

# The variable each runtime reads to restrict which cards a process sees. CPU runs have none.
VISIBLE_DEVICES_VAR: dict[str, str] = {
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "gpu": "CUDA_VISIBLE_DEVICES",
}


@dataclass(frozen=True)
class DeviceProcess:
    """A process the management tool reports on a card."""

    pid: int
    name: str = ""
    memory_mb: int | None = None


@dataclass(frozen=True)
class Device:
    """One card (or CPU virtual device) as a probe reported it, before any exclusion."""

    kind: DeviceKind
    id: int
    name: str
    # None when the source does not report health (npu-list, the torch_npu count, nvidia-smi, CPU).
    health: str | None = None
    memory_used_mb: int | None = None
    memory_total_mb: int | None = None
    processes: tuple[DeviceProcess, ...] = ()
    # False when the source cannot list processes, so "no processes" means "unknown", not "idle".
    processes_known: bool = False
    note: str = ""

    @property
    def healthy(self) -> bool:
        """Unknown health counts as healthy: we can only leave out cards a tool says are bad."""
        return self.health is None or self.health.upper() == "OK"


@dataclass(frozen=True)
class InventoryEntry:
    device: Device
    # Why the card may not be leased (unhealthy, foreign processes, outside the visible-devices variable).
    excluded_reason: str | None = None

    @property
    def usable(self) -> bool:
        return self.excluded_reason is None


@dataclass(frozen=True)
class Inventory:
    kind: DeviceKind
    source: str
    entries: tuple[InventoryEntry, ...] = field(default_factory=tuple)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(entry.device.id for entry in self.entries)

    @property
    def usable_ids(self) -> tuple[int, ...]:
        return tuple(entry.device.id for entry in self.entries if entry.usable)

    @property
    def excluded(self) -> tuple[InventoryEntry, ...]:
        return tuple(entry for entry in self.entries if not entry.usable)

    def entry(self, device_id: int) -> InventoryEntry | None:
        return next((entry for entry in self.entries if entry.device.id == device_id), None)
