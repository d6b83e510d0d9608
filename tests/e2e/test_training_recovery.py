"""Training that survives failures, for real: torchrun with 2 gloo ranks on the tiny model, a rank SIGKILLed mid-run.

The first test runs the whole sft flow (serve off) and kills a rank at a random step: the task must resume and
finish the planned steps in ONE MLflow run holding the whole loss curve. The second calls run_training directly and
truncates the newest checkpoint before the kill: the retry must fall back to the one before it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient

from npu_sft.datasets import prepare_datasets
from npu_sft.engine import DistributedLaunch
from npu_sft.engine.llamafactory_config import resolve_train_config, write_config
from npu_sft.engine.tiny_model import ensure_tiny_model, tokenizer_file
from npu_sft.ports import unused_port
from npu_sft.settings import Pipeline, load_pipeline
from npu_sft.training import FailureKind, RetryPolicy, StallSettings, launch_env, run_training

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
PLANNED_STEPS = 51  # 406 train rows, 2 ranks x 4 per device, 1 epoch
# The shortest run that still shows everything: one epoch, a checkpoint every 10 steps, no API server.
SHORT_RUN = [
    "llamafactory.overrides.num_train_epochs=1",
    "llamafactory.overrides.save_steps=10",
    "serve.enabled=false",
    "training.retry_delay_s=1",
]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, engine_python: Path) -> Path:
    """The generated tiny model, made once per test session (each module that imports this reuses it from disk)."""
    cache = tmp_path_factory.getbasetemp() / "tiny-models"
    pipeline = load_pipeline(DEMO_CONFIG, [f"engine.python={engine_python}"])
    ensure_tiny_model(pipeline.settings.engine, cache)
    return cache


def with_cached_model(project: Path, tiny_models: Path) -> Path:
    """A project whose model cache already holds the tiny model, as after a first `npu-sft demo`."""
    models = project / ".npu-sft" / "models"
    shutil.copytree(tiny_models, models, dirs_exist_ok=True)
    return project


def run_sft_cli(
    project: Path, engine_python: Path, overrides: list[str], timeout_s: float = 600
) -> subprocess.CompletedProcess:
    """`npu-sft demo` in its own project dir, with device leases of its own: other runs on the host cannot stall it."""
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    sets = [f"engine.python={engine_python}", f"devices.state_dir={project / 'leases'}", *overrides]
    argv = [sys.executable, "-m", "npu_sft.cli", "demo", *(arg for s in sets for arg in ("--set", s))]
    return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=timeout_s)


def mlflow_client(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project}/mlruns/mlflow.db"
    return MlflowClient(uri, registry_uri=uri)


def last_logged_step(trainer_log: Path) -> int:
    if not trainer_log.is_file():
        return 0
    lines = [line for line in trainer_log.read_text().splitlines() if line.strip()]
    try:
        return int(json.loads(lines[-1])["current_steps"]) if lines else 0
    except json.JSONDecodeError:  # caught mid-write
        return 0


def torchrun_ranks(marker: str) -> tuple[int, list[int]]:
    """The torchrun agent whose command line mentions `marker`, and its children (the ranks), from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "torch.distributed.run" in argv and any(marker in arg for arg in argv):
            tasks = (entry / "task").iterdir()
            children = [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
            return int(entry.name), children
    raise LookupError(f"no torchrun process for {marker}")


@dataclass
class RankKiller:
    """Watches a trainer log from a thread and, once it reaches `at_step`, runs `before_kill` and SIGKILLs one rank."""

    trainer_logs: Callable[[], list[Path]]
    marker: Callable[[], str]
    at_step: int
    before_kill: Callable[[Path], None] = lambda output_dir: None
    killed: dict = field(default_factory=dict)
    error: Exception | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                for log in self.trainer_logs():
                    step = last_logged_step(log)
                    if step >= self.at_step:
                        self.before_kill(log.parent)
                        agent, ranks = torchrun_ranks(self.marker())
                        victim = random.choice(ranks)
                        os.kill(victim, signal.SIGKILL)
                        self.killed = {"step": step, "pid": victim, "agent": agent, "ranks": ranks}
                        return
                time.sleep(0.02)
        except (OSError, LookupError) as err:  # reported by the test, not lost in the thread
            self.error = err

    def join(self) -> dict:
        self._thread.join(timeout=10)
        if self.error is not None:
            raise self.error
        return self.killed


def test_rank_killed_at_a_random_step_resumes_in_the_same_mlflow_run(
    tmp_path: Path, engine_python: Path, tiny_models: Path
) -> None:
    with_cached_model(tmp_path, tiny_models)
    kill_at = random.randint(12, 40)  # after the first checkpoint, well before the end
    runs = tmp_path / ".npu-sft" / "runs"
    killer = RankKiller(
        trainer_logs=lambda: sorted(runs.glob("*/output/trainer_log.jsonl")),
        marker=lambda: str(runs),
        at_step=kill_at,
    )
    completed = run_sft_cli(tmp_path, engine_python, SHORT_RUN)
    killed = killer.join()
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert killed, f"training ended before step {kill_at}: nothing was killed"

    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("sft-tiny")
    (run,) = client.search_runs([experiment.experiment_id])  # ONE run, resumed in place
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/attempts"] == 2
    assert run.data.metrics["train/steps"] == PLANNED_STEPS
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [metric.step for metric in sorted(history, key=lambda m: m.timestamp)]
    assert sorted(steps) == list(range(2, PLANNED_STEPS, 2)), f"killed {killed}: loss logged at {steps}"

    run_dir = runs / run.info.run_id
    state = json.loads((run_dir / "output" / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == PLANNED_STEPS
    # The loss plot is drawn from the trainer state's log history: every logged step there once.
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(2, PLANNED_STEPS, 2))
    assert "training_loss.png" in [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "plots")]

    # The figures describe the whole training, not its last attempt. transformers' train_loss after a resume sums
    # the last attempt's steps and divides by all 51; the curve's mean covers steps 1..50 (step 51 is not logged).
    metrics = run.data.metrics
    curve_mean = sum(metric.value for metric in history) / len(history)
    assert metrics["train_loss"] == pytest.approx(curve_mean, rel=0.02)
    last_attempt = json.loads((run_dir / "output" / "train_results.json").read_text())
    assert last_attempt["train_loss"] < 0.9 * metrics["train_loss"]
    # The killed attempt adds its loop time in LLaMA-Factory's whole seconds: nothing when it died within the first.
    assert metrics["train_runtime"] == metrics["train/loop_time_s"] >= last_attempt["train_runtime"]
    assert metrics["train_samples_per_second"] == pytest.approx(
        406 / PLANNED_STEPS * metrics["train/steps_run"] / metrics["train/loop_time_s"], rel=0.01
    )
    log = (run_dir / "logs" / "train.log").read_text()
    resumed_from = int(log.split("training attempt 2/3, resuming from checkpoint-")[1].split()[0].rstrip(","))
    assert 10 <= resumed_from <= killed["step"] and resumed_from % 10 == 0
    # The steps after the checkpoint ran twice (none, when the kill came right after a checkpoint's step).
    assert metrics["train/steps_run"] >= PLANNED_STEPS + killed["step"] - resumed_from
    assert (run_dir / "llamafactory.attempt-2.yaml").is_file()


# --------------------------------------------------------------------------------------------------------------------
# run_training directly: a truncated newest checkpoint
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyTraining:
    pipeline: Pipeline
    config: dict


def tiny_training(project: Path, engine_python: Path, tiny_models: Path, overrides: list[str]) -> TinyTraining:
    """The engine config the train task would write for the demo pipeline: generated model, prepared data."""
    pipeline = load_pipeline(
        DEMO_CONFIG, [f"engine.python={engine_python}", f"state_dir={project / '.npu-sft'}", *overrides]
    )
    model = ensure_tiny_model(pipeline.settings.engine, tiny_models)
    data = prepare_datasets(
        pipeline.data_settings(),
        val_size=pipeline.val_size,
        cutoff_len=pipeline.cutoff_len,
        tokenizer_file=tokenizer_file(model),
        out_root=pipeline.state_dir / "datasets",
    )
    config = resolve_train_config(
        pipeline, model_path=str(model), data_args=data.llamafactory_args(), output_dir=project / "output"
    )
    return TinyTraining(pipeline, config)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, engine_python: Path, tiny_models: Path
) -> None:
    tiny = tiny_training(tmp_path, engine_python, tiny_models, SHORT_RUN)
    config_file = write_config(tiny.config, tmp_path / "llamafactory.yaml")
    output_dir = Path(tiny.config["output_dir"])

    def truncate_checkpoint_20(output: Path) -> None:
        weights = output / "checkpoint-20" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # Step 22 is logged after checkpoint-20 is saved, so both checkpoints are whole when the watcher strikes.
    killer = RankKiller(
        trainer_logs=lambda: [output_dir / "trainer_log.jsonl"],
        marker=lambda: str(config_file),
        at_step=22,
        before_kill=truncate_checkpoint_20,
    )
    events: list[str] = []
    logged: list[tuple[str, float, int]] = []
    result = run_training(
        tiny.pipeline.settings.engine,
        DistributedLaunch(nproc_per_node=2, master_port=unused_port()),
        config_file,
        output_dir,
        device_env=launch_env("cpu"),
        log_file=tmp_path / "train.log",
        on_line=lambda line: None,
        on_event=events.append,
        on_metrics=logged.extend,
        policy=RetryPolicy(max_attempts=2, retry_delay_s=1),
    )
    killed = killer.join()
    assert killed and killed["step"] >= 22
    assert [attempt.resumed_from_step for attempt in result.attempts] == [0, 10]
    assert result.attempts[0].failure is not None and "SIGKILL" in result.attempts[0].failure.evidence
    assert any("skipping incomplete checkpoint-20 (adapter_model.safetensors" in event for event in events), events
    assert (output_dir / "incomplete-checkpoint-20").is_dir()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == PLANNED_STEPS
    loss_steps = [step for key, _, step in logged if key == "loss"]
    assert loss_steps == list(range(2, PLANNED_STEPS, 2))  # steps 12..22 ran twice, logged once


