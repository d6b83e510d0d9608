"""`npu-sft compare`: an experiment's runs side by side, best first, with only the params that differ between them.

    npu-sft compare sft-tiny                          # the store of MLFLOW_TRACKING_URI, or ./mlruns
    npu-sft compare --config configs/qwen7b.yaml      # the config's experiment and store
    npu-sft compare sft-tiny --metric eval_loss --format csv > runs.csv
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow import MlflowClient
from rich import box
from rich.console import Console
from rich.table import Table

from npu_sft.errors import BadInputError

DEFAULT_METRICS = ("eval/rouge_l", "eval_loss")  # the first one the runs have orders them
# Lower is better for these; every other metric is a score.
_LOWER_IS_BETTER = ("loss", "perplexity", "runtime", "wall_time", "_time_s", "memory", "rss")
# Params every run has but that name places, not choices: they differ without making runs differ.
_PLACES = {"pipeline.name"}
MAX_RUNS = 1000
SETTINGS_COLUMNS = 5  # runs side by side in the settings table; more would not fit 80 columns


class CompareError(BadInputError):
    """An experiment, metric or store the comparison cannot use; the message says which."""


@dataclass(frozen=True)
class ComparedRun:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in _LOWER_IS_BETTER) and not metric.startswith("gain/")


def load_runs(client: MlflowClient, experiment: str) -> list[ComparedRun]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no MLflow experiment {experiment!r} in this store; it has: {', '.join(names) or 'none'}")
    runs = client.search_runs([found.experiment_id], max_results=MAX_RUNS)
    return [
        ComparedRun(run.info.run_id, run.info.run_name or run.info.run_id[:8], run.info.status,
                    dict(run.data.params), dict(run.data.metrics))
        for run in runs
    ]


def differing_params(runs: Sequence[ComparedRun]) -> list[str]:
    """Params that take more than one value among the runs that have them, in a stable order. A param missing from
    some runs (they predate it) does not make it differ by itself."""
    keys = sorted({key for run in runs for key in run.params} - _PLACES)
    return [key for key in keys if len({run.params[key] for run in runs if key in run.params}) > 1]


def pick_metric(runs: Sequence[ComparedRun], metric: str | None) -> str:
    have = {key for run in runs for key in run.metrics}
    if metric is not None:
        if runs and metric not in have:
            raise CompareError(f"no run has the metric {metric!r}; they have e.g. {', '.join(sorted(have)[:8])}")
        return metric
    return next((name for name in DEFAULT_METRICS if name in have), DEFAULT_METRICS[-1])


def rank(runs: Sequence[ComparedRun], metric: str) -> list[ComparedRun]:
    """Best first by `metric`; runs without it (failed, still running) last, newest order kept among them."""
    sign = 1.0 if lower_is_better(metric) else -1.0
    scored = [run for run in runs if metric in run.metrics]
    unscored = [run for run in runs if metric not in run.metrics]
    return sorted(scored, key=lambda run: sign * run.metrics[metric]) + unscored


def metric_columns(runs: Sequence[ComparedRun], metric: str) -> list[str]:
    """The ordering metric, its base-model score and gain when the runs have them, and the eval loss."""
    have = {key for run in runs for key in run.metrics}
    name = metric.removeprefix("eval/")
    wanted = [metric, f"base/{name}", f"gain/{name}", "eval_loss"] if metric.startswith("eval/") else [metric, "eval_loss"]
    return list(dict.fromkeys(key for key in wanted if key in have)) or [metric]


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def render_table(runs: Sequence[ComparedRun], params: Sequence[str], metrics: Sequence[str], console: Console) -> None:
    """Two tables that stay readable at 80 columns: the runs best first with their metrics, then the settings that
    differ as rows with the runs as columns (as MLflow's comparison view lays them out)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("run", no_wrap=True, overflow="ellipsis", max_width=28)
    table.add_column("status", no_wrap=True)
    for name in metrics:
        table.add_column(_metric_label(name), justify="right", no_wrap=True)
    for index, run in enumerate(runs, 1):
        table.add_row(str(index), run.name, run.status.lower(),
                      *(_number(run.metrics.get(name), signed=name.startswith("gain/")) for name in metrics))
    console.print(table)
    if not params:
        console.print("The runs' settings are all the same.")
        return
    shown = runs[:SETTINGS_COLUMNS]
    settings = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    settings.add_column("settings that differ", overflow="fold")
    for index in range(1, len(shown) + 1):
        settings.add_column(f"#{index}", overflow="fold")
    for name in params:
        settings.add_row(name.removeprefix("pipeline."), *(run.params.get(name, "-") for run in shown))
    console.print()
    console.print(settings)
    if len(runs) > len(shown):
        console.print(f"(settings of runs #{len(shown) + 1} to #{len(runs)}: --format csv or json)")


def _metric_label(metric: str) -> str:
    """eval/rouge_l -> rouge_l, base/rouge_l -> base, gain/rouge_l -> gain: the first column names the metric."""
    head, _, _ = metric.partition("/")
    return head if head in ("base", "gain") else metric.removeprefix("eval/")


def as_records(runs: Sequence[ComparedRun], params: Sequence[str]) -> list[dict[str, object]]:
    """Every run with all its metrics and the differing params, for scripts."""
    return [
        {"rank": index, "run_id": run.run_id, "run_name": run.name, "status": run.status,
         "params": {name: run.params.get(name) for name in params}, "metrics": run.metrics}
        for index, run in enumerate(runs, 1)
    ]


def to_json(runs: Sequence[ComparedRun], params: Sequence[str]) -> str:
    return json.dumps(as_records(runs, params), indent=2, sort_keys=False)


def to_csv(runs: Sequence[ComparedRun], params: Sequence[str]) -> str:
    metrics = sorted({key for run in runs for key in run.metrics})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "run_id", "run_name", "status", *params, *metrics])
    for index, run in enumerate(runs, 1):
        writer.writerow([index, run.run_id, run.name, run.status, *(run.params.get(name, "") for name in params),
                         *(run.metrics.get(name, "") for name in metrics)])
    return out.getvalue()
