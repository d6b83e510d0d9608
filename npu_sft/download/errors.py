"""Download errors: one base class; `retryable` tells the Prefect task whether trying again later can help."""

from __future__ import annotations

from npu_sft.errors import BadInputError


class DownloadError(BadInputError):
    """A model or dataset could not be made available. The message names the repository and revision."""

    retryable: bool = False


class HubNotFoundError(DownloadError):
    """The repository or the revision does not exist on the hub (or is private and no token was given)."""


class UnpinnedRevisionError(DownloadError):
    """`require_pinned` is set and the hub did not say which commit the configured branch or tag points to."""


class HubAccessError(DownloadError):
    """The hub refused the token, or the repository needs one (set MODELSCOPE_API_TOKEN)."""


class HubUnavailableError(DownloadError):
    """Network errors (refused, reset, timed out, 5xx) outlasted the retries; partial files are kept for resuming."""

    retryable = True


class IntegrityError(DownloadError):
    """A file's bytes do not match the size or sha256 the hub lists for it; the file is not used."""


class OfflineCacheMissError(DownloadError):
    """Offline mode, and the cache holds no complete copy of the requested revision."""


class LocalSourceError(DownloadError):
    """A local model directory is missing or does not look like a model."""


class DownloadLockTimeout(DownloadError):
    """Another process kept downloading the same repository for longer than `lock_timeout_s`."""

    retryable = True
