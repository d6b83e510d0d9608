"""The `serve` flow: a registered adapter version through LLaMA-Factory's OpenAI-compatible API.

    prefect deployment run serve/tiny --watch                  # smoke test of the tiny-qwen2-lora champion
    prefect deployment run serve/qwen7b -p model_version=3 -p keep_serving=true   # until the run is cancelled
    prefect deployment run serve/qwen7b -p model_version=runs:/<mlflow run id>     # the version that run published
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prefect import flow

from npu_sft.serving import load_api_key
from npu_sft.settings import load_pipeline
from npu_sft.user_errors import quiet_user_error_tracebacks
from tasks.model import fetch_base_model
from tasks.registry import fetch_registered_adapter, resolve_registered_version
from tasks.serve import serve_until_cancelled, smoke_test_registered

quiet_user_error_tracebacks()  # bad input ends as one line, in the console and in Prefect's UI


@dataclass(frozen=True)
class ServeResult:
    registered_model: str
    version: str
    smoke_reply: str | None  # None when it kept serving until cancelled


@flow(name="serve", log_prints=True)
def serve(
    config: str,
    overrides: list[str] | None = None,
    model_version: str = "champion",
    keep_serving: bool = False,
    port: int = 8000,
) -> ServeResult:
    """Serve `model_version` of the config's `publish.registered_model`: the version the publish gate made
    `champion` (default), another alias, `latest`, a version number, or `runs:/<run_id>` (the version that MLflow
    run published).

    keep_serving=False: smoke test (start on loopback, refuse a wrong key, answer `serve.prompt`, stop).
    keep_serving=True: serve on `serve.host`:`port` until the flow run is cancelled (or its process gets SIGTERM);
    clients send the key in the Prefect Secret block `serve.api_key_secret`, else the worker's NPU_SFT_API_KEY.
    """
    pipeline = load_pipeline(config, overrides)
    if keep_serving:
        load_api_key(pipeline.settings.serve, os.environ)  # no key, no serving: say so before any download
    name = pipeline.settings.publish.registered_model
    version = resolve_registered_version(pipeline.settings.mlflow, name, model_version)
    adapter = fetch_registered_adapter(pipeline, name, version)
    model_path = fetch_base_model(pipeline, adapter)
    if keep_serving:
        serve_until_cancelled(pipeline, model_path, adapter, port)
        return ServeResult(name, version, None)
    reply = smoke_test_registered(pipeline, model_path, adapter)
    return ServeResult(name, version, reply)
