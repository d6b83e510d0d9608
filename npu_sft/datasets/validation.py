"""Every row of every source normalised, checked and deduplicated: kept rows, and each rejected row with its reasons
(counted while validating, with token lengths when a tokenizer is given)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npu_sft.datasets.normalize import Identity, RowNormalizer
from npu_sft.datasets.output import reject_line
from npu_sft.datasets.reading import LoadedSource, RawRow, Reason
from npu_sft.datasets.settings import DataSettings
from npu_sft.datasets.stats import TokenCounter

_MAX_FAILURE_EXAMPLES = 3  # rejected rows quoted per failing source in the error message


@dataclass
class SourceTally:
    total: int = 0
    rejected: int = 0
    duplicates: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)  # first rejected rows, for the error message


@dataclass(frozen=True)
class KeptRow:
    source_index: int
    line: str  # canonical JSON record


@dataclass
class Validated:
    kept: list[KeptRow]
    rejects: list[str]
    tallies: list[SourceTally]


def validate_and_measure(
    settings: DataSettings, sources: list[LoadedSource], tokenizer_json: str | None, tokenizer_file: Path | None
) -> tuple[Validated, list[int] | None]:
    """Validated rows and, with a tokenizer, the token length of each kept row (counted while validating)."""
    if tokenizer_json is None or tokenizer_file is None:
        return _validate_sources(settings, sources, None), None
    with TokenCounter(tokenizer_json, tokenizer_file, settings.template_tokens_per_message) as counter:
        validated = _validate_sources(settings, sources, counter)
        return validated, counter.lengths()


def _validate_sources(settings: DataSettings, sources: list[LoadedSource], counter: TokenCounter | None) -> Validated:
    identity = Identity(name=settings.identity.name, author=settings.identity.author)
    kept: list[KeptRow] = []
    rejects: list[str] = []
    tallies: list[SourceTally] = []
    first_seen: dict[str, tuple[str, str, int]] = {}  # canonical line -> (source, file, row) of its first copy
    for source_index, source in enumerate(sources):
        normalizer = RowNormalizer(source.spec, identity)
        tally = SourceTally()
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
                kept.append(KeptRow(source_index=source_index, line=line))
                if counter is not None:
                    counter.add(outcome.texts())
    return Validated(kept=kept, rejects=rejects, tallies=tallies)


def _reject(
    tally: SourceTally, source: str, display: str, raw: RawRow, reasons: list[Reason], *, example: bool = True
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
