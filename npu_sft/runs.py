"""One pipeline run: its MLflow run and its own working directory (engine config, outputs, logs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npu_sft.settings import MlflowSettings


@dataclass(frozen=True)
class RunContext:
    mlflow_run_id: str
    run_dir: Path
    mlflow: MlflowSettings
    flow_run_id: str | None = None

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"
