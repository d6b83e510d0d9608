from __future__ import annotations

import pytest

from npu_sft.download import ModelSource
from npu_sft.publishing.adapter_model import adapter_facts, base_model_for
from npu_sft.settings import ConfigError, TinyModelSource

RUN_TAGS = {"model.resolved_revision": "2f6b3c1e9d", "data.key": "data-0123", "model.revision": "master"}


def test_a_hub_model_is_named_with_the_commit_the_download_resolved() -> None:
    facts = adapter_facts(ModelSource(source="modelscope", id="qwen/Qwen1.5-7B", revision="master"), RUN_TAGS,
                          {"template": "qwen"})
    assert (facts.base_model, facts.base_revision, facts.template, facts.dataset_key) == (
        "qwen/Qwen1.5-7B", "2f6b3c1e9d", "qwen", "data-0123")
    assert "at revision 2f6b3c1e9d" in facts.description("run-1")


def test_a_generated_or_local_model_has_no_revision(tmp_path) -> None:
    tiny = adapter_facts(TinyModelSource(source="tiny", seed=3), RUN_TAGS, {"template": "qwen"})
    assert tiny.base_model == "tiny (seed 3)" and tiny.base_revision == ""
    local = adapter_facts(ModelSource(source="local", path=tmp_path), RUN_TAGS, {})
    assert local.base_model == str(tmp_path) and local.base_revision == "" and local.template == ""
    assert "revision" not in local.description("run-1")


HEAD = "c0ffee" * 6 + "c0ff"  # a full commit id
QWEN = ModelSource(source="modelscope", id="Qwen/Qwen1.5-7B-Chat", revision="master")
URI = "models:/qwen7b-lora/3"


def test_a_versions_base_is_the_configs_model_pinned_to_the_commit_it_was_trained_on() -> None:
    tags = {"base_model": "Qwen/Qwen1.5-7B-Chat", "base_model.revision": HEAD}
    pinned = base_model_for(QWEN, tags, URI)
    assert isinstance(pinned, ModelSource)
    assert (pinned.id, pinned.revision) == ("Qwen/Qwen1.5-7B-Chat", HEAD)
    # A branch name recorded (the hub reported no commit) pins nothing: the config's revision is used.
    assert base_model_for(QWEN, {**tags, "base_model.revision": "master"}, URI) == QWEN
    # A version without facts (published before they were recorded) is taken as the config's model.
    assert base_model_for(QWEN, {}, URI) == QWEN
    tiny = TinyModelSource(source="tiny", seed=0)
    assert base_model_for(tiny, {"base_model": "tiny (seed 0)", "base_model.revision": ""}, URI) == tiny


def test_another_base_model_or_commit_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as refused:
        base_model_for(TinyModelSource(source="tiny", seed=1), {"base_model": "tiny (seed 0)"}, URI)
    assert str(refused.value) == (
        "model: models:/qwen7b-lora/3 was trained on tiny (seed 0), the config's model is tiny (seed 1); use the "
        "config it was trained with"
    )
    other = "0" * 40
    with pytest.raises(ConfigError, match=rf"^model.revision: {URI} was trained on Qwen/Qwen1.5-7B-Chat at {HEAD}, "
                                          rf"the config pins {other}$"):
        base_model_for(QWEN.model_copy(update={"revision": other}),
                       {"base_model": "Qwen/Qwen1.5-7B-Chat", "base_model.revision": HEAD}, URI)
