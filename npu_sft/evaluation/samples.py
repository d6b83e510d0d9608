"""Answers side by side: the first rows of the held-out split with the reference, the base model's answer and the
adapter's, for the run's table (MLflow) and the flow run's (Prefect)."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from npu_sft.evaluation.models import Evaluation


def read_predictions(path: Path, limit: int) -> list[dict[str, str]]:
    """The first `limit` rows of a generated_predictions.jsonl (prompt, predict, label)."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in islice((line for line in handle if line.strip()), limit)]


def sample_rows(evaluation: Evaluation, limit: int) -> list[dict[str, str]]:
    if evaluation.adapter is None or limit == 0:
        return []
    adapter_rows = read_predictions(evaluation.adapter.predictions, limit)
    base_rows = (
        read_predictions(evaluation.baseline.scores.predictions, limit) if evaluation.baseline is not None else []
    )
    rows = []
    for index, row in enumerate(adapter_rows):
        sample = {"prompt": row.get("prompt", "").strip(), "reference": row.get("label", "").strip()}
        if evaluation.baseline is not None:
            sample["base answer"] = base_rows[index].get("predict", "").strip() if index < len(base_rows) else ""
        sample["adapter answer"] = row.get("predict", "").strip()
        rows.append(sample)
    return rows


def as_columns(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """Rows as MLflow's table form (column -> values)."""
    columns: dict[str, list[str]] = {}
    for row in rows:
        for name, value in row.items():
            columns.setdefault(name, []).append(value)
    return columns
