"""Model and dataset repositories from ModelScope (pinned, cached, resumable, verified) or from a local directory.

from npu_sft.download import ModelSource, download_model, log_manifest

downloaded = download_model(ModelSource(source="modelscope", id="qwen/Qwen1.5-7B", revision="<commit id>"))
log_manifest(run.tracker, downloaded)
"""

from npu_sft.download.core import DownloadedModel, download_model, find_cached_download, use_local_directory
from npu_sft.download.errors import (
    DownloadError,
    DownloadLockTimeout,
    HubAccessError,
    HubNotFoundError,
    HubUnavailableError,
    IntegrityError,
    LocalSourceError,
    OfflineCacheMissError,
    UnpinnedRevisionError,
)
from npu_sft.download.manifest import ManifestEntry
from npu_sft.download.progress import DownloadProgress, ProgressListener
from npu_sft.download.recording import log_manifest, manifest_tags
from npu_sft.download.settings import ModelSource, UnpinnedRevisionWarning, is_commit_id

__all__ = [
    "DownloadError",
    "DownloadLockTimeout",
    "DownloadProgress",
    "DownloadedModel",
    "HubAccessError",
    "HubNotFoundError",
    "HubUnavailableError",
    "IntegrityError",
    "LocalSourceError",
    "ManifestEntry",
    "ModelSource",
    "OfflineCacheMissError",
    "ProgressListener",
    "UnpinnedRevisionError",
    "UnpinnedRevisionWarning",
    "download_model",
    "find_cached_download",
    "is_commit_id",
    "log_manifest",
    "manifest_tags",
    "use_local_directory",
]
