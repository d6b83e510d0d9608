"""What `download_model` would do now, found without downloading or writing anything: for `npu-sft doctor`, which
reports before a long download whether the hub answers, which commit a branch is, and how many bytes are coming.

One listing request at most (none for a pinned or offline copy complete in the cache), made once: a doctor says
what it sees rather than waiting out retries, and a network error is reported as the hub being unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npu_sft.download.core import find_cached_download, inspect_cached_copy, resolved_revision
from npu_sft.download.errors import DownloadError, HubNotFoundError, HubUnavailableError, OfflineCacheMissError
from npu_sft.download.hub import (
    HUB_CALL_ERRORS,
    effective_endpoint,
    explain_not_found,
    fetch_listing,
    hub_api,
    is_network_error,
    root_cause_line,
    translate_hub_error,
)
from npu_sft.download.locking import repo_metadata_dir
from npu_sft.download.manifest import select_files
from npu_sft.download.settings import ModelSource


@dataclass(frozen=True)
class DownloadPreview:
    """A ModelScope repository as a run would find it: the commit, the selected files, and what is still missing."""

    source: ModelSource
    commit: str
    file_count: int
    total_bytes: int  # the selected files at that commit
    missing_bytes: int  # 0 when a complete copy is in the cache; else all of it (resumed parts are not counted)
    cache_dir: Path


def preview_download(source: ModelSource) -> DownloadPreview:
    """Raises the download's own errors (not found, access, unpinned, offline miss) and `HubUnavailableError` after
    one failed attempt."""
    if source.source != "modelscope" or source.id is None:
        raise DownloadError(f"{source.label}: only a ModelScope source is downloaded")
    cache_dir = source.resolved_cache_dir()
    if source.offline or source.is_pinned:
        cached = find_cached_download(source)  # no request for these two
        if cached is not None:
            return DownloadPreview(source, cached.resolved_revision, cached.file_count, cached.total_bytes, 0,
                                   cache_dir)
        if source.offline:
            raise OfflineCacheMissError(
                f"{source.label}: offline, and {cache_dir} holds no complete copy recorded by npu-sft; run once "
                "with offline: false"
            )
    api = hub_api(source)
    try:
        try:
            listing = fetch_listing(api, source, source.revision)
        except HUB_CALL_ERRORS as error:
            if is_network_error(error):
                raise HubUnavailableError(f"{source.label}: the hub at {effective_endpoint(source)} does not answer "
                                          f"({root_cause_line(error)})") from error
            raise translate_hub_error(error, source.label) from error
    except HubNotFoundError as error:  # a missing repository, or a revision it lacks: one more request says which
        raise HubNotFoundError(explain_not_found(api, source) or str(error)) from error
    commit = resolved_revision(source, listing)
    selected = select_files(listing.files, source.allow_patterns, source.ignore_patterns)
    total = sum(entry.size for entry in selected)
    metadata_dir = repo_metadata_dir(cache_dir, source.repo_type, source.id)
    cached = inspect_cached_copy(source, metadata_dir, commit, listing=listing, persist=False).downloaded
    return DownloadPreview(source, commit, len(selected), total, 0 if cached is not None else total, cache_dir)
