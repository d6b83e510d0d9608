"""Dataset settings embedded in the pipeline config.

The vocabulary follows LLaMA-Factory's `dataset_info.json` (`formatting`, `columns`, `tags`) so that an existing
registration can be copied over, with two differences that make the data's state explicit:

- an alpaca row's `system` and `history` fields, and a sharegpt row's `system` and `tools` fields, are used when
  present without having to be mapped (LLaMA-Factory silently ignores unmapped ones);
- `format: openai` is a preset for OpenAI chat messages (`messages` of `role`/`content`, `tool` results and
  assistant `tool_calls`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from npu_sft.datasets.builtin import BUILTIN_DATASETS, DEFAULT_IDENTITY_AUTHOR, DEFAULT_IDENTITY_NAME

DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"

# Columns LLaMA-Factory knows but a text-only supervised fine-tuning set cannot use; named so the error can say why.
_UNSUPPORTED_COLUMNS = {
    "images": "multimodal columns are not supported (text-only SFT)",
    "videos": "multimodal columns are not supported (text-only SFT)",
    "audios": "multimodal columns are not supported (text-only SFT)",
    "chosen": "preference (ranking) data is not supported (SFT only)",
    "rejected": "preference (ranking) data is not supported (SFT only)",
    "kto_tag": "KTO data is not supported (SFT only)",
}


class ColumnMap(BaseModel):
    """`columns` of a LLaMA-Factory dataset registration: which field of a row holds what. None = the default."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    query: str | None = None
    response: str | None = None
    history: str | None = None
    messages: str | None = None
    system: str | None = None
    tools: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _explain_unsupported_columns(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for column, why in _UNSUPPORTED_COLUMNS.items():
                if column in data:
                    raise ValueError(f"column '{column}': {why}")
        return data


class TagMap(BaseModel):
    """`tags` of a LLaMA-Factory sharegpt registration: the message keys and role names. None = the default."""

    model_config = ConfigDict(extra="forbid")

    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    observation_tag: str | None = None
    function_tag: str | None = None
    system_tag: str | None = None


@dataclass(frozen=True)
class ResolvedColumns:
    prompt: str
    query: str
    response: str
    history: str
    messages: str
    system: str
    tools: str


@dataclass(frozen=True)
class ResolvedTags:
    role: str
    content: str
    user: str
    assistant: str
    observation: str
    function: str
    system: str


_DEFAULT_COLUMNS = {
    "alpaca": ResolvedColumns("instruction", "input", "output", "history", "conversations", "system", "tools"),
    "sharegpt": ResolvedColumns("instruction", "input", "output", "history", "conversations", "system", "tools"),
    "openai": ResolvedColumns("instruction", "input", "output", "history", "messages", "system", "tools"),
}
_DEFAULT_TAGS = {
    "sharegpt": ResolvedTags("from", "value", "human", "gpt", "observation", "function_call", "system"),
    "openai": ResolvedTags("role", "content", "user", "assistant", "tool", "function_call", "system"),
}
_ALPACA_ONLY_COLUMNS = ("prompt", "query", "response", "history")


class DatasetSpec(BaseModel):
    """One input dataset. `source` defaults to `file` when a `path` is given, else `builtin`."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    name: str = Field(pattern=DATASET_NAME_PATTERN, description="label in statistics and rejects; builtin id")
    source: Literal["builtin", "file", "modelscope"] = "builtin"
    path: Path | None = Field(
        default=None, description="a data file, or a directory of them (for modelscope: the downloaded directory)"
    )
    files: list[str] = Field(
        default_factory=list, description="glob patterns selecting data files inside a directory `path`"
    )
    repo_id: str | None = Field(default=None, description="ModelScope dataset id, for the download step")
    revision: str | None = None
    format: Literal["alpaca", "sharegpt", "openai"] = Field(default="alpaca", alias="formatting")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    tags: TagMap = Field(default_factory=TagMap)
    fill_identity: bool | None = Field(
        default=None,
        description="replace {{name}} and {{author}} with `identity`; default: only for the builtin identity set",
    )

    @model_validator(mode="before")
    @classmethod
    def _infer_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" not in data:
            data = {**data, "source": "file" if data.get("path") is not None else "builtin"}
        return data

    @model_validator(mode="after")
    def _check_source_fields(self) -> DatasetSpec:
        if self.source == "builtin":
            if self.name not in BUILTIN_DATASETS:
                known = ", ".join(sorted(BUILTIN_DATASETS))
                raise ValueError(f"dataset '{self.name}': no builtin dataset of that name (builtins: {known})")
            if self.path is not None or self.repo_id is not None:
                raise ValueError(f"dataset '{self.name}': a builtin dataset takes no path or repo_id")
        elif self.source == "file" and self.path is None:
            raise ValueError(f"dataset '{self.name}': source 'file' needs a path")
        elif self.source == "modelscope" and self.path is None and self.repo_id is None:
            raise ValueError(f"dataset '{self.name}': source 'modelscope' needs a repo_id (or the downloaded path)")
        return self

    @model_validator(mode="after")
    def _check_mapping_fits_format(self) -> DatasetSpec:
        if self.format == "alpaca":
            if self.tags != TagMap():
                raise ValueError(f"dataset '{self.name}': tags apply to the sharegpt and openai formats only")
            if self.columns.messages is not None:
                raise ValueError(f"dataset '{self.name}': column 'messages' applies to sharegpt and openai only")
        else:
            for column in _ALPACA_ONLY_COLUMNS:
                if getattr(self.columns, column) is not None:
                    raise ValueError(f"dataset '{self.name}': column '{column}' applies to the alpaca format only")
        return self

    def resolved_columns(self) -> ResolvedColumns:
        defaults = _DEFAULT_COLUMNS[self.format]
        overrides = {key: value for key, value in self.columns.model_dump().items() if value is not None}
        return ResolvedColumns(**{**defaults.__dict__, **overrides})

    def resolved_tags(self) -> ResolvedTags:
        defaults = _DEFAULT_TAGS["openai" if self.format == "openai" else "sharegpt"]
        overrides = {
            key.removesuffix("_tag"): value for key, value in self.tags.model_dump().items() if value is not None
        }
        return ResolvedTags(**{**defaults.__dict__, **overrides})

    def fills_identity(self) -> bool:
        if self.fill_identity is not None:
            return self.fill_identity
        return self.source == "builtin" and self.name == "identity"


# Registration keys of LLaMA-Factory that carry no meaning for a local, text-only SFT set.
_IGNORED_DATASET_INFO_KEYS = {"file_sha1"}


def _spec_fields_from_dataset_info(name: str, entry: dict[str, Any], dataset_dir: Path) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"dataset_info entry '{name}' must be an object")
    fields: dict[str, Any] = {"name": name}
    if "file_name" in entry:
        fields.update(source="file", path=dataset_dir / entry["file_name"])
    elif "ms_hub_url" in entry:
        fields.update(source="modelscope", repo_id=entry["ms_hub_url"])
    else:
        raise ValueError(
            f"dataset_info entry '{name}': only local files (file_name) and ModelScope (ms_hub_url) are supported"
        )
    for key, value in entry.items():
        if key in ("file_name", "ms_hub_url", "hf_hub_url") or key in _IGNORED_DATASET_INFO_KEYS:
            continue
        if key in ("formatting", "columns", "tags"):
            fields[key] = value
        elif (key == "split" and value == "train") or (key == "ranking" and value is False):
            continue
        else:
            raise ValueError(f"dataset_info entry '{name}': key '{key}' ({value!r}) is not supported")
    return fields


class IdentitySettings(BaseModel):
    """Values for the `{{name}}` and `{{author}}` placeholders of the identity set."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default=DEFAULT_IDENTITY_NAME, min_length=1)
    author: str = Field(default=DEFAULT_IDENTITY_AUTHOR, min_length=1)


class DataSettings(BaseModel):
    """The `data:` section of the pipeline config.

    `datasets` also accepts LLaMA-Factory's shorthand, a comma-separated string (`identity,tiny_alpaca`); a bare
    name is a builtin set or, when `dataset_info_dir` is given, an entry of that directory's `dataset_info.json`.
    """

    model_config = ConfigDict(extra="forbid")

    datasets: list[DatasetSpec] = Field(min_length=1)
    dataset_info_dir: Path | None = Field(
        default=None, description="a LLaMA-Factory data directory whose dataset_info.json resolves bare names"
    )
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    max_reject_share: float = Field(default=0.05, ge=0.0, le=1.0)
    dedup: bool = True
    seed: int = 42
    val_size: float | None = Field(
        default=None, ge=0.0, description="overrides the training config's val_size: a share (<1) or a row count"
    )
    truncation_warning_share: float = Field(
        default=0.05, ge=0.0, le=1.0, description="warn when more rows than this share exceed cutoff_len"
    )
    template_tokens_per_message: int = Field(
        default=5,
        ge=0,
        description="tokens the chat template adds around each message (chatml: ~5); used for length estimates",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_dataset_names(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "datasets" not in data:
            return data
        entries = data["datasets"]
        if isinstance(entries, str):
            entries = [item.strip() for item in entries.split(",") if item.strip()]
        if not isinstance(entries, list):
            return data
        info_dir = data.get("dataset_info_dir")
        dataset_info = _load_dataset_info(Path(info_dir)) if info_dir is not None else None
        expanded = [_expand_dataset_name(entry, dataset_info, info_dir) for entry in entries]
        return {**data, "datasets": expanded}

    @field_validator("datasets")
    @classmethod
    def _names_are_unique(cls, specs: list[DatasetSpec]) -> list[DatasetSpec]:
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"dataset name '{spec.name}' is used twice")
            seen.add(spec.name)
        return specs

    @field_validator("val_size")
    @classmethod
    def _val_size_is_share_or_count(cls, value: float | None) -> float | None:
        check_val_size(value)
        return value


def check_val_size(value: float | None) -> None:
    """A share in [0, 1) or a whole row count >= 1, as LLaMA-Factory's val_size; 1.0 would mean 'everything'."""
    if value is None:
        return
    if value < 0 or value == 1.0 or (value > 1 and value != int(value)):
        raise ValueError(f"val_size {value} must be a share in [0, 1) or a whole number of rows")


def _expand_dataset_name(entry: Any, dataset_info: dict[str, Any] | None, info_dir: Any) -> Any:
    if not isinstance(entry, str):
        return entry
    if entry in BUILTIN_DATASETS:
        return {"name": entry, "source": "builtin"}
    if dataset_info is None:
        known = ", ".join(sorted(BUILTIN_DATASETS))
        raise ValueError(f"dataset '{entry}' is not a builtin ({known}) and no dataset_info_dir is set")
    if entry not in dataset_info:
        raise ValueError(f"dataset '{entry}' is not a builtin and not in {Path(info_dir) / 'dataset_info.json'}")
    return _spec_fields_from_dataset_info(entry, dataset_info[entry], Path(info_dir))


def _load_dataset_info(dataset_dir: Path) -> dict[str, Any]:
    info_path = dataset_dir / "dataset_info.json"
    try:
        with info_path.open(encoding="utf-8") as handle:
            info = json.load(handle)
    except OSError as err:
        raise ValueError(f"cannot read {info_path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{info_path} line {err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(info, dict):
        raise ValueError(f"{info_path} must hold a JSON object of dataset registrations")
    return info
