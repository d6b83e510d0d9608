"""The statistics of a preparation, per source and in total, and the warnings they call for."""

from __future__ import annotations

from pathlib import Path

from npu_sft.datasets.reading import LoadedSource
from npu_sft.datasets.settings import DataSettings
from npu_sft.datasets.stats import DatasetStats, SourceStats, length_stats, share
from npu_sft.datasets.validation import Validated


def statistics(
    *,
    key: str,
    settings: DataSettings,
    sources: list[LoadedSource],
    validated: Validated,
    eval_indexes: set[int],
    lengths: list[int] | None,
    val_size: float,
    cutoff_len: int,
    tokenizer_file: Path | None,
) -> DatasetStats:
    source_stats = [
        _source_stats(index, source, validated, eval_indexes, lengths, cutoff_len)
        for index, source in enumerate(sources)
    ]
    total = sum(item.total for item in source_stats)
    rejected = sum(item.rejected for item in source_stats)
    duplicates = sum(item.duplicates for item in source_stats)
    truncated = sum(1 for length in lengths if length > cutoff_len) if lengths is not None else None
    stats = DatasetStats(
        key=key,
        sources=source_stats,
        total=total,
        valid=total - rejected,
        rejected=rejected,
        duplicates=duplicates,
        kept=len(validated.kept),
        train=len(validated.kept) - len(eval_indexes),
        eval=len(eval_indexes),
        reject_share=share(rejected, total),
        max_reject_share=settings.max_reject_share,
        val_size=val_size,
        seed=settings.seed,
        cutoff_len=cutoff_len,
        tokenizer=str(tokenizer_file) if tokenizer_file is not None else None,
        tokens=length_stats(lengths) if lengths is not None else None,
        truncated=truncated,
        truncated_share=share(truncated, len(validated.kept)) if truncated is not None else None,
    )
    stats.warnings = _warnings(settings, stats)
    return stats


def _source_stats(
    index: int,
    source: LoadedSource,
    validated: Validated,
    eval_indexes: set[int],
    lengths: list[int] | None,
    cutoff_len: int,
) -> SourceStats:
    tally = validated.tallies[index]
    positions = [position for position, row in enumerate(validated.kept) if row.source_index == index]
    source_lengths = [lengths[position] for position in positions] if lengths is not None else None
    eval_rows = sum(1 for position in positions if position in eval_indexes)
    valid = tally.total - tally.rejected
    return SourceStats(
        name=source.spec.name,
        source=source.spec.source,
        format=source.spec.format,
        files=[display for display, _ in source.digests()],
        skipped_files=source.skipped_files,
        total=tally.total,
        valid=valid,
        rejected=tally.rejected,
        duplicates=tally.duplicates,
        kept=len(positions),
        train=len(positions) - eval_rows,
        eval=eval_rows,
        reject_share=share(tally.rejected, tally.total),
        reject_reasons=dict(sorted(tally.reasons.items(), key=lambda item: (-item[1], item[0]))),
        tokens=length_stats(source_lengths) if source_lengths is not None else None,
        truncated=sum(1 for length in source_lengths if length > cutoff_len) if source_lengths is not None else None,
    )


def _warnings(settings: DataSettings, stats: DatasetStats) -> list[str]:
    warnings = []
    tokens, truncated_share = stats.tokens, stats.truncated_share
    if tokens is not None and truncated_share is not None and truncated_share > settings.truncation_warning_share:
        warnings.append(
            f"{truncated_share:.1%} of rows ({stats.truncated:,}) are longer than cutoff_len={stats.cutoff_len}"
            f" tokens and will be truncated; raise cutoff_len or shorten them (p99 = {tokens.p99} tokens)"
        )
    if stats.tokenizer is None:
        warnings.append("no tokenizer given: token lengths and the truncated share were not measured")
    if stats.rejected:
        warnings.append(
            f"{stats.rejected:,} of {stats.total:,} rows rejected ({stats.reject_share:.1%}); see the rejects file"
        )
    if stats.duplicates:
        warnings.append(f"{stats.duplicates:,} duplicate rows dropped")
    for source in stats.sources:
        if source.skipped_files:
            warnings.append(f"{source.name}: left out files of other splits: {', '.join(source.skipped_files)}")
    return warnings
