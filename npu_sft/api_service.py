"""LLaMA-Factory's OpenAI-compatible API as a long-running service (the `serve` flow with keep_serving=True).

The smoke test in serving.py starts, checks and stops a server; this keeps one up until the flow run is cancelled
(Prefect's SIGTERM unwinds the `with`, which stops the server's whole process group) or the server dies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from npu_sft.engine import EngineSettings, ServedModel
from npu_sft.ports import port_is_free
from npu_sft.secret_blocks import SecretBlockError, read_secret_block
from npu_sft.serving import ServeError, api_server
from npu_sft.settings import ServeSettings

API_KEY_VAR = "NPU_SFT_API_KEY"  # the key clients send; set in the worker's environment, never in a config file
MIN_API_KEY_LENGTH = 16
HEALTH_INTERVAL_S = 10.0


def load_api_key(settings: ServeSettings, environ: Mapping[str, str]) -> str:
    """The key clients must send: the Prefect Secret block `serve.api_key_secret` names, else the worker's
    NPU_SFT_API_KEY. Never a flow parameter or a config value: those are stored and shown in the UIs."""
    if settings.api_key_secret:
        where = f"the Prefect Secret block {settings.api_key_secret!r} (serve.api_key_secret)"
        try:
            key = read_secret_block(settings.api_key_secret, "serve.api_key_secret")
        except SecretBlockError as err:
            raise ServeError(str(err)) from None
    else:
        where = f"{API_KEY_VAR} in the worker's environment (or name a Prefect Secret block in serve.api_key_secret)"
        key = environ.get(API_KEY_VAR, "")
    if len(key) < MIN_API_KEY_LENGTH:
        raise ServeError(
            f"serving on {settings.host} needs an API key: {where} must hold the key clients will use (at least "
            f"{MIN_API_KEY_LENGTH} characters); LLaMA-Factory's API server accepts anyone without one"
        )
    return key


def check_port_free(host: str, port: int) -> None:
    if not port_is_free(port, host):
        raise ServeError(f"port {port} on {host} is in use; pass another `port`")


def serve_until_stopped(
    engine: EngineSettings,
    settings: ServeSettings,
    model: ServedModel,
    *,
    device_env: Mapping[str, str],
    port: int,
    api_key: str,
    log_file: Path,
    on_ready: Callable[[str], None],
    health_interval_s: float = HEALTH_INTERVAL_S,
) -> None:
    """Serve until interrupted; raises ServeError if the server fails to start or exits on its own."""
    check_port_free(settings.host, port)
    with api_server(
        engine, settings, model, device_env=device_env, port=port, api_key=api_key, log_file=log_file
    ) as running:
        on_ready(running.base_url)
        server = running.process
        while True:
            code = server.exited()
            if code is not None:
                raise ServeError(f"API server exited with code {code}:\n{server.log_tail()}")
            time.sleep(health_interval_s)
