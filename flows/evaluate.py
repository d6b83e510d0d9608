"""The `evaluate` flow: score an earlier run's adapter again with the current eval settings, into that run.

    npu-sft evaluate configs/tiny_cpu.yaml --run RUN_ID      # or --version N of publish.registered_model
"""

from __future__ import annotations

from prefect import flow

from npu_sft.evaluation import Evaluation
from npu_sft.settings import load_pipeline
from tasks.evaluate import evaluate
from tasks.tracking import attach_tracking
from tasks.train import Trained


@flow(name="evaluate", log_prints=True)
def evaluate_again(config: str, run_id: str, overrides: list[str] | None = None) -> Evaluation:
    pipeline = load_pipeline(config, overrides)
    run = attach_tracking(pipeline, run_id)
    return evaluate(pipeline, run, Trained.found_in(run))
