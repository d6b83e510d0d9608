"""Sources: file formats, file-level errors (named with file and line), directories, and combined datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from npu_sft.datasets import DatasetError, DataSettings, prepare_datasets

ROWS = [
    {"instruction": "What is 1 plus 1?", "input": "", "output": "2"},
    {"instruction": "Reverse the letters of the input.", "input": "abc", "output": "cba"},
    {"instruction": "What colour is grass?", "input": "", "output": "green"},
]


def prepare(tmp_path: Path, datasets: Any, **settings: Any) -> Any:
    data = DataSettings(datasets=datasets, **settings)
    return prepare_datasets(data, val_size=0, cutoff_len=128, tokenizer_file=None, out_root=tmp_path / "out")


def train_records(prepared: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (prepared.dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def user_texts(prepared: Any) -> list[str]:
    return [record["conversations"][0]["value"] for record in train_records(prepared)]


EXPECTED_USER_TEXTS = ["What is 1 plus 1?", "Reverse the letters of the input.\nabc", "What colour is grass?"]


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert user_texts(prepare(tmp_path, [{"name": "a", "path": str(path)}])) == EXPECTED_USER_TEXTS


def test_json_lines_in_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("\n".join(json.dumps(row) for row in ROWS))
    assert user_texts(prepare(tmp_path, [{"name": "a", "path": str(path)}])) == EXPECTED_USER_TEXTS


def test_csv_file_with_history_as_json_cell(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    history = json.dumps([["hi", "hello"]]).replace('"', '""')
    path.write_text(
        "instruction,input,output,history\n"
        "What is 1 plus 1?,,2,\n"
        '"Reverse the letters of the input.",abc,cba,\n'
        f'What colour is grass?,,green,"{history}"\n'
    )
    prepared = prepare(tmp_path, [{"name": "a", "path": str(path)}])
    records = train_records(prepared)
    assert [record["conversations"][0]["value"] for record in records[:2]] == EXPECTED_USER_TEXTS[:2]
    assert [turn["value"] for turn in records[2]["conversations"]] == ["hi", "hello", "What colour is grass?", "green"]


def test_csv_reject_reports_the_line_of_the_record(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text('instruction,output\n"multi\nline",ok\nq2,\nq3,a3\n')
    prepared = prepare(tmp_path, [{"name": "a", "path": str(path)}], max_reject_share=1.0)
    reject = json.loads(prepared.rejects_path.read_text())
    assert (reject["row"], reject["line"], reject["codes"]) == (2, 4, ["empty_field"])


def test_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert user_texts(prepare(tmp_path, [{"name": "a", "path": str(path)}])) == EXPECTED_USER_TEXTS


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DatasetError) as caught:
        prepare(tmp_path, [{"name": "broken", "path": str(path)}])
    assert str(caught.value).startswith(f"{path}: invalid JSON at line 3, column 23: Expecting ',' delimiter")
    assert "(after row 1)" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[\n  {"instruction": "a", "output": "b"}\n', "line 3, column 1: Unexpected end of file"),
        ('[{"instruction": "a", "output": "b"},]', "line 1, column 38: Expecting value"),
        ('[{"instruction": "a", "output": "b"}] x', "Extra data after the closing ']'"),
    ],
)
def test_other_json_array_syntax_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        prepare(tmp_path, [{"name": "broken", "path": str(path)}])


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        ("empty.json", b"", "the file is empty"),
        ("empty.jsonl", b"\n  \n", "the file is empty"),
        ("empty.csv", b"", "the file is empty"),
        ("header.csv", b"instruction,output\n", "contains no rows"),
        ("array.json", b"[ ]", "contains no rows"),
        ("empty.parquet", b"", "the file is empty"),
        ("object.json", b'{\n "instruction": "a",\n "output": "b"\n}', "holds one JSON object"),
    ],
)
def test_empty_or_unusable_files_are_clear_errors(tmp_path: Path, file_name: str, content: bytes, message: str) -> None:
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message) as caught:
        prepare(tmp_path, [{"name": "x", "path": str(path)}])
    assert str(path) in str(caught.value)


def test_non_utf8_bytes_in_a_json_array_reject_only_that_row(tmp_path: Path) -> None:
    good = json.dumps(ROWS[0]).encode()
    bad = b'{"instruction": "caf\xe9", "output": "x"}'
    path = tmp_path / "latin1.json"
    path.write_bytes(b"[" + good + b",\n" + bad + b"]")
    prepared = prepare(tmp_path, [{"name": "x", "path": str(path)}], max_reject_share=1.0)
    reject = json.loads(prepared.rejects_path.read_text(encoding="utf-8"))
    assert (reject["row"], reject["line"], reject["codes"]) == (2, 2, ["non_utf8"])
    assert reject["raw"]["instruction"] == "caf\udce9"  # \u-escaped in the file, so it stays valid UTF-8


def test_missing_path_and_undownloaded_modelscope_source(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file or directory"):
        prepare(tmp_path, [{"name": "x", "path": str(tmp_path / "nope.json")}])
    with pytest.raises(DatasetError, match="is not downloaded yet"):
        prepare(tmp_path, [{"name": "x", "source": "modelscope", "repo_id": "owner/set"}])


def _modelscope_download(root: Path) -> Path:
    """The shape of a downloaded ModelScope dataset repository."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("# a dataset")
    (root / ".msc").write_text("x")
    (root / "dataset_infos.json").write_text("{}")
    (root / "data" / "train.jsonl").write_text("\n".join(json.dumps(row) for row in ROWS[:2]))
    (root / "data" / "train_2.jsonl").write_text(json.dumps(ROWS[2]))
    (root / "data" / "test.jsonl").write_text(json.dumps({"instruction": "held out", "output": "x"}))
    return root


