"""`devices:` section of the pipeline config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A device request: how many devices (any free ones), or exactly which ids.
DeviceRequest = int | tuple[int, ...]

# torchrun's default MASTER_PORT is 29500; staying below Linux's ephemeral range (32768-60999) keeps our
# ports clear of the ones the kernel hands to outgoing connections.
DEFAULT_MASTER_PORT_RANGE = (29500, 29999)


class DeviceSettings(BaseModel):
    """Which kind of device the pipeline runs on and how many each task leases."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "npu", "gpu", "cpu"] = Field(
        "auto", description="auto: npu if npu-smi (or npu-list) is on PATH, else gpu if nvidia-smi is, else cpu"
    )
    cpu_virtual_devices: int = Field(2, ge=1, description="how many CPU 'devices' to lease when kind is cpu")
    train: DeviceRequest = Field(1, description="device count, or a list of device ids, for training")
    eval: DeviceRequest = Field(1, description="device count, or a list of device ids, for evaluation")
    serve: DeviceRequest = Field(1, description="device count, or a list of device ids, for the API server")
    lease_timeout_s: float = Field(3600.0, ge=0, description="how long a task waits for busy devices")
    state_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "npu-sft" / "devices",
        description="lock files and lease records; every flow run on a host must use the same directory, so the "
        "default is per host (per user), not per project",
    )
    master_port_range: tuple[int, int] = Field(
        DEFAULT_MASTER_PORT_RANGE, description="inclusive range MASTER_PORT is picked from"
    )

    @field_validator("train", "eval", "serve", mode="before")
    @classmethod
    def _check_request(cls, value: object) -> DeviceRequest:
        # Done by hand rather than by a pydantic union so a bad value gets one message, not one per branch.
        if isinstance(value, bool):
            raise ValueError(f"expected a device count (positive integer) or a list of device ids, got {value!r}")
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"a device count must be a positive integer, got {value}")
            return value
        if isinstance(value, (list, tuple)):
            return _check_id_list(value)
        raise ValueError(f"expected a device count (positive integer) or a list of device ids, got {value!r}")

    @field_validator("state_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("master_port_range")
    @classmethod
    def _check_port_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not 1024 <= low <= high <= 65535:
            raise ValueError(f"expected two ports 1024 <= low <= high <= 65535, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _check_cpu_ids(self) -> DeviceSettings:
        # Only CPU ids can be checked without probing the host; accelerator ids are checked at lease time.
        if self.kind != "cpu":
            return self
        for task in ("train", "eval", "serve"):
            request = self.request_for(task)
            if isinstance(request, tuple) and max(request) >= self.cpu_virtual_devices:
                raise ValueError(
                    f"{task}: CPU device ids must be below cpu_virtual_devices={self.cpu_virtual_devices}, "
                    f"got {list(request)}"
                )
        return self

    def request_for(self, task: str) -> DeviceRequest:
        if task not in ("train", "eval", "serve"):
            raise ValueError(f"unknown task {task!r}; expected train, eval or serve")
        request: DeviceRequest = getattr(self, task)
        return request


def _check_id_list(values: list[object] | tuple[object, ...]) -> tuple[int, ...]:
    if not values:
        raise ValueError("a list of device ids must not be empty; give a count or at least one id")
    ids: list[int] = []
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"device ids must be non-negative integers, got {item!r} in {list(values)}")
        if item in ids:
            raise ValueError(f"device id {item} appears twice in {list(values)}")
        ids.append(item)
    return tuple(ids)