# --------------------------------------------------------------------------------------------------------------------
# run_training directly: a training that finished counts as finished
# --------------------------------------------------------------------------------------------------------------------


def holds_evaluation(all_results: Path) -> bool:
    """all_results.json is written after training and rewritten with the eval metrics: the trainer's last write."""
    try:
        return "eval_loss" in json.loads(all_results.read_text())
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return False


def kill_a_rank_once(ready: Callable[[], bool], marker: str, sig: signal.Signals) -> dict:
    """From a thread: once `ready()`, send `sig` to a live rank of the torchrun whose argv names `marker`."""
    killed: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ready():
            time.sleep(0.005)
        try:
            agent, ranks = torchrun_ranks(marker)
        except LookupError as err:
            killed["error"] = err
            return
        for victim in random.sample(ranks, len(ranks)):
            try:
                environ = Path(f"/proc/{victim}/environ").read_bytes().decode(errors="replace").split("\0")
                rank = dict(item.split("=", 1) for item in environ if "=" in item).get("RANK")
                os.kill(victim, sig)
            except (ProcessLookupError, FileNotFoundError):  # that rank had already exited
                continue
            killed.update(pid=victim, rank=rank, agent=agent)
            return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    killed["thread"] = thread
    return killed


def test_a_rank_crashing_after_the_final_outputs_leaves_a_finished_training(
    tmp_path: Path, engine_python: Path, tiny_models: Path
) -> None:
    tiny = tiny_training(tmp_path, engine_python, tiny_models, SHORT_RUN)
    config_file = write_config(tiny.config, tmp_path / "llamafactory.yaml")
    output_dir = Path(tiny.config["output_dir"])
    train = dict(
        engine=tiny.pipeline.settings.engine,
        launch=DistributedLaunch(nproc_per_node=2, master_port=unused_port()),
        config_file=config_file,
        output_dir=output_dir,
        device_env=launch_env("cpu"),
        log_file=tmp_path / "train.log",
        on_line=lambda line: None,
        on_metrics=lambda metrics: None,
        policy=RetryPolicy(max_attempts=1, retry_delay_s=1),  # the only attempt allowed: a retry would fail the test
    )
    # Once all_results.json holds the evaluation the ranks are shutting down, and one of them aborts.
    killed = kill_a_rank_once(lambda: holds_evaluation(output_dir / "all_results.json"), str(config_file), signal.SIGABRT)
    events: list[str] = []
    result = run_training(**train, on_event=events.append)
    killed["thread"].join(timeout=10)
    assert "pid" in killed, f"no rank left to abort: {killed}"
    (attempt,) = result.attempts
    assert attempt.returncode != 0 and attempt.failure is None
    assert attempt.exit_crash is not None and "SIGABRT" in attempt.exit_crash.evidence
    assert any(f"rank {killed['rank']} (pid {killed['pid']}) was killed by SIGABRT" in e for e in events), events

    # The task runs again (say its orchestrator died) after the adapter and the evaluation were lost: the final
    # checkpoint is whole, so nothing trains again; the adapter comes from it and LLaMA-Factory evaluates it.
    eval_loss = json.loads((output_dir / "eval_results.json").read_text())["eval_loss"]
    for name in ("adapter_model.safetensors", "eval_results.json", "all_results.json"):
        (output_dir / name).unlink()
    events.clear()
    again = run_training(**{**train, "launch": DistributedLaunch(nproc_per_node=2, master_port=unused_port())},
                         on_event=events.append)
    assert again.attempts == [] and again.finished_from_checkpoint == output_dir / f"checkpoint-{PLANNED_STEPS}"
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_loss"] == pytest.approx(eval_loss, rel=1e-3)
    assert "training attempt" not in (tmp_path / "train.log").read_text().split("evaluating checkpoint-51")[-1]


