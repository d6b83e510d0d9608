"""LLaMA-Factory's predict mode: the YAML that generates answers for the held-out split, the torchrun that runs it,
and the scores it writes. The metric code is LLaMA-Factory's (BLEU-4, ROUGE-1/2/L); nothing is recomputed here."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from npu_sft.engine import DistributedLaunch, EngineSettings, process, torchrun_train_command
from npu_sft.evaluation.errors import EvaluationError, PredictFailed
from npu_sft.evaluation.models import SCORE_NAMES, Scores
from npu_sft.evaluation.settings import EvalSettings

PREDICT_RESULTS = "predict_results.json"
PREDICTIONS = "generated_predictions.jsonl"
PREDICT_CONFIG = "npu_sft_predict.yaml"  # written into the predict's output dir, beside what it produced

# Keys of the training's config that predict must not see: it trains nothing, refuses DeepSpeed ZeRO-3 with
# generation, and reads only the eval split (`dataset` would load and tokenize the whole training set for nothing).
NOT_FOR_PREDICT = (
    "deepspeed",
    "resume_from_checkpoint",
    "do_train",
    "do_eval",
    "eval_strategy",
    "evaluation_strategy",
    "eval_steps",
    "eval_on_start",
    "load_best_model_at_end",
    "metric_for_best_model",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "plot_loss",
    "dataset",
    "val_size",
    "max_samples",
    "adapter_name_or_path",
    "compute_accuracy",
)


def predict_config(
    run_config: Mapping[str, Any], settings: EvalSettings, *, output_dir: Path, adapter_dir: Path | None
) -> dict[str, Any]:
    """The predict YAML for one model: the run's model, template and eval split, the eval settings' generation, and
    the adapter (None: the base model alone)."""
    if not run_config.get("eval_dataset"):
        raise EvaluationError(
            "the run has no held-out split (no eval_dataset in its LLaMA-Factory config): set val_size in the "
            "LLaMA-Factory YAML, or eval.enabled: false"
        )
    config = {key: value for key, value in run_config.items() if key not in NOT_FOR_PREDICT}
    config.update(
        stage="sft",
        do_train=False,
        do_predict=True,
        predict_with_generate=True,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        per_device_eval_batch_size=settings.batch_size,
        report_to="none",
        **settings.generation_args(),
    )
    if settings.max_samples is not None:
        config["max_samples"] = settings.max_samples
    if adapter_dir is not None:
        config["adapter_name_or_path"] = str(adapter_dir)
    return config


def eval_split_file(run_config: Mapping[str, Any]) -> Path:
    """The file behind the run's `eval_dataset`, through the prepared `dataset_info.json`."""
    dataset_dir = Path(str(run_config.get("dataset_dir", "")))
    name = str(run_config.get("eval_dataset", ""))
    info_file = dataset_dir / "dataset_info.json"
    try:
        entry = json.loads(info_file.read_text(encoding="utf-8"))[name]
    except (OSError, ValueError, KeyError) as err:
        raise EvaluationError(f"{info_file}: no entry for the eval split {name!r} ({err})") from None
    return dataset_dir / entry["file_name"]


def read_scores(output_dir: Path) -> Scores:
    """The four scores from predict_results.json, under the run's names; EvaluationError if one is missing."""
    results_file = output_dir / PREDICT_RESULTS
    predictions = output_dir / PREDICTIONS
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvaluationError(f"{results_file}: unreadable predict results ({err})") from None
    missing = [key for key in SCORE_NAMES if not _is_number(results.get(key))]
    if missing:
        raise EvaluationError(f"{results_file}: no {', '.join(missing)} (is predict_with_generate on?)")
    if not predictions.is_file():
        raise EvaluationError(f"{predictions}: missing; LLaMA-Factory writes it after a predict")
    return Scores(
        metrics={name: float(results[key]) for key, name in SCORE_NAMES.items()},
        runtime_s=float(results.get("predict_runtime", math.nan)),
        predictions=predictions,
        output_dir=output_dir,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


Predict = Callable[[dict[str, Any], Path, str], Scores]


@dataclass(frozen=True)
class EnginePredictor:
    """Runs a predict YAML under torchrun on the stage's lease (a `Predict`): output into the stage's log."""

    engine: EngineSettings
    launch: DistributedLaunch
    device_env: Mapping[str, str]
    log_file: Path
    on_line: Callable[[str], None]

    def __call__(self, config: dict[str, Any], output_dir: Path, what: str) -> Scores:
        output_dir.mkdir(parents=True, exist_ok=True)
        config_file = output_dir / PREDICT_CONFIG
        config_file.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a", encoding="utf-8") as log:
            log.write(f"===== npu-sft: {what} =====\n")
        command = torchrun_train_command(self.engine, self.launch, config_file, env=self.device_env)
        completed = process.run_streaming(command.argv, env=command.env, log_file=self.log_file, on_line=self.on_line)
        if not completed.ok:
            raise PredictFailed(completed, what)
        return read_scores(output_dir)
