"""The demo flow, for real: tiny model generation, torchrun with 2 gloo ranks, MLflow, the registry, the API server."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from npu_sft.devices import DeviceSettings, current_leases, lease_history
from npu_sft.engine import EngineSettings, ServedModel
from npu_sft.serving import ServerSpec, api_server
from npu_sft.settings import ServeSettings
from npu_sft.tracking.summary import mlflow_experiment_url, mlflow_run_url
from tests.fakes.devices import FAKE_BIN

pytestmark = pytest.mark.e2e


# A hub token in the LLaMA-Factory config (the engine gets it, for a local model it is unused) and one in the
# environment: neither may reach a param, tag, artifact, log file or the console.
CONFIG_SECRET = "hf_" + secrets.token_hex(12)
ENV_SECRET = "ms-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, repo: Path, engine_python: Path) -> dict:
    project = tmp_path_factory.mktemp("demo-project")
    completed = run_cli(project, "demo", "--set", f"engine.python={engine_python}",
                        "--set", f"devices.state_dir={project / 'leases'}",
                        "--set", f"llamafactory.overrides.hf_hub_token={CONFIG_SECRET}",
                        env={"MODELSCOPE_API_TOKEN": ENV_SECRET})
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    uri = f"sqlite:///{project}/mlruns/mlflow.db"
    return {"project": project, "stdout": completed.stdout + completed.stderr,
            "client": MlflowClient(uri, registry_uri=uri), "uri": uri}


def run_cli(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect"), **(env or {})}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "npu_sft.cli", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )


def live_leases(state_dir: Path) -> list:
    return current_leases(DeviceSettings(kind="cpu", state_dir=state_dir))


def test_demo_prints_where_to_look(demo_run: dict) -> None:
    out = demo_run["stdout"]
    assert "MLflow run" in out and "registered model" in out and "served reply" in out


def test_mlflow_holds_a_finished_run_with_falling_loss(demo_run: dict) -> None:
    client: MlflowClient = demo_run["client"]
    experiment = client.get_experiment_by_name("sft-tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert math.isfinite(run.data.metrics["eval_loss"])
    assert run.data.metrics["perplexity"] == pytest.approx(math.exp(run.data.metrics["eval_loss"]), rel=1e-6)
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert len(history) >= 5
    assert history[-1].value < history[0].value
    assert run.data.params["lora_target"] == "all" and run.data.params["template"] == "qwen"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots", "logs"} <= artifacts
    assert run.data.tags["serve.reply"].strip()
    assert "NPU-SFT Tiny" in run.data.tags["serve.reply"]  # asked "Who are you?", it answers from the identity set
    assert run.data.tags["serve.model"] == "tiny-qwen2-lora:v1"  # what /v1/models listed: the registered version


def test_registered_version_holds_the_adapter(demo_run: dict, tmp_path: Path) -> None:
    client: MlflowClient = demo_run["client"]
    versions = client.search_model_versions("name='tiny-qwen2-lora'")
    assert len(versions) == 1
    # The first adapter beats the base model and has no champion to beat: the gate promotes it.
    aliases = client.get_registered_model("tiny-qwen2-lora").aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {"candidate": "1", "champion": "1"}
    assert versions[0].tags["gate.verdict"] == "champion"
    assert "tiny-qwen2-lora version 1 (champion)" in demo_run["stdout"]
    assert "publish gate" in demo_run["stdout"]  # the reason, wrapped in the summary table
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    assert run.data.tags["publish/gate_reason"].endswith("no champion yet: promoted to champion")
    mlflow.set_tracking_uri(demo_run["uri"])
    mlflow.set_registry_uri(demo_run["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-qwen2-lora/{versions[0].version}", dst_path=str(tmp_path)))
    names = {p.name for p in local.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"} <= names
    # The version is the run's logged model, which carries what it was trained from and its scores.
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert model.model_id == versions[0].tags["model_id"]
    assert {"base_model": "tiny (seed 0)", "template": "qwen", "dataset.key": run.data.tags["data.key"]}.items() <= (
        model.tags.items())
    scores = {metric.key: metric.value for metric in model.metrics}
    assert scores["eval/rouge_l"] == run.data.metrics["eval/rouge_l"] and "gain/rouge_l" in scores
    assert "LoRA adapter for tiny (seed 0)" in versions[0].description


def test_run_directory_is_the_runs_own(demo_run: dict) -> None:
    run_dirs = list((demo_run["project"] / ".npu-sft" / "runs").iterdir())
    assert len(run_dirs) == 1
    output = run_dirs[0] / "output"
    assert (output / "adapter_model.safetensors").is_file()
    assert (output / "trainer_log.jsonl").is_file()


def test_an_uninterrupted_training_reports_transformers_own_figures(demo_run: dict) -> None:
    client: MlflowClient = demo_run["client"]
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    engine = json.loads((demo_run["project"] / ".npu-sft" / "runs" / run.info.run_id / "output" / "train_results.json").read_text())
    metrics = run.data.metrics
    assert metrics["train/attempts"] == 1 and metrics["train/steps_run"] == metrics["train/steps"]
    assert metrics["train_loss"] == pytest.approx(engine["train_loss"], rel=1e-6)
    assert metrics["train_runtime"] == pytest.approx(engine["train_runtime"], rel=1e-6)
    assert metrics["train_samples_per_second"] == pytest.approx(engine["train_samples_per_second"], rel=1e-3)
    assert f"{metrics['train_loss']:.4f}" in demo_run["stdout"]  # the summary table shows the same figure


def test_mlflow_run_reads_as_a_training_run(demo_run: dict, repo: Path) -> None:
    """What MLflow's UI shows: the experiment opens as machine learning (runs table and charts), the runs table's
    Source, User and Dataset columns are filled, and the pipeline's settings sit beside the engine's params."""
    client: MlflowClient = demo_run["client"]
    experiment = client.get_experiment_by_name("sft-tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.search_runs([experiment.experiment_id])[0]
    tags, params = run.data.tags, run.data.params
    assert tags["mlflow.source.name"] == "flows/sft.py" and tags["mlflow.source.type"] == "LOCAL"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["npu_sft.git.dirty"] in {"true", "false"} and tags["mlflow.user"] and tags["npu_sft.host"]
    assert params["pipeline.devices.train"] == "2" and params["pipeline.training.world_size"] == "2"
    assert params["pipeline.model.source"] == "tiny" and params["pipeline.training.deepspeed_stage"] == "none"
    inputs = {item.tags[0].value: item.dataset for item in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "eval"}
    assert inputs["train"].name == "identity,tiny_alpaca"
    assert json.loads(inputs["eval"].profile)["num_rows"] == run.data.metrics["data.eval_rows"]


@pytest.fixture(scope="module")
def mlflow_ui(demo_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLflow's own UI server over the demo's store, as a user starts it (`mlflow ui --backend-store-uri ...`)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("mlflow-ui") / "ui.log"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with log.open("w") as out:
        server = subprocess.Popen([str(mlflow_cli), "ui", "--backend-store-uri", demo_run["uri"], "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{url}/health"):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_mlflow_ui_opens_the_experiment_on_its_runs_table(demo_run: dict, mlflow_ui: str) -> None:
    """In a real headless browser where the host has Chromium: the page the CLI and Prefect link to shows MLflow's
    runs table (not its GenAI overview) with the run's dataset and source. Without a browser, the REST API must
    hold the facts the page is drawn from."""
    client: MlflowClient = demo_run["client"]
    experiment = client.get_experiment_by_name("sft-tiny")
    run = client.search_runs([experiment.experiment_id])[0]
    page = mlflow_experiment_url(mlflow_ui, experiment.experiment_id)
    assert f"then open {mlflow_run_url('http://127.0.0.1:5000', experiment.experiment_id, run.info.run_id)}\n" in (
        demo_run["stdout"])  # one line, whatever the terminal's width: a link that can be clicked
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        found = httpx.post(f"{mlflow_ui}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment.experiment_id]},
                           timeout=30).json()["runs"][0]
        assert {"key": "mlflow.source.name", "value": "flows/sft.py"} in found["data"]["tags"]
        assert found["inputs"]["dataset_inputs"][0]["dataset"]["name"] == "identity,tiny_alpaca"
        return
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
         "--virtual-time-budget=20000", "--dump-dom", page],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert ">Runs<" in dom and "Detect Issues" not in dom  # the model-training view, not the GenAI overview
    assert run.info.run_name in dom
    assert "identity,tiny_alpaca (" in dom  # the Dataset column: name (digest)
    assert ">sft.py<" in dom  # the Source column


def test_no_secret_reaches_mlflow_the_logs_or_the_console(demo_run: dict, tmp_path: Path) -> None:
    client: MlflowClient = demo_run["client"]
    run = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])[0]
    recorded = json.dumps([run.data.params, run.data.tags])
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    files = [path for path in artifacts.rglob("*") if path.is_file()]
    files += [path for path in (demo_run["project"] / ".npu-sft" / "runs").rglob("*.log")]
    assert any(path.name == "train.log" for path in files)  # the engine's own log was looked at
    for secret in (CONFIG_SECRET, ENV_SECRET):
        assert secret not in recorded and secret not in demo_run["stdout"]
        assert not [path for path in files if secret.encode() in path.read_bytes()]
    recorded_config = yaml.safe_load((artifacts / "config" / "llamafactory.yaml").read_text())
    assert "hf_hub_token" not in recorded_config and recorded_config["lora_target"] == "all"


def test_mlflow_run_holds_the_dataset_statistics(demo_run: dict) -> None:
    client: MlflowClient = demo_run["client"]
    run = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])[0]
    metrics = run.data.metrics
    assert metrics["data.identity.valid_rows"] > 0 and metrics["data.tiny_alpaca.valid_rows"] > 0
    assert metrics["data.train_rows"] + metrics["data.eval_rows"] == metrics["data.valid_rows"] - metrics["data.duplicate_rows"]
    assert metrics["data.eval_rows"] == math.ceil(0.1 * metrics["data.valid_rows"])  # val_size 0.1, rounded up like HF
    assert 0 < metrics["data.tokens_p50"] <= metrics["data.tokens_max"]
    assert "datasets" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_train_and_serve_leases_are_released(demo_run: dict) -> None:
    assert live_leases(demo_run["project"] / "leases") == []


def test_evaluation_holds_its_own_lease_taken_after_the_training_gave_its_back(demo_run: dict) -> None:
    history = lease_history(DeviceSettings(kind="cpu", state_dir=demo_run["project"] / "leases"))
    # The demo trains on both CPU devices and evaluates on one (devices.train: 2, devices.eval: 1).
    steps = [(event.event, event.record.task, len(event.record.ids)) for event in history]
    assert steps[:4] == [("acquired", "train", 2), ("released", "train", 2), ("acquired", "eval", 1), ("released", "eval", 1)]


def test_failed_training_releases_its_devices_and_fails_the_mlflow_run(tmp_path: Path, engine_python: Path) -> None:
    # LLaMA-Factory's parser accepts any lora_target name; peft refuses it when the model loads, inside torchrun.
    completed = run_cli(
        tmp_path, "demo", "--set", f"engine.python={engine_python}", "--set", f"devices.state_dir={tmp_path / 'leases'}",
        "--set", "llamafactory.overrides.lora_target=no_such_proj", "--set", "mlflow.experiment=sft-broken",
    )
    assert completed.returncode != 0
    assert "training failed" in completed.stdout + completed.stderr
    assert live_leases(tmp_path / "leases") == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sft-broken").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
    assert "training failed" in runs[0].data.tags["npu_sft.end_reason"]  # why, in the runs table's tag column


def test_a_diverged_loss_stops_the_run_after_the_configured_steps_attempted_once(tmp_path: Path,
                                                                                 engine_python: Path) -> None:
    # An infinite learning rate turns every LoRA weight NaN after the first step; from then on LLaMA-Factory logs
    # loss 0 with grad_norm nan, step after step, as 910B runs with a broken kernel or dtype do (LLaMA-Factory #3344).
    completed = run_cli(
        tmp_path, "demo", "--set", f"engine.python={engine_python}", "--set", f"devices.state_dir={tmp_path / 'leases'}",
        "--set", "llamafactory.overrides.learning_rate=.inf", "--set", "training.guards.diverged_steps=4",
        "--set", "mlflow.experiment=sft-diverged",
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1
    verdict = ("training failed after 1 attempt(s) (not retryable): diverged and was stopped: loss 0 at logged steps "
               "4, 6, 8, 10 (4 in a row, from step 4)")
    assert f"npu-sft: error: {verdict}" in output
    assert "training attempt 2/" not in output  # attempted once
    assert live_leases(tmp_path / "leases") == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("sft-diverged").experiment_id])
    assert run.info.status == "FAILED"
    assert verdict in run.data.tags["npu_sft.end_reason"]
    # The loss curve in MLflow shows the collapse that stopped it.
    assert [metric.value for metric in client.get_metric_history(run.info.run_id, "loss")][1:4] == [0.0, 0.0, 0.0]


def test_ranks_on_the_cpu_under_an_npu_lease_stop_the_run_in_seconds_naming_the_rank(tmp_path: Path,
                                                                                     engine_python: Path) -> None:
    # An Ascend host as npu-smi shows it (the seeds' 8 x 910B3, idle), and an engine env without torch-npu: the case
    # of LLaMA-Factory #4159 / #6461, where training goes on for days on the CPU while the NPUs idle.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "npu-smi").symlink_to(FAKE_BIN / "npu-smi")
    completed = run_cli(
        tmp_path, "demo", "--set", f"engine.python={engine_python}", "--set", f"devices.state_dir={tmp_path / 'leases'}",
        "--set", "devices.kind=npu", "--set", "mlflow.experiment=sft-wrong-device",
        # The device probe before training would stop this run first (next test): here the guard inside the run is
        # what is tested, for ranks that end up on the CPU although torch_npu answered the probe.
        "--set", "training.guards.probe_devices=false",
        env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "FAKE_NPU_SMI_FIXTURE": "8x910B3_idle"},
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1
    assert re.search(r"npu-sft: error: training failed after 1 attempt\(s\) \(not retryable\): ran on the wrong device "
                     r"and was stopped: rank [01] runs on cpu while its lease holds npu devices: torch-npu is not "
                     r"imported or CANN is not sourced in the engine env", output), output[-3000:]
    assert "training attempt 2/" not in output
    assert live_leases(tmp_path / "leases") == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("sft-wrong-device").experiment_id])
    assert run.info.status == "FAILED" and "ran on the wrong device" in run.data.tags["npu_sft.end_reason"]
    assert "loss" not in run.data.metrics  # stopped before the first step


def test_an_npu_lease_torch_cannot_use_stops_the_run_before_training(tmp_path: Path, engine_python: Path) -> None:
    # The seeds' 8 x 910B3 and an engine env without torch-npu (LLaMA-Factory #4159 / #6461, where training goes on
    # for days on the CPU): the lease's device probe stops the run before torchrun starts, saying what to install.
    # (A card without kernels is the unit tests' case: a torch_npu stand-in on the engine's path would also be
    # imported by transformers in the ranks.)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "npu-smi").symlink_to(FAKE_BIN / "npu-smi")
    completed = run_cli(
        tmp_path, "demo", "--set", f"engine.python={engine_python}", "--set", f"devices.state_dir={tmp_path / 'leases'}",
        "--set", "devices.kind=npu", "--set", "mlflow.experiment=sft-no-torch-npu",
        env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "FAKE_NPU_SMI_FIXTURE": "8x910B3_idle"},
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2, output[-3000:]
    assert re.search(r"npu-sft: error: the npu lease \(\d,\d\) cannot train: engine: import torch_npu: "
                     r"ModuleNotFoundError: No module named 'torch_npu' \(fix: the engine env has no torch-npu: "
                     r"scripts/setup-envs on this host installs it", output), output[-3000:]
    assert "training attempt 1/" not in output  # no torchrun started
    assert live_leases(tmp_path / "leases") == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("sft-no-torch-npu").experiment_id])
    assert run.info.status == "FAILED" and "No module named 'torch_npu'" in run.data.tags["npu_sft.end_reason"]


def test_evaluation_scores_the_adapter_against_the_base_model(demo_run: dict) -> None:
    client: MlflowClient = demo_run["client"]
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    metrics = run.data.metrics
    for name in ("bleu_4", "rouge_1", "rouge_2", "rouge_l"):
        assert {f"eval/{name}", f"base/{name}", f"gain/{name}"} <= set(metrics), name
        assert metrics[f"gain/{name}"] == pytest.approx(metrics[f"eval/{name}"] - metrics[f"base/{name}"])
    # The tiny base model knows no name; the adapter learned the identity set.
    assert metrics["eval/rouge_l"] > metrics["base/rouge_l"]
    # The scores are LLaMA-Factory's own, from its predict_results.json.
    engine = json.loads((demo_run["project"] / ".npu-sft" / "runs" / run.info.run_id / "eval" / "adapter" / "predict_results.json").read_text())
    assert metrics["eval/rouge_l"] == pytest.approx(engine["predict_rouge-l"])
    assert run.data.tags["eval/baseline"] == "computed"
    assert run.data.tags["eval/devices"].startswith("cpu:")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/adapter", "eval/base", "eval/samples.json"} <= artifacts
    samples = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/samples.json")).read_text())
    assert samples["columns"] == ["prompt", "reference", "base answer", "adapter answer"]
    assert len(samples["data"]) == 8
    assert "ROUGE-L adapter / base / gain" in demo_run["stdout"]


def test_evaluating_the_champion_from_the_registry_generates_what_the_run_output_did(
    demo_run: dict, repo: Path, engine_python: Path, tmp_path: Path
) -> None:
    client: MlflowClient = demo_run["client"]
    (before,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    # Another host: its own project directory (no run directories, models or baselines), the demo's MLflow store.
    other_host = tmp_path / "other-host"
    other_host.mkdir()
    completed = run_cli(
        other_host, "evaluate", str(repo / "configs" / "tiny_cpu.yaml"), "--version", "champion",
        "--set", f"engine.python={engine_python}", "--set", f"devices.state_dir={demo_run['project'] / 'leases'}",
        "--set", f"mlflow.tracking_uri={demo_run['uri']}",
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    after = client.get_run(before.info.run_id)
    # The registry's files, loaded into the engine with the base model, answer exactly as the adapter in the run's
    # output directory did (greedy decoding): models:/tiny-qwen2-lora@champion is the trained adapter, and the
    # run's record (engine config, eval split, results) is all the other host needed.
    trained_here = demo_run["project"] / ".npu-sft" / "runs" / before.info.run_id
    evaluated_there = other_host / ".npu-sft" / "runs" / before.info.run_id
    from_registry = evaluated_there / "eval-v1" / "adapter"
    assert (trained_here / "eval" / "adapter" / "generated_predictions.jsonl").read_bytes() == (
        from_registry / "generated_predictions.jsonl"
    ).read_bytes()
    predict_config = yaml.safe_load((from_registry / "npu_sft_predict.yaml").read_text())
    assert predict_config["adapter_name_or_path"] == str(other_host / ".npu-sft" / "registry" / "tiny-qwen2-lora-v1")
    assert predict_config["model_name_or_path"].startswith(str(other_host / ".npu-sft" / "models"))
    assert predict_config["dataset_dir"] == str(evaluated_there / "recorded" / "datasets")
    for name in ("bleu_4", "rouge_1", "rouge_2", "rouge_l"):
        assert after.data.metrics[f"eval/{name}"] == before.data.metrics[f"eval/{name}"], name
        assert after.data.metrics[f"base/{name}"] == before.data.metrics[f"base/{name}"], name
    assert after.data.metrics["eval_loss"] == before.data.metrics["eval_loss"]  # the training's, from the record
    assert before.data.tags["eval/adapter_source"] == "run output"
    assert after.data.tags["eval/adapter_source"] == "models:/tiny-qwen2-lora/1"
    assert after.data.tags["eval/baseline"] == "computed"  # the other host has no scores of the base model yet
    assert after.info.status == "FINISHED"  # the run keeps the status the pipeline gave it
    assert "registry: tiny-qwen2-lora v1 (champion)" in completed.stdout


def test_a_base_model_score_is_reused_by_the_next_evaluation_on_the_host(demo_run: dict, repo: Path,
                                                                         engine_python: Path) -> None:
    client: MlflowClient = demo_run["client"]
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    completed = run_cli(
        demo_run["project"], "evaluate", str(repo / "configs" / "tiny_cpu.yaml"), "--run", run.info.run_id,
        "--set", f"engine.python={engine_python}", "--set", f"devices.state_dir={demo_run['project'] / 'leases'}",
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert client.get_run(run.info.run_id).data.tags["eval/baseline"] == "reused"
    eval_log = (demo_run["project"] / ".npu-sft" / "runs" / run.info.run_id / "logs" / "eval.log").read_text()
    # Both evaluations scored the adapter; only the first started an engine process for the base model.
    assert eval_log.count("===== npu-sft: scoring the adapter") == 2
    assert eval_log.count("===== npu-sft: scoring the base model") == 1
    assert "reused" in completed.stdout


def test_evaluate_refuses_an_unknown_run_in_one_line(demo_run: dict, repo: Path, engine_python: Path) -> None:
    completed = run_cli(
        demo_run["project"], "evaluate", str(repo / "configs" / "tiny_cpu.yaml"), "--run", "0" * 32,
        "--set", f"engine.python={engine_python}",
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"npu-sft: error: --run {'0' * 32}: no such MLflow run in sqlite:///{demo_run['project']}/mlruns/mlflow.db"
    ]


# A stand-in for `docker exec` as docker documents it: the command runs with the container's own environment plus
# each `-e` variable; `-e NAME` without a value takes NAME's value from docker's environment (the caller's).
FAKE_DOCKER = """#!/usr/bin/env bash
[ "$1" = exec ] || { echo "fake docker: only exec" >&2; exit 125; }
shift
passed=()
while [ $# -gt 0 ]; do
  case "$1" in
    -e) if [[ "$2" == *=* ]]; then passed+=("$2"); else passed+=("$2=${!2}"); fi; shift 2;;
    -i) shift;;
    -*) echo "fake docker: unsupported option $1" >&2; exit 125;;
    *) break;;
  esac
