"""The `npu-sft` command as a user meets it: bad input is one line and a non-zero exit, and nothing starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"


def npu_sft(*args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect"), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "npu_sft.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_refused_before_anything_started(result: subprocess.CompletedProcess[str], cwd: Path, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("npu-sft: warning:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("npu-sft: error: ")
    for text in expected:
        assert text in lines[0]
    assert not (cwd / "mlruns").exists() and not (cwd / ".npu-sft" / "runs").exists()


@pytest.fixture
def demo_copy(tmp_path: Path, repo: Path, engine_python: Path) -> Path:
    config = tmp_path / "pipeline.yaml"
    text = (repo / "configs/tiny_cpu.yaml").read_text()
    text = text.replace("config: llamafactory/tiny_lora_sft.yaml", f"config: {repo}/configs/llamafactory/tiny_lora_sft.yaml")
    config.write_text(text + f"\nengine:\n  python: {engine_python}\n")
    return config


def test_missing_config_file(tmp_path: Path) -> None:
    result = npu_sft("run", "nope.yaml", cwd=tmp_path)
    assert_refused_before_anything_started(result, tmp_path, "nope.yaml: pipeline config not found")


def test_yaml_syntax_error(tmp_path: Path, demo_copy: Path) -> None:
    demo_copy.write_text(demo_copy.read_text().replace("name: tiny-cpu", "name: [tiny-cpu"))
    result = npu_sft("run", str(demo_copy), cwd=tmp_path)
    assert_refused_before_anything_started(result, tmp_path, f"{demo_copy}:", "YAML syntax error")


def test_unknown_pipeline_key(tmp_path: Path, demo_copy: Path) -> None:
    demo_copy.write_text(demo_copy.read_text().replace("  max_tokens: 32", "  max_tokens: 32\n  temprature: 0.5"))
    line = demo_copy.read_text().splitlines().index("  temprature: 0.5") + 1
    result = npu_sft("run", str(demo_copy), cwd=tmp_path)
    assert_refused_before_anything_started(result, tmp_path, f"{demo_copy}:{line}: serve.temprature: unknown key")


def test_engine_python_that_does_not_exist(tmp_path: Path, demo_copy: Path) -> None:
    result = npu_sft("run", str(demo_copy), "--set", "engine.python=/opt/missing/bin/python", cwd=tmp_path)
    assert_refused_before_anything_started(result, tmp_path, "engine.python", "/opt/missing/bin/python does not exist")


def test_engine_env_script_that_does_not_exist(tmp_path: Path, demo_copy: Path) -> None:
    result = npu_sft("run", str(demo_copy), "--set", "engine.env_script=/opt/cann/set_env.sh", cwd=tmp_path)
    assert_refused_before_anything_started(
        result, tmp_path, f"{demo_copy}: engine.env_script: /opt/cann/set_env.sh does not exist on this host"
    )


def test_plan_without_the_engine_env_script_warns_and_plans(tmp_path: Path, repo: Path, engine_python: Path) -> None:
    # A plan is made on a laptop before the Ascend host: the seed recipe sources CANN's set_env.sh, which is not here.
    extra_env = {"PATH": f"{FAKES}:{os.environ['PATH']}", "FAKE_NPU_SMI_FIXTURE": "8x910B3", "COLUMNS": "300"}
    result = npu_sft(
        "plan", str(repo / "configs/qwen7b.yaml"), "--set", f"engine.python={engine_python}",
        "--set", f"devices.state_dir={tmp_path / 'leases'}", cwd=tmp_path, extra_env=extra_env,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "warning: " in result.stdout and "engine.env_script: /usr/local/Ascend/ascend-toolkit/set_env.sh" in (
        result.stdout
    ) and "`npu-sft run` here would refuse it" in result.stdout
    assert "accepted by LLaMA-Factory's parser" in result.stdout


def without_device_tools() -> dict[str, str]:
    """PATH without npu-smi and npu-list: a laptop, or an Ascend host whose CANN tools are not on PATH."""
    kept = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "npu-smi").exists()]
    return {"PATH": os.pathsep.join(kept), "COLUMNS": "300"}


def test_plan_on_a_host_without_npu_tools_plans_with_the_devices_unchecked(
    tmp_path: Path, repo: Path, engine_python: Path
) -> None:
    result = npu_sft(
        "plan", str(repo / "configs/qwen7b.yaml"), "--set", f"engine.python={engine_python}",
        "--set", "engine.env_script=null", "--set", "publish.modelscope.repo_id=team/qwen7b-lora",
        "--set", "publish.merged.enabled=true", cwd=tmp_path, extra_env=without_device_tools(),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "npu x 4, not checked on this host" in out
    assert "--nproc_per_node 4" in out and "ASCEND_RT_VISIBLE_DEVICES='<free devices, chosen at lease>'" in out
    assert "warning: devices not checked: devices.kind is npu but neither npu-smi nor npu-list is on PATH" in out
    # The stall watchdog's deadlines beside the collective timeouts a hang would otherwise wait for.
    assert ("start-up 1800 s; between steps 10 x the longest interval, at least 300 s; evaluation or save 3600 s; a "
            "hang otherwise waits for ddp_timeout 180000000 s, HCCL_EXEC_TIMEOUT 1800 s (CANN's default)") in out
    # What stops the training at once, without a retry.
    assert "a loss NaN, inf or 0 for 3 logged steps in a row; a rank not on npu devices: stopped, not retried" in out
    # Where the adapter goes after the evaluation, as configured.
    assert ("qwen1_5-7b-lora: a new version per run, alias candidate; champion when eval/rouge_l (higher is better) "
            "beats the base model by more than 0 and beats the current champion") in out
    assert "each new champion to team/qwen7b-lora, branch master (created private if missing)" in out
    assert "token from $MODELSCOPE_API_TOKEN" in out
    assert "registered as qwen1_5-7b-lora-merged" in out


def test_run_on_a_host_without_npu_tools_is_refused_naming_the_file_and_key(
    tmp_path: Path, repo: Path, engine_python: Path
) -> None:
    config = repo / "configs/qwen7b.yaml"
    result = npu_sft(
        "run", str(config), "--set", f"engine.python={engine_python}", "--set", "engine.env_script=null",
        cwd=tmp_path, extra_env=without_device_tools(),
    )
    assert_refused_before_anything_started(
        result, tmp_path, f"{config}: devices.kind is npu but neither npu-smi nor npu-list is on PATH"
    )


def plan_qwen7b_on_fake_host(
    tmp_path: Path, repo: Path, engine_python: Path, setting: str, fixture: str, columns: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`npu-sft plan configs/qwen7b.yaml --set SETTING` on a host whose npu-smi answers with `fixture`."""
    extra_env = {"PATH": f"{FAKES}:{os.environ['PATH']}", "FAKE_NPU_SMI_FIXTURE": fixture}
    if columns:
        extra_env["COLUMNS"] = columns
    return npu_sft(
        "plan", str(repo / "configs/qwen7b.yaml"), "--set", setting, "--set", f"engine.python={engine_python}",
        "--set", "engine.env_script=null", "--set", f"devices.state_dir={tmp_path / 'leases'}",
        cwd=tmp_path, extra_env=extra_env,
    )


