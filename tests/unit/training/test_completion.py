"""Whether a training has finished, from its outputs: the final trainer state, adapter and results files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from npu_sft.training.completion import (
    evaluation_config,
    expects_evaluation,
    final_checkpoint,
    final_output_problems,
    hand_over_checkpoint,
)
from tests.unit.training.test_attempts import write_final_outputs
from tests.unit.training.test_checkpoints import truncate, write_checkpoint, write_safetensors


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"eval_strategy": "steps"}, True),
        ({"do_eval": True}, True),
        ({"eval_strategy": "no"}, False),
        ({}, False),
    ],
)
def test_evaluation_is_expected_when_the_config_evaluates(config: dict, expected: bool) -> None:
    assert expects_evaluation(config) is expected


def test_whole_final_outputs_have_no_problems(tmp_path: Path) -> None:
    write_final_outputs(tmp_path)
    assert final_output_problems(tmp_path, expects_eval=True) == []


def test_each_missing_or_broken_output_is_named(tmp_path: Path) -> None:
    write_final_outputs(tmp_path, without=["eval_results.json"])
    truncate(tmp_path / "adapter_model.safetensors")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 40, "max_steps": 51}))
    (tmp_path / "all_results.json").write_text('{"eval_loss": ')
    problems = final_output_problems(tmp_path, expects_eval=True)
    assert problems[0] == "trainer_state.json stops at step 40 of 51"
    assert problems[1].startswith("adapter_model.safetensors: ")
    assert "all_results.json is not valid JSON" in problems[2]
    assert problems[3] == "eval_results.json missing"
    assert final_output_problems(tmp_path / "none", expects_eval=False)[0] == "trainer_state.json missing"


def test_only_a_complete_checkpoint_at_the_last_step_is_final(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 40)
    assert final_checkpoint(tmp_path) is None
    truncate(write_checkpoint(tmp_path, 51) / "optimizer.pt")
    assert final_checkpoint(tmp_path) is None  # incomplete: the newest complete one is checkpoint-40
    (tmp_path / "checkpoint-51" / "optimizer.pt").unlink()
    (tmp_path / "checkpoint-51").rename(tmp_path / "broken")
    write_checkpoint(tmp_path, 51)
    assert final_checkpoint(tmp_path).path.name == "checkpoint-51"


def test_the_handover_keeps_an_adapter_the_trainer_already_saved(tmp_path: Path) -> None:
    checkpoint = final_checkpoint(write_checkpoint(tmp_path, 51).parent)
    assert hand_over_checkpoint(checkpoint, tmp_path) == ["adapter_model.safetensors", "adapter_config.json", "trainer_state.json"]
    write_safetensors(tmp_path / "adapter_model.safetensors", floats=8)  # load_best_model_at_end saved another one
    assert hand_over_checkpoint(checkpoint, tmp_path) == []
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < (checkpoint.path / "adapter_model.safetensors").stat().st_size


def test_the_evaluation_config_evaluates_the_checkpoint_without_training(tmp_path: Path) -> None:
    config_file = tmp_path / "llamafactory.yaml"
    config_file.write_text(yaml.safe_dump({"do_train": True, "deepspeed": "ds_z0.json", "eval_strategy": "steps",
                                           "resume_from_checkpoint": "x", "output_dir": "out"}))
    config = yaml.safe_load(evaluation_config(config_file, tmp_path / "checkpoint-51").read_text())
    assert config == {"do_train": False, "eval_strategy": "steps", "output_dir": "out", "do_eval": True,
                      "adapter_name_or_path": str(tmp_path / "checkpoint-51"), "overwrite_output_dir": True}
