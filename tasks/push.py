"""Tasks that push the champion adapter to a ModelScope model repository (`publish.modelscope`)."""

from __future__ import annotations

import os

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact

from npu_sft.publishing.modelscope_push import PushedAdapter, push_registered_version, push_token
from npu_sft.publishing.versions import Published
from npu_sft.settings import Pipeline
from tasks.registry import version_files_dir

PUSH_ARTIFACT_KEY = "modelscope-push"


@task
def check_push_token(pipeline: Pipeline) -> None:
    """A push needs a token: say so before the training, not after it (whether the hub accepts it shows at the
    push)."""
    settings = pipeline.settings.publish.modelscope
    if settings is not None:
        token = push_token(settings, os.environ)
        get_run_logger().info("a new champion goes to ModelScope %s with the token from %s", settings.repo_id,
                              token.source)


@task
def push_to_modelscope(pipeline: Pipeline, published: Published) -> PushedAdapter | None:
    """The champion's files and a model card, one commit on `publish.modelscope.repo_id`; the version is tagged with
    the repository. None when this version was pushed there before."""
    settings = pipeline.settings.publish.modelscope
    if settings is None:
        raise ValueError("push_to_modelscope needs publish.modelscope in the config")
    token = push_token(settings, os.environ)
    pushed = push_registered_version(pipeline.settings.mlflow, settings, published.name, published.version,
                                     files_dir=version_files_dir(pipeline, published.name, published.version),
                                     token=token)
    logger = get_run_logger()
    if pushed is None:
        logger.info("%s version %s is on %s already", published.name, published.version, settings.repo_id)
        return None
    logger.info("pushed %s version %s to %s (%d files)", published.name, published.version, pushed.url,
                len(pushed.files))
    create_link_artifact(pushed.url, link_text=f"{settings.repo_id} on ModelScope", key=PUSH_ARTIFACT_KEY,
                         description=f"{published.name} version {published.version} (champion), {pushed.revision}")
    return pushed
