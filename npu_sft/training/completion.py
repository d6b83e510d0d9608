"""Whether a training has finished, judged from what the trainer wrote rather than from how its processes exited.

Ranks often crash while they shut down after the work is done (HCCL or gloo teardown: "terminate called without an
active exception", SIGABRT), and torchrun then reports the launch FAILED. The outputs say otherwise:

    problems = final_output_problems(output_dir, expects_eval=expects_evaluation(config))   # [] -> finished
    final = final_checkpoint(output_dir)     # a complete checkpoint at the last step: nothing is left to train

A checkpoint at the last step holds the final adapter; what it lacks (the evaluation) is produced from it by an
evaluation-only engine run (`evaluation_config`), never by a training attempt that would run zero steps.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from npu_sft.training.checkpoints import (
    CheckpointCheck,
    find_resume_point,
    json_problem,
    safetensors_problem,
)

TRAINER_STATE = "trainer_state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAIN_RESULTS = "train_results.json"
EVAL_RESULTS = "eval_results.json"
ALL_RESULTS = "all_results.json"
# What a final checkpoint hands over to the output dir: the adapter, its tokenizer files, and the trainer state (its
# log history covers every logged step, so the loss plot and curve drawn from it are whole).
CHECKPOINT_HANDOVER = (
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    TRAINER_STATE,
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
# Keys that make no sense for an evaluation-only run: it trains nothing, resumes nothing, and DeepSpeed refuses
# inference below ZeRO-3 ("ZeRO inference only makes sense with ZeRO Stage 3").
NOT_FOR_EVALUATION = ("resume_from_checkpoint", "deepspeed")


def expects_evaluation(config: Mapping[str, Any]) -> bool:
    """Whether LLaMA-Factory evaluates after training: `do_eval`, which transformers also sets for any eval_strategy
    other than "no"."""
    strategy = str(config.get("eval_strategy", config.get("evaluation_strategy", "no"))).lower()
    return bool(config.get("do_eval")) or strategy not in ("no", "none")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def trainer_state_problem(path: Path) -> str | None:
    """None when the trainer state says the training reached its last step."""
    if not path.is_file():
        return f"{path.name} missing"
    state = _read_json(path)
    if state is None:
        return f"{path.name} is not a valid JSON object"
    step, max_steps = state.get("global_step"), state.get("max_steps")
    if not isinstance(step, int) or not isinstance(max_steps, int) or max_steps <= 0:
        return f"{path.name} names no global_step / max_steps"
    if step < max_steps:
        return f"{path.name} stops at step {step} of {max_steps}"
    return None


def final_output_problems(output_dir: Path, *, expects_eval: bool) -> list[str]:
    """What keeps the output dir from being a finished training: the trainer state at its last step, the final
    adapter complete, the results files written (the evaluation's too when the config evaluates)."""
    problems: list[str] = []
    if problem := trainer_state_problem(output_dir / TRAINER_STATE):
        problems.append(problem)
    weights = output_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        problems.append(f"{ADAPTER_WEIGHTS} missing")
    elif problem := safetensors_problem(weights):
        problems.append(problem)
    results = [ADAPTER_CONFIG, TRAIN_RESULTS, ALL_RESULTS, *([EVAL_RESULTS] if expects_eval else [])]
    for name in results:
        path = output_dir / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif problem := json_problem(path):
            problems.append(problem)
    return problems


def final_checkpoint(output_dir: Path) -> CheckpointCheck | None:
    """The newest complete checkpoint, if it is at the training's last step."""
    checkpoint = find_resume_point(output_dir).checkpoint
    if checkpoint is None or trainer_state_problem(checkpoint.path / TRAINER_STATE) is not None:
        return None
    return checkpoint


def hand_over_checkpoint(checkpoint: CheckpointCheck, output_dir: Path) -> list[str]:
    """Copy the final checkpoint's adapter and trainer state to the output dir, where the pipeline reads them.

    An adapter the trainer already saved there at the same final step is kept: with `load_best_model_at_end` it is
    the best checkpoint's, not the last one's."""
    if trainer_state_problem(output_dir / TRAINER_STATE) is None and (output_dir / ADAPTER_WEIGHTS).is_file() and (
        safetensors_problem(output_dir / ADAPTER_WEIGHTS) is None
    ):
        return []
    copied = []
    for name in CHECKPOINT_HANDOVER:
        if (checkpoint.path / name).is_file():
            shutil.copy2(checkpoint.path / name, output_dir / name)
            copied.append(name)
    return copied


def needs_evaluation(output_dir: Path, config: Mapping[str, Any]) -> bool:
    path = output_dir / EVAL_RESULTS
    return expects_evaluation(config) and (not path.is_file() or json_problem(path) is not None)


def evaluation_config(config_file: Path, adapter_dir: Path) -> Path:
    """The engine config that evaluates `adapter_dir` on the run's eval split, writing eval_results.json and
    all_results.json into the run's output dir as the training would have."""
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    for key in NOT_FOR_EVALUATION:
        config.pop(key, None)
    config.update(do_train=False, do_eval=True, adapter_name_or_path=str(adapter_dir), overwrite_output_dir=True)
    path = config_file.with_name(f"{config_file.stem}.final-eval{config_file.suffix}")
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
