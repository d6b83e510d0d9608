"""The key clients of a long-running server send: from a Prefect Secret block or the worker's environment."""

from __future__ import annotations

from collections.abc import Mapping

from npu_sft.secret_blocks import SecretBlockError, read_secret_block
from npu_sft.serving.errors import ServeError
from npu_sft.settings import ServeSettings

API_KEY_VAR = "NPU_SFT_API_KEY"  # the key clients send; set in the worker's environment, never in a config file
MIN_API_KEY_LENGTH = 16


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
