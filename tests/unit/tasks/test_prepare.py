"""The dataset tasks in a flow against a temporary Prefect server: the prepared data cached while its directory
exists, the statistics recorded in every run."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from npu_sft.settings import load_pipeline
from npu_sft.tracking import RunContext, RunTracker
from tasks.prepare import STATS_ARTIFACT_KEY, download_datasets, prepare_data, record_datasets

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "tiny_cpu.yaml"


async def read_artifacts() -> list[Any]:
    async with get_client() as client:
        key_filter = ArtifactFilter(key=ArtifactFilterKey(any_=[STATS_ARTIFACT_KEY]))
        return await client.read_artifacts(artifact_filter=key_filter)


def test_prepared_data_is_a_prefect_cache_hit_and_recorded_in_every_run(tmp_path: Path) -> None:
    pipeline = load_pipeline(DEMO_CONFIG, [
        f"engine.python={sys.executable}",
        f"state_dir={tmp_path / 'state'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={tmp_path / 'artifacts'}",
    ])
    model_path = tmp_path / "model"  # no tokenizer.json: statistics without token counts
    model_path.mkdir()

    @flow
    def prepare_flow() -> tuple[Any, str]:
        tracker = RunTracker.start(pipeline.settings.mlflow, run_name="r", tags={})
        run = RunContext(tracker, tmp_path / "runs" / tracker.run_id)
        sources = download_datasets(pipeline, run)
        state = prepare_data(pipeline, run, sources, model_path, return_state=True)
        record_datasets(pipeline, run, state.result())
        return state, tracker.run_id

    storage = tmp_path / "prefect-results"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=90):
        first, first_run = prepare_flow()
        second, second_run = prepare_flow()
        artifacts = asyncio.run(read_artifacts())
        shutil.rmtree(first.result().dir)  # someone cleans the prepared datasets away
        third, _ = prepare_flow()
    assert first.is_completed() and first.name == "Completed"
    assert second.name == "Cached"  # same inputs, same prepared directory: Prefect's cache answers
    assert second.result().dir == first.result().dir and first.result().stats.valid == 452
    assert third.name == "Completed" and (third.result().dir / "stats.json").is_file()  # prepared again, not cached
    # Both MLflow runs hold the statistics, also the one whose preparation came from the cache.
    client = RunTracker(pipeline.settings.mlflow, first_run).client
    for run_id in (first_run, second_run):
        assert client.get_run(run_id).data.metrics["data.train_rows"] == first.result().stats.train
    assert len(artifacts) == 2 and artifacts[0].type == "table"
    table = json.loads(artifacts[0].data)
    assert table[0]["dataset"] == "identity" and table[-1]["dataset"] == "total"
    assert str(first.result().dir) in artifacts[0].description
