"""The flow run's summary markdown and the way to the MLflow run's page."""

from __future__ import annotations

from npu_sft.publishing.gate import GateDecision
from npu_sft.publishing.versions import Published
from npu_sft.tracking.summary import RunSummary, mlflow_run_url, mlflow_ui_url

METRICS = {
    "eval/rouge_l": 0.41, "base/rouge_l": 0.12, "gain/rouge_l": 0.29, "eval/bleu_4": 0.2,
    "eval/predict_runtime_s": 3.0, "eval/wall_time_s": 9.0,
    "eval_loss": 2.5, "perplexity": 12.18, "train/steps": 51.0, "train/attempts": 1.0,
}


def test_the_ui_is_the_tracking_server() -> None:
    assert mlflow_ui_url("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert mlflow_ui_url("sqlite:////p/mlflow.db") is None
    assert mlflow_run_url("http://h:5000", "3", "abc") == "http://h:5000/#/experiments/3/runs/abc?workflowType=machine_learning"


def test_the_summary_shows_scores_against_the_base_model_and_the_champion() -> None:
    published = Published("tiny-qwen2-lora", "2", GateDecision(True, "rouge_l 0.41 > champion 0.30 | promoted"), "2", True)
    text = RunSummary("tiny-cpu", "abc", "http://h/#/experiments/1/runs/abc", METRICS, published, "I am | Tiny\n").markdown()
    assert "MLflow run: [abc](http://h/#/experiments/1/runs/abc)" in text
    assert "| rouge_l | 0.4100 | 0.1200 | +0.2900 |" in text
    assert "| bleu_4 | 0.2000 |  |  |" in text
    assert "predict_runtime" not in text and "wall_time" not in text.split("## Training")[0]
    assert "| optimizer steps | 51 |" in text and "| eval loss | 2.5000 |" in text
    assert "`tiny-qwen2-lora` version 2: promoted to **champion**; champion is version 2." in text
    assert "rouge_l 0.41 > champion 0.30 \\| promoted" in text  # a pipe in user text does not split the table
    assert "Smoke-test reply: I am \\| Tiny" in text


def test_without_a_ui_the_summary_says_how_to_open_the_run() -> None:
    text = RunSummary("tiny-cpu", "abc", None, {}, None, None, open_hint="mlflow ui --backend-store-uri sqlite:////p").markdown()
    assert "MLflow run: `abc`" in text and "mlflow ui --backend-store-uri sqlite:////p" in text
    assert "Not published" in text and "## Evaluation" not in text and "## Served" not in text
