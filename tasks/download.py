"""Prefect task over npu_sft.download: caching keyed on repository + resolved commit, retries for network errors
only, and a progress artifact (percent of bytes) while it downloads."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from typing import Any, cast
from uuid import UUID

import httpx
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.tasks import Task

from npu_sft.download import (
    DownloadedModel,
    DownloadError,
    DownloadProgress,
    ModelSource,
    download_model,
    find_cached_download,
)

# Task-level retries are for outages longer than download_model's own backoff (which handles blips in seconds);
# each retry resumes the partial files, so waiting minutes costs no bytes.
TASK_RETRIES = 2
TASK_RETRY_DELAYS_S: list[float] = [60.0, 300.0]
ARTIFACT_UPDATE_INTERVAL_S = 2.0


def download_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Key = repository + resolved commit + file selection + where its complete copy is; None = do not cache.

    A key exists only while a complete, verified copy is on disk, so a cleared cache can never be answered
    with a stale cached result. Unpinned revisions cost one listing request here (to learn the commit).
    """
    source = ModelSource.model_validate(parameters["source"])
    cached = find_cached_download(source)
    if cached is None:
        return None
    identity = {
        "repo_type": cached.repo_type,
        "id": cached.model_id,
        "revision": source.revision,
        "resolved_revision": cached.resolved_revision,
        "allow_patterns": source.allow_patterns,
        "ignore_patterns": source.ignore_patterns,
        "path": str(cached.path),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return f"download-{cached.model_id.replace('/', '--')}-{cached.resolved_revision[:12]}-{digest}"


def retry_only_network_errors(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry when the download failed on the network (or waiting for a lock); a 404 or bad bytes fail at once."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, DownloadError) and error.retryable


class ProgressArtifactReporter:
    """Keeps one Prefect progress artifact at the download's percent, updated at most every couple of seconds.

    Called from ModelScope's download threads; the lock keeps updates in order and one at a time. An API error
    only stops the updates: a progress display must never fail (and so retry) a 15 GB download.
    """

    def __init__(self, key: str, description: str) -> None:
        # Typed as "UUID or coroutine" because of Prefect's sync/async dispatch; called from sync code it is a UUID.
        self._artifact_id = cast(UUID, create_progress_artifact(progress=0.0, key=key, description=description))
        self._lock = threading.Lock()
        self._last_update = 0.0
        self._last_percent = 0.0
        self._broken = False
        # Captured here: the download threads that call `report` do not carry Prefect's run context.
        self._logger = get_run_logger()

    def report(self, progress: DownloadProgress) -> None:
        now = time.monotonic()
        with self._lock:
            due = now - self._last_update >= ARTIFACT_UPDATE_INTERVAL_S or progress.percent >= 100.0
            if self._broken or not due or progress.percent == self._last_percent:
                return
            self._last_update, self._last_percent = now, progress.percent
            self._update(round(progress.percent, 1))

    def finish(self) -> None:
        with self._lock:
            if not self._broken and self._last_percent < 100.0:
                self._last_percent = 100.0
                self._update(100.0)

    def _update(self, percent: float) -> None:
        try:
            update_progress_artifact(artifact_id=self._artifact_id, progress=percent)
        except httpx.HTTPError as error:
            self._broken = True
            self._logger.warning("progress artifact not updated any more: %s", error)


def artifact_key(source: ModelSource) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    name = source.id or (source.path.name if source.path else "model")
    return "download-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@task(
    name="download-model",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS_S,
    retry_condition_fn=retry_only_network_errors,
    cache_key_fn=download_cache_key,
    persist_result=True,
)
def download_model_task(source: ModelSource) -> DownloadedModel:
    logger = get_run_logger()
    reporter = ProgressArtifactReporter(key=artifact_key(source), description=f"Downloading {source.label}")
    downloaded = download_model(source, on_progress=reporter.report)
    reporter.finish()
    logger.info(
        "%s: %s at commit %s, %d files, %d bytes, %s",
        source.label,
        downloaded.path,
        downloaded.resolved_revision,
        downloaded.file_count,
        downloaded.total_bytes,
        "from the cache" if downloaded.from_cache else "downloaded",
    )
    return downloaded