def test_modelscope_directory_takes_training_files_and_reports_the_rest(tmp_path: Path) -> None:
    root = _modelscope_download(tmp_path / "ms")
    prepared = prepare(tmp_path, [{"name": "ms", "source": "modelscope", "repo_id": "o/s", "path": str(root)}])
    assert user_texts(prepared) == EXPECTED_USER_TEXTS
    source = prepared.stats.sources[0]
    assert source.files == [str(root / "data" / "train.jsonl"), str(root / "data" / "train_2.jsonl")]
    assert source.skipped_files == [str(root / "data" / "test.jsonl")]
    assert any("left out files of other splits" in warning for warning in prepared.stats.warnings)


def test_directory_with_file_patterns(tmp_path: Path) -> None:
    root = _modelscope_download(tmp_path / "ms")
    prepared = prepare(tmp_path, [{"name": "ms", "path": str(root), "files": ["data/test*.jsonl"]}])
    assert user_texts(prepared) == ["held out"]
    with pytest.raises(DatasetError, match=r"no file matches \['\*.parquet'\] in this directory; its data files: "
                       r"data/test.jsonl, data/train.jsonl, data/train_2.jsonl$"):
        prepare(tmp_path, [{"name": "ms2", "path": str(root), "files": ["*.parquet"]}])


def test_directory_mixing_file_types_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps(ROWS[0]))
    (tmp_path / "d" / "b.csv").write_text("instruction,output\nq,a\n")
    with pytest.raises(DatasetError, match="mixes file types"):
        prepare(tmp_path, [{"name": "d", "path": str(tmp_path / "d")}])


def test_several_datasets_are_combined_and_deduplicated_across_sources(tmp_path: Path) -> None:
    copy = tmp_path / "copy.jsonl"
    copy.write_text(json.dumps({"instruction": "hi", "input": "", "output": "x"}) + "\n" + json.dumps(ROWS[0]))
    prepared = prepare(tmp_path, ["identity", {"name": "copy", "path": str(copy)}], max_reject_share=1.0)
    names = [source.name for source in prepared.stats.sources]
    assert names == ["identity", "copy"]
    copy_stats = prepared.stats.sources[1]
    assert (copy_stats.total, copy_stats.kept, copy_stats.duplicates) == (2, 2, 0)
    prepared_twice = prepare(tmp_path, [{"name": "a", "path": str(copy)}, {"name": "b", "path": str(copy)}])
    second = prepared_twice.stats.sources[1]
    assert (second.total, second.valid, second.duplicates, second.kept) == (2, 2, 2, 0)
    reject = json.loads(prepared_twice.rejects_path.read_text().splitlines()[0])
    assert reject["reasons"] == [f"duplicate of a row 1 ({copy})"]
