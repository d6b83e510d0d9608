"""download_model: make a model (or dataset) repository available on disk, pinned, cached, resumable, verified.

    downloaded = download_model(source)            # -> DownloadedModel
    train(model_name_or_path=downloaded.path)

For a ModelScope source, under a per-repository cross-process lock:

1. a pinned commit, or offline mode: the copy recorded for it is checked on disk; complete -> done, no network;
2. otherwise one listing request resolves the revision to a commit and lists its files, sizes and sha256;
   a complete copy of that commit on disk -> done, no file requests;
3. otherwise ModelScope's downloader fetches what is missing (resuming partial files), then the manifest is
   written next to the download.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelscope_hub import HubApi
from pydantic import BaseModel, ConfigDict

from npu_sft.download.errors import (
    DownloadError,
    HubNotFoundError,
    IntegrityError,
    LocalSourceError,
    OfflineCacheMissError,
    UnpinnedRevisionError,
)
from npu_sft.download.hub import (
    HUB_CALL_ERRORS,
    HubListing,
    download_snapshot,
    explain_not_found,
    fetch_listing,
    find_in_cache_only,
    first_line,
    hub_api,
    with_network_retries,
)
from npu_sft.download.local import (
    check_dataset_directory,
    check_model_directory,
    describe_directory,
    directory_fingerprint,
)
from npu_sft.download.locking import repo_download_lock, repo_lock_path, repo_metadata_dir
from npu_sft.download.manifest import (
    RECORD_FILE_NAME,
    DownloadRecord,
    ManifestEntry,
    check_files,
    describe_problems,
    read_record,
    read_refs,
    remember_download,
    select_files,
    write_record,
)
from npu_sft.download.progress import (
    ByteProgress,
    ConsoleProgressBar,
    ProgressListener,
    callback_class_for,
)
from npu_sft.download.settings import ModelSource

log = logging.getLogger(__name__)


class DownloadedModel(BaseModel):
    """A repository on disk: where it is, which commit it is, and the manifest of its files."""

    model_config = ConfigDict(frozen=True)

    path: Path
    model_id: str
    revision: str
    resolved_revision: str
    manifest: list[ManifestEntry]
    from_cache: bool
    source: Literal["modelscope", "local"] = "modelscope"
    repo_type: Literal["model", "dataset"] = "model"
    manifest_path: Path | None = None

    @property
    def file_count(self) -> int:
        return len(self.manifest)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.manifest)

    def manifest_document(self) -> dict[str, Any]:
        """The manifest as recorded in MLflow: no local paths, no secrets."""
        return {
            "source": self.source,
            "repo_type": self.repo_type,
            "model_id": self.model_id,
            "revision": self.revision,
            "resolved_revision": self.resolved_revision,
            "file_count": self.file_count,
            "total_bytes": self.total_bytes,
            "files": [entry.model_dump() for entry in self.manifest],
        }


@dataclass
class CachedCopy:
    """What the cache holds for one commit: a usable download, or why not (empty when nothing is recorded)."""

    downloaded: DownloadedModel | None = None
    problems: list[str] = field(default_factory=list)


def download_model(
    source: ModelSource, on_progress: ProgressListener | None = None, *, console_progress: bool = True
) -> DownloadedModel:
    """The repository on disk, complete and verified; `on_progress` hears the bytes received (throttled)."""
    if source.source == "local":
        return use_local_directory(source)
    repo_id = _repo_id(source)
    cache_dir = source.resolved_cache_dir()
    metadata_dir = repo_metadata_dir(cache_dir, source.repo_type, repo_id)
    lock_path = repo_lock_path(cache_dir, source.repo_type, repo_id)
    with repo_download_lock(lock_path, timeout_s=source.lock_timeout_s, what=source.label, on_wait=log.info):
        if source.offline:
            return _from_cache_offline(source, cache_dir, metadata_dir)
        if source.is_pinned:
            cached = inspect_cached_copy(source, metadata_dir, source.revision, listing=None, persist=True)
            if cached.downloaded is not None:
                return cached.downloaded
        api = hub_api(source)
        listing = resolve_revision(api, source)
        resolved = resolved_revision(source, listing)
        cached = inspect_cached_copy(source, metadata_dir, resolved, listing=listing, persist=True)
        if cached.downloaded is not None:
            return cached.downloaded
        if cached.problems:
            log.info(
                "%s: cached copy of %s is incomplete (%s); downloading",
                source.label,
                resolved,
                describe_problems(cached.problems),
            )
        return _download(
            source,
            listing,
            resolved,
            cache_dir=cache_dir,
            metadata_dir=metadata_dir,
            on_progress=on_progress,
            console_progress=console_progress,
        )


def find_cached_download(source: ModelSource) -> DownloadedModel | None:
    """A complete copy already on disk, found without downloading or writing anything; None if there is none.

    Pinned and offline sources cost no request; a branch or tag costs one listing request, to learn which commit
    it points to now. Meant for cache keys: network trouble answers None rather than raising.
    """
    if source.source == "local":
        return None
    repo_id = _repo_id(source)
    metadata_dir = repo_metadata_dir(source.resolved_cache_dir(), source.repo_type, repo_id)
    if source.is_pinned:
        return inspect_cached_copy(source, metadata_dir, source.revision, listing=None, persist=False).downloaded
    if source.offline:
        resolved = read_refs(metadata_dir).revisions.get(source.revision)
        if resolved is None:
            return None
        return inspect_cached_copy(source, metadata_dir, resolved, listing=None, persist=False).downloaded
    try:
        listing = fetch_listing(hub_api(source), source, source.revision)
    except HUB_CALL_ERRORS as error:
        log.debug("%s: cannot resolve the revision now (%s)", source.label, first_line(error))
        return None
    except DownloadError as error:
        log.debug("%s: cannot resolve the revision now (%s)", source.label, error)
        return None
    if listing.commit is None and source.require_pinned:
        return None  # the download itself stops, with the reason
    resolved = resolved_revision(source, listing)
    return inspect_cached_copy(source, metadata_dir, resolved, listing=listing, persist=False).downloaded


def use_local_directory(source: ModelSource) -> DownloadedModel:
    if source.path is None:
        raise LocalSourceError("model source 'local' needs a path")
    directory = source.path.expanduser().resolve()
    if source.repo_type == "model":
        check_model_directory(directory)
    else:
        check_dataset_directory(directory)
    entries = describe_directory(directory)
    log.info(
        "%s: local %s, %d files, %d bytes, used in place", directory, source.repo_type, len(entries), _bytes(entries)
    )
    return DownloadedModel(
        path=directory,
        model_id=source.id or directory.name,
        revision="local",
        resolved_revision=directory_fingerprint(entries, directory),
        manifest=entries,
        from_cache=True,
        source="local",
        repo_type=source.repo_type,
    )


def resolve_revision(api: HubApi, source: ModelSource) -> HubListing:
    """The hub's listing of the configured revision (with retries for network errors only)."""
    try:
        return with_network_retries(
            lambda: fetch_listing(api, source, source.revision),
            what=source.label,
            retries=source.retries,
            backoff_s=source.retry_backoff_s,
        )
    except HubNotFoundError as error:
        raise _explain_not_found(api, source, error) from error


