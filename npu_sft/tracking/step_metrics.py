"""Step metrics from a training into its run, kept and resent while MLflow refuses them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from mlflow.exceptions import MlflowException

from npu_sft.tracking.tracker import MLFLOW_BATCH_LIMIT, RunTracker


class StepMetricSink:
    """`on_metrics` for the training follower: step metrics MLflow refuses for a while (a SQLite store another process
    holds locked, a tracking server restarting) are kept and sent, in order, with the next batch, so the curve keeps
    every step once and the follower goes on. The log says once that metrics are delayed and once that they caught up.

        sink = StepMetricSink(run.tracker, on_warning=logger.warning)
        run_training(..., on_metrics=sink)
        sink.flush()   # the last try; what is still refused then is reported, not raised: the training is done
    """

    def __init__(self, tracker: RunTracker, on_warning: Callable[[str], None]):
        self._tracker = tracker
        self._warn = on_warning
        self._pending: list[tuple[str, float, int]] = []
        self._refused_since: float | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __call__(self, metrics: Iterable[tuple[str, float, int]]) -> None:
        self._pending.extend(metrics)
        self._send()

    def _send(self) -> bool:
        while self._pending:
            batch = self._pending[:MLFLOW_BATCH_LIMIT]
            try:
                self._tracker.log_metrics(batch)
            except MlflowException as err:
                if self._refused_since is None:
                    self._refused_since = time.monotonic()
                    self._warn(f"MLflow refused step metrics ({err.message.splitlines()[0][:200]}); keeping them and "
                               "retrying with the next steps")
                return False
            # Dropped only once MLflow has them: a retry never logs a step twice.
            del self._pending[: len(batch)]
        if self._refused_since is not None:
            self._warn(f"MLflow accepts step metrics again after {time.monotonic() - self._refused_since:.0f} s; "
                       "the delayed steps are logged")
            self._refused_since = None
        return True

    def flush(self, attempts: int = 5, wait_s: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        for attempt in range(attempts):
            if self._send():
                return
            if attempt < attempts - 1:
                sleep(wait_s)
        self._warn(f"{len(self._pending)} step metrics could not be logged to MLflow; they are in the run's trainer log")
