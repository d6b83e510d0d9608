"""LLaMA-Factory's OpenAI-compatible API as a long-running service (the `serve` flow with keep_serving=True).

The smoke check (smoke.py) starts, checks and stops a server; this keeps one up until the flow run is cancelled
(Prefect's SIGTERM unwinds the `with`, which stops the server's whole process group) or the server dies.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from npu_sft.ports import port_is_free
from npu_sft.serving.errors import ServeError
from npu_sft.serving.server import ServerSpec, api_server

HEALTH_INTERVAL_S = 10.0


def check_port_free(host: str, port: int) -> None:
    if not port_is_free(port, host):
        raise ServeError(f"port {port} on {host} is in use; pass another `port`")


def serve_until_stopped(
    spec: ServerSpec,
    *,
    api_key: str,
    on_ready: Callable[[str], None],
    health_interval_s: float = HEALTH_INTERVAL_S,
) -> None:
    """Serve until interrupted; raises ServeError if the server fails to start or exits on its own."""
    check_port_free(spec.settings.host, spec.port)
    with api_server(spec, api_key) as running:
        on_ready(running.base_url)
        server = running.process
        while True:
            code = server.exited()
            if code is not None:
                raise ServeError(f"API server exited with code {code}:\n{server.log_tail()}")
            time.sleep(health_interval_s)
