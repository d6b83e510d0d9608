"""Pushing an adapter with the real `modelscope` hub client to the local hub stand-in (tests/fakes/hub_uploads.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from npu_sft.download.settings import TOKEN_ENV_VAR
from npu_sft.publishing.adapter_model import AdapterFacts, log_adapter_model
from npu_sft.publishing.errors import PushError
from npu_sft.publishing.modelscope_push import (
    PUSHED_TAG,
    HubToken,
    model_card,
    push_adapter,
    push_registered_version,
    push_token,
)
from npu_sft.publishing.settings import ModelScopePushSettings
from npu_sft.publishing.versions import register_version
from npu_sft.settings import MlflowSettings
from npu_sft.tracking import RunTracker, client_for
from tests.fakes.hub_standin import HubStandIn

TOKEN = "ms-write-token-0123456789"
REPO = "team/tiny-qwen2-lora"
WEIGHTS = bytes(range(256)) * 400  # over 64 KiB: the client sends it as an LFS blob


@pytest.fixture(autouse=True)
def _no_credentials_of_this_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client falls back to ~/.modelscope credentials and writes a session file there.
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))
    monkeypatch.delenv(TOKEN_ENV_VAR, raising=False)


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as standin:
        standin.accept_token(TOKEN)
        yield standin


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (directory / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def settings_for(hub: HubStandIn, **fields: object) -> ModelScopePushSettings:
    return ModelScopePushSettings(repo_id=REPO, endpoint=hub.url, **fields)


def head_files(hub: HubStandIn) -> dict[str, bytes]:
    repo = hub.repos[("model", REPO)]
    return repo.commits[repo.branches["master"]].files


def test_the_adapter_and_its_card_arrive_in_a_new_private_repository(
    hub: HubStandIn, adapter: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    pushed = push_adapter(settings_for(hub), adapter, "# card\n", commit_message="v1: champion",
                          token=HubToken(SecretStr(TOKEN), TOKEN_ENV_VAR))
    files = head_files(hub)
    assert files["adapter_model.safetensors"] == WEIGHTS and files["README.md"] == b"# card\n"
    assert set(files) == set(pushed.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                               "tokenizer_config.json"}
    assert hub.uploads.visibility[REPO] == 1  # private
    assert hub.uploads.commit_messages[REPO] == ["v1: champion (batch 1/1)"]  # one commit: all files or none
    assert pushed.url == f"{hub.url}/models/{REPO}"
    assert not (adapter / ".ms_upload_cache").exists()  # the client's cache stayed in the staging copy
    output = capsys.readouterr()
    assert TOKEN not in caplog.text + output.out + output.err


def test_a_second_push_commits_on_top_of_the_first(hub: HubStandIn, adapter: Path) -> None:
    token = HubToken(SecretStr(TOKEN), TOKEN_ENV_VAR)
    push_adapter(settings_for(hub), adapter, "v1", commit_message="v1", token=token)
    (adapter / "adapter_model.safetensors").write_bytes(WEIGHTS[::-1])
    push_adapter(settings_for(hub), adapter, "v2", commit_message="v2", token=token)
    assert head_files(hub)["adapter_model.safetensors"] == WEIGHTS[::-1]
    assert len(hub.repos[("model", REPO)].commits) == 2


def test_a_rejected_token_is_one_line_naming_where_it_came_from(hub: HubStandIn, adapter: Path) -> None:
    with pytest.raises(PushError) as raised:
        push_adapter(settings_for(hub), adapter, "card", commit_message="v1",
                     token=HubToken(SecretStr("not-the-token-0123"), TOKEN_ENV_VAR))
    message = str(raised.value)
    assert "\n" not in message and "not-the-token-0123" not in message
    assert message.startswith(f"ModelScope at {hub.url} refused the token from {TOKEN_ENV_VAR} for {REPO} (")
    assert ("model", REPO) not in hub.repos


def test_a_hub_that_fails_is_one_line_too(hub: HubStandIn, adapter: Path) -> None:
    hub.fail_all(404)
    with pytest.raises(PushError, match=rf"^pushing to {REPO} at {hub.url} failed: "):
        push_adapter(settings_for(hub), adapter, "card", commit_message="v1", token=HubToken(SecretStr(TOKEN), "t"))


def test_the_token_comes_from_the_environment_and_its_absence_says_how_to_give_one() -> None:
    settings = ModelScopePushSettings(repo_id=REPO)
    token = push_token(settings, {TOKEN_ENV_VAR: f" {TOKEN}\n"})
    assert token.value.get_secret_value() == TOKEN and token.source == TOKEN_ENV_VAR
    assert TOKEN not in repr(token)
    with pytest.raises(PushError, match=rf"^publish.modelscope needs a ModelScope token .*set {TOKEN_ENV_VAR}"):
        push_token(settings, {})


def test_settings_refuse_a_bad_repo_id_and_credentials_in_the_endpoint() -> None:
    with pytest.raises(ValidationError, match="repo_id must be owner/name"):
        ModelScopePushSettings(repo_id="just-a-name")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        ModelScopePushSettings(repo_id=REPO, endpoint="https://user:secret@modelscope.cn")


def test_the_card_says_what_the_adapter_was_trained_from_and_how_it_scored() -> None:
    card = model_card("tiny-qwen2-lora", "3", {"base_model": "qwen/Qwen1.5-7B", "base_model.revision": "abc123",
                                               "template": "qwen", "dataset.key": "k1"},
                      {"eval/rouge_l": 41.5, "gain/rouge_l": 2.25}, "rouge_l 41.5 beats champion v2 (40.1)")
    assert card.startswith("---\nframeworks:")
    for text in ("version 3", "qwen/Qwen1.5-7B", "abc123", "| chat template | qwen |", "| eval/rouge_l | 41.5 |",
                 "beats champion v2", "--template qwen"):
        assert text in card


def test_a_registered_version_is_pushed_once_and_tagged_with_its_repository(
    hub: HubStandIn, adapter: Path, tmp_path: Path
) -> None:
    mlflow = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            artifact_location=str(tmp_path / "artifacts"), experiment="push")
    tracker = RunTracker.start(mlflow, run_name="r", tags={})
    tracker.log_metrics([("eval/rouge_l", 12.5, 0), ("eval/predict_runtime_s", 3.0, 0)])
    facts = AdapterFacts("tiny (seed 0)", "", "qwen", "data-key")
    version = register_version(tracker, "tiny-qwen2-lora", log_adapter_model(tracker, adapter, facts, {}), facts)
    token = HubToken(SecretStr(TOKEN), TOKEN_ENV_VAR)
    push = dict(files_dir=tmp_path / "files", token=token)
    pushed = push_registered_version(mlflow, settings_for(hub), "tiny-qwen2-lora", version, **push)
    assert pushed is not None and head_files(hub)["adapter_model.safetensors"] == WEIGHTS
    card = head_files(hub)["README.md"].decode()
    assert "| eval/rouge_l | 12.5 |" in card and "runtime" not in card and "| base model | tiny (seed 0) |" in card
    assert client_for(mlflow).get_model_version("tiny-qwen2-lora", version).tags[PUSHED_TAG] == pushed.url
    assert push_registered_version(mlflow, settings_for(hub), "tiny-qwen2-lora", version, **push) is None
    assert len(hub.repos[("model", REPO)].commits) == 1
