"""What a run records about itself: the pipeline params that tell runs apart and the tags that say where it came
from (a real git checkout made in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import git
import pytest

from npu_sft.settings import load_pipeline
from npu_sft.tracking.description import (
    RunOrigin,
    deepspeed_stage,
    git_state,
    pipeline_params,
    source_tags,
)


@pytest.fixture
def tiny(repo: Path, engine_python: Path):
    return lambda *overrides: load_pipeline(repo / "configs/tiny_cpu.yaml", [f"engine.python={engine_python}", *overrides])


def test_runs_on_one_and_four_cards_differ_in_their_params(tiny) -> None:
    one = pipeline_params(tiny("devices.train=1"))
    four = pipeline_params(tiny("devices.train=4", "training.nnodes=2"))
    differing = {key for key in one if one[key] != four[key]}
    assert differing == {"pipeline.devices.train", "pipeline.training.nnodes", "pipeline.training.world_size"}
    assert four["pipeline.training.world_size"] == "8"
    assert one["pipeline.model.source"] == "tiny" and one["pipeline.data.datasets"] == "identity,tiny_alpaca"
    assert one["pipeline.eval.max_new_tokens"] == "64"  # a key that mentions tokens is not a secret


def test_the_deepspeed_stage_is_read_from_its_json(tiny) -> None:
    assert deepspeed_stage(tiny()) == "none"
    assert deepspeed_stage(tiny("llamafactory.overrides.deepspeed=ds_z2")) == "2"
    assert deepspeed_stage(tiny("llamafactory.overrides.deepspeed=ds_z3_offload")) == "3+offload"
    assert pipeline_params(tiny("llamafactory.overrides.deepspeed=ds_z3"))["pipeline.training.deepspeed_stage"] == "3"


def test_a_command_prefix_is_named_by_its_program_only(tiny) -> None:
    params = pipeline_params(tiny('engine.command_prefix=["docker", "exec", "-e", "HF_TOKEN=hf_secret", "lf"]',
                                  "engine.python=python"))
    assert params["pipeline.engine.launcher"] == "docker"
    assert not any("hf_secret" in value for value in params.values())


def test_git_state_of_a_checkout(tmp_path: Path) -> None:
    repo = git.Repo.init(tmp_path, initial_branch="main")
    (tmp_path / "a.txt").write_text("a")
    repo.index.add(["a.txt"])
    commit = repo.index.commit("first", author=git.Actor("t", "t@example.com"), committer=git.Actor("t", "t@example.com"))
    repo.create_remote("origin", "https://someone:ghp_secret@github.com/org/project.git")
    state = git_state(tmp_path)
    assert state is not None
    assert (state.commit, state.branch, state.dirty) == (commit.hexsha, "main", False)
    assert state.remote_url == "https://github.com/org/project.git"  # the token in the remote URL is not kept
    (tmp_path / "a.txt").write_text("changed")
    assert git_state(tmp_path).dirty is True


def test_no_git_state_outside_a_checkout(tmp_path: Path) -> None:
    assert git_state(tmp_path) is None


def test_source_tags_are_the_ones_mlflow_shows(tmp_path: Path) -> None:
    origin = RunOrigin(
        source_name="sft/qwen7b", source_type="JOB", user="alice", host="npu-host-1", git=None,
        deployment="sft/qwen7b", flow_run_url="http://127.0.0.1:4200/flow-runs/flow-run/abc",
    )
    tags = source_tags(origin)
    assert tags["mlflow.source.name"] == "sft/qwen7b" and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.user"] == "alice" and tags["npu_sft.host"] == "npu-host-1"
    assert tags["prefect.flow_run_url"].endswith("/flow-run/abc")
    assert "mlflow.source.git.commit" not in tags
    local = source_tags(RunOrigin.here())
    assert local["mlflow.source.type"] == "LOCAL" and len(local["mlflow.source.git.commit"]) == 40
