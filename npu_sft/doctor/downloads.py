"""What a config downloads, checked before the download: each ModelScope repository (the model and the datasets)
answers at its revision, and the cache's disk holds what is still to come (a 7B model is about 15 GB)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from npu_sft.doctor.models import Finding, ok
from npu_sft.download import (
    DownloadError,
    HubAccessError,
    HubNotFoundError,
    HubUnavailableError,
    ModelSource,
    OfflineCacheMissError,
    UnpinnedRevisionError,
)
from npu_sft.download.datasets import dataset_repo_source
from npu_sft.download.hub import effective_endpoint
from npu_sft.download.preview import DownloadPreview, preview_download
from npu_sft.download.settings import CACHE_ENV_VAR, TOKEN_ENV_VAR
from npu_sft.settings import Pipeline

FreeBytes = Callable[[Path], "int | None"]  # None: the directory can not be written


def check_downloads(pipeline: Pipeline, free_bytes: FreeBytes | None = None) -> list[Finding]:
    """One line per repository, then one per cache disk; a hub that does not answer is asked once."""
    findings: list[Finding] = []
    previews: list[DownloadPreview] = []
    silent: dict[str, str] = {}  # endpoint -> the model or dataset it did not answer for
    for check, key, source in _hub_sources(pipeline):
        endpoint = effective_endpoint(source)
        if endpoint in silent and not source.offline:
            findings.append(Finding(check, "warning", f"not checked: the hub at {endpoint} did not answer for "
                                    f"{silent[endpoint]}", "see that line"))
            continue
        try:
            preview = preview_download(source)
        except DownloadError as error:
            if isinstance(error, HubUnavailableError):
                silent[endpoint] = check
            findings.append(Finding(check, "error", str(error), _fix(error, pipeline.config_file, key, endpoint)))
            continue
        previews.append(preview)
        findings.append(ok(check, _described(preview)))
    return findings + check_disk(previews, free_bytes or _free_bytes)


def check_disk(previews: list[DownloadPreview], free_bytes: FreeBytes) -> list[Finding]:
    """The bytes still to download against the free space of each cache directory's disk."""
    needed: dict[Path, int] = {}
    for preview in previews:
        needed[preview.cache_dir] = needed.get(preview.cache_dir, 0) + preview.missing_bytes
    findings = []
    for cache_dir, need in needed.items():
        free = free_bytes(cache_dir)
        if free is None:
            findings.append(Finding("disk", "error", f"{cache_dir} can not be written", "set model.cache_dir (or "
                                    f"${CACHE_ENV_VAR}) to a directory this user may write"))
            continue
        said = f"{cache_dir}: {_size(need)} to download, {_size(free)} free" if need else (
            f"{cache_dir}: nothing to download, {_size(free)} free")
        if need > free:
            findings.append(Finding("disk", "error", said, f"free {_size(need - free)} there, or set model.cache_dir "
                                    f"(or ${CACHE_ENV_VAR}) to a disk with room"))
        else:
            findings.append(ok("disk", said))
    return findings


def _hub_sources(pipeline: Pipeline) -> Iterator[tuple[str, str, ModelSource]]:
    """(check, config key, source) for every repository the download step fetches."""
    model = pipeline.settings.model
    hub_model = model if isinstance(model, ModelSource) and model.source == "modelscope" else None
    if hub_model is not None:
        yield f"model {hub_model.id}", "model", hub_model
    for index, spec in enumerate(pipeline.settings.data.datasets):
        if spec.source == "modelscope" and spec.path is None:
            yield f"dataset {spec.repo_id}", f"data.datasets[{index}]", dataset_repo_source(spec, hub_model)


def _described(preview: DownloadPreview) -> str:
    source = preview.source
    at = preview.commit if preview.commit == source.revision else f"{source.revision} = commit {preview.commit}"
    files = f"{preview.file_count} file{'s' * (preview.file_count != 1)}, {_size(preview.total_bytes)}"
    if not preview.missing_bytes:
        return f"{at}: {files}, complete in the cache"
    return f"{at} on {effective_endpoint(source)}: {files} to download"


def _fix(error: DownloadError, config_file: Path, key: str, endpoint: str) -> str:
    if isinstance(error, HubUnavailableError):
        return (f"check this host's network or proxy (HTTPS_PROXY) to {endpoint}; or use a mirror (model.endpoint, "
                "$MODELSCOPE_ENDPOINT); or model.offline: true once the repository is in the cache")
    if isinstance(error, HubNotFoundError):
        field = "id" if key == "model" else "repo_id"
        return f"{config_file}: {key}.{field} / {key}.revision"
    if isinstance(error, HubAccessError):
        return f"set ${TOKEN_ENV_VAR} to a ModelScope token that may read it"
    if isinstance(error, UnpinnedRevisionError):
        return f"{config_file}: {key}.revision: a commit id (or model.require_pinned: false)"
    if isinstance(error, OfflineCacheMissError):
        return "download it once with model.offline: false, or point a `source: local` model at a directory"
    return ""


def _free_bytes(directory: Path) -> int | None:
    """Free space where `directory` is, or would be created; None if this user may not create it there."""
    return shutil.disk_usage(existing_ancestor(directory)).free if can_create(directory) else None


def can_create(directory: Path) -> bool:
    """`directory` exists and is writable, or can be made under the nearest directory above it that exists."""
    existing = existing_ancestor(directory)
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def existing_ancestor(path: Path) -> Path:
    """`path`, or the nearest path above it that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