def inspect_cached_copy(
    source: ModelSource, metadata_dir: Path, resolved: str, *, listing: HubListing | None, persist: bool
) -> CachedCopy:
    """Check the copy recorded for commit `resolved` against its manifest (and against the hub's listing, if given).

    With `persist`, refreshed stamps and the revision name are written back (the caller holds the lock).
    """
    directory_name = read_refs(metadata_dir).directories.get(resolved)
    if directory_name is None:
        return CachedCopy()
    directory = Path(directory_name)
    record = read_record(directory)
    if record is None or (record.repo_type, record.model_id, record.resolved_revision) != (
        source.repo_type,
        source.id,
        resolved,
    ):
        return CachedCopy(problems=[f"{directory} no longer holds {resolved}"])
    if listing is not None and set(listing.files) != set(record.files):
        # Same name, other files: a branch that moved on a hub that reports no commit id, or rewritten history.
        return CachedCopy(problems=[f"the hub's file list for {resolved} differs from the recorded one"])
    selected = select_files(record.files, source.allow_patterns, source.ignore_patterns)
    if not selected:
        return CachedCopy(problems=["the allow/ignore patterns select no recorded file"])
    check = check_files(directory, selected, record.stamps)
    if not check.complete:
        return CachedCopy(problems=check.problems)
    manifest_path = directory / RECORD_FILE_NAME
    if persist:
        revisions = sorted({*record.revisions, source.revision})
        stamps = {**record.stamps, **check.stamps}
        if revisions != record.revisions or stamps != record.stamps:
            manifest_path = write_record(
                directory, record.model_copy(update={"revisions": revisions, "stamps": stamps})
            )
        remember_download(metadata_dir, source.revision, resolved, directory)
    log.info("%s: complete in the cache at %s (commit %s), nothing to download", source.label, directory, resolved)
    return CachedCopy(downloaded=_downloaded(source, directory, resolved, selected, manifest_path, from_cache=True))


