"""DeepSpeed ZeRO-2 on 2 CPU ranks, through the whole sft flow: `deepspeed: ds_z2` resolves to the project's JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from npu_sft.training.checkpoints import inspect_checkpoint, list_checkpoints
from tests.e2e.test_training_recovery import (
    PLANNED_STEPS,
    SHORT_RUN,
    mlflow_client,
    run_sft_cli,
    with_cached_model,
)
from tests.e2e.test_training_recovery import tiny_models  # noqa: F401  (a session fixture: one tiny model for all)

pytestmark = pytest.mark.e2e


def test_zero2_on_two_cpu_ranks(tmp_path: Path, engine_python: Path, repo: Path, tiny_models: Path) -> None:
    with_cached_model(tmp_path, tiny_models)
    completed = run_sft_cli(tmp_path, engine_python, [*SHORT_RUN, "llamafactory.overrides.deepspeed=ds_z2"])
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert math.isfinite(run.data.metrics["eval_loss"])
    assert run.data.metrics["train/steps"] == PLANNED_STEPS and run.data.metrics["train/attempts"] == 1
    assert len(client.get_metric_history(run.info.run_id, "loss")) == PLANNED_STEPS // 2

    run_dir = tmp_path / ".npu-sft" / "runs" / run.info.run_id
    config = yaml.safe_load((run_dir / "llamafactory.yaml").read_text())
    assert config["deepspeed"] == str(repo / "configs" / "deepspeed" / "ds_z2_config.json")
    log = (run_dir / "logs" / "train.log").read_text()
    assert "DeepSpeed" in log
    # DeepSpeed keeps the optimizer in ZeRO shards (global_stepN/), which the resume check must accept as complete.
    checkpoints = list_checkpoints(run_dir / "output")
    assert checkpoints and all((c / "latest").is_file() and not (c / "optimizer.pt").exists() for c in checkpoints)
    problems = {c.name: inspect_checkpoint(c).problems for c in checkpoints}
    assert not any(problems.values()), problems
    zero = json.loads(Path(config["deepspeed"]).read_text())["zero_optimization"]
    assert zero["stage"] == 2
