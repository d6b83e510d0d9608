"""What a pipeline run achieved, as the markdown Prefect shows on the flow run's Artifacts tab, and the way back to
the MLflow run (its page in MLflow's UI, when there is one).

    summary = RunSummary(pipeline="tiny-cpu", mlflow_run_id=..., mlflow_run_url=..., metrics=..., published=...)
    create_markdown_artifact(summary.markdown(), key="sft-summary")
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from npu_sft.publishing.versions import Published

SUMMARY_ARTIFACT_KEY = "sft-summary"
MLFLOW_LINK_ARTIFACT_KEY = "mlflow-run"

_FIGURES = (
    ("train/steps", "optimizer steps", "{:.0f}"),
    ("train/attempts", "attempts", "{:.0f}"),
    ("train/wall_time_s", "training wall time", "{:.0f} s"),
    ("train/samples_per_s", "samples per second", "{:.2f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
)


def mlflow_ui_url(tracking_uri: str) -> str | None:
    """The MLflow UI's base URL: a tracking server serves its UI too (as `make up`'s does); a file store has none."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return None


# MLflow 3's UI opens in its GenAI mode unless the page asks for the model-training one (or the user toggled it).
TRAINING_VIEW = "workflowType=machine_learning"


def mlflow_run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_url}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def mlflow_experiment_url(ui_url: str, experiment_id: str) -> str:
    """The experiment's runs table and charts."""
    return f"{ui_url}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


@dataclass(frozen=True)
class RunSummary:
    pipeline: str
    mlflow_run_id: str
    mlflow_run_url: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    published: Published | None = None
    served_reply: str | None = None
    open_hint: str | None = None  # how to open the run when there is no UI URL

    def markdown(self) -> str:
        run = f"[{self.mlflow_run_id}]({self.mlflow_run_url})" if self.mlflow_run_url else f"`{self.mlflow_run_id}`"
        lines = [f"# {self.pipeline}: what this run achieved", "", f"MLflow run: {run}"]
        if not self.mlflow_run_url and self.open_hint:
            lines.append(f"(open it with `{self.open_hint}`)")
        lines += ["", *self._scores(), *self._figures(), *self._publish()]
        if self.served_reply is not None:
            lines += ["## Served", "", f"Smoke-test reply: {_cell(self.served_reply)}", ""]
        return "\n".join(lines).rstrip() + "\n"

    def _scores(self) -> list[str]:
        names = sorted(key.removeprefix("eval/") for key in self.metrics
                       if key.startswith("eval/") and not key.endswith(("_s", "runtime")))
        if not names:
            return []
        rows = ["## Evaluation", "", "| metric | adapter | base model | gain |", "|---|---:|---:|---:|"]
        for name in names:
            base, gain = self.metrics.get(f"base/{name}"), self.metrics.get(f"gain/{name}")
            rows.append(f"| {name} | {self.metrics[f'eval/{name}']:.4f} | {_number(base)} | "
                        f"{'' if gain is None else f'{gain:+.4f}'} |")
        return [*rows, ""]

    def _figures(self) -> list[str]:
        rows = [f"| {label} | {fmt.format(self.metrics[key])} |" for key, label, fmt in _FIGURES if key in self.metrics]
        return ["## Training", "", "| figure | value |", "|---|---:|", *rows, ""] if rows else []

    def _publish(self) -> list[str]:
        published = self.published
        if published is None:
            return ["## Publish", "", "Not published (publish is off, or there was nothing to judge).", ""]
        verdict = "promoted to **champion**" if published.decision.promote else "kept, not promoted"
        champion = f"; champion is version {published.champion}" if published.champion else ""
        return [
            "## Publish", "",
            f"Registered model `{published.name}` version {published.version}: {verdict}{champion}.", "",
            f"Gate: {_cell(published.decision.reason)}", "",
        ]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _cell(text: str) -> str:
    """One line of user text that cannot break the markdown around it."""
    return " ".join(text.split()).replace("|", "\\|")[:300]
