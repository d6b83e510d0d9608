"""What an MLflow run says about itself besides the LLaMA-Factory config: the pipeline settings that change the
outcome (as params, so two runs on 1 and 4 cards differ in MLflow's comparison) and where it came from (the tags
MLflow's runs table shows in its Source and User columns: the project's git commit, the host, the Prefect run).

    tracker.log_params(pipeline_params(pipeline))
    tracker.set_tags(source_tags(RunOrigin.here(deployment="sft/qwen7b", flow_run_url=...)))
"""

from __future__ import annotations

import getpass
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import git

from npu_sft.devices.settings import DeviceRequest
from npu_sft.engine.llamafactory_config import SECRET_KEY, resolve_deepspeed
from npu_sft.settings import ConfigError, ModelSource, Pipeline

PARAM_PREFIX = "pipeline."
PROJECT_DIR = Path(__file__).resolve().parents[1]
GIT_DIRTY_TAG = "npu_sft.git.dirty"
HOST_TAG = "npu_sft.host"
FLOW_RUN_URL_TAG = "prefect.flow_run_url"
DEPLOYMENT_TAG = "prefect.deployment"


def device_count(request: DeviceRequest) -> int:
    return len(request) if isinstance(request, list) else int(request)


def deepspeed_stage(pipeline: Pipeline) -> str:
    """ZeRO stage of the DeepSpeed config the engine gets ("none" without one), "+offload" when it offloads."""
    value = pipeline.llamafactory.get("deepspeed")
    if not value:
        return "none"
    path = resolve_deepspeed(str(value), pipeline)
    try:
        zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {})
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable DeepSpeed JSON ({err})") from err
    stage = str(zero.get("stage", 0))
    offloads = any(zero.get(key, {}).get("device", "none") not in ("none", None) for key in
                   ("offload_optimizer", "offload_param"))
    return f"{stage}+offload" if offloads else stage


def pipeline_params(pipeline: Pipeline) -> dict[str, str]:
    """The pipeline's own settings that make two runs differ, as `pipeline.*` params (stable names, no secrets)."""
    settings = pipeline.settings
    model = settings.model
    params: dict[str, Any] = {"name": settings.name, "model.source": model.source}
    if isinstance(model, ModelSource):
        params.update({"model.id": model.id, "model.revision": model.revision})
    else:
        params["model.seed"] = model.seed
    data = pipeline.data_settings()
    params.update(
        {
            "data.datasets": ",".join(spec.name for spec in data.datasets),
            "data.val_size": pipeline.val_size,
            "data.seed": data.seed,
            "data.dedup": data.dedup,
            "devices.kind": settings.devices.kind,
            "devices.train": device_count(settings.devices.train),
            "devices.eval": device_count(settings.devices.eval),
            "training.nnodes": settings.training.nnodes,
            "training.world_size": settings.training.nnodes * device_count(settings.devices.train),
            "training.deepspeed_stage": deepspeed_stage(pipeline),
            "training.max_attempts": settings.training.max_attempts,
            # Which engine ran, not how it was reached: a command prefix may carry credentials.
            "engine.launcher": settings.engine.command_prefix[0] if settings.engine.command_prefix else "local",
        }
    )
    if settings.eval.enabled:
        evaluation = settings.eval
        params.update(
            {
                "eval.baseline": evaluation.baseline,
                "eval.max_new_tokens": evaluation.max_new_tokens,
                "eval.max_samples": evaluation.max_samples,
                "eval.do_sample": evaluation.do_sample,
                "eval.num_beams": evaluation.num_beams,
            }
        )
    return {
        PARAM_PREFIX + key: _text(value) for key, value in params.items() if not SECRET_KEY.search(key)
    }


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return str(value)


@dataclass(frozen=True)
class GitState:
    commit: str
    branch: str | None
    remote_url: str | None
    dirty: bool


def git_state(directory: Path = PROJECT_DIR) -> GitState | None:
    """The project checkout's commit, or None when it is not a git checkout (an installed package)."""
    try:
        repo = git.Repo(directory, search_parent_directories=True)
        commit = repo.head.commit.hexsha
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError, git.GitCommandError):
        return None  # not a checkout, or one without a commit yet
    branch = None if repo.head.is_detached else repo.active_branch.name
    remote = next(iter(repo.remotes), None)
    url = _without_credentials(remote.url) if remote is not None else None
    return GitState(commit, branch, url, repo.is_dirty(untracked_files=False))


def _without_credentials(url: str) -> str:
    """`https://user:token@host/repo` -> `https://host/repo`: a remote URL may hold a token. The scp-like form
    (`git@host:org/repo`) carries only a user name and stays as it is."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.hostname is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


@dataclass(frozen=True)
class RunOrigin:
    """Where a run was started from: what MLflow shows as its source and user."""

    source_name: str
    source_type: str  # MLflow's SourceType name: JOB for a deployment run, LOCAL for `npu-sft run`
    user: str
    host: str
    git: GitState | None
    deployment: str | None = None
    flow_run_url: str | None = None

    @classmethod
    def here(cls, deployment: str | None = None, flow_run_url: str | None = None) -> RunOrigin:
        return cls(
            source_name=deployment or "flows/sft.py",
            source_type="JOB" if deployment else "LOCAL",
            user=getpass.getuser(),
            host=socket.gethostname(),
            git=git_state(),
            deployment=deployment,
            flow_run_url=flow_run_url,
        )


def source_tags(origin: RunOrigin) -> dict[str, str]:
    tags = {
        "mlflow.source.name": origin.source_name,
        "mlflow.source.type": origin.source_type,
        "mlflow.user": origin.user,
        HOST_TAG: origin.host,
    }
    if origin.git is not None:
        tags["mlflow.source.git.commit"] = origin.git.commit
        tags[GIT_DIRTY_TAG] = str(origin.git.dirty).lower()
        if origin.git.branch:
            tags["mlflow.source.git.branch"] = origin.git.branch
        if origin.git.remote_url:
            tags["mlflow.source.git.repoURL"] = origin.git.remote_url
    if origin.deployment:
        tags[DEPLOYMENT_TAG] = origin.deployment
    if origin.flow_run_url:
        tags[FLOW_RUN_URL_TAG] = origin.flow_run_url
    return tags
