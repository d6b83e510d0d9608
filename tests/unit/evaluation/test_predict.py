from __future__ import annotations

import json
from pathlib import Path

import pytest

from npu_sft.evaluation import EvalSettings, EvaluationError, PredictFailed, predict_config, read_scores
from npu_sft.engine.process import CompletedCommand

RUN_CONFIG = {
    "model_name_or_path": "/models/tiny",
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "lora",
    "template": "qwen",
    "cutoff_len": 128,
    "dataset_dir": "/data/prepared",
    "dataset": "train",
    "eval_dataset": "eval",
    "val_size": 0.0,
    "max_samples": 1000,
    "deepspeed": "/configs/ds_z3_config.json",
    "eval_strategy": "steps",
    "eval_steps": 50,
    "per_device_eval_batch_size": 1,
    "output_dir": "/runs/r/output",
}


def write_predict_outputs(output_dir: Path, scores: dict[str, float], rows: list[dict[str, str]]) -> None:
    """What LLaMA-Factory 0.9.5's predict leaves in its output dir (names as train/sft/workflow.py writes them)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {f"predict_{name}": value for name, value in scores.items()}
    results.update(predict_runtime=1.5, predict_samples_per_second=30.0, predict_steps_per_second=8.0)
    (output_dir / "predict_results.json").write_text(json.dumps(results))
    (output_dir / "generated_predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_predict_config_generates_greedily_on_the_eval_split_without_training_keys(tmp_path: Path) -> None:
    config = predict_config(RUN_CONFIG, EvalSettings(), output_dir=tmp_path / "out", adapter_dir=tmp_path / "adapter")
    assert config["do_predict"] is True and config["predict_with_generate"] is True
    assert config["do_train"] is False
    assert config["do_sample"] is False  # LLaMA-Factory's own default samples at temperature 0.95
    assert "temperature" not in config
    assert config["eval_dataset"] == "eval" and config["dataset_dir"] == "/data/prepared"
    for key in ("deepspeed", "dataset", "val_size", "max_samples", "eval_strategy", "eval_steps"):
        assert key not in config, key  # ZeRO-3 refuses generation; `dataset` would tokenize the training set
    assert config["adapter_name_or_path"] == str(tmp_path / "adapter")
    assert config["output_dir"] == str(tmp_path / "out")
    assert config["per_device_eval_batch_size"] == 4
    assert config["template"] == "qwen" and config["cutoff_len"] == 128


def test_predict_config_for_the_base_model_has_no_adapter(tmp_path: Path) -> None:
    with_adapter = {**RUN_CONFIG, "adapter_name_or_path": "/old/adapter"}
    config = predict_config(with_adapter, EvalSettings(max_samples=10), output_dir=tmp_path, adapter_dir=None)
    assert "adapter_name_or_path" not in config
    assert config["max_samples"] == 10


def test_sampling_settings_are_passed_only_when_sampling() -> None:
    args = EvalSettings(do_sample=True, temperature=0.7, max_new_tokens=16).generation_args()
    assert args == {
        "do_sample": True,
        "max_new_tokens": 16,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "temperature": 0.7,
        "top_p": 0.7,
        "top_k": 50,
    }


def test_a_run_without_an_eval_split_is_refused_with_the_fix(tmp_path: Path) -> None:
    no_split = {key: value for key, value in RUN_CONFIG.items() if key != "eval_dataset"}
    with pytest.raises(EvaluationError, match="set val_size"):
        predict_config(no_split, EvalSettings(), output_dir=tmp_path, adapter_dir=None)


def test_read_scores_uses_the_runs_names(tmp_path: Path) -> None:
    write_predict_outputs(
        tmp_path, {"bleu-4": 8.02, "rouge-1": 20.1, "rouge-2": 3.5, "rouge-l": 14.53}, [{"prompt": "p", "predict": "a", "label": "b"}]
    )
    scores = read_scores(tmp_path)
    assert scores.metrics == {"bleu_4": 8.02, "rouge_1": 20.1, "rouge_2": 3.5, "rouge_l": 14.53}
    assert scores.runtime_s == 1.5
    assert scores.predictions == tmp_path / "generated_predictions.jsonl"


def test_read_scores_names_the_file_and_the_missing_score(tmp_path: Path) -> None:
    write_predict_outputs(tmp_path, {"rouge-1": 1.0, "rouge-2": 1.0, "rouge-l": 1.0}, [])
    with pytest.raises(EvaluationError, match=r"predict_results\.json: no predict_bleu-4"):
        read_scores(tmp_path)


def test_a_failed_predict_says_why_in_its_first_line(tmp_path: Path) -> None:
    tail = [
        "[rank0]: Traceback (most recent call last):",
        "[rank0]: torch.OutOfMemoryError: NPU out of memory. Tried to allocate 2.00 GiB",
    ]
    failed = PredictFailed(CompletedCommand(["torchrun"], 1, tail, tmp_path / "eval.log", 3.0), "scoring the adapter")
    first_line = str(failed).splitlines()[0]
    assert first_line.startswith("scoring the adapter ran out of device memory: ")
    assert "Tried to allocate 2.00 GiB" in first_line
