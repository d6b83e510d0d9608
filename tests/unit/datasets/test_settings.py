"""DataSettings / DatasetSpec: shorthand, LLaMA-Factory registrations, and clear validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from npu_sft.datasets import DatasetSpec, DataSettings, demo_corpus
from npu_sft.datasets.builtin import identity_rows, tiny_alpaca_rows


def test_comma_shorthand_expands_to_builtin_specs() -> None:
    settings = DataSettings(datasets="identity, tiny_alpaca")
    assert [(spec.name, spec.source) for spec in settings.datasets] == [
        ("identity", "builtin"),
        ("tiny_alpaca", "builtin"),
    ]


def test_source_is_inferred_from_path() -> None:
    spec = DatasetSpec(name="mine", path=Path("data.jsonl"))
    assert spec.source == "file"


def test_formatting_alias_and_tags_resolve_like_llamafactory() -> None:
    spec = DatasetSpec.model_validate(
        {
            "name": "chat",
            "path": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    )
    tags = spec.resolved_tags()
    assert spec.format == "sharegpt"
    assert spec.resolved_columns().messages == "messages"
    assert (tags.role, tags.content, tags.user, tags.assistant, tags.system) == (
        "role",
        "content",
        "user",
        "assistant",
        "system",
    )


def test_openai_preset_defaults() -> None:
    spec = DatasetSpec(name="oa", path=Path("x.jsonl"), format="openai")
    assert spec.resolved_columns().messages == "messages"
    assert spec.resolved_tags().observation == "tool"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "nope"}, "no builtin dataset of that name"),
        ({"name": "x", "source": "file"}, "source 'file' needs a path"),
        ({"name": "x", "source": "modelscope"}, "needs a repo_id"),
        ({"name": "x", "path": "a.json", "tags": {"role_tag": "r"}}, "tags apply to the sharegpt"),
        ({"name": "x", "path": "a.json", "format": "sharegpt", "columns": {"prompt": "q"}}, "alpaca format only"),
        ({"name": "x", "path": "a.json", "columns": {"images": "img"}}, "multimodal columns are not supported"),
        ({"name": "x", "path": "a.json", "colums": {}}, "Extra inputs are not permitted"),
        ({"name": "bad name", "path": "a.json"}, "String should match pattern"),
    ],
)
def test_invalid_specs_say_why(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DatasetSpec.model_validate(fields)


def test_duplicate_names_and_bad_shares_are_refused() -> None:
    with pytest.raises(ValidationError, match="used twice"):
        DataSettings(datasets="identity,identity")
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        DataSettings(datasets="identity", max_reject_share=1.5)
    with pytest.raises(ValidationError, match="whole number of rows"):
        DataSettings(datasets="identity", val_size=2.5)
    with pytest.raises(ValidationError, match="not a builtin"):
        DataSettings(datasets="identity,alpaca_en_demo")


def test_names_resolve_through_a_llamafactory_dataset_info(tmp_path: Path) -> None:
    registration = {
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "glaive": {"file_name": "glaive.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}},
        "hub_only": {"hf_hub_url": "someone/thing"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(registration))
    settings = DataSettings(datasets="identity,alpaca_en_demo,glaive", dataset_info_dir=tmp_path)
    demo, glaive = settings.datasets[1], settings.datasets[2]
    assert (demo.source, demo.path, demo.format) == ("file", tmp_path / "alpaca_en_demo.json", "alpaca")
    assert glaive.format == "sharegpt"
    with pytest.raises(ValidationError, match="only local files"):
        DataSettings(datasets="hub_only", dataset_info_dir=tmp_path)


def test_identity_placeholders_are_filled_only_for_the_identity_set_by_default() -> None:
    assert DatasetSpec(name="identity").fills_identity()
    assert not DatasetSpec(name="mine", path=Path("a.json")).fills_identity()
    assert DatasetSpec(name="mine", path=Path("a.json"), fill_identity=True).fills_identity()


def test_builtin_sets_are_deterministic_and_well_formed() -> None:
    identity = identity_rows()
    tiny = tiny_alpaca_rows()
    assert 30 <= len(identity) <= 90
    assert all("{{name}}" in row["output"] and "{{author}}" in row["output"] for row in identity)
    assert 200 <= len(tiny) <= 1000
    assert len({json.dumps(row, sort_keys=True) for row in tiny}) == len(tiny)
    assert tiny == tiny_alpaca_rows()
    corpus = demo_corpus()
    assert len(corpus) == len(identity) + len(tiny)
    assert not any("{{" in text for text in corpus)
    assert any("Reverse the letters" in text for text in corpus)
