from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from npu_sft.engine import (
    DistributedLaunch,
    EngineSettings,
    SecretInArgvError,
    ServedModel,
    api_server_command,
    engine_script_command,
    render_command,
    served_name,
    torchrun_train_command,
)
from npu_sft.serve_settings import ServeSettings


def test_torchrun_argv_matches_the_seed_launch(engine_python: Path) -> None:
    engine = EngineSettings(python=str(engine_python))
    launch = DistributedLaunch(nproc_per_node=4, master_port=29611)
    command = torchrun_train_command(engine, launch, "/runs/r/llamafactory.yaml", env={"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"})
    assert command.argv == [
        str(engine_python), "-m", "torch.distributed.run",
        "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", "29611",
        "-m", "llamafactory.launcher", "/runs/r/llamafactory.yaml",
    ]
    assert command.env == {"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}


def test_container_engine_forwards_env_in_argv_and_sources_env_script() -> None:
    engine = EngineSettings(
        python="python",
        command_prefix=["docker", "exec", "-i", "llamafactory"],
        env_script="/usr/local/Ascend/ascend-toolkit/set_env.sh",
        env={"USE_MODELSCOPE_HUB": "1"},
    )
    command = torchrun_train_command(engine, DistributedLaunch(1, 7007), "cfg.yaml", env={"ASCEND_RT_VISIBLE_DEVICES": "3"})
    assert command.argv[:4] == ["docker", "exec", "-i", "llamafactory"]
    assert command.argv[4:8] == ["bash", "-c", 'source "$0" && exec "$@"', "/usr/local/Ascend/ascend-toolkit/set_env.sh"]
    assert command.argv[8:11] == ["env", "ASCEND_RT_VISIBLE_DEVICES=3", "USE_MODELSCOPE_HUB=1"]
    assert command.argv[11:14] == ["python", "-m", "torch.distributed.run"]


def test_api_server_binds_loopback_with_key_and_quiet_request_logging(engine_python: Path) -> None:
    command = api_server_command(
        EngineSettings(python=str(engine_python)),
        ServedModel(served_name("qwen7b-lora", "3"), base_model="/m", adapter="/a", template="qwen"),
        ServeSettings(max_concurrent=4), port=18000, api_key="k3y",
    )
    assert command.env["API_HOST"] == "127.0.0.1"
    assert command.env["API_KEY"] == "k3y"
    assert command.env["API_VERBOSE"] == "0"
    # /v1/models names the registered version, not LLaMA-Factory's default gpt-3.5-turbo
    assert command.env["API_MODEL_NAME"] == "qwen7b-lora:v3"
    assert command.env["MAX_CONCURRENT"] == "4"
    assert command.argv[command.argv.index("--template") + 1] == "qwen"
    assert command.argv[command.argv.index("--do_sample") + 1] == "false"  # greedy: the seeds' NPU 507018 fix
    assert "k3y" not in command.argv  # a local engine never sees the key in its argv (visible in `ps`)
    assert command.argv[command.argv.index("--adapter_name_or_path") + 1] == "/a"


def test_engine_scripts_are_fed_on_stdin(engine_python: Path) -> None:
    command = engine_script_command(EngineSettings(python=str(engine_python)), "make_tiny_model.py", ["--out", "x"])
    assert command.argv == [str(engine_python), "-", "--out", "x"]
    assert command.stdin_file is not None and command.stdin_file.name == "make_tiny_model.py"
    assert render_command(command).endswith("make_tiny_model.py")


def test_missing_local_engine_python_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        EngineSettings(python=str(tmp_path / "bin" / "python"))


def test_a_docker_exec_engine_gets_the_api_key_by_name_never_its_value(engine_python: Path) -> None:
    engine = EngineSettings(python="python", command_prefix=["docker", "exec", "-i", "llamafactory"],
                            env_script="/usr/local/Ascend/ascend-toolkit/set_env.sh")
    model = ServedModel("m:v1", base_model="/m", adapter="/a", template="qwen")
    command = api_server_command(engine, model, ServeSettings(), port=8000, api_key="s3cret-k3y",
                                 env={"ASCEND_RT_VISIBLE_DEVICES": "3"})
    assert command.argv[:6] == ["docker", "exec", "-e", "API_KEY", "-i", "llamafactory"]
    assert not any("s3cret-k3y" in arg for arg in command.argv)
    assert command.env["API_KEY"] == "s3cret-k3y"  # docker reads it from its own environment
    assert "ASCEND_RT_VISIBLE_DEVICES=3" in command.argv and "API_MODEL_NAME=m:v1" in command.argv


def test_a_prefix_that_cannot_take_a_key_by_name_is_refused() -> None:
    model = ServedModel("m:v1", base_model="/m", adapter="/a", template="qwen")
    for prefix in (["ssh", "npu-host"], ["sudo", "docker", "exec", "llamafactory"]):
        engine = EngineSettings(python="python", command_prefix=prefix)
        with pytest.raises(SecretInArgvError, match=r"^engine.command_prefix: .* cannot receive the API key"):
            api_server_command(engine, model, ServeSettings(), port=8000, api_key="k")
        # Training carries no secret: the same prefix runs it.
        assert torchrun_train_command(engine, DistributedLaunch(1, 29500), "c.yaml").argv[: len(prefix)] == prefix


def test_the_vllm_backend_on_npus_runs_as_the_seeds_run_it() -> None:
    """The seeds: USE_MODELSCOPE_HUB=1, ASCEND_RT_VISIBLE_DEVICES, PYTORCH_NPU_ALLOC_CONF=max_split_size_mb:256,
    VLLM_WORKER_MULTIPROC_METHOD=spawn, `llamafactory-cli chat --model_name_or_path ... --adapter_name_or_path ...
    --template qwen --finetuning_type lora --infer_backend vllm` (here `api`, the same arguments)."""
    engine = EngineSettings(python="python", command_prefix=["docker", "exec", "-i", "llamafactory"],
                            env={"USE_MODELSCOPE_HUB": "1"})
    settings = ServeSettings(backend="vllm", vllm={"max_lora_rank": 16})
    model = ServedModel("qwen7b-lora:v2", base_model="qwen/Qwen1.5-7B", adapter="/r/qwen7b-lora-v2", template="qwen")
    env = {"ASCEND_RT_VISIBLE_DEVICES": "0", **settings.backend_env("npu")}
    command = api_server_command(engine, model, settings, port=8000, api_key="k" * 32, env=env)
    api = command.argv.index("api")
    assert command.argv[api - 3:api] == ["python", "-m", "llamafactory.cli"]
    assert command.argv[api + 1:api + 11] == [
        "--model_name_or_path", "qwen/Qwen1.5-7B", "--adapter_name_or_path", "/r/qwen7b-lora-v2",
        "--template", "qwen", "--finetuning_type", "lora", "--infer_backend", "vllm",
    ]
    assert command.argv[api + 11:] == [
        "--do_sample", "false", "--vllm_maxlen", "4096", "--vllm_gpu_util", "0.7", "--vllm_enforce_eager", "false",
        "--vllm_max_lora_rank", "16",
    ]
    for variable in ("USE_MODELSCOPE_HUB=1", "ASCEND_RT_VISIBLE_DEVICES=0", "PYTORCH_NPU_ALLOC_CONF=max_split_size_mb:256",
                     "VLLM_WORKER_MULTIPROC_METHOD=spawn"):
        assert variable in command.argv[:api]  # through `env` inside the container
    assert settings.backend_env("gpu") == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    with pytest.raises(ValueError, match="vllm does not run on the CPU"):
        settings.backend_env("cpu")
    assert ServeSettings().backend_env("npu") == {}
