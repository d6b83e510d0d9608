"""The `sft` flow: download -> prepare -> train -> evaluate -> publish -> serve, one MLflow run per flow run.

    npu-sft run configs/tiny_cpu.yaml            # or: npu-sft demo
    prefect deployment run sft/qwen7b            # after `make up`
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

from npu_sft.publishing.versions import Published
from npu_sft.settings import load_pipeline
from npu_sft.user_errors import quiet_user_error_tracebacks
from tasks.evaluate import evaluate
from tasks.export import export_merged_champion
from tasks.model import fetch_model
from tasks.prepare import download_datasets, prepare_data, record_datasets
from tasks.publish import publish
from tasks.push import check_push_token, push_to_modelscope
from tasks.serve import smoke_test_trained
from tasks.tracking import TRACKING_HOOKS, start_tracking, summarize_run
from tasks.train import train
from tasks.validate import check_config

quiet_user_error_tracebacks()  # bad input ends as one line, in the console and in Prefect's UI


@dataclass(frozen=True)
class SftResult:
    mlflow_run_id: str
    metrics: dict[str, float]
    published: Published | None
    served_reply: str | None


@flow(name="sft", log_prints=True, **TRACKING_HOOKS)
def sft(config: str, overrides: list[str] | None = None) -> SftResult:
    pipeline = load_pipeline(config, overrides)
    check_config(pipeline)
    if pipeline.settings.publish.modelscope:
        check_push_token(pipeline)
    run = start_tracking(pipeline)
    model_path = fetch_model(pipeline, run)
    sources = download_datasets(pipeline, run)
    data = prepare_data(pipeline, run, sources, model_path)
    record_datasets(pipeline, run, data)
    trained = train(pipeline, run, model_path, data)
    evaluation = evaluate(pipeline, run, trained)
    metrics = {**trained.figures, **evaluation.metrics()}
    published = publish(pipeline, run, trained, evaluation)
    if published and published.decision.promote and pipeline.settings.publish.modelscope:
        push_to_modelscope(pipeline, published)
    if published and published.decision.promote and pipeline.settings.publish.merged.enabled:
        export_merged_champion(pipeline, run, model_path, published)
    reply = smoke_test_trained(pipeline, run, model_path, trained, published) if pipeline.settings.serve.enabled else None
    summarize_run(pipeline, run, metrics, published, reply)
    return SftResult(run.mlflow_run_id, metrics, published, reply)
