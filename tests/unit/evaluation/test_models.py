from __future__ import annotations

from pathlib import Path
from typing import Any

from npu_sft.evaluation import SAMPLES_TABLE, Baseline, Evaluation, Scores, record_evaluation, sample_rows
from tests.unit.evaluation.test_predict import write_predict_outputs


def scores(tmp_path: Path, name: str, rouge_l: float, answers: list[str]) -> Scores:
    rows = [{"prompt": f"q{i}", "predict": answer, "label": f"ref{i}"} for i, answer in enumerate(answers)]
    write_predict_outputs(tmp_path / name, {"bleu-4": 1.0, "rouge-1": 2.0, "rouge-2": 3.0, "rouge-l": rouge_l}, rows)
    return Scores(
        {"bleu_4": 1.0, "rouge_1": 2.0, "rouge_2": 3.0, "rouge_l": rouge_l},
        1.5,
        tmp_path / name / "generated_predictions.jsonl",
        tmp_path / name,
    )


class ListRecorder:
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[Path, str | None]] = []
        self.tables: dict[str, dict[str, list[Any]]] = {}

    def log_metrics(self, metrics):
        self.metrics.update({key: value for key, value, _ in metrics})

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((path, artifact_path))

    def log_dict(self, document, artifact_file):
        raise AssertionError("not used")

    def log_table(self, columns, artifact_file):
        self.tables[artifact_file] = dict(columns)


def test_metrics_have_stable_names_and_gains(tmp_path: Path) -> None:
    base = Baseline(scores(tmp_path, "base", 0.34, ["?"]), "k", reused=True)
    evaluation = Evaluation(scores(tmp_path, "adapter", 14.53, ["I am"]), base, {"eval_loss": 2.0, "perplexity": 7.4}, 9.0)
    metrics = evaluation.metrics()
    assert metrics["eval/rouge_l"] == 14.53 and metrics["base/rouge_l"] == 0.34
    assert round(metrics["gain/rouge_l"], 6) == 14.19
    assert {"eval/bleu_4", "eval/rouge_1", "eval/rouge_2", "base/bleu_4", "gain/bleu_4"} <= set(metrics)
    assert metrics["eval_loss"] == 2.0 and metrics["perplexity"] == 7.4
    assert metrics["eval/wall_time_s"] == 9.0 and metrics["eval/predict_runtime_s"] == 1.5


def test_without_generation_scoring_only_the_loss_is_recorded() -> None:
    recorder = ListRecorder()
    evaluation = Evaluation(None, None, {"eval_loss": 2.0})
    record_evaluation(recorder, evaluation, sample_rows(evaluation, 8))
    assert recorder.metrics == {"eval_loss": 2.0}
    assert recorder.tables == {} and recorder.artifacts == []


def test_samples_put_base_and_adapter_answers_side_by_side(tmp_path: Path) -> None:
    base = Baseline(scores(tmp_path, "base", 0.3, ["hmm", "uh"]), "k", reused=False)
    evaluation = Evaluation(scores(tmp_path, "adapter", 9.0, ["I am NPU-SFT Tiny.", "Hello"]), base)
    rows = sample_rows(evaluation, limit=1)
    assert rows == [{"prompt": "q0", "reference": "ref0", "base answer": "hmm", "adapter answer": "I am NPU-SFT Tiny."}]
    recorder = ListRecorder()
    record_evaluation(recorder, evaluation, rows)
    assert recorder.tables[SAMPLES_TABLE]["adapter answer"] == ["I am NPU-SFT Tiny."]
    assert recorder.tags == {"eval/baseline": "computed", "eval/baseline_key": "k"}
    assert {artifact_path for _, artifact_path in recorder.artifacts} == {"eval/adapter", "eval/base"}
