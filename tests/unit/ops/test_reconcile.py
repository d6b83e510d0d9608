"""The crash reconciler's rules, with a stand-in Prefect API, a real MLflow store and real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow import MlflowClient
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed, Crashed, Failed, Running

from npu_sft import host_processes
from npu_sft.ops import reconcile
from npu_sft.host_processes import ProcessInfo
from npu_sft.ops.reconcile import RECONCILED_TAG, RUN_ID_VAR, Reconciler, fail_mlflow_runs

WORKER = "host-a"
WORKER_PID = 4000
WORKER_PROCESS = ProcessInfo(WORKER_PID, 1, 11, ("/venv/bin/python", "/venv/bin/prefect", "worker", "start"))


class FakePrefect:
    """The part of SyncPrefectClient the reconciler uses, over an in-memory set of flow runs."""

    def __init__(self, *runs: FlowRun) -> None:
        self.runs = {run.id: run for run in runs}
        self.proposed: list[tuple[uuid.UUID, State]] = []

    def read_flow_runs(
        self, *, flow_run_filter: Any = None, sort: Any = None, limit: int | None = None, offset: int = 0
    ) -> list[FlowRun]:
        """As the API answers: the state and end-time filters (`after_` includes the time itself), END_TIME_DESC,
        then offset and limit."""
        wanted = set(flow_run_filter.state.type.any_)
        runs = [run for run in self.runs.values() if run.state is not None and run.state.type in wanted]
        end_time = getattr(flow_run_filter, "end_time", None)
        if end_time is not None and end_time.after_ is not None:
            runs = [run for run in runs if run.end_time is not None and run.end_time >= end_time.after_]
        if sort is not None and sort.name == "END_TIME_DESC":
            runs.sort(key=lambda run: run.end_time or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
        return runs[offset:][:limit]

    def read_flow_run(self, flow_run_id: uuid.UUID) -> FlowRun:
        if flow_run_id not in self.runs:
            raise ObjectNotFound(http_exc=LookupError(str(flow_run_id)))
        return self.runs[flow_run_id]

    def set_flow_run_state(self, flow_run_id: uuid.UUID, state: State, force: bool = False) -> SimpleNamespace:
        run = self.runs[flow_run_id]
        self.proposed.append((flow_run_id, state))
        if run.state is not None and run.state.is_final():
            return SimpleNamespace(state=run.state)  # Prefect keeps a final state against an unforced proposal
        run.state = state
        return SimpleNamespace(state=state)


def flow_run(state: State, worker: str = WORKER, ended_ago_s: float = 0.0) -> FlowRun:
    ended = datetime.now(timezone.utc) - timedelta(seconds=ended_ago_s)
    return FlowRun(
        id=uuid.uuid4(),
        flow_id=uuid.uuid4(),
        name="tiny-run",
        state=state.model_copy(update={"timestamp": ended}),
        labels={"prefect.worker.name": worker},
        end_time=ended if state.is_final() else None,
    )


def engine_process(run: FlowRun, pid: int, ppid: int = WORKER_PID) -> ProcessInfo:
    return ProcessInfo(pid, ppid, 100 + pid, ("/venv/bin/python", "-m", "prefect.engine"), {RUN_ID_VAR: str(run.id)})


def torchrun_process(run: FlowRun, pid: int, ppid: int) -> ProcessInfo:
    return ProcessInfo(pid, ppid, 100 + pid, ("python", "-m", "torch.distributed.run"), {RUN_ID_VAR: str(run.id)})


@pytest.fixture
def signals(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Signals the reconciler sends, recorded instead of delivered (the pids above are made up)."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(host_processes, "send_signal", lambda pids, signum: sent.extend((p, signum) for p in pids))
    monkeypatch.setattr(host_processes, "is_alive", lambda pid, ticks=None: True)
    return sent


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reconciler(prefect: FakePrefect, mlflow: MlflowClient, processes: list[ProcessInfo], clock: Clock | None = None) -> Reconciler:
    return Reconciler(prefect, mlflow, WORKER, grace_s=30, clock=clock or Clock(), list_processes=lambda: processes)


def test_running_run_whose_processes_are_gone_is_marked_crashed(mlflow_client: MlflowClient, signals: list) -> None:
    run = flow_run(Running())
    prefect = FakePrefect(run)
    done = reconciler(prefect, mlflow_client, [WORKER_PROCESS]).run_once()
    assert run.state.type == StateType.CRASHED
    assert "no process of this flow run is left" in run.state.message
    assert any("marked Crashed" in line for line in done)
    assert signals == []


def test_a_supervised_run_is_left_alone(mlflow_client: MlflowClient, signals: list) -> None:
    run = flow_run(Running())
    processes = [WORKER_PROCESS, engine_process(run, 4100), torchrun_process(run, 4200, ppid=4100)]
    prefect = FakePrefect(run)
    assert reconciler(prefect, mlflow_client, processes).run_once() == []
    assert prefect.proposed == [] and signals == []


def test_runs_of_another_hosts_worker_are_not_ours(mlflow_client: MlflowClient, signals: list) -> None:
    run = flow_run(Running(), worker="host-b")  # its processes are on host-b, invisible here
    prefect = FakePrefect(run)
    reconciler(prefect, mlflow_client, [WORKER_PROCESS]).run_once()
    assert prefect.proposed == [] and run.state.type == StateType.RUNNING


def test_a_run_that_lost_its_worker_gets_sigterm_then_sigkill(mlflow_client: MlflowClient, signals: list) -> None:
    run = flow_run(Running())
    # The worker died: the flow's process was reparented to init.
    processes = [engine_process(run, 4100, ppid=1), torchrun_process(run, 4200, ppid=4100)]
    prefect = FakePrefect(run)
    clock = Clock()
    sweeper = reconciler(prefect, mlflow_client, processes, clock)
    sweeper.run_once()
    assert signals == [(4100, signal.SIGTERM)]  # only the flow's process: it stops torchrun and reports itself
    clock.now += 10
    sweeper.run_once()
    assert signals == [(4100, signal.SIGTERM)]  # within the grace period nothing more happens
    clock.now += 25
    sweeper.run_once()
    assert set(signals[1:]) == {(4100, signal.SIGKILL), (4200, signal.SIGKILL)}
    assert run.state.type == StateType.CRASHED and "worker died" in run.state.message


def test_leftovers_of_a_finished_run_are_stopped_after_the_grace_period(mlflow_client: MlflowClient, signals: list) -> None:
    fresh = flow_run(Crashed(message="process exited -9"), ended_ago_s=5)
    old = flow_run(Crashed(message="process exited -9"), ended_ago_s=60)
    foreign = uuid.uuid4()  # a run id this server does not know (an ephemeral `npu-sft run`)
    processes = [
        torchrun_process(fresh, 4300, ppid=1),
        torchrun_process(old, 4400, ppid=1),
        ProcessInfo(4500, 1, 1, ("python", "train.py"), {RUN_ID_VAR: str(foreign)}),
    ]
    prefect = FakePrefect(fresh, old)
    done = reconciler(prefect, mlflow_client, processes).run_once()
    assert signals == [(4400, signal.SIGTERM)]
    assert any("leftover" in line for line in done)


def _mlflow_run(client: MlflowClient, flow_run_id: str) -> str:
    experiment = client.get_experiment_by_name("reconcile") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("reconcile")
    return client.create_run(experiment_id, tags={"prefect_flow_run_id": flow_run_id}).info.run_id


def test_mlflow_runs_of_unsuccessful_flow_runs_are_marked_failed_once(mlflow_client: MlflowClient, signals: list) -> None:
    crashed = flow_run(Crashed(message="Process exited with status code: -9"), ended_ago_s=1)
    failed = flow_run(Failed(message="boom"), ended_ago_s=1)
    completed = flow_run(Completed(), ended_ago_s=1)
    ids = {name: _mlflow_run(mlflow_client, str(run.id)) for name, run in
           (("crashed", crashed), ("failed", failed), ("completed", completed))}
    mlflow_client.set_terminated(ids["failed"], status="FAILED")  # the flow marked it itself
    sweeper = reconciler(FakePrefect(crashed, failed, completed), mlflow_client, [])
    done = sweeper.run_once()
    assert mlflow_client.get_run(ids["crashed"]).info.status == "FAILED"
    assert "ended Crashed" in mlflow_client.get_run(ids["crashed"]).data.tags[RECONCILED_TAG]
    assert RECONCILED_TAG not in mlflow_client.get_run(ids["failed"]).data.tags
    assert mlflow_client.get_run(ids["completed"]).info.status == "RUNNING"  # not ours to end: still running
    assert done == [line for line in done if ids["crashed"] in line] and len(done) == 1
    assert sweeper.run_once() == []  # checked once per flow run


def test_fail_mlflow_runs_leaves_other_flow_runs_alone(mlflow_client: MlflowClient) -> None:
    target, other = str(uuid.uuid4()), str(uuid.uuid4())
    target_run, other_run = _mlflow_run(mlflow_client, target), _mlflow_run(mlflow_client, other)
    assert fail_mlflow_runs(mlflow_client, target, "because") == [target_run]
    assert mlflow_client.get_run(other_run).info.status == "RUNNING"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_an_orphaned_flow_process_really_stops(mlflow_client: MlflowClient, tmp_path: Path) -> None:
    run = flow_run(Running())
    # A stand-in for `python -m prefect.engine` whose parent (this test) is no Prefect worker.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, RUN_ID_VAR: str(run.id)},
    )
    try:
        sweeper = Reconciler(FakePrefect(run), mlflow_client, WORKER, grace_s=30)
        done = sweeper.run_once()
        assert any("its worker is gone" in line for line in done)
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


def test_is_prefect_worker_recognises_the_cli() -> None:
    assert reconcile.is_prefect_worker(WORKER_PROCESS)
    assert not reconcile.is_prefect_worker(ProcessInfo(1, 0, 1, ("/sbin/init",)))
    assert not reconcile.is_prefect_worker(None)


def test_without_a_worker_only_mlflow_runs_are_fixed(mlflow_client: MlflowClient, signals: list) -> None:
    running = flow_run(Running())  # would be "no process left" if this host were its worker's
    crashed = flow_run(Crashed(message="no heartbeat for 90 s"), ended_ago_s=1)
    mlflow_run_id = _mlflow_run(mlflow_client, str(crashed.id))
    prefect = FakePrefect(running, crashed)
    sweeper = Reconciler(prefect, mlflow_client, None, list_processes=lambda: [])
    sweeper.run_once()
    assert prefect.proposed == [] and signals == []
    assert mlflow_client.get_run(mlflow_run_id).info.status == "FAILED"


def test_a_cancelling_run_without_processes_ends_cancelled_after_the_grace_period(
    mlflow_client: MlflowClient, signals: list
) -> None:
    from prefect.states import Cancelling

    run = flow_run(Cancelling())
    clock = Clock()
    sweeper = reconciler(FakePrefect(run), mlflow_client, [WORKER_PROCESS], clock)
    sweeper.run_once()
    assert run.state.type == StateType.CANCELLING  # the worker is still running its cancellation hooks
    clock.now += 31
    sweeper.run_once()
    assert run.state.type == StateType.CANCELLED


def test_the_mlflow_run_of_a_cancelled_flow_run_ends_killed(mlflow_client: MlflowClient) -> None:
    from prefect.states import Cancelled

    cancelled = flow_run(Cancelled(message="cancelled from the UI"), ended_ago_s=1)
    mlflow_run_id = _mlflow_run(mlflow_client, str(cancelled.id))
    Reconciler(FakePrefect(cancelled), mlflow_client, None, list_processes=lambda: []).run_once()
    assert mlflow_client.get_run(mlflow_run_id).info.status == "KILLED"


def test_every_unsuccessful_run_is_seen_once_however_many_end_and_the_memory_stays_small(
    monkeypatch: pytest.MonkeyPatch, mlflow_client: MlflowClient, signals: list
) -> None:
    ended: list[str] = []
    monkeypatch.setattr(reconcile, "fail_mlflow_runs", lambda client, run_id, reason, status: ended.append(run_id) or [])
    # More than two pages of runs, ending a second apart, within the look-back window.
    runs = [flow_run(Failed(message="boom"), ended_ago_s=1000 - i) for i in range(450)]
    prefect = FakePrefect(*runs)
    sweeper = Reconciler(prefect, mlflow_client, None, grace_s=30, clock=Clock(), list_processes=lambda: [])
    sweeper.run_once()
    assert sorted(ended) == sorted(str(run.id) for run in runs)
    assert len(sweeper._checked_at_cursor) == 1  # the newest run; older ones lie behind the cursor
    ended.clear()
    sweeper.run_once()
    assert ended == []
    newer = flow_run(Crashed(message="lost"), ended_ago_s=0)
    prefect.runs[newer.id] = newer
    sweeper.run_once()
    assert ended == [str(newer.id)]