def _download(
    source: ModelSource,
    listing: HubListing,
    resolved: str,
    *,
    cache_dir: Path,
    metadata_dir: Path,
    on_progress: ProgressListener | None,
    console_progress: bool,
) -> DownloadedModel:
    selected = select_files(listing.files, source.allow_patterns, source.ignore_patterns)
    if not selected:
        raise DownloadError(
            f"{source.label}: allow_patterns/ignore_patterns select none of the "
            f"{len(listing.files)} files at {resolved}"
        )
    log.info(
        "%s: downloading %d files, %d bytes (commit %s) into %s",
        source.label,
        len(selected),
        _bytes(selected),
        resolved,
        cache_dir,
    )
    with ExitStack() as stack:
        listeners = [on_progress] if on_progress is not None else []
        if console_progress:
            listeners.append(stack.enter_context(ConsoleProgressBar()).update)

        def attempt() -> Path:
            # A fresh counter per attempt: ModelScope reports already-received bytes again when it resumes.
            progress = ByteProgress(f"{source.id}@{resolved[:12]}", _bytes(selected), listeners)
            directory = download_snapshot(source, resolved, cache_dir, callback_class_for(progress))
            progress.finish()
            return directory

        directory = with_network_retries(
            attempt, what=f"{source.label} ({resolved})", retries=source.retries, backoff_s=source.retry_backoff_s
        )
    # ModelScope checked each sha256 while streaming and refuses a mismatching file; sizes are cheap to re-check.
    check = check_files(directory, selected, {}, hash_unstamped=False)
    if not check.complete:
        raise IntegrityError(f"{source.label}: after download: {describe_problems(check.problems)}")
    previous = read_record(directory)
    # A directory ModelScope reuses across commits (its legacy cache layout) keeps only this commit's history.
    same_commit = previous if previous is not None and previous.resolved_revision == resolved else None
    record = DownloadRecord(
        repo_type=source.repo_type,
        model_id=_repo_id(source),
        resolved_revision=resolved,
        revisions=sorted({source.revision, *(same_commit.revisions if same_commit else [])}),
        files=list(listing.files),
        stamps={**(same_commit.stamps if same_commit else {}), **check.stamps},
    )
    manifest_path = write_record(directory, record)
    remember_download(metadata_dir, source.revision, resolved, directory)
    log.info("%s: downloaded to %s (commit %s)", source.label, directory, resolved)
    return _downloaded(source, directory, resolved, selected, manifest_path, from_cache=False)


def _from_cache_offline(source: ModelSource, cache_dir: Path, metadata_dir: Path) -> DownloadedModel:
    resolved = source.revision if source.is_pinned else read_refs(metadata_dir).revisions.get(source.revision)
    if resolved is not None:
        cached = inspect_cached_copy(source, metadata_dir, resolved, listing=None, persist=True)
        if cached.downloaded is not None:
            return cached.downloaded
        if cached.problems:
            raise OfflineCacheMissError(
                f"{source.label}: offline, and the cached copy of {resolved} is not usable: "
                f"{describe_problems(cached.problems)}; run once with offline: false to repair it"
            )
    return _adopt_foreign_copy(source, cache_dir)


def _adopt_foreign_copy(source: ModelSource, cache_dir: Path) -> DownloadedModel:
    """A copy npu-sft did not download (e.g. by LLaMA-Factory's own ModelScope): usable offline, but unverified."""
    miss = (
        f"{source.label}: offline, and {cache_dir} holds no copy of it; run once with offline: false, "
        "or point a `source: local` at a model directory"
    )
    try:
        directory = find_in_cache_only(source, cache_dir)
    except HUB_CALL_ERRORS as error:
        raise OfflineCacheMissError(f"{miss} ({first_line(error)})") from error
    try:
        if source.repo_type == "model":
            check_model_directory(directory)
        else:
            check_dataset_directory(directory)
    except LocalSourceError as error:
        raise OfflineCacheMissError(f"{miss}; {directory} is incomplete: {error}") from error
    entries = describe_directory(directory)
    log.warning(
        "%s: offline, using %s which npu-sft did not download: its files cannot be verified against the hub",
        source.label,
        directory,
    )
    return _downloaded(source, directory, source.revision, entries, None, from_cache=True)


def _explain_not_found(api: HubApi, source: ModelSource, error: HubNotFoundError) -> HubNotFoundError:
    explanation = explain_not_found(api, source)
    return HubNotFoundError(explanation) if explanation else error


def resolved_revision(source: ModelSource, listing: HubListing) -> str:
    """The commit a run uses and records: the pinned one, else the one the listing says the branch or tag is."""
    if source.is_pinned:
        return source.revision
    if listing.commit is None and source.require_pinned:
        raise UnpinnedRevisionError(
            f"{source.label}: the hub did not say which commit {source.revision!r} points to, and "
            "model.require_pinned is set; set `revision:` to a commit id"
        )
    if listing.commit is None:
        log.warning(
            "%s: the hub did not report which commit %r points to; recording the revision name instead",
            source.label,
            source.revision,
        )
        return source.revision
    log.info(
        "%s: revision %r is commit %s; pin it with `revision: %s`",
        source.label,
        source.revision,
        listing.commit,
        listing.commit,
    )
    return listing.commit


def _downloaded(
    source: ModelSource,
    directory: Path,
    resolved: str,
    entries: Sequence[ManifestEntry],
    manifest_path: Path | None,
    *,
    from_cache: bool,
) -> DownloadedModel:
    return DownloadedModel(
        path=directory,
        model_id=_repo_id(source),
        revision=source.revision,
        resolved_revision=resolved,
        manifest=list(entries),
        from_cache=from_cache,
        source="modelscope",
        repo_type=source.repo_type,
        manifest_path=manifest_path,
    )


def _repo_id(source: ModelSource) -> str:
    if source.id is None:
        raise DownloadError("a modelscope source needs an id")
    return source.id


def _bytes(entries: Sequence[ManifestEntry]) -> int:
    return sum(entry.size for entry in entries)
