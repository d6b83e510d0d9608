from __future__ import annotations

import math

from prefect import get_run_logger, task

from npu_sft.runs import RunContext
from npu_sft.settings import Pipeline
from npu_sft.training import read_results
from tasks.train import Trained


@task
def evaluate(pipeline: Pipeline, run: RunContext, trained: Trained) -> dict[str, float]:
    """eval_loss and perplexity from the engine's outputs, recorded as the run's final metrics."""
    results = read_results(trained.output_dir)
    if not math.isfinite(results.get("eval_loss", math.nan)):
        raise ValueError(f"{trained.output_dir}/all_results.json holds no finite eval_loss: {results}")
    # train_loss, train_runtime and the rates there describe the last attempt alone; the train task has logged the
    # whole training's.
    evaluation = {key: value for key, value in results.items() if not key.startswith("train_")}
    run.tracker.log_metrics((key, value, 0) for key, value in evaluation.items())
    get_run_logger().info("eval_loss %.4f, perplexity %.2f", results["eval_loss"], results["perplexity"])
    return evaluation
