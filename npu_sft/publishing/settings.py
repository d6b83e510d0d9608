"""The pipeline's `publish:` block: the registered model, the gate a new version passes to become champion, and
where a champion goes besides the registry (`publish.modelscope:`, `publish.merged:`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from npu_sft.download.settings import checked_endpoint

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelScopePushSettings(BaseModel):
    """Push each new champion's adapter to a ModelScope model repository. The token is not a setting: it comes from
    the Prefect Secret block `token_secret` names, else MODELSCOPE_API_TOKEN, when the push starts."""

    model_config = ConfigDict(extra="forbid")

    repo_id: str = Field(description="owner/name of the model repository; created (private by default) if missing")
    private: bool = Field(True, description="visibility of the repository when the push creates it")
    endpoint: str | None = Field(None, description="hub URL; default: $MODELSCOPE_ENDPOINT or modelscope.cn")
    revision: str = Field("master", description="the branch the adapter is committed to")
    token_secret: str | None = Field(
        None, description="name of a Prefect Secret block with a ModelScope token that can write to repo_id"
    )

    @field_validator("repo_id")
    @classmethod
    def _is_owner_slash_name(cls, value: str) -> str:
        if not REPO_ID.match(value):
            raise ValueError(f"repo_id must be owner/name (letters, digits, '_', '.', '-'), got {value!r}")
        return value

    @field_validator("endpoint")
    @classmethod
    def _is_a_plain_url(cls, value: str | None) -> str | None:
        return checked_endpoint(value, "the token comes from token_secret or MODELSCOPE_API_TOKEN")


class MergedExportSettings(BaseModel):
    """`publish.merged`: export each new champion merged into its base model."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    registered_model: str | None = Field(None, description="default: <publish.registered_model>-merged")
    shard_size_gb: int = Field(5, ge=1, description="LLaMA-Factory's export_size: the largest safetensors shard")


class GateSettings(BaseModel):
    """`publish.gate`: what a new version must show to become champion."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["bleu_4", "rouge_1", "rouge_2", "rouge_l"] = Field("rouge_l", description="a score of the eval stage")
    direction: Literal["higher", "lower"] = "higher"
    threshold: float | None = Field(None, description="the adapter's score must reach this (eval/<metric>)")
    min_gain: float | None = Field(
        0.0, description="the adapter must beat the base model by more than this (gain/<metric>); null: no check"
    )
    beat_champion: bool = Field(True, description="the adapter must beat the current champion's score")


class PublishSettings(BaseModel):
    """`publish:`: each trained adapter becomes a version of `registered_model`; the gate picks the champion."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    registered_model: str = Field(min_length=1)
    gate: GateSettings = Field(default_factory=GateSettings)
    merged: MergedExportSettings = Field(default_factory=MergedExportSettings)
    modelscope: ModelScopePushSettings | None = Field(
        None, description="push each new champion's adapter to this ModelScope model repository"
    )

    @field_validator("registered_model")
    @classmethod
    def _searchable(cls, value: str) -> str:
        if "'" in value and '"' in value:
            raise ValueError("holds both ' and \"; MLflow's registry search cannot quote such a name")
        return value
