"""LoRA SFT under torchrun in the engine env, retried after failures, and reading what LLaMA-Factory writes while and
after it trains.

    result = run_training(engine, launch, config_file, output_dir, device_env=..., log_file=..., on_line=log.info,
                          on_metrics=log_to_mlflow, policy=RetryPolicy.from_settings(settings.training))

One call is one training: up to `policy.max_attempts` torchrun attempts. Whether an attempt finished is judged from
its outputs (`npu_sft.training.completion`): a crash while the ranks shut down after writing them all is a warning, not a
failure. A failed attempt is classified (`npu_sft.training.failures.classify_failure`); a retryable one is followed by a wait
(and, on NPUs, by npu-smi confirming the cards are idle) and an attempt that resumes from the newest COMPLETE
checkpoint in the run's output dir. A complete checkpoint at the last step ends the training instead: its adapter is
the result, evaluated by an evaluation-only engine run when the evaluation is missing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from npu_sft.devices import DeviceError
from npu_sft.engine import DistributedLaunch, EngineCommand, EngineSettings, process, torchrun_train_command
from npu_sft.run_recorder import Metric
from npu_sft.training.checkpoints import (
    CheckpointCheck,
    ResumePoint,
    find_resume_point,
    set_aside,
)
from npu_sft.training.completion import (
    evaluation_config,
    expects_evaluation,
    final_checkpoint,
    final_output_problems,
    hand_over_checkpoint,
    needs_evaluation,
)
from npu_sft.training.errors import DevicesStillBusy, TrainingFailed
from npu_sft.training.failures import Failure, FailureKind, classify_failure
from npu_sft.training.guards import RunGuard
from npu_sft.training.models import Attempt, TrainingResult
from npu_sft.training.rank_memory import RankMemorySampler
from npu_sft.training.retry import DeviceProbe, RetryPolicy, wait_before_retry
from npu_sft.training.stall import (
    ProgressWatchdog,
    dump_rank_stacks,
    rank_states,
    stalled_ranks,
)
from npu_sft.training.trainer_log import (
    TRAINER_LOG,
    StepLedger,
    TrainerLogFollower,
    step_metrics,
)

STALL_SAMPLE_S = 1.0  # between the two looks at the ranks of a stalled attempt
STALL_STACKS_PREFIX = "stall-stacks-attempt-"  # <logs>/stall-stacks-attempt-<n>.txt: every rank's Python stacks


class CommandRunner(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
    ) -> process.CompletedCommand: ...




def _attempt_config(config_file: Path, number: int, resume: ResumePoint) -> Path:
    """The engine config of attempt `number`: the run's config, plus where to resume from."""
    if number == 1 and resume.checkpoint is None:
        return config_file
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    if resume.checkpoint is not None:
        config["resume_from_checkpoint"] = str(resume.checkpoint.path)
    # Resuming is explicit: LLaMA-Factory must neither pick a checkpoint by itself nor refuse the non-empty dir.
    config["overwrite_output_dir"] = True
    path = config_file.with_name(f"{config_file.stem}.attempt-{number}{config_file.suffix}")
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _prepare_output_dir(output_dir: Path, number: int, on_event: Callable[[str], None]) -> ResumePoint:
    """Find where attempt `number` resumes from, move incomplete checkpoints and the previous trainer log aside."""
    resume = find_resume_point(output_dir)
    for check in resume.skipped:
        moved = set_aside(check)
        on_event(f"skipping incomplete {check.path.name} ({'; '.join(check.problems)}); moved to {moved.name}")
    trainer_log = output_dir / TRAINER_LOG
    if trainer_log.exists():
        # Each attempt's log stays readable; the new attempt writes (and the follower reads) a fresh one.
        trainer_log.rename(output_dir / f"trainer_log.before-attempt-{number}.jsonl")
    return resume


def _holds_only_partial_checkpoints(output_dir: Path) -> bool:
    """Checkpoints exist but none is complete, as on a node whose output dir only got its ranks' RNG states."""
    point = find_resume_point(output_dir)
    return point.checkpoint is None and bool(point.skipped)


def _append_to_log(log_file: Path, line: str) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")



@dataclass
class _AttemptOutput:
    completed: process.CompletedCommand
    records: list[dict[str, Any]]
    peak_rss_kib: int | None
    stopped: tuple[FailureKind, str] | None = None  # why the watchdog or a guard stopped it


