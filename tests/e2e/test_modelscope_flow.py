"""The sft flow with its model and one dataset from ModelScope, and its champion pushed back there (the real client,
a local stand-in of the hub) and merged into its base model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow import MlflowClient

from npu_sft.datasets.builtin import tiny_alpaca_rows
from npu_sft.engine import EngineSettings
from npu_sft.engine.tiny_model import ensure_tiny_model
from tests.fakes.hub_standin import HubStandIn

pytestmark = pytest.mark.e2e

MODEL_ID = "npu-sft/tiny-qwen2"
DATASET_ID = "npu-sft/tiny-alpaca"
PUSH_REPO = "team/tiny-qwen2-lora"
PUSH_TOKEN = "ms-write-token-e2e-0123456789"


def run_cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "npu_sft.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def hub_env(tmp_path: Path, token: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MODELSCOPE_API_TOKEN"}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"), MODELSCOPE_HOME=str(tmp_path / "modelscope-home"))
    return {**env, "MODELSCOPE_API_TOKEN": token} if token else env


def test_flow_trains_on_a_model_and_dataset_downloaded_from_modelscope(
    tmp_path: Path, repo: Path, engine_python: Path
) -> None:
    model_dir = ensure_tiny_model(EngineSettings(python=str(engine_python)), tmp_path / "generated")
    model_files = {path.name: path.read_bytes() for path in model_dir.iterdir() if path.is_file()}
    rows = "\n".join(json.dumps(row) for row in tiny_alpaca_rows()).encode()
    with HubStandIn() as hub:
        hub.add_repo(MODEL_ID, model_files)
        # A head commit that touched no listed file (the hub lists each file with the commit that last changed it):
        # `master` resolves through the commit history, and require_pinned lets the run go on only if it does.
        model_commit = hub.add_repo(MODEL_ID, model_files)
        hub.add_repo(DATASET_ID, {"train.jsonl": rows}, repo_type="dataset")
        model = {"source": "modelscope", "id": MODEL_ID, "revision": "master", "require_pinned": True,
                 "endpoint": hub.url, "cache_dir": str(tmp_path / "ms_cache"), "retry_backoff_s": 0.01}
        datasets = [{"name": "identity", "source": "builtin"},
                    {"name": "tiny_alpaca", "source": "modelscope", "repo_id": DATASET_ID}]
        hub.accept_token(PUSH_TOKEN)
        push = {"repo_id": PUSH_REPO, "endpoint": hub.url}
        completed = run_cli(
            "run", str(repo / "configs/tiny_cpu.yaml"),
            "--set", f"engine.python={engine_python}", "--set", f"model={json.dumps(model)}",
            "--set", f"data.datasets={json.dumps(datasets)}", "--set", "serve.enabled=false",
            "--set", "llamafactory.overrides.num_train_epochs=1", "--set", "mlflow.experiment=sft-hub",
            # The first version is champion whatever one epoch scores, so it is pushed.
            "--set", f"publish.modelscope={json.dumps(push)}", "--set", "publish.gate.min_gain=null",
            "--set", "publish.merged.enabled=true",
            cwd=tmp_path, env=hub_env(tmp_path, PUSH_TOKEN),
        )
        assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
        assert hub.file_requests("model.safetensors"), "the weights came from the hub stand-in"
        assert hub.file_requests("train.jsonl")
        pushed = hub.repos[("model", PUSH_REPO)]
        pushed_files = pushed.commits[pushed.branches["master"]].files
        assert hub.uploads.visibility[PUSH_REPO] == 1  # created private

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)  # not a registry URI an earlier test set for the process
    run = client.search_runs([client.get_experiment_by_name("sft-hub").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["model.id"] == MODEL_ID
    assert run.data.tags["model.resolved_revision"] == model_commit
    assert "did not report which commit" not in completed.stderr
    manifest_dir = client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts"))
    manifest = json.loads(next(Path(manifest_dir).rglob("model_manifest.json")).read_text())
    files = {entry["path"] for entry in manifest["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert run.data.metrics["data.tiny_alpaca.valid_rows"] == len(tiny_alpaca_rows())
    assert run.data.tags["dataset.tiny_alpaca.id"] == DATASET_ID

    # The champion's adapter went to the pushed repository, byte for byte, with a card; the version says where.
    version = client.get_model_version("tiny-qwen2-lora", "1")
    assert version.tags["modelscope.url"] == f"{hub.url}/models/{PUSH_REPO}"
    registered = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("tiny-qwen2-lora", "1"),
        dst_path=str(tmp_path / "registered"), tracking_uri=uri,
    ))
    assert pushed_files["adapter_model.safetensors"] == (registered / "adapter_model.safetensors").read_bytes()
    card = pushed_files["README.md"].decode()
    assert "version 1" in card and "| eval/rouge_l |" in card
    # The champion merged into its base model: a version of its own model, linked both ways with the adapter's.
    assert version.tags["merged.version"] == "tiny-qwen2-lora-merged/1"
    merged = client.get_model_version_by_alias("tiny-qwen2-lora-merged", "champion")
    assert str(merged.version) == "1" and merged.tags["adapter.version"] == "1"
    assert merged.tags["adapter.model"] == "tiny-qwen2-lora" and merged.tags["base_model"] == MODEL_ID
    merged_dir = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("tiny-qwen2-lora-merged", "1"),
        dst_path=str(tmp_path / "merged"), tracking_uri=uri,
    ))
    merged_files = {path.name for path in merged_dir.iterdir()}
    assert {"config.json", "tokenizer.json"} <= merged_files and "adapter_config.json" not in merged_files
    assert any(name.endswith(".safetensors") for name in merged_files)
    # The token was in no output and no MLflow field.
    fields = str(run.data.params) + str(run.data.tags) + str(version.tags)
    assert PUSH_TOKEN not in completed.stdout + completed.stderr + fields


def test_a_push_without_a_token_stops_before_anything_starts(tmp_path: Path, repo: Path, engine_python: Path) -> None:
    push = {"repo_id": PUSH_REPO, "endpoint": "http://127.0.0.1:9"}
    completed = run_cli("run", str(repo / "configs/tiny_cpu.yaml"), "--set", f"engine.python={engine_python}",
                        "--set", f"publish.modelscope={json.dumps(push)}", cwd=tmp_path, env=hub_env(tmp_path, None),
                        timeout=300)
    assert completed.returncode != 0
    errors = [line for line in completed.stderr.splitlines() if line.startswith("npu-sft: error:")]
    assert errors == [errors[0]] and errors[0].startswith(
        f"npu-sft: error: publish.modelscope needs a ModelScope token that can write to {PUSH_REPO}: set "
        "MODELSCOPE_API_TOKEN"), completed.stderr[-3000:]
    assert not (tmp_path / ".npu-sft" / "models").exists() and not (tmp_path / ".npu-sft" / "runs").exists()


@pytest.mark.parametrize("fault", ["unknown model id", "sha256 mismatch"])
def test_a_download_the_user_must_fix_ends_as_one_line(tmp_path: Path, repo: Path, engine_python: Path,
                                                         fault: str) -> None:
    with HubStandIn() as hub:
        commit = hub.add_repo(MODEL_ID, {"config.json": b"{}", "model.safetensors": b"\0" * 4096})
        model = {"source": "modelscope", "id": MODEL_ID, "revision": commit, "endpoint": hub.url,
                 "cache_dir": str(tmp_path / "ms_cache"), "retry_backoff_s": 0.01}
        if fault == "unknown model id":
            model["id"] = "npu-sft/no-such-model"
        else:
            hub.corrupt("model.safetensors")
        completed = run_cli("run", str(repo / "configs/tiny_cpu.yaml"), "--set", f"engine.python={engine_python}",
                            "--set", f"model={json.dumps(model)}", cwd=tmp_path, env=hub_env(tmp_path, None),
                            timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "| ERROR" in line or line.startswith("npu-sft: error")]
    assert len(errors) == 1 and errors[0].startswith("npu-sft: error: "), output[-3000:]
    expected = "no model 'npu-sft/no-such-model'" if fault == "unknown model id" else "model.safetensors"
    assert expected in errors[0]
    assert "Traceback" not in output
