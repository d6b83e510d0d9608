"""Serving tasks: a smoke check of the adapter the sft flow just trained (recorded in its run) or of a registered
version (the serve flow; the reply tagged on the version), and a registered version kept up until cancelled."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from npu_sft.devices import lease_devices
from npu_sft.engine import served_name
from npu_sft.publishing import registry
from npu_sft.publishing.registry import RegisteredAdapter
from npu_sft.publishing.versions import Published
from npu_sft.serving import (
    API_KEY_VAR,
    ServerSpec,
    SmokeResult,
    load_api_key,
    serve_device_env,
    serve_until_stopped,
    served_model,
    smoke_test_on_lease,
)
from npu_sft.settings import Pipeline
from npu_sft.tracking import RunContext
from tasks.train import Trained

ENDPOINT_ARTIFACT_KEY = "serve-endpoint"


def _serve_log(pipeline: Pipeline) -> Path:
    return pipeline.state_dir / "serve" / (flow_run.get_id() or "local") / "serve.log"


def _smoke_test(pipeline: Pipeline, name: str, model_path: Path, adapter_dir: Path, log_file: Path) -> SmokeResult:
    """On a serve lease: start the API server on loopback, check a wrong key is refused, ask one question, stop it."""
    model = served_model(pipeline, name, model_path, adapter_dir)
    return smoke_test_on_lease(
        pipeline, model, flow_run_id=flow_run.get_id(), log_file=log_file, on_wait=get_run_logger().info
    )


@task
def smoke_test_trained(
    pipeline: Pipeline, run: RunContext, model_path: Path, trained: Trained, published: Published | None
) -> str:
    """Smoke-check the adapter this run trained, listed as the version it was registered as (or as the run when
    publishing is off); its startup time, latency and reply go into the run."""
    if published is not None:
        name = served_name(published.name, published.version)
    else:
        name = f"{pipeline.settings.name}:run-{run.mlflow_run_id[:8]}"
    result = _smoke_test(pipeline, name, model_path, trained.output_dir, run.logs_dir / "serve.log")
    run.tracker.log_metrics([("serve_startup_s", result.startup_s, 0), ("serve_latency_s", result.latency_s, 0)])
    run.tracker.set_tags({"serve.reply": result.reply[:5000], "serve.model": result.model})
    get_run_logger().info("%s replied: %r", result.model, result.reply)
    return result.reply


@task
def smoke_test_registered(pipeline: Pipeline, model_path: Path, adapter: RegisteredAdapter) -> str:
    """Smoke-check a registered version from the registry's files; its reply is tagged on the version."""
    name = served_name(adapter.name, adapter.version)
    result = _smoke_test(pipeline, name, model_path, adapter.path, _serve_log(pipeline))
    registry.tag_version(pipeline.settings.mlflow, adapter.name, adapter.version, "npu_sft.smoke_reply", result.reply)
    get_run_logger().info("%s answered in %.1f s: %r", result.model, result.latency_s, result.reply)
    return result.reply


@task
def serve_until_cancelled(pipeline: Pipeline, model_path: Path, adapter: RegisteredAdapter, port: int) -> None:
    """Keep the API server up on the serve devices until the flow run is cancelled. While it answers, its URL and
    model are a Prefect link artifact and `serving.*` tags of the model version; the version says `stopped` after."""
    logger = get_run_logger()
    settings = pipeline.settings
    api_key = load_api_key(settings.serve, os.environ)
    secret = settings.serve.api_key_secret
    key_source = f"in the Prefect Secret block {secret!r}" if secret else f"the worker has in {API_KEY_VAR}"
    model = served_model(pipeline, served_name(adapter.name, adapter.version), model_path, adapter.path)
    announced: list[str] = []

    def announce(base_url: str) -> None:
        url = f"{_reachable(base_url, settings.serve.host)}/v1"
        # Noted first: a stop that comes while the registry or Prefect is being told must still mark it stopped.
        announced.append(url)
        logger.info("serving %s at %s (OpenAI API; cancel the flow run to stop)", model.name, url)
        registry.mark_serving(settings.mlflow, adapter.name, adapter.version, url=url, model=model.name,
                              flow_run=str(flow_run.get_id()))
        create_link_artifact(url, link_text=f"{model.name} (OpenAI API)", key=ENDPOINT_ARTIFACT_KEY,
                             description=f"`{adapter.uri}` on `{model_path.name}`; clients send the key {key_source}")

    with lease_devices(settings.devices, task="serve", flow_run_id=flow_run.get_id(), on_wait=logger.info) as lease:
        try:
            spec = ServerSpec(
                settings.engine, settings.serve, model, serve_device_env(settings.serve, lease), port,
                _serve_log(pipeline),
            )
            serve_until_stopped(spec, api_key=api_key, on_ready=announce)
        finally:  # also when the run is cancelled: Prefect's SIGTERM unwinds this frame
            if announced:
                registry.mark_stopped(settings.mlflow, adapter.name, adapter.version)
                create_markdown_artifact(f"{model.name} at {announced[0]}: stopped", key=ENDPOINT_ARTIFACT_KEY)


def _reachable(base_url: str, host: str) -> str:
    """The URL a client on another host uses: a wildcard bind is reached through this host's name."""
    if host == "0.0.0.0":
        return base_url.replace("//0.0.0.0:", f"//{socket.getfqdn()}:", 1)
    return base_url
