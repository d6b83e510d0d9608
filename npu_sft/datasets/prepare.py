"""Dataset preparation: read every source, validate each row, dedup, split, measure, and register the result.

The point is to make the data's state explicit before any device is taken: every row that LLaMA-Factory would
silently drop (or train on broken) is named with its reasons in a rejects file, and the stage fails when too many
are rejected, instead of a user finding out after hours of training.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npu_sft.datasets.cache_key import content_key, read_tokenizer
from npu_sft.datasets.errors import DatasetError
from npu_sft.datasets.measure import statistics
from npu_sft.datasets.output import (
    DATASET_INFO_FILE,
    EVAL_DATASET,
    EVAL_FILE,
    FAILED_DIR,
    REJECTS_FILE,
    STATS_FILE,
    TRAIN_DATASET,
    TRAIN_FILE,
    dataset_info,
    new_temp_dir,
    publish,
    read_stats,
    remove_stale_temp_dirs,
    replace_dir,
    write_json,
    write_lines,
    write_stats,
)
from npu_sft.datasets.reading import load_source
from npu_sft.datasets.settings import DataSettings, check_val_size
from npu_sft.datasets.split import split_rows
from npu_sft.datasets.stats import DatasetStats
from npu_sft.datasets.validation import SourceTally, Validated, validate_and_measure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset directory, ready to be LLaMA-Factory's `dataset_dir`."""

    dir: Path
    train_dataset: str
    eval_dataset: str | None
    stats: DatasetStats
    rejects_path: Path
    cache_hit: bool

    def llamafactory_args(self) -> dict[str, Any]:
        """Keys to set in the LLaMA-Factory training config. The split is already done here, and the engine
        refuses `val_size` beside `eval_dataset`, so it is zeroed."""
        args: dict[str, Any] = {"dataset_dir": str(self.dir), "dataset": self.train_dataset, "val_size": 0.0}
        if self.eval_dataset is not None:
            args["eval_dataset"] = self.eval_dataset
        return args


def prepare_datasets(
    settings: DataSettings,
    *,
    val_size: float,
    cutoff_len: int,
    tokenizer_file: Path | None,
    out_root: Path,
) -> PreparedData:
    """Prepare (or reuse) the dataset directory for these settings; see the module docstring.

    `val_size` is the training config's (a share or a row count); `settings.val_size` overrides it when set.
    Raises DatasetError when sources are unreadable or rows are rejected beyond `settings.max_reject_share`.
    """
    effective_val_size = settings.val_size if settings.val_size is not None else val_size
    _check_run_arguments(effective_val_size, cutoff_len)
    sources = [load_source(spec) for spec in settings.datasets]
    tokenizer_json = read_tokenizer(tokenizer_file)
    key = content_key(settings, sources, effective_val_size, cutoff_len, tokenizer_json)
    final_dir = out_root / key
    if (final_dir / STATS_FILE).is_file():
        logger.info("datasets: cache hit, reusing %s", final_dir)
        prepared = _prepared_from_dir(final_dir, cache_hit=True)
        _log_warnings(prepared.stats)
        return prepared

    validated, lengths = validate_and_measure(settings, sources, tokenizer_json, tokenizer_file)
    train_rows, eval_rows = split_rows(
        [row.line for row in validated.kept], val_size=effective_val_size, seed=settings.seed
    )
    stats = statistics(
        key=key,
        settings=settings,
        sources=sources,
        validated=validated,
        eval_indexes=set(eval_rows),
        lengths=lengths,
        val_size=effective_val_size,
        cutoff_len=cutoff_len,
        tokenizer_file=tokenizer_file,
    )
    failures = _gate_failures(settings, stats)
    if failures:
        rejects_path = _write_failed(out_root, key, validated.rejects, stats)
        raise DatasetError(
            _failure_message(failures, stats, validated.tallies, rejects_path), rejects_path=rejects_path
        )

    _log_warnings(stats)
    remove_stale_temp_dirs(out_root)
    temp_dir = new_temp_dir(out_root, key)
    try:
        _write_prepared(temp_dir, validated, train_rows, eval_rows, stats)
        published = publish(temp_dir, final_dir)
    finally:
        if temp_dir.exists():
            shutil.rmtree(temp_dir, ignore_errors=True)  # only a failed write leaves it: nothing half-written stays
    logger.info("datasets: prepared %s (%d train, %d eval rows)", final_dir, stats.train, stats.eval)
    return _prepared_from_dir(final_dir, cache_hit=not published)


