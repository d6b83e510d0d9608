from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from npu_sft.training import TrainerLogFollower, collect_adapter, read_results, step_metrics

RECORD = {"current_steps": 2, "total_steps": 46, "loss": 5.79, "lr": 0.001, "epoch": 0.087, "percentage": 4.35}


def test_follower_returns_only_complete_new_lines(tmp_path: Path) -> None:
    log = tmp_path / "trainer_log.jsonl"
    follower = TrainerLogFollower(log)
    assert follower.read_new() == []  # not written yet
    log.write_text(json.dumps(RECORD) + "\n" + '{"current_steps": 4, "lo')
    assert follower.read_new() == [RECORD]
    with log.open("a") as handle:
        handle.write('ss": 5.7}\n')
    assert follower.read_new() == [{"current_steps": 4, "loss": 5.7}]
    assert follower.read_new() == []


def test_step_metrics_use_the_step_number() -> None:
    assert step_metrics(RECORD) == [("loss", 5.79, 2), ("learning_rate", 0.001, 2), ("epoch", 0.087, 2)]
    assert step_metrics({"current_steps": 20, "eval_loss": 5.4, "epoch": 0.8}) == [("eval_loss", 5.4, 20), ("epoch", 0.8, 20)]


def test_results_add_perplexity(tmp_path: Path) -> None:
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_loss": 2.0, "epoch": 3.0, "train_loss": 2.5}))
    results = read_results(tmp_path)
    assert results["perplexity"] == pytest.approx(math.exp(2.0))
    with pytest.raises(FileNotFoundError, match="all_results.json missing"):
        read_results(tmp_path / "nothing")


def test_collect_adapter_copies_adapter_not_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-20").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "optimizer.pt"):
        (out / name).write_text("x")
    dest = collect_adapter(out, tmp_path / "adapter")
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        collect_adapter(out, tmp_path / "again")
