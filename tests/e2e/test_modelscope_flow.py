"""The sft flow with its model and one dataset from ModelScope: the real client, a local stand-in of the hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from npu_sft.datasets.builtin import tiny_alpaca_rows
from npu_sft.engine import EngineSettings
from npu_sft.tiny_model import ensure_tiny_model
from tests.hub_standin import HubStandIn

pytestmark = pytest.mark.e2e

MODEL_ID = "npu-sft/tiny-qwen2"
DATASET_ID = "npu-sft/tiny-alpaca"


def test_flow_trains_on_a_model_and_dataset_downloaded_from_modelscope(
    tmp_path: Path, repo: Path, engine_python: Path
) -> None:
    model_dir = ensure_tiny_model(EngineSettings(python=str(engine_python)), tmp_path / "generated")
    model_files = {path.name: path.read_bytes() for path in model_dir.iterdir() if path.is_file()}
    rows = "\n".join(json.dumps(row) for row in tiny_alpaca_rows()).encode()
    with HubStandIn() as hub:
        model_commit = hub.add_repo(MODEL_ID, model_files)
        hub.add_repo(DATASET_ID, {"train.jsonl": rows}, repo_type="dataset")
        model = {"source": "modelscope", "id": MODEL_ID, "revision": model_commit, "endpoint": hub.url,
                 "cache_dir": str(tmp_path / "ms_cache"), "retry_backoff_s": 0.01}
        datasets = [{"name": "identity", "source": "builtin"},
                    {"name": "tiny_alpaca", "source": "modelscope", "repo_id": DATASET_ID}]
        completed = subprocess.run(
            [sys.executable, "-m", "npu_sft.cli", "run", str(repo / "configs/tiny_cpu.yaml"),
             "--set", f"engine.python={engine_python}", "--set", f"model={json.dumps(model)}",
             "--set", f"data.datasets={json.dumps(datasets)}", "--set", "serve.enabled=false",
             "--set", "llamafactory.overrides.num_train_epochs=1", "--set", "mlflow.experiment=sft-hub"],
            cwd=tmp_path, env={**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect")},
            capture_output=True, text=True, timeout=900,
        )
        assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
        assert hub.file_requests("model.safetensors"), "the weights came from the hub stand-in"
        assert hub.file_requests("train.jsonl")

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("sft-hub").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["model.id"] == MODEL_ID
    assert run.data.tags["model.resolved_revision"] == model_commit
    manifest_dir = client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts"))
    manifest = json.loads(next(Path(manifest_dir).rglob("model_manifest.json")).read_text())
    files = {entry["path"] for entry in manifest["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert run.data.metrics["data.tiny_alpaca.valid_rows"] == len(tiny_alpaca_rows())
    assert run.data.tags["dataset.tiny_alpaca.id"] == DATASET_ID