done
shift  # the container
exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$HOME" "${passed[@]}" "$@"
"""


def test_an_engine_behind_docker_exec_gets_the_api_key_in_no_command_line(
    demo_run: dict, engine_python: Path, tmp_path: Path
) -> None:
    docker = tmp_path / "bin" / "docker"
    docker.parent.mkdir()
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    client: MlflowClient = demo_run["client"]
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    run_dir = demo_run["project"] / ".npu-sft" / "runs" / run.info.run_id
    trained = yaml.safe_load((run_dir / "llamafactory.yaml").read_text())
    model = ServedModel("tiny-qwen2-lora:v1", trained["model_name_or_path"], str(run_dir / "output"), "qwen")
    engine = EngineSettings(python=str(engine_python), command_prefix=[str(docker), "exec", "-i", "llamafactory"])
    key = secrets.token_urlsafe(24)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_file = tmp_path / "serve.log"
    with api_server(ServerSpec(engine, ServeSettings(), model, {}, port, log_file), key) as running:
        command_lines = _command_lines()
        served = [card["id"] for card in httpx.get(
            f"{running.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5
        ).json()["data"]]
        wrong = httpx.get(f"{running.base_url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert served == ["tiny-qwen2-lora:v1"]  # the key reached the server inside the "container"...
    assert wrong.status_code == 401  # ...and guards it
    assert any(b"llamafactory.cli\0api" in line for line in command_lines)  # the scan saw the server itself
    assert not [line for line in command_lines if key.encode() in line]
    assert key not in log_file.read_text()


def _command_lines() -> list[bytes]:
    """Every process's argv on this host, as `ps` shows them to anyone."""
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes())
        except OSError:  # the process ended during the scan
            continue
    return lines


