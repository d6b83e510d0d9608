from __future__ import annotations

from prefect import get_run_logger, task

from npu_sft.engine.llamafactory_config import check_with_engine
from npu_sft.preflight import check_on_this_host
from npu_sft.settings import Pipeline


@task
def check_config(pipeline: Pipeline) -> None:
    """Before anything is downloaded or any device is leased: what this host must have (env script, data files,
    device tool; a run from a deployment had no CLI check it), then LLaMA-Factory's own parser on the config."""
    check_on_this_host(pipeline)
    check_with_engine(pipeline)
    get_run_logger().info("LLaMA-Factory accepts %s", pipeline.llamafactory_file)