def _run_attempt(
    command: EngineCommand,
    *,
    follower: TrainerLogFollower,
    sampler: RankMemorySampler,
    ledger: StepLedger,
    watchdog: ProgressWatchdog,
    guard: RunGuard,
    config_file: Path,
    log_file: Path,
    stacks_file: Path,
    on_line: Callable[[str], None],
    on_metrics: Callable[[list[Metric]], None],
    on_progress: Callable[[float], None] | None,
    run_command: CommandRunner,
    poll_interval_s: float,
) -> _AttemptOutput:
    """One torchrun attempt to its end, its trainer log followed (and its ranks' memory sampled) from a thread,
    which also stops the attempt's process group when the watchdog finds it stalled or a guard finds it hopeless."""
    records: list[dict[str, Any]] = []
    stop = threading.Event()
    stopped: list[tuple[FailureKind, str]] = []
    lock = threading.Lock()  # watchdog and guard hear output lines from this thread and records from the follower's

    def stop_for(verdict: tuple[FailureKind, str]) -> None:
        if not stop.is_set():
            stopped.append(verdict)
            stop.set()

    def poll() -> None:
        sampler.sample()
        new = follower.read_new()
        records.extend(new)
        metrics = ledger.new_only(m for record in new for m in step_metrics(record))
        if metrics:
            on_metrics(metrics)
        percentages = [r["percentage"] for r in new if isinstance(r.get("percentage"), (int, float))]
        if percentages and on_progress is not None:
            on_progress(float(percentages[-1]))
        with lock:
            if any("current_steps" in record for record in new):
                watchdog.stepped()
            verdict = guard.saw_records(new)
            if verdict is not None:
                stop_for(verdict)
            stall = None if stop.is_set() else watchdog.stall()
        if stall is not None:
            before = rank_states(config_file)
            time.sleep(STALL_SAMPLE_S)  # CPU time spent between two looks tells a stuck rank from a busy one
            after = rank_states(config_file)
            # Before the ranks are killed: where each one is waiting is the first thing to look at.
            with lock:
                stop_for((FailureKind.STALLED,
                          f"{stall}; {stalled_ranks(before, after)}; {dump_rank_stacks(after, stacks_file)}"))

    def hear(line: str) -> None:
        with lock:
            watchdog.saw_line(line)
            verdict = guard.saw_line(line)
            if verdict is not None:
                stop_for(verdict)
        on_line(line)

    finished = threading.Event()
    thread = process.follow_in_thread(poll, finished, poll_interval_s)
    try:
        completed = run_command(command.argv, env=command.env, log_file=log_file, on_line=hear, stop=stop)
    finally:
        finished.set()
        thread.join()
    return _AttemptOutput(completed, records, sampler.peak_kib, stopped[0] if stopped else None)


def _finish_from_final_checkpoint(
    checkpoint: CheckpointCheck,
    engine: EngineSettings,
    launch: DistributedLaunch,
    config_file: Path,
    output_dir: Path,
    run_config: Mapping[str, Any],
    *,
    device_env: Mapping[str, str],
    log_file: Path,
    on_line: Callable[[str], None],
    on_event: Callable[[str], None],
    run_command: CommandRunner,
    attempts: list[Attempt],
) -> None:
    """Take the final adapter and trainer state from `checkpoint`, and evaluate it if the config evaluates and the
    evaluation had not been written: the outputs a finished training leaves, without training again."""
    copied = hand_over_checkpoint(checkpoint, output_dir)
    taken = f"took {', '.join(copied)} from it" if copied else "the output dir already holds its final adapter"
    on_event(f"{checkpoint.path.name} is the training's last step: nothing is left to train; {taken}")
    if not needs_evaluation(output_dir, run_config):
        return
    header = f"evaluating {checkpoint.path.name} (the training ended before its evaluation)"
    on_event(header)
    _append_to_log(log_file, f"===== npu-sft: {header} =====")
    command = torchrun_train_command(engine, launch, evaluation_config(config_file, checkpoint.path), env=device_env)
    completed = run_command(command.argv, env=command.env, log_file=log_file, on_line=on_line)
    if not completed.ok and needs_evaluation(output_dir, run_config):
        failure = classify_failure(completed.tail, completed.returncode)
        raise TrainingFailed(completed, failure, attempts, f"evaluating the final {checkpoint.path.name} failed")


