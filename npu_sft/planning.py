"""`npu-sft plan` and `npu-sft prepare`: one stage, or a dry run, outside Prefect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from npu_sft.datasets import prepare_datasets, render_prepare_report
from npu_sft.devices import VISIBLE_DEVICES_VAR, DeviceToolMissing, resolve_kind, take_inventory
from npu_sft.devices.leases import candidate_ids
from npu_sft.download import download_model, find_cached_download
from npu_sft.download.datasets import with_downloaded_datasets
from npu_sft.download.settings import TOKEN_ENV_VAR
from npu_sft.engine import (
    api_server_command,
    render_command,
    served_name,
    torchrun_train_command,
)
from npu_sft.engine.llamafactory_config import (
    check_with_engine,
    env_script_missing,
    resolve_train_config,
    without_secrets,
)
from npu_sft.engine.tiny_model import ensure_tiny_model, tokenizer_file
from npu_sft.publishing.gate import describe_gate
from npu_sft.publishing.merged_export import merged_model_name
from npu_sft.serving import served_model
from npu_sft.settings import ConfigError, Pipeline, TinyModelSource, missing_data_file
from npu_sft.training import distributed_launch

MASTER_PORT_PLACEHOLDER = 0  # chosen (and reserved) when the task leases its devices
SERVE_SHOWN_ENV = ("API_HOST", "API_PORT", "API_MODEL_NAME", "MAX_CONCURRENT", "API_VERBOSE")  # never API_KEY
TOKENIZER_PATTERNS = ["tokenizer*", "vocab*", "merges.txt", "*.json", "*.model", "*.tiktoken"]


@dataclass(frozen=True)
class PlannedDevices:
    """The devices a task would lease if it started now; `unchecked` says why this host's devices were not looked at
    (a plan made on a laptop for the Ascend host)."""

    kind: str
    count: int
    env: dict[str, str]  # the visible-devices variable
    shown: str
    unchecked: str | None = None


def planned_devices(pipeline: Pipeline, task: str) -> PlannedDevices:
    """What `task` would lease if it started now; leases nothing. Without the kind's device tool on this host the
    plan goes on with the request as configured and says the devices were not checked."""
    settings = pipeline.settings.devices
    request = settings.request_for(task)
    kind = resolve_kind(settings.kind)
    variable = VISIBLE_DEVICES_VAR.get(kind)
    try:
        inventory = take_inventory(settings)
    except DeviceToolMissing as missing:
        count = request if isinstance(request, int) else len(request)
        chosen = "<free devices, chosen at lease>" if isinstance(request, int) else ",".join(map(str, request))
        env = {variable: chosen} if variable else {}
        return PlannedDevices(kind, count, env, f"{kind} x {count}, not checked on this host", str(missing))
    candidates, needed = candidate_ids(inventory, request, task)
    ids = tuple(candidates[:needed])
    env = {variable: ",".join(map(str, ids))} if variable else {}
    shown = f"{kind} {','.join(map(str, ids))} ({len(ids)} of this host's free devices)"
    return PlannedDevices(kind, len(ids), env, shown)


def render_plan(pipeline: Pipeline) -> list[RenderableType]:
    settings = pipeline.settings
    check_with_engine(pipeline, without_missing_env_script=True)
    warnings = [Text(f"warning: {missing}; `npu-sft run` here would refuse it", style="yellow")
                for missing in (env_script_missing(pipeline), missing_data_file(pipeline)) if missing is not None]
    devices = planned_devices(pipeline, "train")
    if devices.unchecked is not None:
        warnings.append(Text(f"warning: devices not checked: {devices.unchecked}", style="yellow"))
    run_dir = pipeline.state_dir / "runs" / "<mlflow-run-id>"
    config = resolve_train_config(
        pipeline,
        model_path=_planned_model_path(pipeline),
        data_args=_planned_data_args(pipeline),
        output_dir=run_dir / "output",
    )
    launch = distributed_launch(settings.training, nproc_per_node=devices.count, master_port=MASTER_PORT_PLACEHOLDER)
    command = torchrun_train_command(settings.engine, launch, run_dir / "llamafactory.yaml", env=devices.env)
    shown_env = [*devices.env, *settings.engine.env] if settings.engine.is_local else []
    line = render_command(command, shown_env).replace("--master_port 0", "--master_port <free port, reserved at launch>")

    summary = Table(title=f"plan: {settings.name}", show_header=False, title_justify="left")
    summary.add_row("pipeline config", str(pipeline.config_file))
    summary.add_row("LLaMA-Factory config", f"{pipeline.llamafactory_file} (accepted by LLaMA-Factory's parser)")
    summary.add_row("train devices", devices.shown)
    summary.add_row("model", _describe_model(pipeline))
    summary.add_row("datasets", _describe_datasets(pipeline))
    summary.add_row("stall deadlines", _stall_row(pipeline, devices.kind))
    summary.add_row("guards", _guards_row(pipeline, devices.kind))
    for stage, description in _publish_rows(pipeline):
        summary.add_row(stage, description)
    return [
        summary,
        Text("Resolved LLaMA-Factory config:", style="bold"),
        Syntax(yaml.safe_dump(without_secrets(config), sort_keys=False, allow_unicode=True), "yaml"),
        Text("Engine command:", style="bold"),
        Text(line),
        Text(f"Serve command (the serve flow, {settings.publish.registered_model} version <N>, e.g. champion):",
             style="bold"),
        Text(_serve_line(pipeline)),
        *warnings,
        Text("Nothing was started: no download, no dataset preparation, no device lease.", style="dim"),
    ]


def _serve_line(pipeline: Pipeline) -> str:
    """The API server the serve flow would start with `keep_serving` on port 8000; the key is never shown."""
    settings = pipeline.settings
    devices = planned_devices(pipeline, "serve")
    try:
        env = {**devices.env, **settings.serve.backend_env(devices.kind)}
    except ValueError as err:  # devices.kind auto found no accelerator
        raise ConfigError(f"{pipeline.config_file}: {err}") from None
    name = settings.publish.registered_model
    model = served_model(
        pipeline, served_name(name, "<N>"), _planned_model_path(pipeline), pipeline.state_dir / "registry" / f"{name}-v<N>"
    )
    command = api_server_command(settings.engine, model, settings.serve, port=8000, api_key="", env=env)
    shown = [*env, *settings.engine.env, *SERVE_SHOWN_ENV] if settings.engine.is_local else []
    return render_command(command, shown)


HCCL_DEFAULT_EXEC_TIMEOUT_S = 1800  # CANN's default for HCCL_EXEC_TIMEOUT


def _guards_row(pipeline: Pipeline, kind: str) -> str:
    """What stops a training at once, without a retry."""
    guards = pipeline.settings.training.guards
    if not guards.enabled:
        return "off (training.guards.enabled: false)"
    device = f"; a rank not on {kind} devices" if kind in ("npu", "gpu") else ""
    return f"a loss NaN, inf or 0 for {guards.diverged_steps} logged steps in a row{device}: stopped, not retried"


def _stall_row(pipeline: Pipeline, kind: str) -> str:
    """The watchdog's deadlines beside the collective timeouts it undercuts (a hang waits for those otherwise)."""
    stall = pipeline.settings.training.stall
    if not stall.enabled:
        watchdog = "watchdog off (training.stall.enabled: false)"
    else:
        watchdog = (
            f"start-up {stall.startup_s:g} s; between steps {stall.step_factor:g} x the longest interval, at least "
            f"{stall.step_floor_s:g} s; evaluation or save {stall.phase_s:g} s"
        )
    collectives = [f"ddp_timeout {pipeline.llamafactory.get('ddp_timeout', 1800)} s"]
    if kind == "npu":
        hccl = pipeline.settings.engine.env.get("HCCL_EXEC_TIMEOUT")
        shown = f"{hccl} s" if hccl is not None else f"{HCCL_DEFAULT_EXEC_TIMEOUT_S} s (CANN's default)"
        collectives.append(f"HCCL_EXEC_TIMEOUT {shown}")
    return f"{watchdog}; a hang otherwise waits for {', '.join(collectives)}"


