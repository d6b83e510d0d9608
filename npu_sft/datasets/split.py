"""The train/eval split: LLaMA-Factory's reading of val_size, applied by a seeded hash of each row's content."""

from __future__ import annotations

import hashlib
import math

from npu_sft.datasets.errors import DatasetError


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
