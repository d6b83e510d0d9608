from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from npu_sft import tracking
from npu_sft.datasets import PreparedData
from npu_sft.devices import lease_devices
from npu_sft.engine import DistributedLaunch
from npu_sft.llamafactory_config import resolve_train_config, write_config
from npu_sft.runs import RunContext
from npu_sft.settings import Pipeline
from npu_sft.training import TrainingResult, run_training, step_metrics


@dataclass(frozen=True)
class Trained:
    output_dir: Path
    config_file: Path
    wall_time_s: float


@task
def train(pipeline: Pipeline, run: RunContext, model_path: Path, data: PreparedData) -> Trained:
    """LoRA SFT under torchrun on the devices this task leases; every logged step goes to MLflow as it happens."""
    logger = get_run_logger()
    settings = pipeline.settings
    config = resolve_train_config(
        pipeline,
        model_path=str(model_path),
        data_args=data.llamafactory_args(),
        output_dir=run.output_dir,
    )
    config_file = write_config(config, run.run_dir / "llamafactory.yaml")
    tracking.log_artifact(run.mlflow, run.mlflow_run_id, config_file, "config")
    progress_id = create_progress_artifact(0.0, key=None, description="training progress (percent of steps)")

    def on_records(records: list[dict]) -> None:
        tracking.log_metrics(run.mlflow, run.mlflow_run_id, [m for r in records for m in step_metrics(r)])
        last = records[-1]
        if "percentage" in last:
            update_progress_artifact(progress_id, float(last["percentage"]))

    with lease_devices(settings.devices, task="train", flow_run_id=run.flow_run_id, on_wait=logger.info) as lease:
        logger.info("training on %s devices %s", lease.kind, ",".join(str(i) for i in lease.ids))
        launch = DistributedLaunch(
            nproc_per_node=lease.nproc_per_node,
            master_port=lease.master_port,
            nnodes=settings.training.nnodes,
            node_rank=settings.training.node_rank,
            master_addr=settings.training.master_addr,
        )
        result: TrainingResult = run_training(
            settings.engine,
            launch,
            config_file,
            run.output_dir,
            device_env=lease.env(),
            log_file=run.logs_dir / "train.log",
            on_line=logger.info,
            on_records=on_records,
        )
    update_progress_artifact(progress_id, 100.0)
    tracking.log_artifact(run.mlflow, run.mlflow_run_id, result.log_file, "logs")
    for plot in sorted(run.output_dir.glob("training_*.png")):
        tracking.log_artifact(run.mlflow, run.mlflow_run_id, plot, "plots")
    tracking.log_metrics(run.mlflow, run.mlflow_run_id, [("train_wall_time_s", result.wall_time_s, 0)])
    return Trained(run.output_dir, config_file, result.wall_time_s)
