"""One pipeline run: its MLflow run (through its tracker) and its own working directory (engine config, outputs,
logs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npu_sft.tracking.tracker import RunTracker


@dataclass(frozen=True)
class RunContext:
    tracker: RunTracker
    run_dir: Path
    flow_run_id: str | None = None

    @property
    def mlflow_run_id(self) -> str:
        return self.tracker.run_id

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"
