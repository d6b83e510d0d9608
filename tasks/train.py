from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from uuid import UUID

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from npu_sft.datasets import PreparedData
from npu_sft.devices import lease_devices, processes_on_devices
from npu_sft.doctor import require_working_cards
from npu_sft.engine.llamafactory_config import resolve_train_config, without_secrets, write_config
from npu_sft.evaluation.reevaluation import RESULTS, RESULTS_ARTIFACT_DIR, RUN_CONFIG, RUN_CONFIG_ARTIFACT_DIR
from npu_sft.settings import Pipeline
from npu_sft.tracking import RunContext, StepMetricSink
from npu_sft.training import (
    STALL_STACKS_PREFIX,
    STEP_METRIC_KEYS,
    FailureKind,
    RetryPolicy,
    TrainingFailed,
    estimated_train_tokens_per_epoch,
    evaluation_results,
    launch_env,
    launch_on,
    run_figures,
    run_training,
)


@dataclass(frozen=True)
class Trained:
    output_dir: Path
    config_file: Path
    wall_time_s: float
    figures: dict[str, float]  # the whole training's, across its attempts (train_loss, train/samples_per_s, ...)
    results: dict[str, float]  # its final evaluation: eval_loss, perplexity, ... (empty: the config evaluates not)

    @classmethod
    def found_in(cls, run: RunContext) -> Trained:
        """An earlier run's training outputs, as the train task left them in its working directory."""
        return cls(
            run.output_dir, run.run_dir / RUN_CONFIG, wall_time_s=0.0, figures={},
            results=evaluation_results(run.output_dir),
        )


class ProgressReporter:
    """`on_progress` for the follower: an API error stops the progress updates (said once), never the follower."""

    def __init__(self, artifact_id: UUID, on_warning: Callable[[str], None]):
        self._artifact_id = artifact_id
        self._warn = on_warning
        self._broken = False

    def __call__(self, percent: float) -> None:
        if self._broken:
            return
        try:
            update_progress_artifact(self._artifact_id, percent)
        except httpx.HTTPError as err:
            self._broken = True
            self._warn(f"training progress artifact not updated any more: {err}")


def _log_stall_stacks(run: RunContext) -> None:
    """The Python stacks of the ranks of each stalled attempt, under `stall/` in the run."""
    for stacks in sorted(run.logs_dir.glob(f"{STALL_STACKS_PREFIX}*.txt")):
        run.tracker.log_artifact(stacks, "stall")


@task
def train(pipeline: Pipeline, run: RunContext, model_path: Path, data: PreparedData) -> Trained:
    """LoRA SFT under torchrun on the devices this task leases; every logged step goes to MLflow as it happens.

    A failed attempt is retried (training.max_attempts) from the newest complete checkpoint, in the same MLflow run.
    """
    logger = get_run_logger()
    settings = pipeline.settings
    config = resolve_train_config(
        pipeline,
        model_path=str(model_path),
        data_args=data.llamafactory_args(),
        output_dir=run.output_dir,
    )
    config_file = write_config(config, run.run_dir / RUN_CONFIG)
    # The engine reads the file with its tokens; the run records it without them.
    run.tracker.log_dict(without_secrets(config), f"{RUN_CONFIG_ARTIFACT_DIR}/{RUN_CONFIG}")
    # Typed as "UUID or coroutine" because of Prefect's sync/async dispatch; called from sync code it is a UUID.
    progress_id = cast(UUID, create_progress_artifact(0.0, key=None, description="training progress (percent of steps)"))
    log_file = run.logs_dir / "train.log"

    with lease_devices(settings.devices, task="train", flow_run_id=run.flow_run_id, on_wait=logger.info) as lease:
        logger.info("training on %s devices %s", lease.kind, ",".join(str(i) for i in lease.ids))
        if settings.training.guards.enabled and settings.training.guards.probe_devices:
            require_working_cards(settings.engine, lease)
        launch = launch_on(lease, settings.training)
        metrics = StepMetricSink(run.tracker, on_warning=logger.warning)
        progress = ProgressReporter(progress_id, on_warning=logger.warning)
        try:
            result = run_training(
                settings.engine,
                launch,
                config_file,
                run.output_dir,
                device_env={**lease.env(), **launch_env(lease.kind)},
                log_file=log_file,
                on_line=logger.info,
                on_event=logger.warning,
                on_metrics=metrics,
                on_progress=progress,
                policy=RetryPolicy.from_settings(settings.training),
                device_ids=lease.ids,
                device_probe=processes_on_devices if lease.kind == "npu" else None,
                device_kind=lease.kind,
                logged_steps=run.tracker.logged_steps(STEP_METRIC_KEYS),
            )
        except TrainingFailed as failed:
            run.tracker.set_tags(
                {"train/failure": failed.failure.kind.value, "train/failure_evidence": failed.failure.evidence[:500]}
            )
            run.tracker.log_metrics([("train/attempts", len(failed.attempts), 0)])
            run.tracker.log_artifact(log_file, "logs")
            _log_stall_stacks(run)
            raise
        finally:
            metrics.flush()
    progress(100.0)
    run.tracker.log_artifact(result.log_file, "logs")
    _log_stall_stacks(run)
    # With the engine config and the eval split (datasets/), what a later evaluation needs from the record alone.
    run.tracker.log_artifact(run.output_dir / RESULTS, RESULTS_ARTIFACT_DIR)
    for plot in sorted(run.output_dir.glob("training_*.png")):
        run.tracker.log_artifact(plot, "plots")
    tokens = data.stats.tokens
    figures, sources = run_figures(
        result,
        world_size=launch.nproc_per_node * launch.nnodes,
        train_tokens_per_epoch=estimated_train_tokens_per_epoch(
            data.stats.train, tokens.mean if tokens is not None else None, pipeline.cutoff_len
        ),
    )
    run.tracker.log_metrics((key, value, 0) for key, value in figures.items())
    outcome = {}
    if result.finished_from_checkpoint is not None:
        outcome["train/finished_from_checkpoint"] = result.finished_from_checkpoint.name
    stalls = [a.failure.evidence for a in result.attempts if a.failure and a.failure.kind is FailureKind.STALLED]
    if stalls:  # recovered from, and worth knowing: the stacks are under stall/
        outcome.update({"train/stalled_attempts": str(len(stalls)), "train/stall_evidence": stalls[-1][:2000]})
    if exit_crashes := [attempt.exit_crash.evidence for attempt in result.attempts if attempt.exit_crash]:
        outcome["train/exit_crash_after_finishing"] = exit_crashes[-1][:500]
    run.tracker.set_tags({**sources, **outcome})
    logger.info(
        "trained in %d attempt(s), %.0f s: %s",
        len(result.attempts),
        result.wall_time_s,
        # train_runtime and the train_*_per_second rates repeat train/ figures under transformers' names.
        ", ".join(
            f"{key.removeprefix('train/')} {value:.4g}"
            for key, value in figures.items()
            if key.startswith("train/") or key == "train_loss"
        ),
    )
    return Trained(run.output_dir, config_file, result.wall_time_s, figures, evaluation_results(run.output_dir))
