"""LoRA SFT under torchrun in the engine env, retried after failures, and reading what LLaMA-Factory writes while and
after it trains.

    result = run_training(engine, launch, config_file, output_dir, device_env=..., log_file=..., on_line=log.info,
                          on_metrics=log_to_mlflow, policy=RetryPolicy.from_settings(settings.training))

One call is one training: up to `policy.max_attempts` torchrun attempts. Whether an attempt finished is judged from
its outputs (`npu_sft.completion`): a crash while the ranks shut down after writing them all is a warning, not a
failure. A failed attempt is classified (`npu_sft.recovery.classify_failure`); a retryable one is followed by a wait
(and, on NPUs, by npu-smi confirming the cards are idle) and an attempt that resumes from the newest COMPLETE
checkpoint in the run's output dir. A complete checkpoint at the last step ends the training instead: its adapter is
the result, evaluated by an evaluation-only engine run when the evaluation is missing.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from npu_sft import process
from npu_sft.completion import (
    evaluation_config,
    expects_evaluation,
    final_checkpoint,
    final_output_problems,
    hand_over_checkpoint,
    needs_evaluation,
)
from npu_sft.devices import DeviceError
from npu_sft.engine import DistributedLaunch, EngineCommand, EngineSettings, torchrun_train_command
from npu_sft.recording import Metric
from npu_sft.recovery import (
    CheckpointCheck,
    DeviceProbe,
    DevicesStillBusy,
    Failure,
    FailureKind,
    ResumePoint,
    classify_failure,
    find_resume_point,
    set_aside,
    wait_for_idle_devices,
)
from npu_sft.settings import TrainingSettings
from npu_sft.stall import ProgressWatchdog, StallSettings, dump_rank_stacks, rank_states, stalled_ranks

TRAINER_LOG = "trainer_log.jsonl"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Files LLaMA-Factory writes beside the adapter that a server or a later merge needs too.
ADAPTER_COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "README.md")
STEP_METRIC_NAMES = {"loss": "loss", "lr": "learning_rate", "eval_loss": "eval_loss", "epoch": "epoch"}
# Written by LLaMA-Factory when RECORD_VRAM=1: the device allocator's peak so far, in GiB (0 on the CPU).
DEVICE_MEMORY_METRIC_NAMES = {
    "vram_allocated": "peak_device_memory_allocated_gb",
    "vram_reserved": "peak_device_memory_reserved_gb",
}
# Every key `step_metrics` can produce: what a re-run of the train task asks the run for, to log no step twice.
STEP_METRIC_KEYS = (*STEP_METRIC_NAMES.values(), *DEVICE_MEMORY_METRIC_NAMES.values())
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


# --------------------------------------------------------------------------------------------------------------------
# Following trainer_log.jsonl
# --------------------------------------------------------------------------------------------------------------------


class TrainerLogFollower:
    """Reads the complete lines LLaMA-Factory has appended to trainer_log.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = ""

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        if self.path.stat().st_size < self._offset:
            # LLaMA-Factory deletes an old trainer log when it starts with overwrite_output_dir: start over.
            self._offset, self._partial = 0, ""
        with self.path.open("r", encoding="utf-8") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset = handle.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()  # an unfinished line stays until its newline arrives
        return [json.loads(line) for line in lines if line.strip()]


def step_metrics(record: Mapping[str, Any]) -> list[Metric]:
    """One trainer_log record as MLflow (key, value, step) triples."""
    step = int(record["current_steps"])
    metrics = [
        (name, float(record[key]), step)
        for key, name in STEP_METRIC_NAMES.items()
        if isinstance(record.get(key), (int, float))
    ]
    # The CPU reports 0 (and -1 reserved): no device memory to speak of, so nothing is logged.
    metrics += [
        (name, float(record[key]), step)
        for key, name in DEVICE_MEMORY_METRIC_NAMES.items()
        if isinstance(record.get(key), (int, float)) and record[key] > 0
    ]
    return metrics


class StepLedger:
    """The newest step logged per metric, so a resumed attempt that re-runs the steps after its checkpoint does not
    log those steps a second time: the loss curve keeps one point per step."""

    def __init__(self, logged: Mapping[str, int] | None = None):
        self._last: dict[str, int] = dict(logged or {})

    def new_only(self, metrics: Iterable[Metric]) -> list[Metric]:
        kept: list[Metric] = []
        for key, value, step in metrics:
            if step <= self._last.get(key, -1):
                continue
            self._last[key] = step
            kept.append((key, value, step))
        return kept


