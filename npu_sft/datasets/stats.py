"""Statistics of prepared data: row counts per source and token lengths measured with the model's own tokenizer.

Token lengths are estimates of what LLaMA-Factory feeds the model: the tokens of every message text plus a fixed
number of chat-template tokens per message (the orchestrator cannot run the engine's template). That is close
enough to tell whether `cutoff_len` truncates 0.1% or 30% of the rows, which is the question the number answers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from npu_sft.datasets.errors import DatasetError


class LengthStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int
    min: int
    mean: float
    p50: int
    p90: int
    p99: int
    max: int


class RowCounts(BaseModel):
    """Row counts, of one input dataset or of all of them. valid = total - rejected; kept = valid - duplicates =
    train + eval."""

    model_config = ConfigDict(extra="forbid")

    total: int
    valid: int
    rejected: int
    duplicates: int
    kept: int
    train: int
    eval: int
    reject_share: float


class SourceStats(RowCounts):
    """Rows of one input dataset."""

    name: str
    source: str
    format: str
    files: list[str]
    skipped_files: list[str] = Field(default_factory=list)
    reject_reasons: dict[str, int] = Field(default_factory=dict)
    tokens: LengthStats | None = None
    truncated: int | None = None


class DatasetStats(RowCounts):
    """Rows of all the input datasets of one preparation, with the settings that shaped them."""

    key: str
    sources: list[SourceStats]
    max_reject_share: float
    val_size: float
    seed: int
    cutoff_len: int
    tokenizer: str | None
    tokens: LengthStats | None = None
    truncated: int | None = None
    truncated_share: float | None = None
    warnings: list[str] = Field(default_factory=list)


def share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def length_stats(lengths: Sequence[int]) -> LengthStats | None:
    if not lengths:
        return None
    ordered = sorted(lengths)
    return LengthStats(
        count=len(ordered),
        min=ordered[0],
        mean=round(sum(ordered) / len(ordered), 2),
        p50=_nearest_rank(ordered, 50),
        p90=_nearest_rank(ordered, 90),
        p99=_nearest_rank(ordered, 99),
        max=ordered[-1],
    )


def _nearest_rank(ordered: Sequence[int], percent: int) -> int:
    """The smallest value with at least `percent`% of the values at or below it (no interpolation: a real row)."""
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


# Pieces start at a space followed by a non-space: " word", " (x)". Pre-tokenizers of byte-level BPE tokenizers
# always end a pre-token there, so a text's token count is the sum of its pieces' counts.
_split_pieces = re.compile(r"(?= \S)").split
_PIECE_CHECK_TEXTS = 200


class TokenCounter:
    """Token counts with a Hugging Face `tokenizer.json`, encoded in batches on a background thread.

    The tokenizer releases the GIL while it encodes, so counting chunk N overlaps with validating the rows of
    chunk N+1: the job takes about as long as the slower of the two instead of their sum. Use as a context
    manager; `add` conversations in order, then `lengths()` returns one estimate per added conversation.
    """

    CHUNK_ROWS = 8192

    def __init__(self, tokenizer_json: str, source: Path, template_tokens_per_message: int) -> None:
        # Imported here: only statistics need it, and it is a compiled extension worth not loading otherwise.
        from tokenizers import Tokenizer

        try:
            json.loads(tokenizer_json)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{source}: not a tokenizer.json (invalid JSON at line {err.lineno})") from err
        try:
            self._tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as err:
            raise DatasetError(f"{source}: not a usable tokenizer.json ({err})") from err
        self._per_message = template_tokens_per_message
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-count")
        self._pending: list[Sequence[str]] = []
        self._by_pieces: bool | None = None  # decided on the first chunk
        self._piece_tokens: dict[str, int] = {}
        self._chunks: list[Future[list[int]]] = []

    def __enter__(self) -> TokenCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def add(self, texts: Sequence[str]) -> None:
        """Queue one conversation, given the texts of its messages."""
        self._pending.append(texts)
        if len(self._pending) >= self.CHUNK_ROWS:
            self._submit_pending()

    def lengths(self) -> list[int]:
        """Estimated model-input length of every added conversation, in the order added."""
        self._submit_pending()
        return [length for chunk in self._chunks for length in chunk.result()]

    def _submit_pending(self) -> None:
        if self._pending:
            self._chunks.append(self._executor.submit(self._count, self._pending))
            self._pending = []

    def _count(self, conversations_texts: Sequence[Sequence[str]]) -> list[int]:
        # Each distinct text is counted once: real sets repeat instructions, inputs and system prompts a lot.
        distinct = list(dict.fromkeys(text for texts in conversations_texts for text in texts))
        if self._by_pieces is None:
            self._by_pieces = self._piece_counts_are_exact(distinct[:_PIECE_CHECK_TEXTS])
        counts = self._count_by_pieces(distinct) if self._by_pieces else self._count_whole(distinct)
        tokens_of = dict(zip(distinct, counts, strict=True))
        return [
            sum(tokens_of[text] for text in texts) + self._per_message * len(texts) for texts in conversations_texts
        ]

    def _count_whole(self, texts: list[str]) -> list[int]:
        return [len(encoding.ids) for encoding in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def _count_by_pieces(self, texts: list[str]) -> list[int]:
        """Counts from distinct pieces: far less to encode, since prose reuses a small vocabulary of words."""
        pieces_of_texts = [_split_pieces(text) for text in texts]
        new_pieces = [
            piece for piece in dict.fromkeys(chain.from_iterable(pieces_of_texts)) if piece not in self._piece_tokens
        ]
        self._piece_tokens.update(zip(new_pieces, self._count_whole(new_pieces), strict=True))
        tokens_of_piece = self._piece_tokens.__getitem__
        return [sum(map(tokens_of_piece, pieces)) for pieces in pieces_of_texts]

    def _piece_counts_are_exact(self, sample: list[str]) -> bool:
        """Whether this tokenizer never merges across a piece boundary, checked on real rows.

        True for the byte-level BPE pre-tokenizers of GPT-2, Qwen and Llama 3 (their split patterns end every
        pre-token before a space that precedes a word). A tokenizer that disagrees on any sample text is counted
        text by text instead, so a tokenizer of another kind gets exact figures too, only more slowly.
        """
        whole = self._count_whole(sample)
        by_pieces = [sum(self._count_whole(_split_pieces(text))) for text in sample]
        return whole == by_pieces
