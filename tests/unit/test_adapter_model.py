from __future__ import annotations

from npu_sft.adapter_model import adapter_facts
from npu_sft.download import ModelSource
from npu_sft.settings import TinyModelSource

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
