from __future__ import annotations

from prefect import get_run_logger, task

from npu_sft.engine.llamafactory_config import check_with_engine
from npu_sft.settings import Pipeline


@task
def check_engine_config(pipeline: Pipeline) -> None:
    """LLaMA-Factory's own parser judges the config before anything is downloaded or any device is leased."""
    check_with_engine(pipeline)
    get_run_logger().info("LLaMA-Factory accepts %s", pipeline.llamafactory_file)
