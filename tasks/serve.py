from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from npu_sft.devices import lease_devices
from npu_sft.runs import RunContext
from npu_sft.serving import smoke_test
from npu_sft.settings import Pipeline
from tasks.train import Trained


@task
def serve_smoke_test(pipeline: Pipeline, run: RunContext, model_path: Path, trained: Trained) -> str:
    """Serve the adapter through LLaMA-Factory's OpenAI API on loopback, ask one question, stop the server."""
    logger = get_run_logger()
    settings = pipeline.settings
    with lease_devices(settings.devices, task="serve", flow_run_id=run.flow_run_id, on_wait=logger.info) as lease:
        result = smoke_test(
            settings.engine,
            settings.serve,
            model_path=str(model_path),
            adapter_path=str(trained.output_dir),
            template=str(pipeline.llamafactory.get("template", "default")),
            device_env=lease.env(),
            port=lease.master_port,
            log_file=run.logs_dir / "serve.log",
        )
    run.tracker.log_metrics([("serve_startup_s", result.startup_s, 0), ("serve_latency_s", result.latency_s, 0)])
    run.tracker.set_tags({"serve.reply": result.reply[:5000]})
    logger.info("served reply: %r", result.reply)
    return result.reply
