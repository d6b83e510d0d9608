"""`model:` of the pipeline config: where the base model (or a dataset repository) comes from.

    model:
      source: modelscope
      id: qwen/Qwen1.5-7B
      revision: 2f6b3c1e...        # a commit id; a branch such as `master` works but is not reproducible
      cache_dir: /root/.cache/modelscope
      allow_patterns: ["*.json", "*.safetensors", "tokenizer*"]

    model:
      source: local
      path: /data/models/Qwen1.5-7B

The hub token is deliberately not a setting: it is read from MODELSCOPE_API_TOKEN when a request is made, so it
never lands in a config file, in Prefect parameters, in MLflow or in an artifact.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

TOKEN_ENV_VAR = "MODELSCOPE_API_TOKEN"
CACHE_ENV_VAR = "MODELSCOPE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/modelscope")
DEFAULT_REVISION = "master"

# A full git commit id: the only revision that cannot move under a pipeline between two runs.
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class UnpinnedRevisionWarning(UserWarning):
    """The configured revision is a branch or tag: a later run may get different weights."""


def is_commit_id(revision: str) -> bool:
    return bool(_COMMIT_ID.match(revision))


class ModelSource(BaseModel):
    """A model (or dataset) repository on ModelScope, or a model directory already on this machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["modelscope", "local"]
    id: str | None = Field(default=None, description="ModelScope repository id `owner/name`; for local: a label")
    repo_type: Literal["model", "dataset"] = "model"
    revision: str = Field(
        default=DEFAULT_REVISION,
        min_length=1,
        description="commit id (pinned), or a branch/tag (resolved and recorded)",
    )
    path: Path | None = Field(default=None, description="local: the model directory (used in place, not copied)")
    cache_dir: Path | None = Field(default=None, description=f"default: ${CACHE_ENV_VAR} or {DEFAULT_CACHE_DIR}")
    allow_patterns: list[str] | None = Field(default=None, description="glob patterns: download only these files")
    ignore_patterns: list[str] | None = Field(default=None, description="glob patterns: skip these files")
    offline: bool = Field(default=False, description="use only the cache; never contact the hub")
    require_pinned: bool = Field(
        default=False,
        description="stop before downloading when a branch or tag cannot be resolved to a commit (production)",
    )
    endpoint: str | None = Field(default=None, description="hub URL; default: $MODELSCOPE_ENDPOINT or modelscope.cn")
    retries: int = Field(default=5, ge=0, le=50, description="retries after network errors (not after 404s)")
    retry_backoff_s: float = Field(default=2.0, ge=0, description="first retry delay; doubles up to 60 s")
    lock_timeout_s: float = Field(
        default=6 * 3600, gt=0, description="how long to wait for another process downloading the same repository"
    )

    @field_validator("allow_patterns", "ignore_patterns", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        return checked_endpoint(value, f"put the token in ${TOKEN_ENV_VAR}")

    @model_validator(mode="after")
    def _check_fields_fit_source(self) -> ModelSource:
        if self.source == "local":
            if self.path is None:
                raise ValueError("model source 'local' needs a path (the model directory)")
            for name in ("allow_patterns", "ignore_patterns", "endpoint", "cache_dir"):
                if getattr(self, name) is not None:
                    raise ValueError(f"model source 'local' takes no {name}: the directory is used as it is")
            return self
        if self.id is None:
            raise ValueError("model source 'modelscope' needs an id such as qwen/Qwen1.5-7B")
        if not _REPO_ID.match(self.id):
            raise ValueError(f"model id must look like owner/name (e.g. qwen/Qwen1.5-7B), got {self.id!r}")
        if self.path is not None:
            raise ValueError("model source 'modelscope' takes no path; use cache_dir to choose where it is stored")
        if not is_commit_id(self.revision):
            warnings.warn(
                f"{self.id}: revision {self.revision!r} is a branch or tag, not a commit id, so a later run may get "
                "different files; the commit it resolves to is logged and recorded in the manifest, pin it with "
                "`revision: <commit id>`",
                UnpinnedRevisionWarning,
                stacklevel=2,
            )
        return self

    @property
    def is_pinned(self) -> bool:
        return self.source == "local" or is_commit_id(self.revision)

    @property
    def label(self) -> str:
        """How logs and errors name this source: `owner/name@revision`, or the local directory."""
        if self.source == "local":
            return str(self.path)
        return f"{self.id}@{self.revision}"

    def resolved_cache_dir(self) -> Path:
        configured = self.cache_dir or Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR)
        return configured.expanduser().resolve()


def checked_endpoint(value: str | None, token_hint: str) -> str | None:
    """A hub URL setting: http(s), a host, no credentials (`token_hint` says where the token goes instead)."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint must be an http(s) URL such as https://modelscope.cn, got {value!r}")
    if parts.username or parts.password:
        # Credentials in the URL would be logged and recorded with the endpoint; the token has its own place.
        raise ValueError(f"endpoint must not carry credentials; {token_hint}")
    return value.rstrip("/")


def hub_token() -> SecretStr | None:
    """The ModelScope token, from the environment only; read per call so that a rotated token is picked up."""
    value = os.environ.get(TOKEN_ENV_VAR, "").strip()
    return SecretStr(value) if value else None