def _publish_rows(pipeline: Pipeline) -> list[tuple[str, str]]:
    """Where the adapter goes after the evaluation: the registry and its gate, a ModelScope push, a merged export."""
    publish = pipeline.settings.publish
    if not publish.enabled:
        return [("publish", "off (publish.enabled: false): the adapter stays in the run's output directory")]
    rows = [("publish", f"{publish.registered_model}: a new version per run, alias candidate; "
                        f"{describe_gate(publish.gate)}")]
    if (push := publish.modelscope) is not None:
        token = f"Prefect Secret block {push.token_secret!r}" if push.token_secret else f"${TOKEN_ENV_VAR}"
        hub = push.endpoint or "$MODELSCOPE_ENDPOINT or modelscope.cn"
        visibility = "private" if push.private else "public"
        rows.append(("ModelScope push", f"each new champion to {push.repo_id}, branch {push.revision} (created "
                                        f"{visibility} if missing) at {hub}; token from {token}"))
    if publish.merged.enabled:
        merged_name = merged_model_name(publish.merged, publish.registered_model)
        rows.append(("merged export", f"each new champion merged into its base model, registered as {merged_name} "
                                      f"(safetensors shards up to {publish.merged.shard_size_gb} GB)"))
    return rows


def _planned_data_args(pipeline: Pipeline) -> dict[str, object]:
    args: dict[str, object] = {"dataset_dir": str(pipeline.state_dir / "datasets" / "<content-hash>"), "dataset": "train"}
    if pipeline.val_size:
        args.update({"eval_dataset": "eval", "val_size": 0.0})
    return args


