from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from npu_sft.evaluation.reevaluation import (
    RESULTS,
    RUN_CONFIG,
    EvaluationTarget,
    find_evaluation_target,
    restore_training_record,
    run_dir_of,
)
from npu_sft.settings import ConfigError, Pipeline, load_pipeline
from npu_sft.tracking import RunTracker, client_for


@pytest.fixture
def pipeline(in_tmp_project: Path, repo: Path, engine_python: Path) -> Pipeline:
    return load_pipeline(repo / "configs" / "tiny_cpu.yaml", [f"engine.python={engine_python}"])


TRAINING_HOST_CONFIG = {
    "stage": "sft",
    "model_name_or_path": "/training-host/models/base",
    "dataset_dir": "/training-host/datasets/abc",
    "eval_dataset": "eval",
    "template": "qwen",
}


def trained_run(pipeline: Pipeline, *, adapter: bool = True, recorded: bool = True) -> str:
    """A run with its working directory as the train task leaves it, and its record as the prepare and train tasks
    log it."""
    tracker = RunTracker.start(pipeline.settings.mlflow, run_name="trained", tags={})
    run_dir = run_dir_of(pipeline, tracker.run_id)
    output = run_dir / "output"
    output.mkdir(parents=True)
    (run_dir / RUN_CONFIG).write_text(yaml.safe_dump(TRAINING_HOST_CONFIG))
    (output / RESULTS).write_text('{"eval_loss": 2.5, "epoch": 3.0, "train_loss": 2.9}')
    data = run_dir / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text('{"eval": {"file_name": "eval.jsonl"}}')
    (data / "eval.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    if adapter:
        (output / "adapter_model.safetensors").write_bytes(b"weights")
    if recorded:
        tracker.log_artifact(run_dir / RUN_CONFIG, "config")
        tracker.log_artifact(output / RESULTS, "results")
        tracker.log_artifact(data / "dataset_info.json", "datasets")
        tracker.log_artifact(data / "eval.jsonl", "datasets")
    return tracker.run_id


def registered(
    pipeline: Pipeline, run_id: str, alias: str | None = None, base_model: str = "tiny (seed 0)"
) -> str:
    client = client_for(pipeline.settings.mlflow)
    name = pipeline.settings.publish.registered_model
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name, source=str(run_dir_of(pipeline, run_id)), run_id=run_id,
        tags={"base_model": base_model, "base_model.revision": ""},
    ).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


def test_a_run_is_scored_from_its_output_directory(pipeline: Pipeline) -> None:
    run_id = trained_run(pipeline)
    assert find_evaluation_target(pipeline, run_id, None) == EvaluationTarget(run_id, None)


def test_a_version_alias_resolves_to_its_number_and_its_run(pipeline: Pipeline) -> None:
    first = trained_run(pipeline)
    registered(pipeline, first)
    # The version's files come from the registry: the run's own adapter may be gone.
    second = trained_run(pipeline, adapter=False)
    registered(pipeline, second, alias="champion")
    assert find_evaluation_target(pipeline, None, "champion") == EvaluationTarget(second, "2")
    assert find_evaluation_target(pipeline, None, "@champion") == EvaluationTarget(second, "2")
    assert find_evaluation_target(pipeline, None, "1") == EvaluationTarget(first, "1")
    assert find_evaluation_target(pipeline, None, "latest") == EvaluationTarget(second, "2")


def test_refusals_are_one_line_naming_what_to_do(pipeline: Pipeline) -> None:
    with pytest.raises(ConfigError, match=r"^--version champion: .* has no versions in .*: run the sft flow first$"):
        find_evaluation_target(pipeline, None, "champion")
    without_adapter = trained_run(pipeline, adapter=False)
    registered(pipeline, without_adapter)
    with pytest.raises(ConfigError, match="no version has passed the publish gate yet"):
        find_evaluation_target(pipeline, None, "champion")
    with pytest.raises(ConfigError, match=r"adapter_model.safetensors is missing; evaluate runs where the training"):
        find_evaluation_target(pipeline, without_adapter, None)
    with pytest.raises(ConfigError, match="give one of --run RUN_ID or --version N"):
        find_evaluation_target(pipeline, None, None)


def test_a_version_is_scored_from_the_record_alone(pipeline: Pipeline, tmp_path: Path) -> None:
    run_id = trained_run(pipeline)
    registered(pipeline, run_id, alias="champion")
    shutil.rmtree(run_dir_of(pipeline, run_id))  # another host: the training's directory is not here
    assert find_evaluation_target(pipeline, None, "champion") == EvaluationTarget(run_id, "1")
    dest, model = tmp_path / "restored", tmp_path / "models" / "base"
    config_file, results = restore_training_record(pipeline.settings.mlflow, run_id, dest, model)
    config = yaml.safe_load(config_file.read_text())
    assert config == {**TRAINING_HOST_CONFIG, "model_name_or_path": str(model), "dataset_dir": str(dest / "datasets")}
    info = json.loads((dest / "datasets" / "dataset_info.json").read_text())
    assert (dest / "datasets" / info["eval"]["file_name"]).read_text() == '{"instruction": "hi", "output": "hello"}\n'
    assert results == {"eval_loss": 2.5, "epoch": 3.0, "perplexity": math.exp(2.5)}
    # Restoring again starts from the record, not from what an earlier restore left.
    (dest / "stale").write_text("x")
    restore_training_record(pipeline.settings.mlflow, run_id, dest, model)
    assert not (dest / "stale").exists()


def test_a_version_whose_run_recorded_no_eval_split_is_refused(pipeline: Pipeline) -> None:
    run_id = trained_run(pipeline, recorded=False)
    registered(pipeline, run_id)
    with pytest.raises(ConfigError) as refused:
        find_evaluation_target(pipeline, None, "1")
    assert str(refused.value) == (
        f"--version 1: run {run_id}, which trained models:/tiny-qwen2-lora/1, recorded no config/llamafactory.yaml, "
        "results/all_results.json, datasets/dataset_info.json, datasets/eval.jsonl (it ran before npu-sft recorded "
        "them); evaluate it with --run where it trained"
    )


def test_a_version_of_another_base_model_is_refused(pipeline: Pipeline) -> None:
    registered(pipeline, trained_run(pipeline), base_model="Qwen/Qwen1.5-7B-Chat")
    with pytest.raises(ConfigError) as refused:
        find_evaluation_target(pipeline, None, "latest")
    assert str(refused.value) == (
        "model: models:/tiny-qwen2-lora/1 was trained on Qwen/Qwen1.5-7B-Chat, the config's model is tiny (seed 0); "
        "use the config it was trained with"
    )
