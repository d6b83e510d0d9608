"""LLaMA-Factory's OpenAI-compatible API server: the model it serves, started for a `with` block, ready when
`/v1/models` answers, asked one question, stopped on the way out."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from npu_sft.devices import Lease
from npu_sft.engine import EngineSettings, ServedModel, api_server_command, process
from npu_sft.serving.errors import ServeError
from npu_sft.settings import Pipeline, ServeSettings


def served_model(pipeline: Pipeline, name: str, base_model: Path | str, adapter: Path | str) -> ServedModel:
    """The adapter on its base model with the training's chat template, listed as `name`."""
    return ServedModel(name, str(base_model), str(adapter), str(pipeline.llamafactory.get("template", "default")))


def serve_device_env(settings: ServeSettings, lease: Lease) -> dict[str, str]:
    """The server's environment on its leased devices: the lease's visible devices and the backend's own variables."""
    return {**lease.env(), **settings.backend_env(lease.kind)}


def wait_until_ready(server: process.BackgroundProcess, base_url: str, api_key: str, timeout_s: float) -> float:
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"}
    while time.monotonic() - started < timeout_s:
        code = server.exited()
        if code is not None:
            raise ServeError(f"API server exited with code {code} before it answered:\n{server.log_tail()}")
        try:
            if httpx.get(f"{base_url}/v1/models", headers=headers, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise ServeError(f"API server did not answer within {timeout_s:.0f}s:\n{server.log_tail()}")


def chat_once(base_url: str, api_key: str, model: str, prompt: str, max_tokens: int) -> str:
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.01,
        },
        timeout=120,
    )
    if response.status_code != 200:
        raise ServeError(f"chat completion failed: HTTP {response.status_code}: {response.text[:500]}")
    return response.json()["choices"][0]["message"]["content"]


@dataclass(frozen=True)
class ServerSpec:
    """One API server: what it serves, with which engine and settings, on which devices and port, logging where.
    Built once, then handed as it is to the smoke check, the keep-alive loop or a benchmark."""

    engine: EngineSettings
    settings: ServeSettings
    model: ServedModel
    device_env: Mapping[str, str]
    port: int
    log_file: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"


@dataclass(frozen=True)
class RunningServer:
    process: process.BackgroundProcess
    base_url: str
    startup_s: float


@contextmanager
def api_server(spec: ServerSpec, api_key: str) -> Iterator[RunningServer]:
    """LLaMA-Factory's API server, answering at `spec.base_url`, for the `with` block; stopped on the way out."""
    command = api_server_command(
        spec.engine, spec.model, spec.settings, port=spec.port, api_key=api_key, env=spec.device_env
    )
    with process.start_background(command.argv, env=command.env, log_file=spec.log_file) as server:
        startup_s = wait_until_ready(server, spec.base_url, api_key, spec.settings.startup_timeout_s)
        yield RunningServer(server, spec.base_url, startup_s)
