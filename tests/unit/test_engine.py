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
        host="127.0.0.1", port=18000, api_key="k3y", max_concurrent=4,
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
    command = api_server_command(engine, model, host="127.0.0.1", port=8000, api_key="s3cret-k3y", max_concurrent=1,
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
            api_server_command(engine, model, host="127.0.0.1", port=8000, api_key="k", max_concurrent=1)
        # Training carries no secret: the same prefix runs it.
        assert torchrun_train_command(engine, DistributedLaunch(1, 29500), "c.yaml").argv[: len(prefix)] == prefix