def prepared_dir_for(
    settings: DataSettings, *, val_size: float, cutoff_len: int, tokenizer_file: Path | None, out_root: Path
) -> Path:
    """Where `prepare_datasets` puts, or finds, the prepared directory for these inputs (it may not exist yet): named
    by the content key, so asking costs reading and hashing the inputs, not validating them."""
    effective_val_size = settings.val_size if settings.val_size is not None else val_size
    _check_run_arguments(effective_val_size, cutoff_len)
    sources = [load_source(spec) for spec in settings.datasets]
    return out_root / content_key(settings, sources, effective_val_size, cutoff_len, read_tokenizer(tokenizer_file))


def _log_warnings(stats: DatasetStats) -> None:
    for warning in stats.warnings:
        logger.warning("datasets: %s", warning)


def _check_run_arguments(val_size: float, cutoff_len: int) -> None:
    try:
        check_val_size(val_size)
    except ValueError as err:
        raise DatasetError(str(err)) from err
    if cutoff_len < 1:
        raise DatasetError(f"cutoff_len must be a positive number of tokens, got {cutoff_len}")


# gates ----------------------------------------------------------------------------------------------------------


def _gate_failures(settings: DataSettings, stats: DatasetStats) -> list[str]:
    failures = []
    for source in stats.sources:
        if source.valid == 0 or source.reject_share > settings.max_reject_share:
            failures.append(source.name)
    return failures


def _failure_message(failures: list[str], stats: DatasetStats, tallies: list[SourceTally], rejects: Path) -> str:
    lines = [
        f"Dataset preparation failed: {len(failures)} of {len(stats.sources)} dataset(s) rejected too many rows "
        f"(max_reject_share {stats.max_reject_share:.1%}; a dataset with no valid row always fails)."
    ]
    for index, source in enumerate(stats.sources):
        if source.name not in failures:
            continue
        reasons = ", ".join(f"{code} {count}" for code, count in source.reject_reasons.items())
        verdict = "no valid row" if source.valid == 0 else f"{source.reject_share:.1%} rejected"
        lines.append(f"  {source.name}: {source.rejected:,} of {source.total:,} rows rejected ({verdict}): {reasons}")
        for example in tallies[index].examples:
            where = f"row {example['row']}" + (f" (line {example['line']})" if example["line"] else "")
            lines.append(f"    {example['file']} {where}: {'; '.join(example['reasons'])}")
    lines.append(f"Every rejected row with its reasons: {rejects}")
    return "\n".join(lines)


# output ---------------------------------------------------------------------------------------------------------


def _write_prepared(
    directory: Path, validated: Validated, train_rows: list[int], eval_rows: list[int], stats: DatasetStats
) -> None:
    kept = validated.kept
    write_lines(directory / TRAIN_FILE, (kept[index].line for index in train_rows))
    if eval_rows:
        write_lines(directory / EVAL_FILE, (kept[index].line for index in eval_rows))
    write_json(directory / DATASET_INFO_FILE, dataset_info(has_eval=bool(eval_rows)))
    write_lines(directory / REJECTS_FILE, validated.rejects)
    write_stats(directory, stats)  # last: its presence marks a complete directory


def _write_failed(out_root: Path, key: str, rejects: list[str], stats: DatasetStats) -> Path:
    temp_dir = new_temp_dir(out_root, key)
    try:
        write_lines(temp_dir / REJECTS_FILE, rejects)
        write_stats(temp_dir, stats)
        failed_dir = out_root / FAILED_DIR / key
        replace_dir(temp_dir, failed_dir)
    finally:
        if temp_dir.exists():
            shutil.rmtree(temp_dir, ignore_errors=True)
    return failed_dir / REJECTS_FILE


def _prepared_from_dir(directory: Path, *, cache_hit: bool) -> PreparedData:
    stats = read_stats(directory)
    return PreparedData(
        dir=directory,
        train_dataset=TRAIN_DATASET,
        eval_dataset=EVAL_DATASET if stats.eval else None,
        stats=stats,
        rejects_path=directory / REJECTS_FILE,
        cache_hit=cache_hit,
    )