# --------------------------------------------------------------------------------------------------------------------
# run_training directly: a hung rank is found and the training resumed
# --------------------------------------------------------------------------------------------------------------------


def test_a_stopped_rank_is_found_stalled_and_the_training_resumes_from_its_newest_checkpoint(
    tmp_path: Path, engine_python: Path, tiny_models: Path
) -> None:
    """SIGSTOP is how a hung device or a stuck collective looks from outside: the other rank waits in gloo for ever
    (ddp_timeout is 1800 s). A 3 s step deadline must catch it, name the rank, and resume from checkpoint-20."""
    tiny = tiny_training(tmp_path, engine_python, tiny_models, SHORT_RUN)
    config_file = write_config(tiny.config, tmp_path / "llamafactory.yaml")
    output_dir = Path(tiny.config["output_dir"])
    stopped_at: list[float] = []

    def after_step_22() -> bool:
        if last_logged_step(output_dir / "trainer_log.jsonl") >= 22:
            stopped_at.append(time.monotonic())
            return True
        return False

    victim = kill_a_rank_once(after_step_22, str(tmp_path), signal.SIGSTOP)
    events: list[tuple[float, str]] = []
    logged: list[tuple[str, float, int]] = []
    stall = StallSettings(startup_s=300, step_floor_s=3, step_factor=10, phase_s=60)
    result = run_training(
        tiny.pipeline.settings.engine,
        DistributedLaunch(nproc_per_node=2, master_port=unused_port()),
        config_file,
        output_dir,
        device_env=launch_env("cpu"),
        log_file=tmp_path / "train.log",
        on_line=lambda line: None,
        on_event=lambda event: events.append((time.monotonic(), event)),
        on_metrics=logged.extend,
        policy=RetryPolicy(max_attempts=2, retry_delay_s=1, stall=stall),
    )
    victim["thread"].join(timeout=10)
    assert "pid" in victim, victim
    first, second = result.attempts
    assert first.failure is not None and first.failure.kind is FailureKind.STALLED, first.failure
    assert f"rank {victim['rank']} (pid {victim['pid']}) is stopped" in first.failure.evidence
    # Where each rank's Python was when the attempt was stopped, read before the kill (py-spy, for real).
    stacks = tmp_path / "stall-stacks-attempt-1.txt"
    text = stacks.read_text()
    assert f"(pid {victim['pid']}, state T)" in text
    if "needs ptrace" not in first.failure.evidence:  # else a container without SYS_PTRACE, and the evidence says so
        assert f"Python stacks of 2 of 2 ranks in {stacks}" in first.failure.evidence
        assert text.count("Thread ") >= 2 and "llamafactory" in text
    reported_at = next(at for at, event in events if "stalled and was stopped" in event)
    # The learned deadline (10 x the longest step interval, at least 3 s) plus the look at the ranks and a poll.
    assert reported_at - stopped_at[0] < 15, (reported_at - stopped_at[0], first.failure.evidence)
    assert second.resumed_from_step == 20 and second.failure is None
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == PLANNED_STEPS
    loss_steps = [step for key, _, step in logged if key == "loss"]
    assert loss_steps == list(range(2, PLANNED_STEPS, 2))  # steps 22..24 ran twice, logged once


