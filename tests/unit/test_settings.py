from __future__ import annotations

from pathlib import Path

import pytest

from npu_sft.engine.llamafactory_config import write_config
from npu_sft.settings import ConfigError, load_pipeline

TINY = """\
# npu-sft run this.yaml
name: t
model:
  source: tiny
data:
  datasets:
    - name: identity
      source: builtin
    - name: tiny_alpaca
      source: builtin
llamafactory:
  config: {lf}
engine:
  python: {python}
publish:
  registered_model: m
serve:
  prompt: hi
"""


@pytest.fixture
def tiny_config(tmp_path: Path, repo: Path, engine_python: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(TINY.format(lf=repo / "configs/llamafactory/tiny_lora_sft.yaml", python=engine_python))
    return path


def test_loads_and_merges_llamafactory_config(tiny_config: Path) -> None:
    pipeline = load_pipeline(tiny_config, ["llamafactory.overrides.num_train_epochs=1", "devices.train=2"])
    assert pipeline.llamafactory["num_train_epochs"] == 1
    assert pipeline.llamafactory["template"] == "qwen"
    assert pipeline.settings.devices.train == 2
    assert pipeline.dataset_names == ["identity", "tiny_alpaca"]


def test_exponent_numbers_are_numbers_in_the_config_and_in_overrides(tiny_config: Path, tmp_path: Path) -> None:
    """`learning_rate: 1e-5` as the seed writes it: PyYAML alone reads a string, which transformers would keep."""
    pipeline = load_pipeline(tiny_config, ["llamafactory.overrides.learning_rate=2e-5", "llamafactory.overrides.warmup_ratio=1E-1"])
    assert pipeline.llamafactory["learning_rate"] == 2e-5 and isinstance(pipeline.llamafactory["learning_rate"], float)
    assert pipeline.llamafactory["warmup_ratio"] == pytest.approx(0.1)
    written = write_config(dict(pipeline.llamafactory), tmp_path / "engine.yaml").read_text()
    assert "learning_rate: 2.0e-05" in written  # a number LLaMA-Factory's OmegaConf reads back as one
    assert load_pipeline(tiny_config, ["llamafactory.overrides.run_name='1e-5'"]).llamafactory["run_name"] == "1e-5"


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: pipeline config not found"):
        load_pipeline(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_the_line(tiny_config: Path) -> None:
    text = tiny_config.read_text().replace("serve:\n  prompt: hi", "serve:\n  prompt: [hi")
    tiny_config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(tiny_config)
    message = str(err.value)
    assert message.startswith(f"{tiny_config}:")
    assert "YAML syntax error" in message
    assert "\n" not in message
    line = int(message.split(":")[1])
    assert line >= text.splitlines().index("  prompt: [hi") + 1


def test_unknown_key_names_key_and_line(tiny_config: Path) -> None:
    text = tiny_config.read_text().replace("  prompt: hi", "  promt: hi")
    tiny_config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(tiny_config)
    line = text.splitlines().index("  promt: hi") + 1
    assert str(err.value) == f"{tiny_config}:{line}: serve.promt: unknown key"


def test_missing_engine_python_is_a_clear_error(tiny_config: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_pipeline(tiny_config, ["engine.python=/nonexistent/bin/python"])
    assert "engine.python" in str(err.value)
    assert "/nonexistent/bin/python does not exist" in str(err.value)


def test_dataset_without_source_is_refused(tiny_config: Path) -> None:
    with pytest.raises(ConfigError, match="no source for dataset.*alpaca_en_demo"):
        load_pipeline(tiny_config, ["llamafactory.overrides.dataset=identity,alpaca_en_demo"])


def test_bad_set_syntax(tiny_config: Path) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_pipeline(tiny_config, ["devices.train"])


def test_shipped_configs_load(repo: Path, monkeypatch: pytest.MonkeyPatch, engine_python: Path) -> None:
    monkeypatch.chdir(repo)
    demo = load_pipeline(repo / "configs/tiny_cpu.yaml")
    assert demo.settings.model.source == "tiny"
    qwen = load_pipeline(repo / "configs/qwen7b.yaml", [f"engine.python={engine_python}"])
    assert qwen.llamafactory["model_name_or_path"] == "qwen/Qwen1.5-7B"
    assert qwen.settings.engine.env["USE_MODELSCOPE_HUB"] == "1"


def test_every_config_starts_with_the_command_that_runs_it(repo: Path) -> None:
    for path in [*repo.glob("configs/*.yaml"), *repo.glob("configs/llamafactory/*.yaml")]:
        first_lines = path.read_text().splitlines()[:3]
        assert first_lines[0].startswith("#"), path
        assert any("npu-sft " in line for line in first_lines), path


def test_no_held_out_split_is_refused_at_load_naming_the_key(tiny_config: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_pipeline(tiny_config, ["llamafactory.overrides.val_size=0"])
    message = str(err.value)
    # Set by an override: the key named is where it was set.
    assert "pipeline.yaml: llamafactory.overrides.val_size: 0 leaves no held-out rows" in message
    assert "\n" not in message


def test_no_held_out_split_is_fine_without_the_eval_stage(tiny_config: Path) -> None:
    pipeline = load_pipeline(tiny_config, ["llamafactory.overrides.val_size=0", "eval.enabled=false"])
    assert pipeline.val_size == 0


def test_eval_settings_are_validated_with_the_config(tiny_config: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens: Input should be greater than or equal to 1"):
        load_pipeline(tiny_config, ["eval.max_new_tokens=0"])
    with pytest.raises(ConfigError, match=r"eval\.temprature: unknown key"):
        load_pipeline(tiny_config, ["eval.temprature=0.5"])


def test_a_gain_gate_without_base_model_scores_is_refused_at_load(tiny_config: Path) -> None:
    with pytest.raises(ConfigError, match=r"publish\.gate\.min_gain: needs the base model's scores; set eval\.baseline"):
        load_pipeline(tiny_config, ["eval.baseline=false", "publish.gate.min_gain=1.0"])
    assert load_pipeline(tiny_config, ["eval.baseline=false"]).settings.publish.gate.min_gain == 0.0


def test_serve_concurrency_below_one_is_refused_naming_the_key(tiny_config: Path) -> None:
    assert load_pipeline(tiny_config, ["serve.max_concurrent=4"]).settings.serve.max_concurrent == 4
    with pytest.raises(ConfigError) as err:
        load_pipeline(tiny_config, ["serve.max_concurrent=0"])
    assert "serve.max_concurrent" in str(err.value) and "\n" not in str(err.value)


def test_a_serving_pipeline_behind_ssh_is_refused_at_load(tiny_config: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_pipeline(tiny_config, ["engine.command_prefix=[ssh, npu-host]"])
    message = str(err.value)
    assert message.startswith(f"{tiny_config.resolve()}: engine.command_prefix: 'ssh npu-host' cannot receive the API key")
    assert "\n" not in message
    assert load_pipeline(tiny_config, ["engine.command_prefix=[ssh, npu-host]", "serve.enabled=false"])
    assert load_pipeline(tiny_config, ["engine.command_prefix=[docker, exec, -i, llamafactory]"])


def test_vllm_serving_is_refused_on_the_cpu_and_below_the_adapter_rank(tiny_config: Path) -> None:
    with pytest.raises(ConfigError, match=r"serve.backend: vllm does not run on the CPU \(devices.kind: cpu\)"):
        load_pipeline(tiny_config, ["serve.backend=vllm", "devices.kind=cpu"])
    with pytest.raises(ConfigError, match=r"serve.vllm.max_lora_rank: 4 is below the adapter's lora_rank 8"):
        load_pipeline(tiny_config, ["serve.backend=vllm", "devices.kind=npu", "serve.vllm.max_lora_rank=4",
                                    "llamafactory.overrides.lora_rank=8"])
    assert load_pipeline(tiny_config, ["serve.backend=vllm", "devices.kind=npu"]).settings.serve.backend == "vllm"


def test_data_val_size_is_the_split_plan_run_and_the_eval_check_all_use(tiny_config: Path) -> None:
    # Preparation cuts the held-out split with data.val_size when it is set, whatever the LLaMA-Factory YAML says.
    pipeline = load_pipeline(tiny_config, ["llamafactory.overrides.val_size=0", "data.val_size=0.2"])
    assert pipeline.val_size == 0.2
    with pytest.raises(ConfigError, match=r"pipeline.yaml: data.val_size: 0 leaves no held-out rows"):
        load_pipeline(tiny_config, ["data.val_size=0"])