# --------------------------------------------------------------------------------------------------------------------
# Host memory of the ranks
# --------------------------------------------------------------------------------------------------------------------


class RankMemorySampler:
    """The largest resident-set high-water mark (VmHWM) among the rank processes of one attempt, read from /proc.

    Ranks are found by their command line: torchrun starts them with the attempt's config file as an argument,
    which also finds them when the engine runs in a container on this host. Host RAM, not device memory.
    """

    REDISCOVER_EVERY = 10  # samples; ranks start a moment after torchrun, DataLoader workers come and go

    def __init__(self, config_file: Path, proc_root: Path = Path("/proc")):
        self._marker = str(config_file)
        self._proc = proc_root
        self._pids: set[int] = set()
        self._samples = 0
        self.peak_kib: int | None = None

    def _discover(self) -> None:
        if not self._proc.is_dir():  # not Linux: no figure rather than a wrong one
            return
        for entry in self._proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:  # exited meanwhile, or not ours to read
                continue
            args = [arg.decode("utf-8", "replace") for arg in argv]
            if self._marker in args and "llamafactory.launcher" in args and "torch.distributed.run" not in args:
                self._pids.add(int(entry.name))

    def sample(self) -> None:
        if not self._pids or self._samples % self.REDISCOVER_EVERY == 0:
            self._discover()
        self._samples += 1
        for pid in list(self._pids):
            try:
                status = (self._proc / str(pid) / "status").read_text()
            except OSError:
                self._pids.discard(pid)
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    kib = int(line.split()[1])
                    self.peak_kib = max(self.peak_kib or 0, kib)

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak_kib is None else self.peak_kib / 1024


# --------------------------------------------------------------------------------------------------------------------
# Attempts and retries
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    retry_delay_s: float = 5.0
    device_settle_s: float = 10.0
    device_release_timeout_s: float = 600.0
    device_poll_s: float = 5.0
    stall: StallSettings = field(default_factory=StallSettings)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")

    @classmethod
    def from_settings(cls, settings: TrainingSettings) -> RetryPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            retry_delay_s=settings.retry_delay_s,
            device_settle_s=settings.device_settle_s,
            device_release_timeout_s=settings.device_release_timeout_s,
            stall=settings.stall,
        )


@dataclass(frozen=True)
class Attempt:
    number: int
    config_file: Path
    resumed_from_step: int  # 0: from the beginning
    returncode: int
    wall_time_s: float
    last_step: int | None  # the newest step its trainer log reached
    failure: Failure | None
    records: tuple[dict[str, Any], ...] = ()  # what it appended to trainer_log.jsonl
    # A crash while the ranks shut down, after the training's final outputs were all written: not a failure.
    exit_crash: Failure | None = None

    @property
    def loop_time_s(self) -> float | None:
        """Time in the training loop up to its newest logged step (LLaMA-Factory's `elapsed_time`, whole seconds)."""
        times = [_seconds(r["elapsed_time"]) for r in self.records if isinstance(r.get("elapsed_time"), str)]
        known = [t for t in times if t is not None]
        return known[-1] if known else None


def _seconds(elapsed: str) -> float | None:
    """LLaMA-Factory's `str(timedelta(seconds=...))`: "0:01:05" or "1 day, 2:00:00"."""
    days = 0
    if "day" in elapsed:
        day_part, _, elapsed = elapsed.partition(", ")
        days = int(day_part.split()[0])
    parts = elapsed.split(":")
    if len(parts) != 3:
        return None
    try:
        hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return None
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


@dataclass(frozen=True)
class TrainingResult:
    output_dir: Path
    wall_time_s: float  # the whole training: every attempt, and the waits between them
    log_file: Path
    records: list[dict[str, Any]]
    attempts: list[Attempt] = field(default_factory=list)
    peak_rank_rss_mb: float | None = None
    # Set when the training was complete in a checkpoint at its last step and the outputs were taken from there.
    finished_from_checkpoint: Path | None = None


class TrainingFailed(process.CommandFailed):
    """Training failed for good: a failure that is not retried, attempts used up, or cards that never came free."""

    def __init__(self, completed: process.CompletedCommand, failure: Failure, attempts: list[Attempt], why: str):
        self.failure = failure
        self.attempts = attempts
        super().__init__(completed, "training")
        # The verdict first, then CommandFailed's exit code, log path and output tail.
        headline = f"training failed after {len(attempts)} attempt(s) ({why}): {failure.what}: {failure.evidence}"
        self.args = (f"{headline}\n{self.args[0]}",)