def test_more_train_devices_than_the_host_has(tmp_path: Path, repo: Path, engine_python: Path) -> None:
    result = plan_qwen7b_on_fake_host(tmp_path, repo, engine_python, "devices.train=9", "8x910B3")
    assert_refused_before_anything_started(result, tmp_path, "asks for 9 npu devices but this host has 8")


@pytest.mark.e2e
def test_plan_for_the_seed_recipe_on_an_8_card_host(tmp_path: Path, repo: Path, engine_python: Path) -> None:
    """The seed's single-card launch: torchrun --nproc_per_node 1 with ASCEND_RT_VISIBLE_DEVICES naming a free card."""
    result = plan_qwen7b_on_fake_host(tmp_path, repo, engine_python, "devices.train=1", "8x910B3_busy", columns="400")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--nproc_per_node 1" in out and "-m llamafactory.launcher" in out
    assert "deepspeed: " + str(repo / "configs/deepspeed/ds_z0_config.json") in out
    visible = [w for w in out[:out.index("Serve command")].split() if w.startswith("ASCEND_RT_VISIBLE_DEVICES=")]
    assert len(visible) == 1
    card = int(visible[0].split("=")[1])
    busy_fixture = (FAKES.parent / "fixtures/devices/npu_smi_info_8x910B3_busy.txt").read_text()
    assert f"| {card}       " not in busy_fixture.split("Process id")[-1]  # not a card with a foreign process
    assert not (tmp_path / ".npu-sft" / "runs").exists() and not (tmp_path / "mlruns").exists()
    # Where the data comes from, and that the hub is named, not asked (nothing downloaded).
    assert ("identity (builtin); alpaca_en_demo (ModelScope dataset llamafactory/alpaca_en @ master, files "
            "alpaca_data_en*.json) (the hub is not asked by a plan: npu-sft doctor checks it)") in " ".join(out.split())
    # The serve flow's server: greedy on the huggingface backend, listed as the version it serves, never the key.
    serve = out[out.index("Serve command"):]
    assert "-m llamafactory.cli api" in serve and "--infer_backend huggingface --do_sample false" in serve
    assert "API_MODEL_NAME='qwen1_5-7b-lora:v<N>'" in serve
    assert "API_KEY" not in serve


