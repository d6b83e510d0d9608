"""Pipeline configs: one YAML per pipeline, referencing a LLaMA-Factory YAML and adding the pipeline's own settings.

Loading fails fast with one line that names the file, the line and the key, e.g.
`configs/tiny_cpu.yaml:12: serve.promt: unknown key`.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from npu_sft.datasets import DataSettings
from npu_sft.datasets.settings import check_val_size
from npu_sft.devices import DeviceSettings
from npu_sft.download import ModelSource
from npu_sft.engine import EngineSettings, passes_secrets_by_name, secret_refusal
from npu_sft.errors import BadInputError
from npu_sft.evaluation.settings import EvalSettings
from npu_sft.publishing.settings import PublishSettings
from npu_sft.serve_settings import ServeSettings
from npu_sft.training.settings import TrainingSettings

LLAMAFACTORY_DEFAULT_CUTOFF_LEN = 2048


class ConfigError(BadInputError, ValueError):
    """A pipeline or LLaMA-Factory config is unusable; the message is one line naming file, line and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyModelSource(_Strict):
    """The embedded default: a tiny Qwen2-architecture model generated locally, deterministically, offline."""

    source: Literal["tiny"]
    seed: int = 0


class LlamaFactorySettings(_Strict):
    config: str = Field(description="LLaMA-Factory YAML, relative to the pipeline config's directory")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Keys set on top of that YAML")


# The stores MLflow's tracking registry knows without plugins (a path is a file store); `+driver` suffixes allowed.
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


