"""Row-level validation: every rejection reason, in both formats, lands in the rejects file with its row number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from npu_sft.datasets import DatasetError, DataSettings, prepare_datasets

GOOD_ALPACA = {"instruction": "Say hi", "input": "", "output": "hi"}
GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prepare_leniently(tmp_path: Path, spec: dict[str, Any], **settings: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Prepare with every share of rejects allowed; return the result and the parsed rejects file."""
    data = DataSettings(datasets=[spec], max_reject_share=1.0, **settings)
    prepared = prepare_datasets(data, val_size=0.0, cutoff_len=1024, tokenizer_file=None, out_root=tmp_path / "out")
    rejects = [json.loads(line) for line in prepared.rejects_path.read_text(encoding="utf-8").splitlines()]
    return prepared, rejects


def reasons_of(tmp_path: Path, spec_fields: dict[str, Any], bad_row: Any) -> tuple[list[str], list[str]]:
    """Codes and messages for one bad row placed after a good one."""
    good = GOOD_ALPACA if spec_fields.get("format", "alpaca") == "alpaca" else _good_for(spec_fields)
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad_row])
    _, rejects = prepare_leniently(tmp_path, {"name": "d", "path": str(path), **spec_fields})
    assert [reject["row"] for reject in rejects] == [2]
    return rejects[0]["codes"], rejects[0]["reasons"]


def _good_for(spec_fields: dict[str, Any]) -> dict[str, Any]:
    if spec_fields.get("format") == "openai":
        return {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
    return GOOD_SHAREGPT


@pytest.mark.parametrize(
    ("bad_row", "code", "message"),
    [
        ({"input": "", "output": "x"}, "missing_field", "missing field 'instruction'"),
        ({"instruction": "q"}, "missing_field", "missing field 'output'"),
        ({"instruction": "q", "output": None}, "missing_field", "missing field 'output'"),
        ({"instruction": "   ", "input": "", "output": "x"}, "empty_field", "empty field 'instruction'"),
        ({"instruction": "q", "output": "  \n"}, "empty_field", "empty field 'output'"),
        ({"instruction": 7, "output": "x"}, "wrong_type", "field 'instruction' must be a string, got number"),
        ({"instruction": "q", "output": ["x"]}, "wrong_type", "field 'output' must be a string, got array"),
        ({"instruction": "q", "output": "x", "system": {"a": 1}}, "wrong_type", "field 'system' must be a string"),
        ({"instruction": "q", "output": "x", "history": "hi"}, "wrong_type", "'history' must be an array"),
        ({"instruction": "q", "output": "x", "history": [["only one"]]}, "wrong_type", "history[1] must be a"),
        (
            {"instruction": "q", "output": "x", "history": [["a", ""]]},
            "empty_field",
            "history[1] has an empty response",
        ),
        (["instruction", "output"], "wrong_type", "row must be an object, got array"),
        ({"instruction": "q", "output": "bad \udcff byte"}, "non_utf8", "field 'output' contains bytes that are not"),
    ],
)
def test_alpaca_rejection_reasons(tmp_path: Path, bad_row: Any, code: str, message: str) -> None:
    if any("\udcff" in str(value) for value in (bad_row.values() if isinstance(bad_row, dict) else [])):
        codes, reasons = _with_raw_bytes(tmp_path, bad_row, {})
    else:
        codes, reasons = reasons_of(tmp_path, {}, bad_row)
    assert code in codes
    assert any(message in reason for reason in reasons), reasons


def _with_raw_bytes(tmp_path: Path, bad_row: dict[str, Any], spec_fields: dict[str, Any]) -> tuple[list, list]:
    """Write a row whose \\udcff stands for a raw 0xFF byte in the file (not an escape)."""
    line = json.dumps(bad_row, ensure_ascii=False).encode("utf-8", errors="surrogateescape")
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD_ALPACA).encode() + b"\n" + line + b"\n")
    _, rejects = prepare_leniently(tmp_path, {"name": "d", "path": str(path), **spec_fields})
    assert [reject["row"] for reject in rejects] == [2]
    return rejects[0]["codes"], rejects[0]["reasons"]


def _conversation(*pairs: tuple[Any, Any]) -> dict[str, Any]:
    return {"conversations": [{"from": role, "value": value} for role, value in pairs]}


