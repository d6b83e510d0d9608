"""The smoke check: serve an adapter on loopback behind a one-time key, check a wrong key is refused and the model is
listed, get one non-empty reply, stop the server."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from npu_sft.devices import lease_devices
from npu_sft.engine import ServedModel
from npu_sft.serving.errors import ServeError
from npu_sft.serving.server import ServerSpec, api_server, chat_once, serve_device_env
from npu_sft.settings import Pipeline


@dataclass(frozen=True)
class SmokeResult:
    reply: str
    model: str
    startup_s: float
    latency_s: float


def smoke_test(spec: ServerSpec) -> SmokeResult:
    """Serve the adapter, check a wrong key is refused and `/v1/models` names it, get one non-empty chat
    completion, stop the server. Raises ServeError when any of that does not happen."""
    settings, model = spec.settings, spec.model
    api_key = secrets.token_urlsafe(24)  # per launch, never logged or stored
    with api_server(spec, api_key) as running:
        base_url = running.base_url
        unauthorized = httpx.get(f"{base_url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=5)
        models = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=5).json()
        listed = [card["id"] for card in models["data"]]
        started = time.monotonic()
        reply = chat_once(base_url, api_key, model.name, settings.prompt, settings.max_tokens)
        latency_s = time.monotonic() - started
    if unauthorized.status_code != 401:
        raise ServeError(f"the API server accepted a wrong API key (HTTP {unauthorized.status_code})")
    if listed != [model.name]:
        raise ServeError(f"the API server lists {listed} at /v1/models, not {model.name!r}")
    if not reply.strip():
        raise ServeError(f"the API server answered {settings.prompt!r} with an empty reply")
    return SmokeResult(reply, model.name, running.startup_s, latency_s)


def smoke_test_on_lease(
    pipeline: Pipeline,
    model: ServedModel,
    *,
    flow_run_id: str | None,
    log_file: Path,
    on_wait: Callable[[str], None],
) -> SmokeResult:
    """The smoke check on the pipeline's serve devices, leased for it; the server listens on the lease's port."""
    settings = pipeline.settings
    with lease_devices(settings.devices, task="serve", flow_run_id=flow_run_id, on_wait=on_wait) as lease:
        return smoke_test(
            ServerSpec(
                settings.engine, settings.serve, model, serve_device_env(settings.serve, lease), lease.master_port,
                log_file,
            )
        )
