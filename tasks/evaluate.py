"""The eval task: LLaMA-Factory's predict for the adapter and the base model on the task's own device lease."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from npu_sft.devices import lease_devices
from npu_sft.evaluation import EnginePredictor, Evaluation, evaluate_adapter, record_evaluation, sample_rows
from npu_sft.evaluation.reevaluation import RECORDED_DIR, RESULTS, restore_training_record
from npu_sft.publishing.registry import RegisteredAdapter
from npu_sft.settings import Pipeline
from npu_sft.tracking import RunContext
from npu_sft.training import launch_env, launch_on
from tasks.train import Trained

SAMPLES_ARTIFACT_KEY = "eval-samples"
SOURCE_TAG = "eval/adapter_source"  # what the run's eval/* scores were computed from
RUN_OUTPUT = "run output"


@task
def evaluate(
    pipeline: Pipeline, run: RunContext, trained: Trained, registered: RegisteredAdapter | None = None
) -> Evaluation:
    """The adapter's answers on the held-out split against the references (BLEU-4, ROUGE-1/2/L, LLaMA-Factory's
    metric code), the base model's the same way (once per model, split and settings), and the gains; with the
    training's eval_loss and perplexity. Runs on devices of its own: the training's were released before.

    The adapter is the training's output, or `registered`: a version's files as the registry gave them back."""
    logger = get_run_logger()
    settings = pipeline.settings
    loss = _training_loss(trained)
    if not settings.eval.enabled:
        evaluation = Evaluation(adapter=None, baseline=None, loss=loss)
        record_evaluation(run.tracker, evaluation, [])
        return evaluation
    run_config = yaml.safe_load(trained.config_file.read_text(encoding="utf-8"))
    with lease_devices(settings.devices, task="eval", flow_run_id=run.flow_run_id, on_wait=logger.info) as lease:
        devices = ",".join(str(i) for i in lease.ids)
        logger.info("evaluating on %s devices %s", lease.kind, devices)
        predictor = EnginePredictor(
            settings.engine,
            launch_on(lease),
            device_env={**lease.env(), **launch_env(lease.kind)},
            log_file=run.logs_dir / "eval.log",
            on_line=logger.info,
        )
        scored = evaluate_adapter(
            run_config,
            settings.eval,
            adapter_dir=trained.output_dir if registered is None else registered.path,
            out_dir=run.run_dir / "eval" if registered is None else run.run_dir / f"eval-v{registered.version}",
            predict=predictor,
            engine=settings.engine,
            baseline_store=pipeline.state_dir / "baselines",
            on_event=logger.info,
        )
    evaluation = Evaluation(scored.adapter, scored.baseline, loss, scored.wall_time_s)
    source = RUN_OUTPUT if registered is None else registered.uri
    run.tracker.set_tags({"eval/devices": f"{lease.kind}:{devices}", SOURCE_TAG: source})
    samples = sample_rows(evaluation, settings.eval.samples)
    record_evaluation(run.tracker, evaluation, samples)
    run.tracker.log_artifact(run.logs_dir / "eval.log", "logs")
    if samples:
        create_table_artifact(table=samples, key=SAMPLES_ARTIFACT_KEY, description=_summary(evaluation))
    logger.info("%s (%s)", _summary(evaluation), source)
    return evaluation


@task
def restore_training(pipeline: Pipeline, run: RunContext, model_path: Path) -> Trained:
    """A registered version's training as its run recorded it in MLflow (engine config, final evaluation, eval
    split), on this host and with its copy of the base model: the training's own directory is not needed."""
    config_file, results = restore_training_record(
        pipeline.settings.mlflow, run.mlflow_run_id, run.run_dir / RECORDED_DIR, model_path
    )
    return Trained(config_file.parent, config_file, wall_time_s=0.0, figures={}, results=results)


def _training_loss(trained: Trained) -> dict[str, float]:
    """eval_loss and perplexity the training wrote (train_* figures are the train task's to log)."""
    if not math.isfinite(trained.results.get("eval_loss", math.nan)):
        raise ValueError(f"the training's {RESULTS} holds no finite eval_loss: {trained.results}")
    return trained.results


def _summary(evaluation: Evaluation) -> str:
    if evaluation.adapter is None:
        return "generation scoring is off (eval.enabled: false)"
    adapter = evaluation.adapter.metrics
    line = f"adapter BLEU-4 {adapter['bleu_4']:.2f}, ROUGE-L {adapter['rouge_l']:.2f}"
    if evaluation.baseline is not None:
        base = evaluation.baseline.scores.metrics
        source = "reused" if evaluation.baseline.reused else "computed"
        line += (
            f"; base model ({source}) BLEU-4 {base['bleu_4']:.2f}, ROUGE-L {base['rouge_l']:.2f}; "
            f"gain ROUGE-L {adapter['rouge_l'] - base['rouge_l']:+.2f}"
        )
    loss = evaluation.loss
    if "eval_loss" in loss:
        line += f"; eval_loss {loss['eval_loss']:.4f}, perplexity {loss.get('perplexity', math.nan):.2f}"
    return line
