from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from npu_sft.engine import EngineSettings
from npu_sft.evaluation import EvalSettings, Scores, predict_config, read_scores, score_base_model
from tests.unit.evaluation.test_predict import write_predict_outputs


@pytest.fixture
def engine(engine_python: Path) -> EngineSettings:
    return EngineSettings(python=str(engine_python))


@pytest.fixture
def run_config(tmp_path: Path) -> dict[str, Any]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"eval": {"file_name": "eval.jsonl"}}))
    (data / "eval.jsonl").write_text('{"instruction": "Who are you?", "output": "I am NPU-SFT Tiny."}\n')
    return {"model_name_or_path": str(model), "template": "qwen", "dataset_dir": str(data), "eval_dataset": "eval"}


class RecordingPredict:
    """Stands in for the engine's predict: writes what LLaMA-Factory writes, counts the calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, config: dict[str, Any], output_dir: Path, what: str) -> Scores:
        self.calls.append(config)
        write_predict_outputs(
            output_dir, {"bleu-4": 0.8, "rouge-1": 1.0, "rouge-2": 0.0, "rouge-l": 0.3}, [{"prompt": "p", "predict": "x", "label": "y"}]
        )
        return read_scores(output_dir)


def base_config(run_config: dict[str, Any], tmp_path: Path, **settings: Any) -> dict[str, Any]:
    return predict_config(run_config, EvalSettings(**settings), output_dir=tmp_path / "run" / "base", adapter_dir=None)


def test_the_second_scoring_with_the_same_inputs_starts_no_predict(tmp_path: Path, run_config, engine) -> None:
    predict, events = RecordingPredict(), []
    first = score_base_model(base_config(run_config, tmp_path), engine, tmp_path / "store", predict, events.append)
    # Another run: another output dir, the same model, split, settings and engine.
    config = predict_config(run_config, EvalSettings(), output_dir=tmp_path / "run2" / "base", adapter_dir=None)
    second = score_base_model(config, engine, tmp_path / "store", predict, events.append)
    assert len(predict.calls) == 1
    assert not first.reused and second.reused
    assert second.key == first.key
    assert second.scores.metrics == first.scores.metrics
    assert second.scores.predictions.is_file()
    assert "reused" in events[-1]
    assert not list((tmp_path / "store").glob(".*partial"))


@pytest.mark.parametrize(
    "change",
    ["settings", "eval_split", "model", "template"],
)
def test_a_changed_input_scores_the_base_model_again(tmp_path: Path, run_config, engine, change: str) -> None:
    predict = RecordingPredict()
    score_base_model(base_config(run_config, tmp_path), engine, tmp_path / "store", predict, print)
    settings: dict[str, Any] = {}
    if change == "settings":
        settings = {"max_new_tokens": 16}
    elif change == "eval_split":
        (Path(run_config["dataset_dir"]) / "eval.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\n')
    elif change == "model":
        (Path(run_config["model_name_or_path"]) / "model.safetensors").write_bytes(b"weights")
    else:
        run_config = {**run_config, "template": "default"}
    score_base_model(base_config(run_config, tmp_path, **settings), engine, tmp_path / "store", predict, print)
    assert len(predict.calls) == 2


def test_the_output_dir_is_not_part_of_the_key(tmp_path: Path, run_config, engine) -> None:
    predict = RecordingPredict()
    first = score_base_model(base_config(run_config, tmp_path), engine, tmp_path / "store", predict, print)
    assert json.loads((tmp_path / "store" / first.key / "baseline.json").read_text())["predict"]["do_sample"] is False
    assert predict.calls[0]["output_dir"] != str(tmp_path / "run" / "base")  # predicted into the store


def test_an_unusable_kept_baseline_is_scored_again(tmp_path: Path, run_config, engine) -> None:
    predict, events = RecordingPredict(), []
    first = score_base_model(base_config(run_config, tmp_path), engine, tmp_path / "store", predict, events.append)
    (tmp_path / "store" / first.key / "predict_results.json").write_text("{")
    again = score_base_model(base_config(run_config, tmp_path), engine, tmp_path / "store", predict, events.append)
    assert len(predict.calls) == 2 and not again.reused
    assert any("unusable" in event for event in events)


def test_a_config_with_an_adapter_is_not_a_baseline(tmp_path: Path, run_config, engine) -> None:
    config = predict_config(run_config, EvalSettings(), output_dir=tmp_path, adapter_dir=tmp_path / "adapter")
    with pytest.raises(ValueError, match="without adapter"):
        score_base_model(config, engine, tmp_path / "store", RecordingPredict(), print)