def launch_env(device_kind: str) -> dict[str, str]:
    """Variables every training launch gets on top of the device lease's."""
    env = {"RECORD_VRAM": "1"}  # LLaMA-Factory then logs the device allocator's peak with every step
    if device_kind == "cpu":
        # Under torchrun accelerate names the CPU "cpu:0", and torch.load(map_location="cpu:0") cannot restore the
        # optimizer state of a checkpoint: resuming would fail. Plain "cpu" is the same device.
        env["ACCELERATE_TORCH_DEVICE"] = "cpu"
    return env


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


def _wait_before_retry(
    failure: Failure,
    policy: RetryPolicy,
    *,
    device_ids: Sequence[int],
    device_probe: DeviceProbe | None,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    on_event: Callable[[str], None],
) -> None:
    if device_probe is not None and device_ids:
        # HCCL refuses a card a previous process still holds (EJ0001): confirm they have all gone first.
        wait_for_idle_devices(
            device_ids,
            device_probe,
            timeout_s=policy.device_release_timeout_s,
            poll_s=policy.device_poll_s,
            sleep=sleep,
            clock=clock,
            on_wait=on_event,
        )
    if failure.kind is FailureKind.DEVICE_BUSY:
        on_event(f"cards are idle; waiting {policy.device_settle_s:.0f} s more, as HCCL advises, before retrying")
        sleep(policy.device_settle_s)
    elif policy.retry_delay_s > 0:
        sleep(policy.retry_delay_s)


@dataclass
class _AttemptOutput:
    completed: process.CompletedCommand
    records: list[dict[str, Any]]
    peak_rss_kib: int | None
    stall: str | None = None  # why the watchdog stopped it


def _run_attempt(
    command: EngineCommand,
    *,
    follower: TrainerLogFollower,
    sampler: RankMemorySampler,
    ledger: StepLedger,
    watchdog: ProgressWatchdog,
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
    which also stops the attempt's process group when the watchdog finds it stalled."""
    records: list[dict[str, Any]] = []
    stop = threading.Event()
    stalled: list[str] = []
    lock = threading.Lock()  # the watchdog hears output lines from this thread and steps from the follower's

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
            stall = None if stop.is_set() else watchdog.stall()
        if stall is not None:
            before = rank_states(config_file)
            time.sleep(STALL_SAMPLE_S)  # CPU time spent between two looks tells a stuck rank from a busy one
            after = rank_states(config_file)
            # Before the ranks are killed: where each one is waiting is the first thing to look at.
            stalled.append(f"{stall}; {stalled_ranks(before, after)}; {dump_rank_stacks(after, stacks_file)}")
            stop.set()

    def hear(line: str) -> None:
        with lock:
            watchdog.saw_line(line)
        on_line(line)

    finished = threading.Event()
    thread = process.follow_in_thread(poll, finished, poll_interval_s)
    try:
        completed = run_command(command.argv, env=command.env, log_file=log_file, on_line=hear, stop=stop)
    finally:
        finished.set()
        thread.join()
    return _AttemptOutput(completed, records, sampler.peak_kib, stalled[0] if stalled else None)


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
    the processes on `device_ids`, to confirm a failed attempt has left the cards before the next one starts.

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
        if output.stall is not None:
            failure = Failure(FailureKind.STALLED, output.stall, completed.returncode)
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
            _wait_before_retry(
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


# --------------------------------------------------------------------------------------------------------------------
# After training
# --------------------------------------------------------------------------------------------------------------------


def read_results(output_dir: Path) -> dict[str, float]:
    """LLaMA-Factory's final metrics (all_results.json), with perplexity derived from eval_loss."""
    results_file = output_dir / "all_results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file} missing: the engine finished without writing its results")
    results = {key: float(value) for key, value in json.loads(results_file.read_text()).items() if isinstance(value, (int, float))}
    if "eval_loss" in results:
        eval_loss = results["eval_loss"]
        results["perplexity"] = math.exp(eval_loss) if eval_loss < 700 else math.inf
    return results


def evaluation_results(output_dir: Path) -> dict[str, float]:
    """The training's final evaluation (eval_loss, perplexity, eval_runtime, ...): all_results.json without the
    train_* figures, which the train task computes across attempts."""
    return {key: value for key, value in read_results(output_dir).items() if not key.startswith("train_")}


def collect_adapter(output_dir: Path, dest: Path) -> Path:
    """Copy the trained adapter (not the checkpoints) into `dest`, the directory that gets published."""
    missing = [name for name in ADAPTER_FILES if not (output_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{output_dir}: training wrote no {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES + ADAPTER_COMPANIONS:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, dest / name)
    return dest
