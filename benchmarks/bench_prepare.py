"""Benchmark dataset preparation: 100,000 alpaca rows through validation, dedup, split and token statistics.

    python benchmarks/bench_prepare.py [--rows 100000] [--target-seconds 15]

Generates a JSON Lines file (about 1% duplicates and 1% invalid rows, so every path is exercised) and a byte-level
BPE tokenizer trained on the demo corpus, then times `prepare_datasets` end to end (a fresh output root, so no
cache hit) and prints rows per second. Exits 1 when the run is slower than the target.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from npu_sft.datasets import DataSettings, demo_corpus, prepare_datasets

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "this",
    "be",
    "are",
    "or",
    "an",
    "have",
    "not",
    "which",
    "one",
    "had",
    "but",
    "were",
    "all",
    "there",
    "can",
    "when",
    "your",
    "model",
    "data",
    "train",
    "token",
    "device",
    "cluster",
    "ascend",
    "npu",
    "memory",
    "loss",
    "step",
    "batch",
    "rank",
    "value",
]


def build_tokenizer(path: Path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(demo_corpus(), trainer=trainer)
    tokenizer.save(str(path))


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    written: list[str] = []
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            roll = rng.random()
            if roll < 0.01 and written:
                line = rng.choice(written)  # a duplicate
            elif roll < 0.02:
                line = json.dumps({"instruction": _sentence(rng, 3, 12), "input": "", "output": ""})  # empty output
            else:
                row = {
                    "instruction": f"{index}: {_sentence(rng, 5, 30)}",
                    "input": "",
                    "output": _sentence(rng, 10, 120),
                }
                if rng.random() < 0.3:
                    row["input"] = _sentence(rng, 5, 40)
                line = json.dumps(row)
                if len(written) < 1000:
                    written.append(line)
            handle.write(line + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--target-seconds", type=float, default=15.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        data_file = work_dir / "bench.jsonl"
        tokenizer_file = work_dir / "tokenizer.json"
        started = time.perf_counter()
        write_rows(data_file, args.rows)
        build_tokenizer(tokenizer_file)
        setup_seconds = time.perf_counter() - started

        settings = DataSettings(datasets=[{"name": "bench", "path": str(data_file)}])
        started = time.perf_counter()
        prepared = prepare_datasets(
            settings, val_size=0.05, cutoff_len=256, tokenizer_file=tokenizer_file, out_root=work_dir / "out"
        )
        seconds = time.perf_counter() - started

    stats = prepared.stats
    print(f"setup (data file + tokenizer): {setup_seconds:.1f} s")
    print(
        f"prepared {stats.total:,} rows in {seconds:.2f} s = {stats.total / seconds:,.0f} rows/s "
        f"(train {stats.train:,}, eval {stats.eval:,}, rejected {stats.rejected:,}, duplicates {stats.duplicates:,}, "
        f"tokens p50 {stats.tokens.p50 if stats.tokens else '-'})"
    )
    if seconds > args.target_seconds:
        print(f"SLOWER than the target of {args.target_seconds:.0f} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
