from __future__ import annotations

import re
from pathlib import Path

import pytest

from npu_sft.engine.llamafactory_config import (
    check_with_engine,
    env_script_missing,
    loggable_params,
    resolve_deepspeed,
    resolve_train_config,
)
from npu_sft.settings import ConfigError, load_pipeline

SEEDS = Path(__file__).resolve().parents[4] / "shared" / "seeds"


@pytest.fixture
def qwen7b(repo: Path, engine_python: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(repo)
    return load_pipeline(repo / "configs/qwen7b.yaml", [f"engine.python={engine_python}"])


def test_seed_yaml_is_used_unchanged(repo: Path) -> None:
    seed = next(SEEDS.glob("000_*.txt")).read_text(encoding="utf-8")
    block = re.search(r"cat << EOF > qwen1_5_lora_sft_ds.yaml\n(.*?)\n  EOF", seed, re.S).group(1)
    seed_yaml = "\n".join(line[2:] for line in block.splitlines())
    ours = (repo / "configs/llamafactory/qwen1_5_lora_sft_ds.yaml").read_text(encoding="utf-8")
    body = "\n".join(line for line in ours.splitlines() if not line.startswith("# "))
    assert body.strip() == seed_yaml.strip()


def test_seed_deepspeed_path_maps_to_the_project_copy(qwen7b, repo: Path) -> None:
    assert qwen7b.llamafactory["deepspeed"] == "examples/deepspeed/ds_z0_config.json"
    assert resolve_deepspeed("examples/deepspeed/ds_z0_config.json", qwen7b) == repo / "configs/deepspeed/ds_z0_config.json"
    assert resolve_deepspeed("ds_z3_offload", qwen7b) == repo / "configs/deepspeed/ds_z3_offload_config.json"
    with pytest.raises(ConfigError, match="deepspeed: 'ds_z9' not found"):
        resolve_deepspeed("ds_z9", qwen7b)


def test_run_config_owns_paths_and_keeps_user_keys(qwen7b, tmp_path: Path) -> None:
    config = resolve_train_config(
        qwen7b,
        model_path="/models/qwen",
        data_args={"dataset_dir": str(tmp_path / "data"), "dataset": "train", "eval_dataset": "eval", "val_size": 0.0},
        output_dir=tmp_path / "out",
    )
    assert config["model_name_or_path"] == "/models/qwen"
    assert config["dataset"] == "train" and config["eval_dataset"] == "eval"
    assert config["val_size"] == 0.0  # the split was made by preparation
    assert config["output_dir"] == str(tmp_path / "out")
    assert config["report_to"] == "none"
    assert config["deepspeed"].endswith("configs/deepspeed/ds_z0_config.json")
    assert config["fp16"] is True and config["learning_rate"] == 0.0001 and config["lora_target"] == "q_proj,v_proj"


def test_params_leave_secrets_out() -> None:
    params = loggable_params({"hf_hub_token": "hf_x", "ms_hub_token": "ms_y", "learning_rate": 0.0001, "fp16": True, "lora_target": "q_proj,v_proj"})
    assert params == {"learning_rate": "0.0001", "fp16": "true", "lora_target": "q_proj,v_proj"}


def test_params_keep_keys_that_only_mention_tokens() -> None:
    params = loggable_params({"max_new_tokens": 64, "new_special_tokens": "<a>", "om_hub_token": "x"})
    assert params == {"max_new_tokens": "64", "new_special_tokens": "<a>"}


def test_a_missing_env_script_is_named_before_the_engine_starts(qwen7b, tmp_path: Path) -> None:
    missing = tmp_path / "set_env.sh"
    pipeline = qwen7b.model_copy(
        update={"settings": qwen7b.settings.model_copy(update={
            "engine": qwen7b.settings.engine.model_copy(update={"env_script": str(missing)})
        })}
    )

    with pytest.raises(ConfigError, match=rf"engine\.env_script: {re.escape(str(missing))} does not exist on this host"):
        check_with_engine(pipeline)
    missing.write_text("export ASCEND_HOME=/usr/local/Ascend\n")
    assert env_script_missing(pipeline) is None


def test_an_env_script_behind_a_command_prefix_is_not_looked_for_here(qwen7b) -> None:
    engine = qwen7b.settings.engine.model_copy(update={"command_prefix": ["docker", "exec", "-i", "llamafactory"]})
    pipeline = qwen7b.model_copy(update={"settings": qwen7b.settings.model_copy(update={"engine": engine})})
    assert env_script_missing(pipeline) is None
