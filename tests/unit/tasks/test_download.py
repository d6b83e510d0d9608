"""The Prefect task (caching, retries for network errors only, progress artifact) and the MLflow manifest.

Slower than test_download.py: a temporary Prefect server (~10 s) and a fresh MLflow SQLite store (~10 s).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.states import State
from prefect.testing.utilities import prefect_test_harness

from npu_sft.download import (
    DownloadedModel,
    HubNotFoundError,
    HubUnavailableError,
    ModelSource,
    UnpinnedRevisionWarning,
    download_model,
    log_manifest,
)
from tasks.download import artifact_key, download_cache_key, download_model_task
from tests.fakes.hub_standin import HubStandIn
from tests.unit.download.test_core import MODEL_ID, WEIGHTS, tiny_model_files

LISTING = f"/api/v1/models/{MODEL_ID}/repo/files"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as standin:
        standin.add_repo(MODEL_ID, tiny_model_files())
        yield standin


def source(hub: HubStandIn, cache: Path, **overrides: Any) -> ModelSource:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnpinnedRevisionWarning)
        return ModelSource(
            **{
                "source": "modelscope",
                "id": MODEL_ID,
                "endpoint": hub.url,
                "cache_dir": cache,
                "retries": 0,
                "retry_backoff_s": 0.01,
                **overrides,
            }
        )


def run_task(src: ModelSource) -> State[DownloadedModel]:
    """The task on its own (Prefect runs a task called outside a flow in its own task run)."""
    return download_model_task.with_options(retry_delay_seconds=0)(src, return_state=True)


def listing_requests(hub: HubStandIn) -> int:
    return sum(1 for r in hub.requests if r.path == LISTING)


def task_run_count(state: State[Any]) -> int:
    with get_client(sync_client=True) as client:
        return client.read_task_run(state.state_details.task_run_id).run_count


@flow
def pipeline_step(src: ModelSource) -> tuple[str, DownloadedModel]:
    """How the pipeline's flow calls the task."""
    state = download_model_task(src, return_state=True)
    return state.name, state.result()


def test_runs_after_a_complete_download_are_served_from_the_task_cache(
    prefect_server: None, hub: HubStandIn, tmp_path: Path
):
    src = source(hub, tmp_path)

    first_state, first = pipeline_step(src)
    # The copy is now complete on disk: no file requests, and this run's result fills the task cache.
    second_state, second = pipeline_step(src)
    hub.clear_log()
    third_state, third = pipeline_step(src)

    assert (first_state, first.from_cache) == ("Completed", False)
    assert (second_state, second.from_cache) == ("Completed", True)
    assert third_state == "Cached" and third.path == first.path
    assert hub.file_requests() == []
    assert listing_requests(hub) == 1  # the cache key's lookup of the commit `master` points to now


def test_the_cache_key_names_the_resolved_commit_and_vanishes_with_the_files(
    prefect_server: None, hub: HubStandIn, tmp_path: Path
):
    src = source(hub, tmp_path)
    assert download_cache_key(None, {"source": src}) is None  # type: ignore[arg-type]
    downloaded = download_model(src, console_progress=False)

    key = download_cache_key(None, {"source": src})  # type: ignore[arg-type]
    (downloaded.path / WEIGHTS).unlink()

    assert key is not None and downloaded.resolved_revision[:12] in key
    assert download_cache_key(None, {"source": src}) is None  # type: ignore[arg-type]


def test_the_download_reports_a_progress_artifact(prefect_server: None, hub: HubStandIn, tmp_path: Path):
    src = source(hub, tmp_path)

    run_task(src)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(src)]))
        )
    assert artifacts and artifacts[0].type == "progress" and float(artifacts[0].data) == 100.0


def test_a_missing_model_fails_the_task_without_task_retries(prefect_server: None, hub: HubStandIn, tmp_path: Path):
    state = run_task(source(hub, tmp_path, id="qwen/No-Such-Model"))

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), HubNotFoundError)
    assert task_run_count(state) == 1


def test_network_errors_are_retried_by_the_task(prefect_server: None, hub: HubStandIn, tmp_path: Path):
    hub.fail_all(503)

    state = run_task(source(hub, tmp_path))

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), HubUnavailableError)
    assert task_run_count(state) == 3  # the first attempt and the task's two retries


def test_log_manifest_records_tags_and_the_manifest_artifact(hub: HubStandIn, tmp_path: Path):
    from npu_sft.settings import MlflowSettings
    from npu_sft.tracking import RunTracker

    downloaded = download_model(source(hub, tmp_path / "cache"), console_progress=False)
    settings = MlflowSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "artifacts"), experiment="sft"
    )
    tracker = RunTracker.start(settings, run_name="download", tags={})
    client, run_id = tracker.client, tracker.run_id

    log_manifest(tracker, downloaded)

    tags = client.get_run(run_id).data.tags
    assert tags["model.id"] == MODEL_ID
    assert tags["model.revision"] == "master"
    assert tags["model.resolved_revision"] == downloaded.resolved_revision
    assert tags["model.file_count"] == str(len(tiny_model_files()))
    assert tags["model.total_bytes"] == str(downloaded.total_bytes)
    local = Path(client.download_artifacts(run_id, "model_manifest.json", str(tmp_path / "out")))
    document = json.loads(local.read_text())
    assert document["resolved_revision"] == downloaded.resolved_revision
    assert document["file_count"] == len(tiny_model_files())
    assert document["files"] == [entry.model_dump() for entry in downloaded.manifest]
