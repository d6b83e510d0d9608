"""`npu-sft compare` on a real MLflow store: best first, only the params that differ, 80 columns, csv and json."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from npu_sft.cli import main
from npu_sft.tracking.compare import ComparedRun, differing_params, lower_is_better, rank


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("COLUMNS", "80")
    client = MlflowClient(uri)
    experiment = client.create_experiment("sft-tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    # As the pipeline logs them: every param at the start, metrics as the stages end (the failed run has none).
    for name, lr, cards, rouge, loss in (("lr-low", "1e-05", "2", 0.20, 2.9), ("lr-high", "0.0001", "2", 0.35, 2.4),
                                         ("broken", "0.0001", "4", None, None)):
        run = client.create_run(experiment, run_name=name)
        for key, value in {"learning_rate": lr, "template": "qwen", "pipeline.devices.train": cards,
                           "pipeline.training.deepspeed_stage": "none", "lora_target": "all"}.items():
            client.log_param(run.info.run_id, key, value)
        if rouge is not None:
            for key, value in {"eval/rouge_l": rouge, "base/rouge_l": 0.1, "gain/rouge_l": rouge - 0.1,
                               "eval_loss": loss}.items():
                client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status="FINISHED" if rouge is not None else "FAILED")
    return client


def test_the_table_shows_the_better_run_first_and_the_learning_rate_that_differs(store, capsys) -> None:
    assert main(["compare", "sft-tiny"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    assert "best first by eval/rouge_l (higher is better)" in lines[0]
    body = [line for line in lines if line.strip()[:1].isdigit()]
    assert [line.split()[1] for line in body] == ["lr-high", "lr-low", "broken"]
    assert "0.35" in body[0] and "+0.25" in body[0]  # the score and its gain over the base model
    assert "failed" in body[2]
    # The settings that differ, runs side by side in rank order: the learning rate (missing in none).
    (learning_rate,) = [line.split() for line in lines if line.startswith("learning_rate")]
    assert learning_rate == ["learning_rate", "0.0001", "1e-05", "0.0001"]
    assert "template" not in out and "deepspeed" not in out  # the same in every run
    (cards,) = [line.split() for line in lines if line.startswith("devices.train")]
    assert cards == ["devices.train", "2", "2", "4"]


def test_csv_and_json_for_scripts(store, capsys) -> None:
    assert main(["compare", "sft-tiny", "--metric", "eval_loss", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["run_name"] for row in rows] == ["lr-high", "lr-low", "broken"]  # lower loss first
    assert rows[0]["learning_rate"] == "0.0001" and float(rows[0]["eval/rouge_l"]) == pytest.approx(0.35)
    assert main(["compare", "sft-tiny", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["run_name"] == "lr-high" and records[0]["params"]["learning_rate"] == "0.0001"
    assert records[0]["metrics"]["eval_loss"] == pytest.approx(2.4)


def test_an_unknown_experiment_or_metric_is_one_line(store, capsys) -> None:
    assert main(["compare", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow experiment 'nope'" in err and "sft-tiny" in err
    assert main(["compare", "sft-tiny", "--metric", "eval/bleu_9"]) == 2
    assert "no run has the metric 'eval/bleu_9'" in capsys.readouterr().err


def test_ranking_rules() -> None:
    runs = [ComparedRun("a", "a", "FINISHED", {"x": "1"}, {"eval_loss": 2.0}),
            ComparedRun("b", "b", "FINISHED", {"x": "2", "y": "1"}, {"eval_loss": 1.0}),
            ComparedRun("c", "c", "FAILED", {"x": "1"}, {})]
    assert [run.run_id for run in rank(runs, "eval_loss")] == ["b", "a", "c"]
    assert differing_params(runs) == ["x"]  # y is in one run only: older runs did not record it
    assert lower_is_better("eval_loss") and lower_is_better("perplexity") and not lower_is_better("eval/rouge_l")
    assert not lower_is_better("gain/eval_loss_drop")