def test_a_stalled_rank_in_a_flow_run_ends_finished_with_its_stacks_in_mlflow(
    tmp_path: Path, engine_python: Path, tiny_models: Path
) -> None:
    """The whole sft flow with a rank SIGSTOPped after step 22: one MLflow run, FINISHED, every step once, the stall
    in its tags and every rank's stacks under stall/."""
    with_cached_model(tmp_path, tiny_models)
    runs = tmp_path / ".npu-sft" / "runs"

    def after_step_22() -> bool:
        return any(last_logged_step(log) >= 22 for log in runs.glob("*/output/trainer_log.jsonl"))

    victim = kill_a_rank_once(after_step_22, str(runs), signal.SIGSTOP)
    completed = run_sft_cli(tmp_path, engine_python, [*SHORT_RUN, "training.stall.step_floor_s=3",
                                                      "training.stall.step_factor=10"])
    victim["thread"].join(timeout=10)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "pid" in victim, victim

    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/attempts"] == 2
    steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(2, PLANNED_STEPS, 2))
    assert run.data.tags["train/stalled_attempts"] == "1"
    assert f"rank {victim['rank']} (pid {victim['pid']}) is stopped" in run.data.tags["train/stall_evidence"]
    (stacks,) = [item.path for item in client.list_artifacts(run.info.run_id, "stall")]
    assert stacks == "stall/stall-stacks-attempt-1.txt"
    text = Path(client.download_artifacts(run.info.run_id, stacks, str(tmp_path / "dl"))).read_text()
    assert f"(pid {victim['pid']}, state T)" in text
    assert "Thread " in text or "needs ptrace" in run.data.tags["train/stall_evidence"]
