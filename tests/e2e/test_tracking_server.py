"""Training through a real MLflow tracking server that goes away mid-training and comes back: the flow goes on,
and the run ends FINISHED with every logged step once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from npu_sft.ports import unused_port
from tests.e2e.test_training_recovery import (
    PLANNED_STEPS,
    SHORT_RUN,
    last_logged_step,
    run_sft_cli,
    with_cached_model,
)
from tests.e2e.test_training_recovery import tiny_models  # noqa: F401  (a session fixture: one tiny model for all)

pytestmark = pytest.mark.e2e

OUTAGE_S = 15.0


@dataclass
class TrackingServer:
    """`mlflow server` on loopback over a SQLite store, as `make up` runs it; stop() and start() again on one port."""

    store: Path
    artifacts: Path
    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        argv = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.store}", "--default-artifact-root",
                str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError("mlflow server did not answer /health in 120 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # as a crash or a host restart ends it: no goodbye
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TrackingServer]:
    tracking = TrackingServer(tmp_path / "server" / "mlflow.db", tmp_path / "server" / "artifacts", unused_port(),
                              tmp_path / "server.log")
    tracking.store.parent.mkdir(parents=True)
    tracking.start()
    yield tracking
    tracking.stop()


def test_a_tracking_server_restarted_mid_training_loses_no_step(
    tmp_path: Path, engine_python: Path, tiny_models: Path, server: TrackingServer  # noqa: F811
) -> None:
    project = with_cached_model(tmp_path / "project", tiny_models)
    runs = project / ".npu-sft" / "runs"
    outage: dict[str, float] = {}

    def take_the_server_away() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if any(last_logged_step(log) >= 10 for log in runs.glob("*/output/trainer_log.jsonl")):
                server.stop()
                outage["stopped_at_step"] = max(last_logged_step(log) for log in runs.glob("*/output/trainer_log.jsonl"))
                time.sleep(OUTAGE_S)
                outage["steps_during"] = max(last_logged_step(log) for log in runs.glob("*/output/trainer_log.jsonl"))
                server.start()
                return
            time.sleep(0.05)

    chaos = threading.Thread(target=take_the_server_away, daemon=True)
    chaos.start()
    completed = run_sft_cli(project, engine_python, [*SHORT_RUN, f"mlflow.tracking_uri={server.url}",
                                                     "training.retry_delay_s=1"])
    chaos.join(timeout=180)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert outage.get("stopped_at_step"), "training ended before the server was stopped"
    assert outage["steps_during"] > outage["stopped_at_step"]  # training went on while the server was away

    client = MlflowClient(server.url, registry_uri=server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/attempts"] == 1  # the outage cost the training nothing
    steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(2, PLANNED_STEPS, 2))
    (version,) = client.search_model_versions("name='tiny-qwen2-lora'")
    assert version.run_id == run.info.run_id
