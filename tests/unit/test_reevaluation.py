from __future__ import annotations

from pathlib import Path

import pytest

from npu_sft.reevaluation import RESULTS, RUN_CONFIG, EvaluationTarget, find_evaluation_target, run_dir_of
from npu_sft.settings import ConfigError, Pipeline, load_pipeline
from npu_sft.tracking import RunTracker, client_for


@pytest.fixture
def pipeline(in_tmp_project: Path, repo: Path, engine_python: Path) -> Pipeline:
    return load_pipeline(repo / "configs" / "tiny_cpu.yaml", [f"engine.python={engine_python}"])


def trained_run(pipeline: Pipeline, *, adapter: bool = True) -> str:
    """A run with its working directory as the train task leaves it."""
    tracker = RunTracker.start(pipeline.settings.mlflow, run_name="trained", tags={})
    output = run_dir_of(pipeline, tracker.run_id) / "output"
    output.mkdir(parents=True)
    (output.parent / RUN_CONFIG).write_text("stage: sft\n")
    (output / RESULTS).write_text('{"eval_loss": 2.5}')
    if adapter:
        (output / "adapter_model.safetensors").write_bytes(b"weights")
    return tracker.run_id


def registered(pipeline: Pipeline, run_id: str, alias: str | None = None) -> str:
    client = client_for(pipeline.settings.mlflow)
    name = pipeline.settings.publish.registered_model
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, source=str(run_dir_of(pipeline, run_id)), run_id=run_id).version
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
