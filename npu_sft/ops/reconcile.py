"""Crash reconciliation: what a dead process can no longer do for itself.

    python -m npu_sft.ops.reconcile --worker-name HOST --tracking-uri http://127.0.0.1:5000   (`make up` runs it)

A flow run marks itself Crashed and its MLflow run FAILED when it is told to stop (SIGTERM, cancellation), but
not when it is SIGKILLed (OOM killer) or loses its worker. Every few seconds, for the flow runs of this host's
worker (Prefect labels each run with `prefect.worker.name`):

1. Running with no process left on this host: propose Crashed. Cancelling with no process left for longer than the
   grace period: propose Cancelled (before that the worker is still killing it and running its cancellation hooks,
   which end its MLflow run KILLED).
2. Running but no longer supervised by a worker (the worker died; Prefect starts each flow run in its own session,
   so it outlives the worker): SIGTERM it, so the flow marks itself Crashed, stops torchrun and fails its MLflow
   run; SIGKILL what is left after the grace period and propose Crashed.
3. Finished for longer than the grace period while processes that inherited its PREFECT__FLOW_RUN_ID still run
   (torchrun ranks of a SIGKILLed flow, a serve flow's API server): stop them. Device leases are flocks, so a dead
   holder's leases are already free; stopping its engine processes frees the devices themselves.

And for every flow run that ended Crashed, Failed or Cancelled, whichever host or automation ended it:

4. its MLflow run (tag `prefect_flow_run_id`) still RUNNING: mark it FAILED (KILLED for a cancelled one), tagged
   with the reason.

The heartbeat automation (deployments/automations.yaml) covers hosts that died altogether; step 4 then follows.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

import httpx
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.states import Cancelled, Crashed

from npu_sft import host_processes
from npu_sft.host_processes import ProcessInfo
from npu_sft.tracking import end_running_runs

log = logging.getLogger("npu_sft.ops.reconcile")

RUN_ID_VAR = "PREFECT__FLOW_RUN_ID"  # set by the worker for the flow run's process, inherited by all it starts
WORKER_LABEL = "prefect.worker.name"
RECONCILED_TAG = "npu_sft.reconciled"
ACTIVE_STATES = [StateType.RUNNING, StateType.CANCELLING]
UNSUCCESSFUL_STATES = [StateType.CRASHED, StateType.FAILED, StateType.CANCELLED]
# Errors of one pass that the next pass may not see (a server restarting, a locked SQLite store).
TRANSIENT_ERRORS = (httpx.HTTPError, PrefectHTTPStatusError, MlflowException, OSError)


def processes_by_flow_run(processes: Iterable[ProcessInfo]) -> dict[str, list[ProcessInfo]]:
    runs: dict[str, list[ProcessInfo]] = defaultdict(list)
    for info in processes:
        run_id = info.env.get(RUN_ID_VAR)
        if run_id:
            runs[run_id].append(info)
    return dict(runs)


def is_prefect_worker(info: ProcessInfo | None) -> bool:
    """`prefect worker start ...` (the python interpreter, then the prefect script, then its arguments)."""
    return info is not None and "worker" in info.cmdline and any(part.endswith("prefect") for part in info.cmdline)


def is_flow_engine(info: ProcessInfo) -> bool:
    """The flow run's own process: `python -m prefect.engine`."""
    return "prefect.engine" in info.cmdline


def fail_mlflow_runs(client: MlflowClient, flow_run_id: str, reason: str, status: int = RunStatus.FAILED) -> list[str]:
    """Mark the flow run's MLflow runs that are still RUNNING, in any experiment, as FAILED (or `status`); returns
    their ids."""
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    return end_running_runs(client, experiment_ids, flow_run_id, RunStatus.to_string(status), reason, RECONCILED_TAG)


PAGE_SIZE = 200  # flow runs per read from the Prefect API


