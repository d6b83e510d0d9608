"""The publish task: the run's adapter as a registered version, `candidate` at once and `champion` when it passes
the gate (`publish.gate`); the verdict with its numbers in the run, the version and a Prefect artifact."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from npu_sft.evaluation import Evaluation
from npu_sft.publishing import Published, publish_version
from npu_sft.runs import RunContext
from npu_sft.settings import Pipeline
from npu_sft.training import collect_adapter
from tasks.train import Trained

ADAPTER_ARTIFACT = "adapter"
GATE_ARTIFACT_KEY = "publish-gate"


@task
def publish(pipeline: Pipeline, run: RunContext, trained: Trained, evaluation: Evaluation) -> Published | None:
    """Log the adapter to the run, register it (once per run), and let the gate decide whether it is champion. A
    version the gate refuses stays `candidate`; the flow goes on."""
    settings = pipeline.settings.publish
    adapter_dir = collect_adapter(trained.output_dir, run.run_dir / ADAPTER_ARTIFACT)
    run.tracker.log_artifact(adapter_dir, ADAPTER_ARTIFACT)
    if not settings.enabled:
        return None
    published = publish_version(
        run.tracker,
        settings.registered_model,
        ADAPTER_ARTIFACT,
        settings.gate,
        evaluation.metrics(),
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