def _describe_model(pipeline: Pipeline) -> str:
    source = pipeline.settings.model
    if isinstance(source, TinyModelSource):
        return f"embedded tiny Qwen2 model (generated locally, seed {source.seed})"
    if source.source == "local":
        return f"local directory {source.path}"
    return f"ModelScope {source.id} @ {source.revision} ({NOT_ASKED})"


# What a plan can not know without the network: it names the repositories, `npu-sft doctor CONFIG` asks the hub.
NOT_ASKED = "the hub is not asked by a plan: npu-sft doctor checks it"


def _describe_datasets(pipeline: Pipeline) -> str:
    """Each input set and where it comes from, in the order preparation reads them."""
    described = []
    for spec in pipeline.settings.data.datasets:
        if spec.source == "builtin":
            described.append(f"{spec.name} (builtin)")
        elif spec.source == "file" or spec.path is not None:
            patterns = f", files {', '.join(spec.files)}" if spec.files else ""
            described.append(f"{spec.name} ({spec.path}{patterns})")
        else:
            patterns = f", files {', '.join(spec.files)}" if spec.files else ""
            described.append(f"{spec.name} (ModelScope dataset {spec.repo_id} @ {spec.revision or 'master'}{patterns})")
    hub = any(spec.source == "modelscope" and spec.path is None for spec in pipeline.settings.data.datasets)
    return "; ".join(described) + (f" ({NOT_ASKED})" if hub else "")


def _planned_model_path(pipeline: Pipeline) -> str:
    source = pipeline.settings.model
    if isinstance(source, TinyModelSource):
        return str(pipeline.state_dir / "models" / "tiny-qwen2-<hash>")
    if source.source == "local":
        return str(source.path)
    return f"<ModelScope cache>/{source.id} (revision {source.revision})"


def model_tokenizer(pipeline: Pipeline) -> Path | None:
    """The model's tokenizer for dataset statistics, fetching only the tokenizer when the model is not cached."""
    source = pipeline.settings.model
    if isinstance(source, TinyModelSource):
        return tokenizer_file(ensure_tiny_model(pipeline.settings.engine, pipeline.state_dir / "models", source.seed))
    if source.source == "local":
        return tokenizer_file(Path(source.path))
    cached = find_cached_download(source)
    if cached is not None:
        return tokenizer_file(cached.path)
    tokenizer_only = source.model_copy(update={"allow_patterns": TOKENIZER_PATTERNS})
    return tokenizer_file(download_model(tokenizer_only).path)


def prepare_alone(pipeline: Pipeline) -> list[RenderableType]:
    data_settings, _ = with_downloaded_datasets(pipeline.data_settings(), pipeline.hub_source)
    prepared = prepare_datasets(data_settings, **pipeline.prepare_arguments(model_tokenizer(pipeline)))
    return render_prepare_report(prepared)
