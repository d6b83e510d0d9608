"""Errors of the device layer: one base class so callers (the Prefect task, the CLI) can catch them together."""

from npu_sft.errors import BadInputError


class DeviceError(BadInputError):
    """A device request that cannot be served: bad input, unknown ids, a probe that failed."""


class DeviceBusyError(DeviceError):
    """The requested devices exist but stayed leased by others until the lease timeout."""


class DeviceToolMissing(DeviceError):
    """No tool on this host lists the devices of the configured kind: not an accelerator host (a laptop planning a
    run), or the accelerator's tools are not on PATH."""
