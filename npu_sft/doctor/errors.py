"""What the doctor's checks raise when a run depends on them."""

from __future__ import annotations

from npu_sft.devices import DeviceError


class CardsNotWorking(DeviceError):
    """A leased card torch cannot compute on (or torch_npu cannot load): the run stops before training, not
    retried; the message names each card and the fix."""
