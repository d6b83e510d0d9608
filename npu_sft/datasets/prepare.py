"""Dataset preparation: read every source, validate each row, dedup, split, measure, and register the result.

The point is to make the data's state explicit before any device is taken: every row that LLaMA-Factory would
silently drop (or train on broken) is named with its reasons in a rejects file, and the stage fails when too many
are rejected, instead of a user finding out after hours of training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npu_sft.datasets.builtin import BUILTIN_DATASETS
from npu_sft.datasets.errors import DatasetError
from npu_sft.datasets.normalize import Identity, RowNormalizer
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
    reject_line,
    remove_stale_temp_dirs,
    replace_dir,
    write_json,
    write_lines,
    write_stats,
)
from npu_sft.datasets.reading import DataFile, RawRow, Reason, load_data_file, parse_rows, select_data_files
from npu_sft.datasets.settings import DatasetSpec, DataSettings, check_val_size
from npu_sft.datasets.stats import DatasetStats, SourceStats, TokenCounter, length_stats, share

logger = logging.getLogger(__name__)

_MAX_FAILURE_EXAMPLES = 3  # rejected rows quoted per failing source in the error message


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


@dataclass
class _LoadedSource:
    """A source's inputs read into memory: data files (hashed before parsing) or a builtin's generated rows."""

    spec: DatasetSpec
    files: list[DataFile]
    builtin_rows: list[dict[str, Any]] | None
    skipped_files: list[str]

    def digests(self) -> list[tuple[str, str]]:
        if self.builtin_rows is not None:
            encoded = json.dumps(self.builtin_rows, ensure_ascii=False, sort_keys=True).encode("utf-8")
            return [(f"builtin:{self.spec.name}", hashlib.sha256(encoded).hexdigest())]
        return [(data_file.display, data_file.sha256) for data_file in self.files]

    def parsed_files(self) -> list[tuple[str, list[RawRow]]]:
        if self.builtin_rows is not None:
            rows = [RawRow(row=index, line=None, value=row) for index, row in enumerate(self.builtin_rows, start=1)]
            return [(f"builtin:{self.spec.name}", rows)]
        return [(data_file.display, parse_rows(data_file)) for data_file in self.files]


@dataclass
class _SourceTally:
    total: int = 0
    rejected: int = 0
    duplicates: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)  # first rejected rows, for the error message


@dataclass(frozen=True)
class _KeptRow:
    source_index: int
    line: str  # canonical JSON record


@dataclass
class _Validated:
    kept: list[_KeptRow]
    rejects: list[str]
    tallies: list[_SourceTally]


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
    sources = [_load_source(spec) for spec in settings.datasets]
    tokenizer_json = _read_tokenizer(tokenizer_file)
    key = _content_key(settings, sources, effective_val_size, cutoff_len, tokenizer_json)
    final_dir = out_root / key
    if (final_dir / STATS_FILE).is_file():
        logger.info("datasets: cache hit, reusing %s", final_dir)
        prepared = _prepared_from_dir(final_dir, cache_hit=True)
        _log_warnings(prepared.stats)
        return prepared

    validated, lengths = _validate_and_measure(settings, sources, tokenizer_json, tokenizer_file)
    train_rows, eval_rows = split_rows(
        [row.line for row in validated.kept], val_size=effective_val_size, seed=settings.seed
    )
    stats = _statistics(
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
    sources = [_load_source(spec) for spec in settings.datasets]
    return out_root / _content_key(settings, sources, effective_val_size, cutoff_len, _read_tokenizer(tokenizer_file))


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


# loading --------------------------------------------------------------------------------------------------------


def _load_source(spec: DatasetSpec) -> _LoadedSource:
    if spec.source == "builtin":
        return _LoadedSource(spec=spec, files=[], builtin_rows=BUILTIN_DATASETS[spec.name](), skipped_files=[])
    if spec.path is None:
        # Only a modelscope spec gets here: its path is set by the download step.
        raise DatasetError(f"dataset '{spec.name}': {spec.repo_id} is not downloaded yet (no local path)")
    selection = select_data_files(spec.path, spec.files)
    files = [load_data_file(path, str(path)) for path in selection.files]
    return _LoadedSource(spec=spec, files=files, builtin_rows=None, skipped_files=[str(p) for p in selection.skipped])


def _read_tokenizer(tokenizer_file: Path | None) -> str | None:
    if tokenizer_file is None:
        return None
    try:
        return tokenizer_file.read_text(encoding="utf-8")
    except OSError as err:
        raise DatasetError(f"{tokenizer_file}: cannot read the tokenizer ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise DatasetError(f"{tokenizer_file}: not a tokenizer.json (not UTF-8 text)") from err


def _code_fingerprint() -> str:
    """Digest of this package's source: a change to validation or layout must not reuse an old cache entry."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.name.encode())
        digest.update(module.read_bytes())
    return digest.hexdigest()