@pytest.mark.parametrize(
    ("bad_row", "code", "message"),
    [
        ({"messages": []}, "missing_field", "missing field 'conversations'"),
        ({"conversations": []}, "empty_conversation", "empty conversation"),
        (_conversation(("system", "be nice")), "empty_conversation", "no user or assistant message"),
        ({"conversations": "hi"}, "wrong_type", "'conversations' must be an array, got string"),
        ({"conversations": ["hi", "there"]}, "wrong_type", "message 1 must be an object, got string"),
        (_conversation(("gpt", "hi"), ("human", "q")), "wrong_role_order", "message 1 is 'gpt', expected 'human'"),
        (_conversation(("human", "a"), ("human", "b")), "wrong_role_order", "message 2 is 'human', expected 'gpt'"),
        (_conversation(("human", "a"), ("gpt", "b"), ("human", "c")), "wrong_role_order", "ends with 'human'"),
        (
            _conversation(("human", "a"), ("system", "s"), ("gpt", "b")),
            "wrong_role_order",
            "system message is only allowed first",
        ),
        (_conversation(("human", "a"), ("bot", "b")), "unknown_role", "message 2 has role 'bot'"),
        ({"conversations": [{"value": "a"}]}, "missing_field", "message 1 has no 'from'"),
        ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}, "missing_field", "has no 'value'"),
        (_conversation(("human", "a"), ("gpt", "")), "empty_field", "message 2 has empty content"),
        (_conversation(("human", 5), ("gpt", "b")), "wrong_type", "'value' must be a string, got number"),
        ({**GOOD_SHAREGPT, "tools": 3}, "wrong_type", "field 'tools' must be a string"),
        (_conversation(("human", "\ud800 lone"), ("gpt", "b")), "non_utf8", "message 1 contains bytes"),
    ],
)
def test_sharegpt_rejection_reasons(tmp_path: Path, bad_row: Any, code: str, message: str) -> None:
    codes, reasons = reasons_of(tmp_path, {"format": "sharegpt"}, bad_row)
    assert code in codes
    assert any(message in reason for reason in reasons), reasons


def test_openai_messages_with_custom_tags_and_tool_calls(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "wx", "arguments": "{}"}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "tool", "content": "20C"},
                {"role": "assistant", "content": "Sunny, 20C."},
            ],
            "tools": [{"name": "wx"}],
        },
        {"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "no"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepared, rejects = prepare_leniently(tmp_path, {"name": "chat", "path": str(path), "format": "openai"})
    record = json.loads((prepared.dir / "train.jsonl").read_text().splitlines()[0])
    assert record["system"] == "You are terse."
    assert [turn["from"] for turn in record["conversations"]] == ["human", "function_call", "observation", "gpt"]
    assert record["conversations"][2]["value"] == "sunny\n</tool_response>\n<tool_response>\n20C"
    assert json.loads(record["tools"]) == [{"name": "wx"}]
    assert rejects[0]["row"] == 2
    assert "message 1 is 'assistant', expected 'user'" in rejects[0]["reasons"][0]


def test_column_and_tag_mapping(tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "qa.jsonl", [{"q": "What?", "ctx": "this", "a": "That.", "sys": "Be kind."}])
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"dialog": [{"speaker": "me", "text": "hello"}, {"speaker": "bot", "text": "hi!"}]}],
    )
    settings = DataSettings(
        datasets=[
            {
                "name": "qa",
                "path": str(alpaca),
                "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys"},
            },
            {
                "name": "chat",
                "path": str(chat),
                "formatting": "sharegpt",
                "columns": {"messages": "dialog"},
                "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"},
            },
        ]
    )
    prepared = prepare_datasets(settings, val_size=0, cutoff_len=64, tokenizer_file=None, out_root=tmp_path / "out")
    records = [json.loads(line) for line in (prepared.dir / "train.jsonl").read_text().splitlines()]
    assert records[0] == {
        "conversations": [{"from": "human", "value": "What?\nthis"}, {"from": "gpt", "value": "That."}],
        "system": "Be kind.",
        "tools": "",
    }
    assert records[1]["conversations"][1] == {"from": "gpt", "value": "hi!"}


