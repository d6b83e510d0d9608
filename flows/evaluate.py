"""The `evaluate` flow: score an earlier run's adapter, or a registered version's files, again with the current
eval settings, into the run that trained it.

    npu-sft evaluate configs/tiny_cpu.yaml --run RUN_ID          # the adapter in the run's output directory
    npu-sft evaluate configs/tiny_cpu.yaml --version champion    # or N, latest: the registry's files, on any host
"""

from __future__ import annotations

from prefect import flow

from npu_sft.evaluation import Evaluation
from npu_sft.settings import load_pipeline
from npu_sft.user_errors import quiet_user_error_tracebacks
from tasks.evaluate import evaluate, restore_training
from tasks.model import fetch_base_model
from tasks.registry import fetch_registered_adapter
from tasks.tracking import attach_tracking
from tasks.train import Trained

quiet_user_error_tracebacks()  # bad input ends as one line, in the console and in Prefect's UI


@flow(name="evaluate", log_prints=True)
def evaluate_again(
    config: str, run_id: str, overrides: list[str] | None = None, version: str | None = None
) -> Evaluation:
    """`version` (a number) scores that version of `publish.registered_model` from the registry and its run's
    record alone, with the config's model as its base; without it, the run's own output directory."""
    pipeline = load_pipeline(config, overrides)
    run = attach_tracking(pipeline, run_id)
    if version is None:
        return evaluate(pipeline, run, Trained.found_in(run))
    registered = fetch_registered_adapter(pipeline, pipeline.settings.publish.registered_model, version)
    model_path = fetch_base_model(pipeline, registered)
    trained = restore_training(pipeline, run, model_path)
    return evaluate(pipeline, run, trained, registered)
