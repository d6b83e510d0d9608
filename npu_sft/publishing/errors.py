"""What goes wrong publishing: a version not made, a registered version not found, a push refused."""

from __future__ import annotations

from npu_sft.errors import BadInputError, NpuSftError


class PublishError(NpuSftError, RuntimeError):
    """The adapter could not be published; the registry is as it was before."""


class RegistryError(BadInputError, LookupError):
    """The registered model or version does not exist, or its files are not an adapter."""


class PushError(BadInputError, RuntimeError):
    """The adapter did not reach the ModelScope repository; the registry is unchanged."""
