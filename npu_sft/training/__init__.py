"""LoRA SFT under torchrun in the engine env: attempts retried after failures, the trainer log followed live, a
stalled attempt stopped, and what LLaMA-Factory leaves read back.

    result = run_training(engine, launch, config_file, output_dir, device_env=..., log_file=..., on_line=log.info,
                          on_metrics=log_to_mlflow, policy=RetryPolicy.from_settings(settings.training))

Modules: `attempts` (the retry loop), `failures` (what a failed attempt was), `retry` (waits between attempts),
`checkpoints` (where a retry resumes), `completion` (whether a training finished), `stall` (the progress
watchdog), `trainer_log` (step metrics), `rank_memory` (the ranks' host RAM), `outputs` (results and adapter),
`launch` (torchrun's layout and launch variables), `figures` (run figures for MLflow), `settings`, `models`, `errors`.
"""

from npu_sft.training.attempts import STALL_STACKS_PREFIX, run_training
from npu_sft.training.errors import DevicesStillBusy, TrainingFailed
from npu_sft.training.failures import Failure, FailureKind, classify_failure
from npu_sft.training.figures import estimated_train_tokens_per_epoch, run_figures
from npu_sft.training.launch import distributed_launch, launch_env, launch_on
from npu_sft.training.models import Attempt, TrainingResult
from npu_sft.training.outputs import collect_adapter, evaluation_results, read_results
from npu_sft.training.retry import RetryPolicy
from npu_sft.training.settings import StallSettings, TrainingSettings
from npu_sft.training.trainer_log import STEP_METRIC_KEYS, TRAINER_LOG, StepLedger, TrainerLogFollower, step_metrics

__all__ = [
    "STALL_STACKS_PREFIX",
    "STEP_METRIC_KEYS",
    "TRAINER_LOG",
    "Attempt",
    "DevicesStillBusy",
    "Failure",
    "FailureKind",
    "RetryPolicy",
    "StallSettings",
    "StepLedger",
    "TrainerLogFollower",
    "TrainingFailed",
    "TrainingResult",
    "TrainingSettings",
    "classify_failure",
    "collect_adapter",
    "distributed_launch",
    "estimated_train_tokens_per_epoch",
    "evaluation_results",
    "launch_env",
    "launch_on",
    "read_results",
    "run_figures",
    "run_training",
    "step_metrics",
]
