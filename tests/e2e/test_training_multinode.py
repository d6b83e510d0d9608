"""Two nodes on loopback: two launches with nnodes=2 (node_rank 0 and 1, one CPU rank each, the same master port),
each with its own output dir as separate hosts would have, train to completion together."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from npu_sft.engine import DistributedLaunch
from npu_sft.engine.llamafactory_config import write_config
from npu_sft.ports import unused_port
from npu_sft.training import RetryPolicy, TrainingResult, launch_env, run_training
from tests.e2e.test_training_recovery import PLANNED_STEPS, SHORT_RUN, tiny_training
from tests.e2e.test_training_recovery import tiny_models  # noqa: F401  (a session fixture: one tiny model for all)

pytestmark = pytest.mark.e2e


def test_two_nodes_on_loopback_train_to_completion(tmp_path: Path, engine_python: Path, tiny_models: Path) -> None:
    tiny = tiny_training(tmp_path, engine_python, tiny_models, SHORT_RUN)
    port = unused_port()

    def node(rank: int) -> TrainingResult:
        output_dir = tmp_path / f"node{rank}" / "output"
        config = {**tiny.config, "output_dir": str(output_dir)}
        config_file = write_config(config, tmp_path / f"node{rank}" / "llamafactory.yaml")
        return run_training(
            tiny.pipeline.settings.engine,
            DistributedLaunch(nproc_per_node=1, master_port=port, nnodes=2, node_rank=rank, master_addr="127.0.0.1"),
            config_file,
            output_dir,
            # torchrun sets OMP_NUM_THREADS=1 only for several ranks per node; two "hosts" share these 2 cores.
            device_env={**launch_env("cpu"), "OMP_NUM_THREADS": "1"},
            log_file=tmp_path / f"node{rank}" / "train.log",
            on_line=lambda line: None,
            on_metrics=lambda metrics: None,
            policy=RetryPolicy(max_attempts=1),  # a retry would hide a broken rendezvous
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        master, worker = pool.map(node, [0, 1])

    assert [a.returncode for a in master.attempts + worker.attempts] == [0, 0]
    # Global rank 0 (node 0) writes the trainer log, the adapter and the results; each rank its own RNG state.
    assert master.records and master.records[-1]["current_steps"] == PLANNED_STEPS
    state = json.loads((master.output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == PLANNED_STEPS
    assert (master.output_dir / "adapter_model.safetensors").is_file()
    assert (worker.output_dir / "checkpoint-10" / "rng_state_1.pth").is_file()
    log = (tmp_path / "node0" / "train.log").read_text()
    assert "world size: 2" in log
