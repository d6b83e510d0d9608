"""The publish task: the run's adapter as an MLflow logged model and a registered version, `candidate` at once and
`champion` when it passes the gate (`publish.gate`); the verdict with its numbers in the run, the version and a
Prefect artifact."""

from __future__ import annotations

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from npu_sft.evaluation import Evaluation
from npu_sft.publishing.adapter_model import adapter_facts, log_adapter_model
from npu_sft.publishing.versions import Published, publish_version
from npu_sft.settings import Pipeline
from npu_sft.tracking import RunContext
from npu_sft.training import collect_adapter
from tasks.train import Trained

ADAPTER_DIR = "adapter"  # in the run's working directory: the files that get published
GATE_ARTIFACT_KEY = "publish-gate"


@task
def publish(pipeline: Pipeline, run: RunContext, trained: Trained, evaluation: Evaluation) -> Published | None:
    """Log the adapter as the run's model with its facts and linked scores, register it (once per run), and let the
    gate decide whether it is champion. A version the gate refuses stays `candidate`; the flow goes on."""
    settings = pipeline.settings.publish
    adapter_dir = collect_adapter(trained.output_dir, run.run_dir / ADAPTER_DIR)
    run_tags = run.tracker.client.get_run(run.tracker.run_id).data.tags
    engine_config = yaml.safe_load(trained.config_file.read_text(encoding="utf-8"))
    facts = adapter_facts(pipeline.settings.model, run_tags, engine_config)
    metrics = evaluation.metrics()
    model_id = log_adapter_model(run.tracker, adapter_dir, facts, metrics)
    get_run_logger().info("adapter logged as MLflow model %s (%s)", model_id, facts.description(run.tracker.run_id))
    if not settings.enabled:
        return None
    published = publish_version(
        run.tracker,
        settings.registered_model,
        model_id,
        facts,
        settings.gate,
        metrics,
        lock_file=pipeline.state_dir / "publish.lock",
    )
    verdict = "champion" if published.decision.promote else "candidate"
    get_run_logger().info(
        "%s version %s%s is %s: %s",
        published.name,
        published.version,
        "" if published.new_version else " (registered before by this run)",
        verdict,
        published.decision.reason,
    )
    create_markdown_artifact(
        key=GATE_ARTIFACT_KEY,
        markdown=(
            f"## {published.name} version {published.version}: **{verdict}**\n\n"
            f"{published.decision.reason}\n\n"
            f"Gate: `{settings.gate.model_dump_json()}`\n\n"
            f"Champion now: version {published.champion or '-'}"
        ),
        description=f"publish gate for {published.name} version {published.version}",
    )
    return published
