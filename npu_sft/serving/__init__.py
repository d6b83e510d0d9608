"""Serving an adapter through LLaMA-Factory's OpenAI-compatible API: `server` (start, ready, ask, stop), `smoke`
(the smoke check the sft and serve flows run), `keep_alive` (kept up until the flow run is cancelled), `api_key`
(the key clients send), `errors`."""

from npu_sft.serving.api_key import API_KEY_VAR, load_api_key
from npu_sft.serving.errors import ServeError
from npu_sft.serving.keep_alive import check_port_free, serve_until_stopped
from npu_sft.serving.server import (
    RunningServer,
    ServerSpec,
    api_server,
    chat_once,
    serve_device_env,
    served_model,
    wait_until_ready,
)
from npu_sft.serving.smoke import SmokeResult, smoke_test, smoke_test_on_lease

__all__ = [
    "API_KEY_VAR",
    "RunningServer",
    "ServeError",
    "ServerSpec",
    "SmokeResult",
    "api_server",
    "chat_once",
    "check_port_free",
    "load_api_key",
    "serve_device_env",
    "serve_until_stopped",
    "served_model",
    "smoke_test",
    "smoke_test_on_lease",
    "wait_until_ready",
]