class MlflowSettings(_Strict):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    experiment: str = "sft"

    @field_validator("tracking_uri")
    @classmethod
    def _a_store_mlflow_knows(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.split("+")[0]
        if scheme not in TRACKING_SCHEMES:
            known = ", ".join(f"{name}:" for name in TRACKING_SCHEMES if name)
            raise ValueError(f"{scheme}: is not a store MLflow tracks runs in ({known} or a directory path)")
        return value


class PipelineSettings(_Strict):
    name: str
    model: Annotated[ModelSource | TinyModelSource, Field(discriminator="source")]
    data: DataSettings
    llamafactory: LlamaFactorySettings
    devices: DeviceSettings = Field(default_factory=DeviceSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    publish: PublishSettings
    serve: ServeSettings = Field(default_factory=ServeSettings)
    state_dir: str = Field(".npu-sft", description="runs/, datasets/, models/ of this project; relative to the cwd")


class Pipeline(BaseModel):
    """A loaded pipeline config: its settings and the LLaMA-Factory config they reference, overrides applied."""

    config_file: Path
    settings: PipelineSettings
    llamafactory_file: Path
    llamafactory: dict[str, Any]

    @property
    def config_dir(self) -> Path:
        return self.config_file.parent

    @property
    def dataset_names(self) -> list[str]:
        return split_names(self.llamafactory.get("dataset"))

    @property
    def state_dir(self) -> Path:
        return Path(self.settings.state_dir).resolve()

    @property
    def val_size(self) -> float:
        """The held-out share or row count preparation cuts: `data.val_size` when set, else the LLaMA-Factory
        config's (which the engine then sees as 0: the split is done)."""
        if self.settings.data.val_size is not None:
            return float(self.settings.data.val_size)
        return float(self.llamafactory.get("val_size", 0.0))

    @property
    def cutoff_len(self) -> int:
        return int(self.llamafactory.get("cutoff_len", LLAMAFACTORY_DEFAULT_CUTOFF_LEN))

    def prepare_arguments(self, tokenizer_file: Path | None) -> dict[str, Any]:
        """`prepare_datasets`' (and `prepared_dir_for`'s) keyword arguments for this pipeline, besides its sources:
        the split, the cut-off, the tokenizer that measures rows, and where prepared directories live."""
        return {
            "val_size": self.val_size,
            "cutoff_len": self.cutoff_len,
            "tokenizer_file": tokenizer_file,
            "out_root": self.state_dir / "datasets",
        }

    @property
    def hub_source(self) -> ModelSource | None:
        """The model's ModelScope settings (endpoint, cache, offline), which dataset repositories follow too."""
        model = self.settings.model
        return model if isinstance(model, ModelSource) else None

    def data_settings(self) -> DataSettings:
        """The data sources the LLaMA-Factory config's `dataset:` names, in its order."""
        by_name = {spec.name: spec for spec in self.settings.data.datasets}
        return self.settings.data.model_copy(update={"datasets": [by_name[name] for name in self.dataset_names]})


def split_names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [name.strip() for name in str(value).split(",") if name.strip()]


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-5` as the number it is (YAML 1.2, and LLaMA-Factory's OmegaConf): PyYAML
    alone reads it as the string "1e-5", which transformers then keeps as a string learning rate."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path, what: str) -> tuple[Any, yaml.Node | None]:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {err.object[err.start]:#04x}); save it as UTF-8") from None
    try:
        return load_yaml(text), yaml.compose(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: YAML syntax error: {err.problem or err.context}") from None


def key_line(path: Path, key: str) -> int | None:
    """The 1-based line of a top-level key in a YAML file (None if it is not there or the file does not parse)."""
    try:
        return _line_of(yaml.compose(path.read_text(encoding="utf-8")), (key,))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest key of `loc` that exists in the YAML document."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _describe(error: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    # Drop the discriminator's tag (`model.tiny.seed` -> `model.seed`) so the key reads like the YAML.
    loc = tuple(part for part in error["loc"] if part not in ("tiny", "modelscope", "local") or error["loc"][0] != "model")
    kind = error["type"]
    if kind == "extra_forbidden":
        return loc, "unknown key"
    if kind == "missing":
        return loc, "required key is missing"
    # A validator's ValueError reads "Value error, <our message>": the key already says where, the rest is ours.
    return loc, str(error["msg"]).removeprefix("Value error, ")


def _apply_set(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set devices.train=4")
    value = load_yaml(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a mapping in the config")
        node = child
    node[parts[-1]] = value


def resolve_path(path: str | Path, base: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def load_pipeline(config_file: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Load, merge and validate a pipeline config. Relative paths other than `llamafactory.config` are relative to
    the current directory, the project directory. Raises ConfigError; starts nothing."""
    config_path = Path(config_file)
    raw, tree = _read_yaml(config_path, "pipeline config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: a pipeline config is a YAML mapping, got {type(raw).__name__}")
    data = copy.deepcopy(raw)
    for assignment in overrides or []:
        _apply_set(data, assignment)

    try:
        settings = PipelineSettings.model_validate(data)
    except ValidationError as err:
        loc, message = _describe(err.errors()[0])
        line = _line_of(tree, loc)
        where = f":{line}" if line is not None else ""
        key = ".".join(str(part) for part in loc)
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{config_path}{where}: {key}: {message}{more}") from None
    if settings.engine.is_local and "/" in settings.engine.python:
        # abspath, not resolve(): a venv's python is a symlink to the base interpreter, and following it would
        # leave the venv (and its packages) behind.
        settings.engine.python = os.path.abspath(settings.engine.python)

    lf_file = resolve_path(settings.llamafactory.config, config_path.parent.resolve())
    lf_config, _ = _read_yaml(lf_file, "LLaMA-Factory config (llamafactory.config)")
    if not isinstance(lf_config, dict):
        raise ConfigError(f"{lf_file}: a LLaMA-Factory config is a YAML mapping")
    lf_config = {**lf_config, **settings.llamafactory.overrides}

    pipeline = Pipeline(
        config_file=config_path.resolve(), settings=settings, llamafactory_file=lf_file, llamafactory=lf_config
    )
    _check_datasets_defined(pipeline)
    _check_values_read_here(pipeline)
    _check_eval_split(pipeline)
    _check_gate(pipeline)
    _check_serving_key(pipeline)
    _check_serve_backend(pipeline)
    return pipeline


def _check_serve_backend(pipeline: Pipeline) -> None:
    serve = pipeline.settings.serve
    if serve.backend != "vllm":
        return
    if pipeline.settings.devices.kind == "cpu":
        raise ConfigError(
            f"{pipeline.config_file}: serve.backend: vllm does not run on the CPU (devices.kind: cpu); use huggingface"
        )
    rank = int(pipeline.llamafactory.get("lora_rank", 8))
    if rank > serve.vllm.max_lora_rank:
        raise ConfigError(
            f"{pipeline.config_file}: serve.vllm.max_lora_rank: {serve.vllm.max_lora_rank} is below the adapter's "
            f"lora_rank {rank} ({pipeline.llamafactory_file.name}); vLLM would refuse the adapter, raise it"
        )


def _check_serving_key(pipeline: Pipeline) -> None:
    """The serve stage hands the engine an API key: refuse a prefix that would put it in a command line now, not at
    the end of a training."""
    prefix = pipeline.settings.engine.command_prefix
    if pipeline.settings.serve.enabled and prefix and not passes_secrets_by_name(prefix):
        raise ConfigError(
            f"{pipeline.config_file}: engine.command_prefix: {secret_refusal(prefix)}; or serve.enabled: false"
        )


def _check_gate(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    gate = settings.publish.gate
    # Only a gain asked for in the config is refused; by default a run without base scores just stays candidate.
    if settings.publish.enabled and "min_gain" in gate.model_fields_set and gate.min_gain is not None and not (
        settings.eval.enabled and settings.eval.baseline
    ):
        raise ConfigError(
            f"{pipeline.config_file}: publish.gate.min_gain: needs the base model's scores; set eval.baseline: true "
            "(and eval.enabled: true), or publish.gate.min_gain: null"
        )


def missing_data_file(pipeline: Pipeline) -> str | None:
    """One line naming the first local data file or directory the run would read that is not on this host (a plan
    may be made elsewhere: `run` refuses it, `plan` warns)."""
    names = set(pipeline.dataset_names)
    for index, spec in enumerate(pipeline.settings.data.datasets):
        if spec.name not in names or spec.source != "file" or spec.path is None or spec.path.exists():
            continue
        try:
            tree = yaml.compose(pipeline.config_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            tree = None
        line = _line_of(tree, ("data", "datasets", index, "path"))
        relative = "" if spec.path.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        return (
            f"{pipeline.config_file}{f':{line}' if line else ''}: data.datasets.{index}.path: {spec.path} does not "
            f"exist{relative}"
        )
    return None


def _check_values_read_here(pipeline: Pipeline) -> None:
    """LLaMA-Factory keys the pipeline itself reads (the split and the length statistics are cut here, before the
    engine sees them): a wrong type or range is refused now, naming where the key is set."""
    config = pipeline.llamafactory
    val_size = config.get("val_size", 0.0)
    try:
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
            raise ValueError("not a number")
        check_val_size(val_size)  # the rule `data.val_size` is held to
    except ValueError:
        raise ConfigError(
            f"{where_set(pipeline, 'val_size')}: {val_size!r} is neither a share in [0, 1) nor a whole number of rows"
        ) from None
    cutoff_len = config.get("cutoff_len", LLAMAFACTORY_DEFAULT_CUTOFF_LEN)
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
        raise ConfigError(f"{where_set(pipeline, 'cutoff_len')}: {cutoff_len!r} is not a token count of 1 or more")


def where_set(pipeline: Pipeline, key: str) -> str:
    """`FILE:LINE: key` of a LLaMA-Factory key: the pipeline's `llamafactory.overrides`, or the LLaMA-Factory YAML."""
    if key in pipeline.settings.llamafactory.overrides:
        return f"{pipeline.config_file}: llamafactory.overrides.{key}"
    line = key_line(pipeline.llamafactory_file, key)
    return f"{pipeline.llamafactory_file}{f':{line}' if line is not None else ''}: {key}"


def _check_eval_split(pipeline: Pipeline) -> None:
    """The eval stage scores the held-out split that preparation cuts with `val_size`: refuse a config without one
    now, not after the training."""
    if pipeline.settings.eval.enabled and pipeline.val_size == 0:
        where = (
            f"{pipeline.config_file}: data.val_size" if pipeline.settings.data.val_size is not None
            else where_set(pipeline, "val_size")
        )
        raise ConfigError(
            f"{where}: 0 leaves no held-out rows for the eval stage; set val_size "
            f"(a share such as 0.1, or a row count), or eval.enabled: false in {pipeline.config_file.name}"
        )


def _check_datasets_defined(pipeline: Pipeline) -> None:
    defined = {spec.name for spec in pipeline.settings.data.datasets}
    names = pipeline.dataset_names
    if not names:
        raise ConfigError(f"{pipeline.llamafactory_file}: dataset: required key is missing")
    missing = [name for name in names if name not in defined]
    if missing:
        raise ConfigError(
            f"{pipeline.config_file}: data.datasets: no source for dataset(s) {', '.join(missing)} named by "
            f"`dataset:` in {pipeline.llamafactory_file.name}; add an entry with that name"
        )
