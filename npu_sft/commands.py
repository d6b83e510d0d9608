"""What each `npu-sft` subcommand does (argument parsing lives in cli.py, which imports this lazily)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from npu_sft.devices import render_device_report
from npu_sft.engine.llamafactory_config import check_with_engine, engine_verdict_is_kept
from npu_sft.prefect_server import temporary_server_started_early
from npu_sft.preflight import check_on_this_host
from npu_sft.settings import ConfigError, Pipeline, load_pipeline

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def run_command(args: argparse.Namespace) -> int:
    handlers = {
        "run": run_flow,
        "demo": run_demo,
        "evaluate": evaluate,
        "plan": plan,
        "prepare": prepare,
        "devices": devices,
        "doctor": doctor,
        "compare": compare,
    }
    return handlers[args.command](args)


def run_demo(args: argparse.Namespace) -> int:
    args.config = str(DEMO_CONFIG)
    return run_flow(args)


def load_for_engine(args: argparse.Namespace, *, check_engine: bool = True) -> Pipeline:
    """The pipeline of a command that starts the engine: bad input fails here, before Prefect starts anything (with
    `check_engine=False`, the engine's own check of the LLaMA-Factory config is the caller's)."""
    pipeline = load_pipeline(args.config, args.overrides)
    check_on_this_host(pipeline)
    if check_engine:
        check_with_engine(pipeline)  # as `plan` does; the flow's own check then finds the verdict kept
    return pipeline


@contextmanager
def _prefect_starting_while_the_engine_checks(pipeline: Pipeline) -> Iterator[None]:
    """Prefect's temporary server starts while the flow's modules import. A config the engine has not checked yet is
    checked meanwhile (the engine's imports take seconds); its refusal stops the server before the flow starts. A
    kept verdict is read first, so a kept refusal starts nothing."""
    if engine_verdict_is_kept(pipeline):
        check_with_engine(pipeline)
        with temporary_server_started_early():
            yield
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="npu-sft-engine-check") as pool:
        checking = pool.submit(check_with_engine, pipeline)
        with temporary_server_started_early():
            yield
            checking.result()


def run_flow(args: argparse.Namespace) -> int:
    pipeline = load_for_engine(args, check_engine=False)
    with _prefect_starting_while_the_engine_checks(pipeline):
        from flows.sft import sft
    result = sft(str(pipeline.config_file), args.overrides)
    from npu_sft.tracking import tracking_uri

    console = Console()
    summary = Table(title=f"sft: {pipeline.settings.name}", show_header=False)
    summary.add_row("MLflow run", result.mlflow_run_id)
    summary.add_row("tracking store", tracking_uri(pipeline.settings.mlflow))
    for key in ("eval_loss", "perplexity", "train_loss"):
        if key in result.metrics:
            summary.add_row(key, f"{result.metrics[key]:.4f}")
    _add_score_rows(summary, result.metrics)
    if (published := result.published) is not None:
        verdict = "champion" if published.decision.promote else "candidate"
        summary.add_row("registered model", f"{published.name} version {published.version} ({verdict})")
        summary.add_row("publish gate", published.decision.reason)
    if result.served_reply is not None:
        summary.add_row("served reply", repr(result.served_reply))
    console.print(summary)
    _print_where_to_look(pipeline, result.mlflow_run_id, console)
    return 0


def _print_where_to_look(pipeline: Pipeline, run_id: str, console: Console) -> None:
    """The run's page in MLflow's UI (its model-training view), and how to start that UI over a file store."""
    from npu_sft.tracking import client_for, tracking_uri
    from npu_sft.tracking.summary import mlflow_run_url, mlflow_ui_url

    uri = tracking_uri(pipeline.settings.mlflow)
    experiment_id = client_for(pipeline.settings.mlflow).get_run(run_id).info.experiment_id
    ui_url = mlflow_ui_url(uri)
    page = mlflow_run_url(ui_url or "http://127.0.0.1:5000", experiment_id, run_id)
    if ui_url is None:
        console.print(f"MLflow UI:  mlflow ui --backend-store-uri {uri} --port 5000", soft_wrap=True)
        console.print(f"            then open {page}", soft_wrap=True)  # a link stays one line, clickable
    else:
        console.print(f"MLflow run: {page}", soft_wrap=True)
    console.print("Prefect UI: make up, then open http://127.0.0.1:4200")


def evaluate(args: argparse.Namespace) -> int:
    from npu_sft.evaluation.reevaluation import find_evaluation_target

    pipeline = load_for_engine(args)
    target = find_evaluation_target(pipeline, args.run, args.version)  # before Prefect starts anything
    with temporary_server_started_early():
        from flows.evaluate import evaluate_again

    evaluation = evaluate_again(str(pipeline.config_file), target.run_id, args.overrides, target.version)
    summary = Table(title=f"evaluate: {pipeline.settings.name}", show_header=False)
    summary.add_row("MLflow run", target.run_id)
    if target.version is None:
        summary.add_row("adapter scored", "the run's output directory")
    else:
        name = pipeline.settings.publish.registered_model
        asked = "" if args.version == target.version else f" ({args.version})"
        summary.add_row("adapter scored", f"registry: {name} v{target.version}{asked}")
    _add_score_rows(summary, evaluation.metrics())
    if evaluation.baseline is not None:
        summary.add_row("base model scores", "reused" if evaluation.baseline.reused else "computed")
    Console().print(summary)
    return 0


def _add_score_rows(summary: Table, metrics: dict[str, float]) -> None:
    for name, label in (("bleu_4", "BLEU-4"), ("rouge_l", "ROUGE-L")):
        if f"eval/{name}" not in metrics:
            continue
        if f"base/{name}" in metrics:
            shown = f"{metrics[f'eval/{name}']:.2f} / {metrics[f'base/{name}']:.2f} / {metrics[f'gain/{name}']:+.2f}"
        else:
            shown = f"{metrics[f'eval/{name}']:.2f} / - / -"
        summary.add_row(f"{label} adapter / base / gain", shown)


def plan(args: argparse.Namespace) -> int:
    from npu_sft.planning import render_plan

    pipeline = load_pipeline(args.config, args.overrides)
    Console().print(*render_plan(pipeline), sep="\n")
    return 0


def prepare(args: argparse.Namespace) -> int:
    from npu_sft.planning import prepare_alone

    pipeline = load_pipeline(args.config, args.overrides)
    Console().print(*prepare_alone(pipeline), sep="\n")
    return 0


def devices(args: argparse.Namespace) -> int:
    from npu_sft.devices import DeviceSettings

    settings = load_pipeline(args.config).settings.devices if args.config else DeviceSettings()
    Console().print(*render_device_report(settings), sep="\n")
    return 0


def doctor(args: argparse.Namespace) -> int:
    """Exit 0 when nothing is an error (warnings included), 1 otherwise."""
    import os

    from npu_sft.doctor import diagnose, render_findings, worst

    pipeline = load_pipeline(args.config, args.overrides) if args.config else None
    findings = diagnose(pipeline, os.environ)
    title = f"npu-sft doctor: {pipeline.config_file}" if pipeline is not None else "npu-sft doctor: this host"
    Console().print(*render_findings(title, findings), sep="\n")
    return 1 if worst(findings) == "error" else 0


def compare(args: argparse.Namespace) -> int:
    """The experiment's runs best first: the config's experiment and store, or the one named in the store of
    MLFLOW_TRACKING_URI (default: ./mlruns, as the configs use)."""
    import os

    from mlflow import MlflowClient
    from pydantic import ValidationError

    from npu_sft.settings import MlflowSettings
    from npu_sft.tracking import compare as comparing
    from npu_sft.tracking import tracking_uri

    if args.config:
        settings = load_pipeline(args.config).settings.mlflow
    else:
        uri_from_env = os.environ.get("MLFLOW_TRACKING_URI", MlflowSettings().tracking_uri)
        try:
            settings = MlflowSettings(tracking_uri=uri_from_env)
        except ValidationError as err:
            reason = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"MLFLOW_TRACKING_URI={uri_from_env}: {reason}") from None
    experiment = args.experiment or settings.experiment
    uri = tracking_uri(settings)
    runs = comparing.load_runs(MlflowClient(tracking_uri=uri, registry_uri=uri), experiment)
    metric = comparing.pick_metric(runs, args.metric)
    ranked = comparing.rank(runs, metric)
    params = comparing.differing_params(ranked)
    if args.format == "json":
        print(comparing.to_json(ranked, params))
    elif args.format == "csv":
        print(comparing.to_csv(ranked, params), end="")
    else:
        console = Console()
        order = "lower" if comparing.lower_is_better(metric) else "higher"
        console.print(f"{experiment}: {len(ranked)} runs, best first by {metric} ({order} is better)")
        comparing.render_table(ranked, params, comparing.metric_columns(ranked, metric), console)
    return 0

