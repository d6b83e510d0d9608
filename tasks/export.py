"""The task that merges a new champion into its base model (`publish.merged`) and registers the result."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from npu_sft.publishing.adapter_model import AdapterFacts
from npu_sft.publishing.merged_export import export_merged, merged_model_name, register_merged
from npu_sft.publishing.versions import Published
from npu_sft.settings import Pipeline
from npu_sft.tracking import RunContext
from tasks.publish import ADAPTER_DIR

MERGED_DIR = "merged"  # in the run's working directory


@task
def export_merged_champion(pipeline: Pipeline, run: RunContext, model_path: Path, published: Published) -> str:
    """`llamafactory-cli export` of the run's adapter on its base model, as a version of the merged model (alias
    champion, tags naming the adapter version). Returns `<merged model>/<version>`."""
    settings = pipeline.settings.publish.merged
    tags = run.tracker.client.get_model_version(published.name, published.version).tags
    facts = AdapterFacts(tags.get("base_model", ""), tags.get("base_model.revision", ""), tags.get("template", ""),
                         tags.get("dataset.key", ""))
    merged_dir = export_merged(pipeline.settings.engine, model_path, run.run_dir / ADAPTER_DIR, facts.template,
                               run.run_dir / MERGED_DIR, settings.shard_size_gb)
    reference = register_merged(run.tracker, merged_dir, merged_model_name(settings, published.name), published.name,
                                published.version, facts)
    get_run_logger().info("%s version %s merged into %s: registered as %s", published.name, published.version,
                          facts.base_model, reference)
    return reference
