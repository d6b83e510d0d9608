"""prepare_datasets end to end: dedup and split determinism, cache, atomic output, statistics, MLflow, Prefect,
the CLI report, and (e2e) LLaMA-Factory loading the prepared directory."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from npu_sft.datasets import (
    DatasetError,
    DataSettings,
    demo_corpus,
    log_dataset_stats,
    dataset_inputs,
    prepare_datasets,
    render_prepare_report,
    stats_table_rows,
)
from npu_sft.datasets import output as output_module
from npu_sft.datasets.split import eval_row_count, split_rows


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE like the demo model's, trained on the demo corpus."""
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
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_rows(path: Path, count: int, *, start: int = 0) -> Path:
    rows = [
        {"instruction": f"question {index}", "input": "", "output": f"answer {index}"} for index in range(start, count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare(
    out_root: Path,
    datasets: Any,
    *,
    val_size: float = 0.1,
    tokenizer: Path | None = None,
    cutoff_len: int = 64,
    **settings: Any,
) -> Any:
    """prepare_datasets with the run's val_size and cutoff_len; other keywords are DataSettings fields."""
    return prepare_datasets(
        DataSettings(datasets=datasets, **settings),
        val_size=val_size,
        cutoff_len=cutoff_len,
        tokenizer_file=tokenizer,
        out_root=out_root,
    )


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# split ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "val_size", "expected"),
    [(100, 0.1, 10), (101, 0.1, 11), (10, 0.01, 1), (50, 0.0, 0), (50, 7, 7), (0, 0.5, 0)],
)
def test_eval_row_count_reads_val_size_like_llamafactory(rows: int, val_size: float, expected: int) -> None:
    assert eval_row_count(rows, val_size) == expected


def test_split_is_seeded_deterministic_and_keeps_input_order() -> None:
    lines = [f"row {index}" for index in range(200)]
    train, evaluation = split_rows(lines, val_size=0.1, seed=1)
    assert (len(train), len(evaluation)) == (180, 20)
    assert sorted(train + evaluation) == list(range(200))
    assert train == sorted(train) and evaluation == sorted(evaluation)
    assert split_rows(lines, val_size=0.1, seed=1) == (train, evaluation)
    assert split_rows(lines, val_size=0.1, seed=2)[1] != evaluation
    # Content decides, not position: shuffling the input picks the same eval rows.
    reversed_eval = split_rows(lines[::-1], val_size=0.1, seed=1)[1]
    assert sorted(lines[::-1][index] for index in reversed_eval) == sorted(lines[index] for index in evaluation)


def test_split_refuses_to_leave_no_training_rows(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", 3)
    with pytest.raises(DatasetError, match="leaves no training rows"):
        prepare(tmp_path / "out", [{"name": "d", "path": str(path)}], val_size=3)


def test_prepared_split_and_registration(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", 100)
    prepared = prepare(tmp_path / "out", [{"name": "d", "path": str(path)}], val_size=0.2, seed=7)
    train, evaluation = lines_of(prepared.dir / "train.jsonl"), lines_of(prepared.dir / "eval.jsonl")
    assert (len(train), len(evaluation)) == (80, 20)
    assert not set(train) & set(evaluation)
    info = json.loads((prepared.dir / "dataset_info.json").read_text())
    assert info["train"]["file_name"] == "train.jsonl" and info["eval"]["file_name"] == "eval.jsonl"
    assert info["train"]["formatting"] == "sharegpt"
    assert prepared.llamafactory_args() == {
        "dataset_dir": str(prepared.dir),
        "dataset": "train",
        "eval_dataset": "eval",
        "val_size": 0.0,
    }
    again = prepare(tmp_path / "other", [{"name": "d", "path": str(path)}], val_size=0.2, seed=7)
    assert (again.dir / "eval.jsonl").read_bytes() == (prepared.dir / "eval.jsonl").read_bytes()
    assert (again.dir / "train.jsonl").read_bytes() == (prepared.dir / "train.jsonl").read_bytes()


def test_settings_val_size_overrides_and_zero_means_no_eval_dataset(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", 20)
    settings = DataSettings(datasets=[{"name": "d", "path": str(path)}], val_size=0.0)
    prepared = prepare_datasets(settings, val_size=0.5, cutoff_len=64, tokenizer_file=None, out_root=tmp_path / "o")
    assert prepared.eval_dataset is None and prepared.stats.eval == 0
    assert not (prepared.dir / "eval.jsonl").exists()
    assert "eval" not in json.loads((prepared.dir / "dataset_info.json").read_text())
    assert "eval_dataset" not in prepared.llamafactory_args()


def test_dedup_can_be_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(2 * (json.dumps({"instruction": "q", "output": "a"}) + "\n"))
    assert prepare(tmp_path / "a", [{"name": "d", "path": str(path)}], val_size=0).stats.kept == 1
    assert prepare(tmp_path / "b", [{"name": "d", "path": str(path)}], val_size=0, dedup=False).stats.kept == 2


# cache and atomic output ----------------------------------------------------------------------------------------


def test_same_inputs_are_a_cache_hit_and_changes_are_not(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", 30)
    datasets = ["identity", {"name": "d", "path": str(path)}]
    first = prepare(tmp_path / "out", datasets)
    second = prepare(tmp_path / "out", datasets)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.dir == first.dir and second.stats == first.stats
    assert any("cache hit" in str(item) for item in _rendered(second))
    write_rows(path, 31)
    assert prepare(tmp_path / "out", datasets).dir != first.dir
    assert prepare(tmp_path / "out", datasets, identity={"name": "Other"}).dir != first.dir
    assert prepare(tmp_path / "out", datasets, val_size=0.2).dir != first.dir


def test_cache_key_covers_the_tokenizer(tmp_path: Path, tokenizer_file: Path) -> None:
    without = prepare(tmp_path / "out", "identity")
    with_tokenizer = prepare(tmp_path / "out", "identity", tokenizer=tokenizer_file)
    assert with_tokenizer.dir != without.dir and with_tokenizer.stats.tokens is not None


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_write(directory: Path, stats: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("npu_sft.datasets.prepare.write_stats", broken_write)
    with pytest.raises(OSError, match="No space left"):
        prepare(tmp_path / "out", "identity")
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()
    prepared = prepare(tmp_path / "out", "identity")
    assert not prepared.cache_hit
    assert [entry.name for entry in (tmp_path / "out").iterdir()] == [prepared.dir.name]
    assert sorted(entry.name for entry in prepared.dir.iterdir()) == [
        "dataset_info.json",
        "eval.jsonl",
        "rejects.jsonl",
        "stats.json",
        "train.jsonl",
    ]


def test_losing_a_publish_race_reuses_the_winner(tmp_path: Path) -> None:
    winner = prepare(tmp_path / "out", "identity")
    temp_dir = output_module.new_temp_dir(tmp_path / "out", "x")
    assert output_module.publish(temp_dir, winner.dir) is False
    assert not temp_dir.exists()


# statistics -----------------------------------------------------------------------------------------------------


def test_token_statistics_use_the_model_tokenizer(tmp_path: Path, tokenizer_file: Path) -> None:
    rows = [
        {"instruction": "What is 2 plus 3?", "input": "", "output": "5"},
        {"instruction": "Reverse the letters of: moon", "input": "", "output": "noom", "system": "Be brief."},
        {"instruction": "Write in capitals: " + "tree " * 40, "input": "", "output": "TREE " * 40},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = Tokenizer.from_file(str(tokenizer_file))

    def expected_length(row: dict[str, str]) -> int:
        texts = [text for text in (row.get("system"), row["instruction"], row["output"]) if text]
        return sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts) + 5 * len(texts)

    lengths = sorted(expected_length(row) for row in rows)
    cutoff = lengths[1]  # only the long row exceeds it
    prepared = prepare_datasets(
        DataSettings(datasets=[{"name": "d", "path": str(path)}], truncation_warning_share=0.2),
        val_size=0,
        cutoff_len=cutoff,
        tokenizer_file=tokenizer_file,
        out_root=tmp_path / "out",
    )
    tokens = prepared.stats.tokens
    assert tokens is not None
    assert (tokens.count, tokens.min, tokens.p50, tokens.max) == (3, lengths[0], lengths[1], lengths[2])
    assert (tokens.p90, tokens.p99) == (lengths[2], lengths[2])
    assert tokens.mean == round(sum(lengths) / 3, 2)
    assert (prepared.stats.truncated, round(prepared.stats.truncated_share, 3)) == (1, 0.333)
    assert prepared.stats.sources[0].tokens == tokens
    assert any(f"longer than cutoff_len={cutoff}" in warning for warning in prepared.stats.warnings)


def test_no_truncation_warning_below_the_threshold(tmp_path: Path, tokenizer_file: Path) -> None:
    prepared = prepare(tmp_path / "out", "identity,tiny_alpaca", tokenizer=tokenizer_file, cutoff_len=4096)
    assert prepared.stats.truncated == 0
    assert not any("cutoff_len" in warning for warning in prepared.stats.warnings)


def test_counts_per_source(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"instruction": "hi", "input": "", "output": "x"}) + "\n" + json.dumps({"instruction": "q"}) + "\n"
    )
    prepared = prepare(tmp_path / "out", ["tiny_alpaca", {"name": "bad", "path": str(bad)}], max_reject_share=0.6)
    tiny, second = prepared.stats.sources
    assert (tiny.total, tiny.valid, tiny.rejected, tiny.duplicates, tiny.kept) == (400, 400, 0, 0, 400)
    assert (second.total, second.valid, second.rejected, second.kept, second.reject_share) == (2, 1, 1, 1, 0.5)
    assert tiny.train + tiny.eval == 400 and second.train + second.eval == 1
    assert prepared.stats.train + prepared.stats.eval == prepared.stats.kept == 401
    table = stats_table_rows(prepared.stats)
    assert [row["dataset"] for row in table] == ["tiny_alpaca", "bad", "total"]
    assert table[-1]["rows"] == 402 and table[-1]["rejected"] == 1


def _rendered(prepared: Any, width: int = 200) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    for renderable in render_prepare_report(prepared):
        console.print(renderable)
    return console.export_text().splitlines()


def test_report_shows_location_counts_rejects_and_warnings(tmp_path: Path, tokenizer_file: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n" + json.dumps({"instruction": "q"}) + "\n")
    prepared = prepare(
        tmp_path / "out", ["identity", {"name": "bad", "path": str(bad)}], tokenizer=tokenizer_file, max_reject_share=1
    )
    text = "\n".join(_rendered(prepared))
    assert f"Prepared datasets: {prepared.dir}" in text
    assert "dataset: train, eval_dataset: eval" in text
    assert "identity" in text and "bad" in text and "total" in text
    assert "1 (50.0%)" in text
    assert "missing_field" in text and str(prepared.rejects_path) in text
    assert "Token lengths (estimated, incl. template): min" in text
    assert "warning: 1 of 54 rows rejected" in text
    # At 80 columns every header and dataset name is whole (wrapped, not cut to three letters).
    narrow = _rendered(prepared, width=80)
    assert all(len(line) <= 80 for line in narrow)
    tables = "\n".join(narrow)
    for header in ("dataset", "source", "format", "rows", "valid", "rejected", "duplicates", "train", "eval",
                   "identity", "cutoff_len"):
        assert header in tables, header
    assert "…" not in tables


def test_log_dataset_stats_to_mlflow(tmp_path: Path, tokenizer_file: Path) -> None:
    from npu_sft.settings import MlflowSettings
    from npu_sft.tracking import RunTracker

    prepared = prepare(tmp_path / "out", "identity,tiny_alpaca", tokenizer=tokenizer_file)
    settings = MlflowSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "artifacts"), experiment="data"
    )
    tracker = RunTracker.start(settings, run_name="data", tags={})
    log_dataset_stats(tracker, prepared)
    client, run_id = tracker.client, tracker.run_id
    logged = client.get_run(run_id).data
    assert logged.metrics["data.train_rows"] == prepared.stats.train
    assert logged.metrics["data.identity.total_rows"] == 52
    assert logged.metrics["data.tokens_p99"] == prepared.stats.tokens.p99
    assert logged.tags["data.key"] == prepared.stats.key
    artifacts = {item.path for item in client.list_artifacts(run_id, "datasets")}
    assert prepared.eval_dataset is not None
    # The eval split too: a registered adapter is scored again from the run's record alone.
    assert artifacts == {"datasets/stats.json", "datasets/rejects.jsonl", "datasets/dataset_info.json", "datasets/eval.jsonl"}
    # The prepared files as MLflow dataset inputs: the runs table's Dataset column and the dataset view.
    inputs = {item.tags[0].value: item.dataset for item in client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"train", "eval"}
    train = inputs["train"]
    assert train.name == "identity,tiny_alpaca" and train.source_type == "local"
    assert json.loads(train.source)["uri"] == (prepared.dir / "train.jsonl").resolve().as_uri()
    assert json.loads(train.profile) == {"num_rows": prepared.stats.train}
    assert [column["name"] for column in json.loads(train.schema)["mlflow_colspec"]] == ["conversations", "system", "tools"]
    assert train.digest != inputs["eval"].digest
    # The same content gives the same digest (a second run on the cached preparation).
    assert dataset_inputs(prepared)[0].digest == train.digest


# the engine reads it --------------------------------------------------------------------------------------------

_ENGINE_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import Seq2SeqTrainingArguments
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.data.loader import _get_merged_dataset

    dataset_dir, output_dir = sys.argv[1], sys.argv[2]
    data_args = DataArguments(dataset_dir=dataset_dir, dataset="train", eval_dataset="eval", template="qwen")
    model_args = ModelArguments(model_name_or_path="unused-by-the-data-loader")
    training_args = Seq2SeqTrainingArguments(output_dir=output_dir, report_to=[])
    result = {}
    for name in ("train", "eval"):
        dataset = _get_merged_dataset([name], model_args, data_args, training_args, "sft")
        # The supervised processor drops exactly these shapes ("Dropped invalid example").
        dropped = sum(1 for ex in dataset if len(ex["_prompt"]) % 2 != 1 or len(ex["_response"]) != 1)
        result[name] = {"rows": len(dataset), "dropped": dropped, "first": dataset[0]}
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.e2e
def test_llamafactory_loads_the_prepared_directory(tmp_path: Path, engine_python: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "You are terse."},
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"},
                    {"from": "human", "value": "bye"},
                    {"from": "gpt", "value": "bye"},
                ]
            }
        )
        + "\n"
    )
    prepared = prepare(
        tmp_path / "out", ["identity", "tiny_alpaca", {"name": "chat", "path": str(chat), "format": "sharegpt"}]
    )
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run(
        [str(engine_python), "-c", _ENGINE_LOAD_SCRIPT, str(prepared.dir), str(tmp_path / "lf")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    assert result["train"] == {**result["train"], "rows": prepared.stats.train, "dropped": 0}
    assert result["eval"]["rows"] == prepared.stats.eval and result["eval"]["dropped"] == 0
    multi_turn = [line for line in lines_of(prepared.dir / "train.jsonl") + lines_of(prepared.dir / "eval.jsonl")
                  if "You are terse." in line]  # fmt: skip
    assert len(multi_turn) == 1


# token counting -------------------------------------------------------------------------------------------------

TRICKY_TEXTS = [
    "Hello,  world!\n  Next line\t tab  (paren) 'quote' it's 123 4567 café naïve 你好 世界  end ",
    "  leading spaces",
    "trailing spaces   ",
    "a\n\n b\r\n c",
    "x — y … z",
    "def f(x):\n    return x  # indented code\n",
]


def test_piece_counting_matches_whole_text_encoding(tokenizer_file: Path) -> None:
    from npu_sft.datasets.stats import TokenCounter

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    with TokenCounter(tokenizer_file.read_text(), tokenizer_file, template_tokens_per_message=0) as counter:
        for text in TRICKY_TEXTS:
            counter.add([text])
        lengths = counter.lengths()
        assert counter._by_pieces is True
    assert lengths == [len(tokenizer.encode(text, add_special_tokens=False).ids) for text in TRICKY_TEXTS]


def test_a_tokenizer_that_merges_across_spaces_is_counted_whole(tmp_path: Path) -> None:
    from npu_sft.datasets.stats import TokenCounter

    # No pre-tokenizer: BPE merges freely across spaces, so pieces would overcount.
    tokenizer = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=60, show_progress=False)
    tokenizer.train_from_iterator(["ab cd ab cd ab cd"] * 50, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    texts = ["ab cd", "ab cd ab cd"]
    with TokenCounter(path.read_text(), path, template_tokens_per_message=2) as counter:
        counter.add(texts)
        counter.add(texts[:1])
        lengths = counter.lengths()
        assert counter._by_pieces is False
    whole = [len(tokenizer.encode(text).ids) for text in texts]
    assert lengths == [sum(whole) + 4, whole[0] + 2]


def test_unusable_tokenizer_files_are_clear_errors(tmp_path: Path) -> None:
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text("nope")
    with pytest.raises(DatasetError, match=r"not a tokenizer\.json"):
        prepare(tmp_path / "out", "identity", tokenizer=not_json)
    wrong_json = tmp_path / "wrong.json"
    wrong_json.write_text('{"model": 1}')
    with pytest.raises(DatasetError, match=r"not a usable tokenizer\.json"):
        prepare(tmp_path / "out", "identity", tokenizer=wrong_json)
    with pytest.raises(DatasetError, match="cannot read the tokenizer"):
        prepare(tmp_path / "out", "identity", tokenizer=tmp_path / "missing.json")


def test_temp_dirs_of_killed_runs_are_cleaned_up(tmp_path: Path) -> None:
    out_root = tmp_path / "out"
    stale = output_module.new_temp_dir(out_root, "killed")
    fresh = output_module.new_temp_dir(out_root, "running")
    os.utime(stale, (0, 0))
    prepare(out_root, "identity")
    assert not stale.exists() and fresh.exists()
