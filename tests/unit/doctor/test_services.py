"""`npu-sft doctor` on the services a run reports to: Prefect's API as Prefect's own settings name it, and the
config's MLflow store (a server's /health, or a local store's directory)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

from npu_sft.doctor.services import check_mlflow, check_prefect
from npu_sft.ports import unused_port
from npu_sft.settings import load_pipeline

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny_cpu.yaml"


class Health(BaseHTTPRequestHandler):
    """What Prefect's and MLflow's servers answer on /health."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def healthy_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_prefect_without_a_server_uses_the_temporary_one_unless_it_is_disabled() -> None:
    with temporary_settings(updates={PREFECT_API_URL: None}):
        finding = check_prefect()
        assert finding.status == "ok" and "starts Prefect's temporary one" in finding.detail
    with temporary_settings(updates={PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_ENABLED: False}):
        finding = check_prefect()
        assert finding.status == "error" and "PREFECT_SERVER_EPHEMERAL_ENABLED=false" in finding.detail


def test_prefect_s_configured_server_must_answer(healthy_server: str) -> None:
    with temporary_settings(updates={PREFECT_API_URL: f"{healthy_server}/api"}):
        assert check_prefect().status == "error"  # /api/health is not served by this double: HTTP 404
    with temporary_settings(updates={PREFECT_API_URL: healthy_server}):
        assert check_prefect().status == "ok"
    silent = f"http://127.0.0.1:{unused_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: silent}):
        finding = check_prefect()
        assert finding.status == "error" and finding.detail.startswith(f"PREFECT_API_URL={silent} does not answer (")
        assert "make up" in finding.fix


def test_an_mlflow_server_must_answer_and_its_credentials_stay_hidden(healthy_server: str) -> None:
    answering = load_pipeline(TINY, [f"mlflow.tracking_uri={healthy_server}"])
    assert check_mlflow(answering, {}).status == "ok"
    port = unused_port()
    silent = load_pipeline(TINY, [f"mlflow.tracking_uri=http://alice:s3cret@127.0.0.1:{port}"])
    finding = check_mlflow(silent, {})
    assert finding.status == "error" and f"http://***@127.0.0.1:{port} does not answer" in finding.detail
    assert "s3cret" not in finding.detail and "mlflow.tracking_uri" in finding.fix


def test_a_local_store_is_checked_where_it_would_be_written(tmp_path: Path) -> None:
    local = load_pipeline(TINY, [f"mlflow.tracking_uri=sqlite:///{tmp_path}/new/mlflow.db"])
    assert check_mlflow(local, {}).status == "ok"
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    finding = check_mlflow(load_pipeline(TINY, [f"mlflow.tracking_uri=sqlite:///{blocked}/runs/mlflow.db"]), {})
    assert finding.status == "error" and f"{blocked}/runs can not be written" in finding.detail


def test_a_store_it_can_not_reach_from_here_is_said_to_be_unchecked() -> None:
    pipeline = load_pipeline(TINY, ["mlflow.tracking_uri=postgresql://mlflow:pw@db.internal/mlflow"])
    finding = check_mlflow(pipeline, {})
    assert finding.status == "warning" and "not checked" in finding.detail and "pw" not in finding.detail

