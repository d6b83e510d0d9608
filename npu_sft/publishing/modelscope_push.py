"""Pushing a registered adapter version to a ModelScope model repository with the `modelscope` hub client: its files
plus a model card (README.md) that says what it was trained from and how it scored, in one commit."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelscope_hub import HubApi
from modelscope_hub.config import get_default_config
from modelscope_hub.errors import AlreadyExistsError, AuthenticationError, PermissionDeniedError
from pydantic import SecretStr

from npu_sft.download.hub import HUB_CALL_ERRORS
from npu_sft.download.settings import TOKEN_ENV_VAR
from npu_sft.publishing import registry
from npu_sft.publishing.errors import PushError
from npu_sft.publishing.settings import ModelScopePushSettings
from npu_sft.secret_blocks import SecretBlockError, read_secret_block
from npu_sft.settings import MlflowSettings
from npu_sft.tracking import client_for

TOKEN_PAGE = "https://modelscope.cn/my/myaccesstoken"
MODEL_CARD = "README.md"
PUSHED_TAG = "modelscope.url"  # on a model version: the repository it was pushed to
CARD_METRIC_PREFIXES = ("eval/", "base/", "gain/")


@dataclass(frozen=True)
class HubToken:
    value: SecretStr
    source: str  # where it came from, for messages: never the token itself


@dataclass(frozen=True)
class PushedAdapter:
    repo_id: str
    revision: str
    url: str  # the repository's page on the hub
    files: tuple[str, ...]


def push_token(settings: ModelScopePushSettings, environ: Mapping[str, str]) -> HubToken:
    """The token from the Prefect Secret block `token_secret` names, else MODELSCOPE_API_TOKEN."""
    if settings.token_secret:
        try:
            value = read_secret_block(settings.token_secret, "publish.modelscope.token_secret")
        except SecretBlockError as err:
            raise PushError(str(err)) from None
        source = f"the Prefect Secret block {settings.token_secret!r}"
    else:
        value, source = environ.get(TOKEN_ENV_VAR, ""), TOKEN_ENV_VAR
    if not value.strip():
        raise PushError(
            f"publish.modelscope needs a ModelScope token that can write to {settings.repo_id}: set {TOKEN_ENV_VAR} "
            f"in the worker's environment or name a Prefect Secret block in publish.modelscope.token_secret "
            f"(tokens: {TOKEN_PAGE})"
        )
    return HubToken(SecretStr(value.strip()), source)


def hub_endpoint(settings: ModelScopePushSettings) -> str:
    return settings.endpoint or str(get_default_config().endpoint).rstrip("/")


def model_card(name: str, version: str, facts: Mapping[str, str], metrics: Mapping[str, float], verdict: str) -> str:
    """README.md for the repository: ModelScope's metadata header, then what a user needs to load and trust it."""
    scores = "\n".join(f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items())) or "| - | - |"
    revision = facts.get("base_model.revision") or "-"
    template = facts.get("template", "-")
    return f"""---
frameworks:
- Pytorch
tasks:
- text-generation
---

# {name} version {version}

A LoRA adapter trained with LLaMA-Factory by npu-sft, published as MLflow registered model `{name}` version
{version}.

| | |
|---|---|
| base model | {facts.get("base_model", "-")} |
| base model revision | {revision} |
| chat template | {template} |
| prepared data | {facts.get("dataset.key", "-")} |
| publish gate | {verdict} |

## Evaluation

| metric | value |
|---|---|
{scores}

## Use

Load the base model at that revision, apply this adapter, and chat with the template above, e.g.
`llamafactory-cli chat --model_name_or_path <base> --adapter_name_or_path <this repo> --template {template}`.
"""


def push_adapter(
    settings: ModelScopePushSettings, adapter_dir: Path, card: str, *, commit_message: str, token: HubToken
) -> PushedAdapter:
    """Create the repository if it is missing (private unless `settings.private` is false) and commit the adapter's
    files and `card` as README.md. Raises PushError with one line saying what to fix."""
    endpoint = hub_endpoint(settings)
    api = HubApi(endpoint=endpoint, token=token.value.get_secret_value())
    with tempfile.TemporaryDirectory(prefix="npu-sft-push-") as staging:
        # A copy: the client leaves its resume cache in the folder it uploads, and the card is not in the adapter.
        files = _stage(adapter_dir, Path(staging), card)
        try:
            try:
                api.create_repo(settings.repo_id, repo_type="model",
                                visibility="private" if settings.private else "public")
            except AlreadyExistsError:
                pass  # pushed before: the commit goes on top
            api.upload_folder(settings.repo_id, "model", staging, commit_message=commit_message,
                              revision=settings.revision, use_cache=False, disable_tqdm=True)
        except (AuthenticationError, PermissionDeniedError) as err:
            raise PushError(
                f"ModelScope at {endpoint} refused the token from {token.source} for {settings.repo_id} "
                f"({_first_line(err)}); use a token that can write to {settings.repo_id.split('/')[0]} ({TOKEN_PAGE})"
            ) from None
        except HUB_CALL_ERRORS as err:
            raise PushError(f"pushing to {settings.repo_id} at {endpoint} failed: {_first_line(err)}") from None
    return PushedAdapter(settings.repo_id, settings.revision, f"{endpoint}/models/{settings.repo_id}", files)


def push_registered_version(
    mlflow: MlflowSettings, settings: ModelScopePushSettings, name: str, version: str, *, files_dir: Path,
    token: HubToken,
) -> PushedAdapter | None:
    """Push version `version` of `name` (its files, downloaded to `files_dir` once) with a card made from its tags
    and its run's scores, then tag the version with where it went. None: it was pushed to that repository before."""
    client = client_for(mlflow)
    model_version = client.get_model_version(name, version)
    url = f"{hub_endpoint(settings)}/models/{settings.repo_id}"
    if model_version.tags.get(PUSHED_TAG) == url:
        return None
    adapter_dir = registry.download_version(mlflow, name, version, files_dir)
    run_metrics = client.get_run(model_version.run_id).data.metrics if model_version.run_id else {}
    scores = {key: value for key, value in run_metrics.items()
              if key.startswith(CARD_METRIC_PREFIXES) and not key.endswith("_s")}
    verdict = model_version.tags.get("gate.reason", model_version.tags.get("gate.verdict", "-"))
    card = model_card(name, version, model_version.tags, scores, verdict)
    pushed = push_adapter(settings, adapter_dir, card, commit_message=f"{name} version {version}: {verdict}"[:300],
                          token=token)
    for key, value in ((PUSHED_TAG, pushed.url), ("modelscope.revision", pushed.revision)):
        client.set_model_version_tag(name, version, key, value)
    return pushed


def _stage(adapter_dir: Path, staging: Path, card: str) -> tuple[str, ...]:
    files = sorted(path for path in adapter_dir.rglob("*") if path.is_file() and not path.name.startswith("."))
    for path in files:
        target = staging / path.relative_to(adapter_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (staging / MODEL_CARD).write_text(card, encoding="utf-8")
    return tuple(sorted([*(str(path.relative_to(adapter_dir)) for path in files), MODEL_CARD]))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