def test_compare_ranks_a_second_run_with_another_learning_rate(demo_run: dict, repo: Path, engine_python: Path) -> None:
    """Last in this module: it adds a run to the demo's experiment. A learning rate too small to learn anything
    leaves the adapter near the base model, so the demo's own run ranks first."""
    project = demo_run["project"]
    second = run_cli(project, "run", str(repo / "configs" / "tiny_cpu.yaml"), "--set", f"engine.python={engine_python}",
                     "--set", f"devices.state_dir={project / 'leases'}", "--set", "serve.enabled=false",
                     "--set", "llamafactory.overrides.learning_rate=1.0e-9")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    env_overrides = {"MLFLOW_TRACKING_URI": demo_run["uri"], "COLUMNS": "80"}
    table = run_cli(project, "compare", "sft-tiny", env=env_overrides)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), table.stdout
    assert "best first by eval/rouge_l" in lines[0]
    (learning_rate,) = [line.split() for line in lines if line.startswith("learning_rate")]
    assert learning_rate == ["learning_rate", "0.005", "1e-09"]  # the better run first
    records = json.loads(run_cli(project, "compare", "sft-tiny", "--format", "json", env=env_overrides).stdout)
    assert [record["params"]["learning_rate"] for record in records] == ["0.005", "1e-09"]
    assert records[0]["metrics"]["eval/rouge_l"] > records[1]["metrics"]["eval/rouge_l"]
