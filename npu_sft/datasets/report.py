"""Human-readable views of prepared data: rich renderables for the CLI and table rows for Prefect artifacts."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from rich.console import RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from npu_sft.datasets.stats import DatasetStats, LengthStats, SourceStats

if TYPE_CHECKING:
    from npu_sft.datasets.prepare import PreparedData


def render_prepare_report(prepared: PreparedData) -> list[RenderableType]:
    """Where the data is, per-dataset counts and token lengths, what was rejected and why, and warnings."""
    stats = prepared.stats
    renderables: list[RenderableType] = [_location(prepared), _sources_table(stats), _split_table(stats),
                                         _tokens_line(stats)]
    if stats.rejected or stats.duplicates:
        renderables.append(_rejects_panel(prepared))
    renderables.extend(Text(f"warning: {warning}", style="yellow") for warning in stats.warnings)
    return renderables


def _location(prepared: PreparedData) -> Text:
    text = Text()
    text.append("Prepared datasets: ", style="bold")
    text.append(str(prepared.dir))
    text.append("  (cache hit: reused, nothing rebuilt)" if prepared.cache_hit else "  (built)", style="dim")
    eval_part = f", eval_dataset: {prepared.eval_dataset}" if prepared.eval_dataset else ""
    text.append(f"\nLLaMA-Factory: dataset_dir: {prepared.dir}, dataset: {prepared.train_dataset}{eval_part}")
    return text


def _sources_table(stats: DatasetStats) -> Table:
    """Counts per dataset; split and token lengths are their own table, so each reads at 80 columns."""
    table = Table(title="Datasets", title_justify="left")
    table.add_column("dataset", overflow="fold")
    table.add_column("source", overflow="fold")
    table.add_column("format", overflow="fold")
    for column in ("rows", "valid", "rejected", "duplicates"):
        table.add_column(column, justify="right", no_wrap=True)
    for source in stats.sources:
        table.add_row(source.name, source.source, source.format, f"{source.total:,}", f"{source.valid:,}",
                      _rejected_cell(source.rejected, source.reject_share), f"{source.duplicates:,}")
    table.add_row("total", "", "", f"{stats.total:,}", f"{stats.valid:,}",
                  _rejected_cell(stats.rejected, stats.reject_share), f"{stats.duplicates:,}", style="bold")
    return table


def _split_table(stats: DatasetStats) -> Table:
    table = Table(title="Split and token lengths", title_justify="left")
    table.add_column("dataset", overflow="fold")
    for column in ("train", "eval", "tokens p50 / p99 / max", f"> cutoff_len {stats.cutoff_len}"):
        table.add_column(column, justify="right", overflow="fold")
    for source in stats.sources:
        table.add_row(source.name, f"{source.train:,}", f"{source.eval:,}", _lengths_cell(source.tokens),
                      _truncated_cell(source.truncated, source.kept))
    table.add_row("total", f"{stats.train:,}", f"{stats.eval:,}", _lengths_cell(stats.tokens),
                  _truncated_cell(stats.truncated, stats.kept), style="bold")
    return table


def _rejected_cell(rejected: int, reject_share: float) -> str:
    return f"{rejected:,} ({reject_share:.1%})" if rejected else "0"


def _lengths_cell(lengths: LengthStats | None) -> str:
    return f"{lengths.p50} / {lengths.p99} / {lengths.max}" if lengths else "-"


def _truncated_cell(truncated: int | None, kept: int) -> str:
    if truncated is None:
        return "-"
    return f"{truncated:,} ({truncated / kept:.1%})" if truncated and kept else "0"


def _tokens_line(stats: DatasetStats) -> Text:
    if stats.tokens is None:
        return Text("Token lengths: not measured (no tokenizer)", style="dim")
    tokens = stats.tokens
    return Text(
        f"Token lengths (estimated, incl. template): min {tokens.min}, mean {tokens.mean:.1f}, p50 {tokens.p50}, "
        f"p90 {tokens.p90}, p99 {tokens.p99}, max {tokens.max}; "
        f"{stats.truncated_share or 0:.1%} of rows exceed cutoff_len {stats.cutoff_len}"
    )


def _rejects_panel(prepared: PreparedData) -> Panel:
    reasons: Counter[str] = Counter()
    for source in prepared.stats.sources:
        reasons.update(source.reject_reasons)
    lines = [f"{count:>8,}  {code}" for code, count in reasons.most_common()]
    lines.append(f"\nEvery rejected row with its reasons: {prepared.rejects_path}")
    return Panel("\n".join(lines), title="Rejected rows by reason", title_align="left")


def stats_table_rows(stats: DatasetStats) -> list[dict[str, Any]]:
    """One row per dataset plus a total, for a Prefect table artifact (flat, JSON-friendly values)."""
    rows = [_table_row(source.name, source, source.reject_share) for source in stats.sources]
    rows.append(_table_row("total", stats, stats.reject_share))
    return rows


def _table_row(name: str, counts: SourceStats | DatasetStats, reject_share: float) -> dict[str, Any]:
    tokens = counts.tokens
    return {
        "dataset": name,
        "rows": counts.total,
        "valid": counts.valid,
        "rejected": counts.rejected,
        "reject_share": round(reject_share, 4),
        "duplicates": counts.duplicates,
        "train": counts.train,
        "eval": counts.eval,
        "tokens_p50": tokens.p50 if tokens else None,
        "tokens_p90": tokens.p90 if tokens else None,
        "tokens_p99": tokens.p99 if tokens else None,
        "tokens_max": tokens.max if tokens else None,
        "truncated": counts.truncated,
    }