def test_alpaca_history_becomes_leading_turns(tmp_path: Path) -> None:
    row = {"instruction": "And 3+3?", "output": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]}
    path = write_jsonl(tmp_path / "h.jsonl", [row])
    prepared, _ = prepare_leniently(tmp_path, {"name": "h", "path": str(path)})
    record = json.loads((prepared.dir / "train.jsonl").read_text())
    assert [turn["value"] for turn in record["conversations"]] == ["1+1?", "2", "2+2?", "4", "And 3+3?", "6"]


def test_mixed_file_rejects_exactly_the_bad_rows(tmp_path: Path) -> None:
    rows: list[Any] = [{"instruction": f"q{index}", "input": "", "output": f"a{index}"} for index in range(10)]
    rows[2] = {"instruction": "q2", "output": ""}
    rows[5] = {"instruction": 5, "output": "a5"}
    rows[7] = {"instruction": "q0", "input": "", "output": "a0"}  # duplicate of row 1
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(row) for row in rows]
    lines.insert(8, '{"instruction": "broken",')  # becomes line 9: not JSON
    path.write_text("\n".join(lines) + "\n")
    prepared, rejects = prepare_leniently(tmp_path, {"name": "mixed", "path": str(path)})
    assert [(reject["row"], reject["line"], reject["codes"]) for reject in rejects] == [
        (3, 3, ["empty_field"]),
        (6, 6, ["wrong_type"]),
        (8, 8, ["duplicate"]),
        (9, 9, ["invalid_json"]),
    ]
    assert rejects[2]["reasons"] == [f"duplicate of mixed row 1 ({path})"]
    assert rejects[0]["raw"] == {"instruction": "q2", "output": ""}
    assert rejects[3]["raw"] == '{"instruction": "broken",'
    assert all(reject["source"] == "mixed" and reject["file"] == str(path) for reject in rejects)
    source = prepared.stats.sources[0]
    assert (source.total, source.valid, source.rejected, source.duplicates, source.kept) == (11, 8, 3, 1, 7)
    assert source.reject_reasons == {"duplicate": 1, "empty_field": 1, "invalid_json": 1, "wrong_type": 1}
    kept = (prepared.dir / "train.jsonl").read_text().splitlines()
    assert len(kept) == 7


def test_rejected_share_above_the_limit_fails_with_a_summary(tmp_path: Path) -> None:
    rows = [dict(GOOD_ALPACA, instruction=f"q{index}") for index in range(9)] + [{"instruction": "q", "output": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    settings = DataSettings(datasets=[{"name": "d", "path": str(path)}], max_reject_share=0.05)
    with pytest.raises(DatasetError) as caught:
        prepare_datasets(settings, val_size=0, cutoff_len=64, tokenizer_file=None, out_root=tmp_path / "out")
    message = str(caught.value)
    assert "d: 1 of 10 rows rejected (10.0% rejected): empty_field 1" in message
    assert f"{path} row 10 (line 10): empty field 'output'" in message
    assert caught.value.rejects_path is not None and caught.value.rejects_path.is_file()
    assert str(caught.value.rejects_path) in message
    assert json.loads(caught.value.rejects_path.read_text())["row"] == 10
    assert not [entry for entry in (tmp_path / "out").iterdir() if entry.name != "failed"]
    # The same data passes under a looser limit.
    loose = settings.model_copy(update={"max_reject_share": 0.2})
    prepared = prepare_datasets(loose, val_size=0, cutoff_len=64, tokenizer_file=None, out_root=tmp_path / "out")
    assert prepared.stats.rejected == 1


def test_all_invalid_file_always_fails(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    settings = DataSettings(datasets=[{"name": "bad", "path": str(path)}], max_reject_share=1.0)
    with pytest.raises(DatasetError, match=r"bad: 2 of 2 rows rejected \(no valid row\): missing_field 2"):
        prepare_datasets(settings, val_size=0, cutoff_len=64, tokenizer_file=None, out_root=tmp_path / "out")


def test_identity_placeholders_are_filled_from_settings(tmp_path: Path) -> None:
    settings = DataSettings(datasets="identity", identity={"name": "Ada", "author": "Acme Labs"})
    prepared = prepare_datasets(settings, val_size=0, cutoff_len=64, tokenizer_file=None, out_root=tmp_path)
    text = (prepared.dir / "train.jsonl").read_text(encoding="utf-8")
    assert "{{" not in text
    assert "I am Ada, an AI assistant developed by Acme Labs." in text
