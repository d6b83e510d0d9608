"""The flow's first task: a run started from a deployment (no CLI before it) stops on what this host lacks, in one
line naming the file and key, before the engine is asked or anything is tracked."""

from __future__ import annotations

from pathlib import Path

import pytest

from npu_sft.settings import ConfigError, load_pipeline
from tasks.validate import check_config


def test_a_data_file_missing_on_the_worker_stops_the_flow_s_first_task(
    in_tmp_project: Path, repo: Path, engine_python: Path
) -> None:
    pipeline = load_pipeline(repo / "configs/tiny_cpu.yaml", [
        f"engine.python={engine_python}", f"devices.state_dir={in_tmp_project / 'leases'}",
        'data.datasets=[{"name": "identity"}, {"name": "tiny_alpaca", "path": "mine.json"}]',
    ])
    with pytest.raises(ConfigError, match=r"data.datasets.1.path: mine.json does not exist"):
        check_config.fn(pipeline)
    assert not (in_tmp_project / ".npu-sft" / "checks").exists()  # refused before the engine was asked


def test_an_env_script_missing_on_the_worker_stops_the_flow_s_first_task(repo: Path, engine_python: Path) -> None:
    pipeline = load_pipeline(repo / "configs/tiny_cpu.yaml", [
        f"engine.python={engine_python}", "engine.env_script=/usr/local/Ascend/ascend-toolkit/set_env.sh",
    ])
    with pytest.raises(ConfigError, match=r"engine.env_script: /usr/local/Ascend/ascend-toolkit/set_env.sh does not"):
        check_config.fn(pipeline)