def run_training(
    engine: EngineSettings,
    launch: DistributedLaunch,
    config_file: Path,
    output_dir: Path,
    *,
    device_env: Mapping[str, str],
    log_file: Path,
    on_line: Callable[[str], None],
    on_metrics: Callable[[list[Metric]], None],
    on_progress: Callable[[float], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    policy: RetryPolicy = RetryPolicy(),
    device_ids: Sequence[int] = (),
    device_probe: DeviceProbe | None = None,
    device_kind: str | None = None,
    logged_steps: Mapping[str, int] | None = None,
    run_command: CommandRunner = process.run_streaming,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    poll_interval_s: float = 1.0,
) -> TrainingResult:
    """Train to completion in up to `policy.max_attempts` torchrun attempts, following trainer_log.jsonl live.

    `on_metrics` gets each logged step's metrics once (never a step twice, across attempts; `logged_steps` names
    steps logged before this call, e.g. by an earlier run of the same task). `on_event` gets this function's own
    messages (retries, resume points); engine output goes to `on_line`. `device_probe` (npu-smi on NPU hosts) lists
    the processes on `device_ids`, to confirm a failed attempt has left the cards before the next one starts;
    `device_kind` (the lease's) lets a guard stop an attempt whose ranks run on another device type.

    With nnodes > 1 every node must resume from the same checkpoint, so the output dir must be on storage all nodes
    share (or the config must set `save_on_each_node: true`).
    """
    event = on_event or on_line
    ledger = StepLedger(logged_steps)
    records: list[dict[str, Any]] = []
    attempts: list[Attempt] = []
    peak_rss_kib: int | None = None
    started = clock()
    run_config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}

    def result(finished_from: Path | None = None) -> TrainingResult:
        return TrainingResult(
            output_dir, clock() - started, log_file, records, attempts,
            None if peak_rss_kib is None else peak_rss_kib / 1024, finished_from,
        )

    def finish_from(checkpoint: CheckpointCheck) -> TrainingResult:
        _finish_from_final_checkpoint(
            checkpoint, engine, launch, config_file, output_dir, run_config, device_env=device_env, log_file=log_file,
            on_line=on_line, on_event=event, run_command=run_command, attempts=attempts,
        )
        return result(checkpoint.path)

    # A re-run of the task on a training that already reached its last step (the orchestrator died after it).
    if (checkpoint := final_checkpoint(output_dir)) is not None:
        return finish_from(checkpoint)
    for number in range(1, policy.max_attempts + 1):
        resume = _prepare_output_dir(output_dir, number, event)
        attempt_config = _attempt_config(config_file, number, resume)
        where = f"resuming from {resume.checkpoint.path.name}" if resume.checkpoint else "from the beginning"
        header = f"training attempt {number}/{policy.max_attempts}, {where}"
        # A first attempt from the beginning is the ordinary case; anything else is worth a warning.
        (on_line if number == 1 and resume.checkpoint is None else event)(header)
        _append_to_log(log_file, f"===== npu-sft: {header} =====")

        output = _run_attempt(
            torchrun_train_command(engine, launch, attempt_config, env=device_env),
            follower=TrainerLogFollower(output_dir / TRAINER_LOG),
            sampler=RankMemorySampler(attempt_config),
            ledger=ledger,
            watchdog=ProgressWatchdog(policy.stall, clock, settle_s=2 * poll_interval_s),
            guard=RunGuard(policy.guards, device_kind),
            config_file=attempt_config,
            log_file=log_file,
            stacks_file=log_file.with_name(f"{STALL_STACKS_PREFIX}{number}.txt"),
            on_line=on_line,
            on_metrics=on_metrics,
            on_progress=on_progress,
            run_command=run_command,
            poll_interval_s=poll_interval_s,
        )
        records.extend(output.records)
        if output.peak_rss_kib is not None:
            peak_rss_kib = max(peak_rss_kib or 0, output.peak_rss_kib)
        completed = output.completed
        failure = None if completed.ok else classify_failure(completed.tail, completed.returncode)
        if output.stopped is not None:
            failure = Failure(*output.stopped, completed.returncode)
        exit_crash = None
        if failure is not None and not final_output_problems(output_dir, expects_eval=expects_evaluation(run_config)):
            # The work is done and on disk; the processes died on the way out (HCCL/gloo teardown).
            event(
                f"training attempt {number}/{policy.max_attempts} wrote all its final outputs, then "
                f"{failure.evidence} while the processes shut down; the training counts as finished"
            )
            failure, exit_crash = None, failure
        steps = [int(r["current_steps"]) for r in output.records if "current_steps" in r]
        attempts.append(
            Attempt(number, attempt_config, resume.step, completed.returncode, completed.wall_time_s,
                    max(steps, default=None), failure, tuple(output.records), exit_crash)
        )
        if failure is None:
            return result()
        if (checkpoint := final_checkpoint(output_dir)) is not None:
            # The last step's checkpoint is whole: resuming from it would train nothing.
            event(f"training attempt {number}/{policy.max_attempts} {failure.describe()} after its last checkpoint")
            return finish_from(checkpoint)
        if not failure.retryable:
            raise TrainingFailed(completed, failure, attempts, "not retryable")
        if number == policy.max_attempts:
            raise TrainingFailed(completed, failure, attempts, "training.max_attempts reached")
        event(f"training attempt {number}/{policy.max_attempts} {failure.describe()}; retrying")
        try:
            wait_before_retry(
                failure, policy, device_ids=device_ids, device_probe=device_probe, sleep=sleep, clock=clock,
                on_event=event,
            )
        except (DevicesStillBusy, DeviceError) as err:
            raise TrainingFailed(completed, failure, attempts, f"cannot confirm the cards are free: {err}") from err
        if launch.nnodes > 1 and _holds_only_partial_checkpoints(output_dir):
            # Starting over on this node while the others resume would desynchronise them (and hang every rank
            # until ddp_timeout); failing says what to fix.
            raise TrainingFailed(
                completed, failure, attempts,
                f"node {launch.node_rank} holds no complete checkpoint to resume from; put the output dir on storage "
                "every node shares, or set save_on_each_node: true",
            )
    raise RuntimeError("unreachable: every attempt returns or raises, and RetryPolicy has max_attempts >= 1")
