"""The `evaluate` flow: score an earlier run's adapter, or a registered version's files, again with the current
eval settings, into the run that trained it.

    npu-sft evaluate configs/tiny_cpu.yaml --run RUN_ID          # the adapter in the run's output directory
    npu-sft evaluate configs/tiny_cpu.yaml --version champion    # or N, latest: the registry's files
"""

from __future__ import annotations

from prefect import flow

from npu_sft.evaluation import Evaluation
from npu_sft.settings import load_pipeline
from npu_sft.user_errors import quiet_user_error_tracebacks
from tasks.evaluate import evaluate
from tasks.registry import fetch_registered_adapter
from tasks.tracking import attach_tracking
from tasks.train import Trained

quiet_user_error_tracebacks()  # bad input ends as one line, in the console and in Prefect's UI


@flow(name="evaluate", log_prints=True)
def evaluate_again(
    config: str, run_id: str, overrides: list[str] | None = None, version: str | None = None
) -> Evaluation:
    """`version` (a number) scores that version of `publish.registered_model` as the registry holds it."""
    pipeline = load_pipeline(config, overrides)
    run = attach_tracking(pipeline, run_id)
    registered = None
    if version is not None:
        registered = fetch_registered_adapter(pipeline, pipeline.settings.publish.registered_model, version)
    return evaluate(pipeline, run, Trained.found_in(run), registered)