@pytest.mark.e2e
def test_plan_shows_the_seeds_vllm_serving_on_npus(tmp_path: Path, repo: Path, engine_python: Path) -> None:
    result = plan_qwen7b_on_fake_host(tmp_path, repo, engine_python, "serve.backend=vllm", "8x910B3", columns="400")
    assert result.returncode == 0, result.stderr
    serve = result.stdout[result.stdout.index("Serve command"):]
    for expected in ("ASCEND_RT_VISIBLE_DEVICES=", "PYTORCH_NPU_ALLOC_CONF=max_split_size_mb:256",
                     "VLLM_WORKER_MULTIPROC_METHOD=spawn", "USE_MODELSCOPE_HUB=1",
                     "--template qwen --finetuning_type lora --infer_backend vllm"):
        assert expected in serve, expected
    assert "API_KEY" not in serve


@pytest.mark.e2e
def test_prepare_alone_prints_statistics_rejects_and_where_the_data_is(tmp_path: Path, demo_copy: Path) -> None:
    data = tmp_path / "mine.jsonl"
    good = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(40)]
    bad = [{"instruction": "", "input": "", "output": "x"}, {"instruction": "no output"}]
    data.write_text("\n".join(json.dumps(row) for row in good + bad) + "\n")
    text = demo_copy.read_text().replace(
        "    - name: tiny_alpaca\n      source: builtin", f"    - name: tiny_alpaca\n      source: file\n      path: {data}"
    )
    demo_copy.write_text(text)
    result = npu_sft("prepare", str(demo_copy), "--set", "data.max_reject_share=0.1", cwd=tmp_path,
                     extra_env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Prepared datasets: " + str(tmp_path / ".npu-sft" / "datasets") in out
    assert "tiny_alpaca" in out and "identity" in out
    rejects = next((tmp_path / ".npu-sft" / "datasets").rglob("rejects.jsonl")).read_text().splitlines()
    assert sorted(json.loads(line)["row"] for line in rejects) == [41, 42]
    assert not (tmp_path / ".npu-sft" / "runs").exists()  # no training, no MLflow run
    again = npu_sft("prepare", str(demo_copy), "--set", "data.max_reject_share=0.1", cwd=tmp_path, extra_env={"COLUMNS": "200"})
    assert "cache hit" in again.stdout


def test_devices_shows_inventory_with_reasons(tmp_path: Path) -> None:
    config = tmp_path / "devices.yaml"
    result = npu_sft(
        "devices", cwd=tmp_path,
        extra_env={"PATH": f"{FAKES}:{os.environ['PATH']}", "FAKE_NPU_SMI_FIXTURE": "8x910B3_busy", "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "910B3" in result.stdout
    assert "1333928" in result.stdout or "did not start" in result.stdout  # card 2's foreign process is the reason
    assert not config.exists()