@dataclass
class Reconciler:
    prefect: SyncPrefectClient
    mlflow: MlflowClient
    worker_name: str | None  # None: no worker on this host (e.g. next to the MLflow server), rule 4 only
    grace_s: float = 30.0
    lookback: timedelta = timedelta(hours=24)
    clock: Callable[[], float] = time.monotonic
    list_processes: Callable[[], list[ProcessInfo]] = field(
        default=lambda: host_processes.list_processes([RUN_ID_VAR])
    )
    _signalled: dict[tuple[int, int], float] = field(default_factory=dict)  # process -> when it got SIGTERM
    _unsupervised_since: dict[str, float] = field(default_factory=dict)  # flow run id -> first seen orphaned
    _gone_since: dict[str, float] = field(default_factory=dict)  # cancelling flow run id -> first seen without process
    # Every unsuccessful flow run that ended before the cursor has had its MLflow runs ended; of those that ended
    # exactly at it, these: memory stays bounded however long the worker lives.
    _cursor: datetime | None = None
    _checked_at_cursor: set[str] = field(default_factory=set)
    _foreign: set[str] = field(default_factory=set)  # run ids this server does not know: never asked again
    _since: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def run_once(self) -> list[str]:
        """One pass over the four rules; returns what it did, one line each."""
        done: list[str] = []
        if self.worker_name is not None and host_processes.PROC.is_dir():
            # Without /proc every run would look like it has no process left: the process rules need it.
            done += self._check_processes()
        done += self._fail_mlflow_runs_of_unsuccessful_runs()
        return done

    def _check_processes(self) -> list[str]:
        """Rules 1-3. Processes are listed before runs are read: a run that ends in between is then seen with its
        final state (its process sets it before exiting) instead of looking like a Running run without a process."""
        processes = self.list_processes()
        by_pid = {info.pid: info for info in processes}
        by_run = processes_by_flow_run(processes)
        done: list[str] = []
        active = self._active_runs_of_this_worker()
        for flow_run in active:
            done += self._check_active(flow_run, by_run.get(str(flow_run.id), []), by_pid)
        active_ids = {str(flow_run.id) for flow_run in active}
        for run_id, run_processes in by_run.items():
            if run_id not in active_ids:
                done += self._stop_leftovers(run_id, run_processes)
        alive = {info.identity for info in processes}
        self._signalled = {proc: when for proc, when in self._signalled.items() if proc in alive}
        self._unsupervised_since = {run: when for run, when in self._unsupervised_since.items() if run in active_ids}
        self._gone_since = {run: when for run, when in self._gone_since.items() if run in active_ids}
        return done

    def _active_runs_of_this_worker(self) -> list[FlowRun]:
        runs = self.prefect.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES)))
        )
        return [run for run in runs if run.labels.get(WORKER_LABEL) == self.worker_name]

    def _check_active(
        self, flow_run: FlowRun, run_processes: list[ProcessInfo], by_pid: dict[int, ProcessInfo]
    ) -> list[str]:
        run_id = str(flow_run.id)
        if not run_processes:
            self._unsupervised_since.pop(run_id, None)
            cancelling = flow_run.state is not None and flow_run.state.type == StateType.CANCELLING
            # The worker kills a cancelled run's process first, then runs its cancellation hooks, then marks it
            # Cancelled: that takes it a few seconds.
            if cancelling and self.clock() - self._gone_since.setdefault(run_id, self.clock()) <= self.grace_s:
                return []
            return self._propose_crashed(flow_run, f"no process of this flow run is left on worker {self.worker_name}")
        if any(is_prefect_worker(by_pid.get(info.ppid)) for info in run_processes):
            self._unsupervised_since.pop(run_id, None)
            return []  # supervised: the worker reports whatever happens to it
        first_seen = self._unsupervised_since.setdefault(run_id, self.clock())
        if self.clock() - first_seen > self.grace_s:
            self._kill(run_processes)
            return [f"flow run {run_id}: SIGKILLed {len(run_processes)} processes still running {self.grace_s:g} s "
                    "after SIGTERM"] + self._propose_crashed(flow_run, "its worker died; stopped by the reconciler")
        # SIGTERM the flow's own process first: it stops torchrun itself and reports Crashed with its reason.
        engines = [info for info in run_processes if is_flow_engine(info)] or run_processes
        if self._terminate(engines):
            return [f"flow run {run_id}: its worker is gone; sent SIGTERM to pid "
                    f"{', '.join(str(info.pid) for info in engines)}"]
        return []

    def _stop_leftovers(self, run_id: str, run_processes: list[ProcessInfo]) -> list[str]:
        if run_id in self._foreign:
            return []
        try:
            flow_run = self.prefect.read_flow_run(UUID(run_id))
        except ObjectNotFound:
            # A run of another Prefect server (e.g. `npu-sft run` in ephemeral mode): not ours to judge.
            self._foreign.add(run_id)
            return []
        state = flow_run.state
        if state is None or not state.is_final():
            return []
        ended_ago = (datetime.now(timezone.utc) - state.timestamp).total_seconds()
        if ended_ago < self.grace_s:
            return []  # its processes may still be on their way out
        if self._terminate(run_processes):
            return [f"flow run {run_id} ended {state.name}; sent SIGTERM to its leftover processes "
                    f"{', '.join(str(info.pid) for info in run_processes)}"]
        if any(self.clock() - self._signalled.get(info.identity, self.clock()) > self.grace_s for info in run_processes):
            self._kill(run_processes)
            return [f"flow run {run_id}: SIGKILLed leftover processes {', '.join(str(i.pid) for i in run_processes)}"]
        return []

    def _terminate(self, processes: list[ProcessInfo]) -> bool:
        """SIGTERM the processes not signalled yet; returns whether any was."""
        fresh = [info for info in processes if info.identity not in self._signalled]
        for info in fresh:
            self._signalled[info.identity] = self.clock()
        host_processes.send_signal((info.pid for info in fresh), signal.SIGTERM)
        return bool(fresh)

    def _kill(self, processes: list[ProcessInfo]) -> None:
        live = [info.pid for info in processes if host_processes.is_alive(*info.identity)]
        host_processes.send_signal(live, signal.SIGKILL)

    def _propose_crashed(self, flow_run: FlowRun, reason: str) -> list[str]:
        message = f"npu-sft reconciler: {reason}"
        # A run being cancelled whose process is gone was cancelled, not crashed.
        cancelling = flow_run.state is not None and flow_run.state.type == StateType.CANCELLING
        state = Cancelled(message=message) if cancelling else Crashed(message=message)
        # Not forced: if the run reached a final state since we read it (it completed and exited), Prefect keeps
        # that state and rejects ours.
        result = self.prefect.set_flow_run_state(flow_run.id, state)
        if result.state is not None and result.state.type == state.type:
            return [f"flow run {flow_run.id} ({flow_run.name}): marked {state.name}: {reason}"]
        return []

    def _fail_mlflow_runs_of_unsuccessful_runs(self) -> list[str]:
        done: list[str] = []
        for flow_run in reversed(self._unsuccessful_runs_since_cursor()):  # oldest first: the cursor only moves on
            run_id = str(flow_run.id)
            if flow_run.state is None or flow_run.end_time is None or run_id in self._checked_at_cursor:
                continue
            reason = f"Prefect flow run {run_id} ended {flow_run.state.name}: {flow_run.state.message or ''}".strip()
            cancelled = flow_run.state.type == StateType.CANCELLED
            status = RunStatus.KILLED if cancelled else RunStatus.FAILED
            failed = fail_mlflow_runs(self.mlflow, run_id, reason, status)
            if self._cursor is None or flow_run.end_time > self._cursor:
                self._cursor, self._checked_at_cursor = flow_run.end_time, set()
            self._checked_at_cursor.add(run_id)
            ended = RunStatus.to_string(status)
            done += [f"MLflow run {mlflow_run_id}: marked {ended} ({reason})" for mlflow_run_id in failed]
        return done

    def _unsuccessful_runs_since_cursor(self) -> list[FlowRun]:
        """Newest first, every page of them (a busy day may end more than one page of runs between two passes)."""
        flow_run_filter = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNSUCCESSFUL_STATES)),
            end_time=FlowRunFilterEndTime(after_=self._cursor or self._since - self.lookback),
        )
        runs: list[FlowRun] = []
        while True:
            page = self.prefect.read_flow_runs(
                flow_run_filter=flow_run_filter, sort=FlowRunSort.END_TIME_DESC, limit=PAGE_SIZE, offset=len(runs)
            )
            runs += page
            if len(page) < PAGE_SIZE:
                return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu_sft.ops.reconcile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker-name", help="the Prefect worker on this host, whose flow runs' processes are "
                        "checked; without it only MLflow runs of ended flow runs are fixed")
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking URI the flows log to")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between passes")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL")
    parser.add_argument("--ready-file", type=Path, help="written with this process's pid once it polls")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API request would bury what we did
    mlflow = MlflowClient(tracking_uri=args.tracking_uri, registry_uri=args.tracking_uri)
    with get_client(sync_client=True) as prefect:
        reconciler = Reconciler(prefect, mlflow, args.worker_name, grace_s=args.grace)
        log.info("reconciler: watching flow runs of worker %s, MLflow at %s", args.worker_name or "(none)",
                 args.tracking_uri)
        if args.ready_file is not None:
            args.ready_file.write_text(str(os.getpid()), encoding="utf-8")
        while True:
            try:
                for line in reconciler.run_once():
                    log.info("%s", line)
            except TRANSIENT_ERRORS as err:
                log.warning("pass failed, retrying in %.0f s: %s", args.interval, err)
            if args.once:
                return 0
            time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