def _content_key(
    settings: DataSettings,
    sources: list[_LoadedSource],
    val_size: float,
    cutoff_len: int,
    tokenizer_json: str | None,
) -> str:
    material = {
        "code": _code_fingerprint(),
        "settings": settings.model_dump(mode="json", exclude={"dataset_info_dir"}),
        "inputs": [[source.spec.name, source.digests()] for source in sources],
        "val_size": val_size,
        "cutoff_len": cutoff_len,
        "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest() if tokenizer_json is not None else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


# validation and dedup -------------------------------------------------------------------------------------------


def _validate_and_measure(
    settings: DataSettings, sources: list[_LoadedSource], tokenizer_json: str | None, tokenizer_file: Path | None
) -> tuple[_Validated, list[int] | None]:
    """Validated rows and, with a tokenizer, the token length of each kept row (counted while validating)."""
    if tokenizer_json is None or tokenizer_file is None:
        return _validate_sources(settings, sources, None), None
    with TokenCounter(tokenizer_json, tokenizer_file, settings.template_tokens_per_message) as counter:
        validated = _validate_sources(settings, sources, counter)
        return validated, counter.lengths()


def _validate_sources(settings: DataSettings, sources: list[_LoadedSource], counter: TokenCounter | None) -> _Validated:
    identity = Identity(name=settings.identity.name, author=settings.identity.author)
    kept: list[_KeptRow] = []
    rejects: list[str] = []
    tallies: list[_SourceTally] = []
    first_seen: dict[str, tuple[str, str, int]] = {}  # canonical line -> (source, file, row) of its first copy
    for source_index, source in enumerate(sources):
        normalizer = RowNormalizer(source.spec, identity)
        tally = _SourceTally()
        tallies.append(tally)
        name = source.spec.name
        for display, rows in source.parsed_files():
            for raw in rows:
                tally.total += 1
                outcome = [raw.problem] if raw.problem is not None else normalizer.normalize(raw.value)
                if isinstance(outcome, list):
                    tally.rejected += 1
                    rejects.append(_reject(tally, name, display, raw, outcome))
                    continue
                line = json.dumps(outcome.to_record(), ensure_ascii=False)
                original = first_seen.get(line) if settings.dedup else None
                if original is not None:
                    tally.duplicates += 1
                    where = f"duplicate of {original[0]} row {original[2]} ({original[1]})"
                    rejects.append(_reject(tally, name, display, raw, [Reason("duplicate", where)], example=False))
                    continue
                first_seen[line] = (name, display, raw.row)
                kept.append(_KeptRow(source_index=source_index, line=line))
                if counter is not None:
                    counter.add(outcome.texts())
    return _Validated(kept=kept, rejects=rejects, tallies=tallies)


def _reject(
    tally: _SourceTally, source: str, display: str, raw: RawRow, reasons: list[Reason], *, example: bool = True
) -> str:
    tally.reasons.update(list(dict.fromkeys(reason.code for reason in reasons)))  # rows per reason, not mentions
    record = {
        "source": source,
        "file": display,
        "row": raw.row,
        "line": raw.line,
        "reasons": [reason.message for reason in reasons],
        "codes": [reason.code for reason in reasons],
        "raw": raw.value,
    }
    if example and len(tally.examples) < _MAX_FAILURE_EXAMPLES:
        tally.examples.append(record)
    return reject_line(record)


# split ----------------------------------------------------------------------------------------------------------


def eval_row_count(rows: int, val_size: float) -> int:
    """LLaMA-Factory's reading of val_size: a share (rounded up, as `train_test_split`) or a row count."""
    if val_size <= 0 or rows == 0:
        return 0
    if val_size < 1:
        # Rounded first so that float noise (100 * 0.1 = 10.000000000000002) does not add a row.
        return math.ceil(round(rows * val_size, 9))
    return int(val_size)


def split_rows(lines: list[str], *, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Indexes of train and eval rows, each in input order.

    Eval rows are those whose seeded hash of their content ranks lowest: deterministic for the same data and seed,
    independent of input order, and adding rows moves few existing rows between train and eval.
    """
    eval_count = eval_row_count(len(lines), val_size)
    if eval_count == 0:
        return list(range(len(lines))), []
    if eval_count >= len(lines):
        raise DatasetError(
            f"val_size {val_size} leaves no training rows: {len(lines)} rows, {eval_count} for evaluation"
        )
    salt = f"{seed}\0".encode()
    ranked = sorted(
        range(len(lines)), key=lambda index: hashlib.blake2b(salt + lines[index].encode(), digest_size=16).digest()
    )
    eval_set = set(ranked[:eval_count])
    train = [index for index in range(len(lines)) if index not in eval_set]
    return train, sorted(eval_set)


# statistics -----------------------------------------------------------------------------------------------------


def _statistics(
    *,
    key: str,
    settings: DataSettings,
    sources: list[_LoadedSource],
    validated: _Validated,
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
    source: _LoadedSource,
    validated: _Validated,
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


# gates ----------------------------------------------------------------------------------------------------------


def _gate_failures(settings: DataSettings, stats: DatasetStats) -> list[str]:
    failures = []
    for source in stats.sources:
        if source.valid == 0 or source.reject_share > settings.max_reject_share:
            failures.append(source.name)
    return failures


def _failure_message(failures: list[str], stats: DatasetStats, tallies: list[_SourceTally], rejects: Path) -> str:
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
    directory: Path, validated: _Validated, train_rows: list[int], eval_rows: list[int], stats: DatasetStats
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
