"""The retry loop with injected runner, clock and npu-smi probe."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import yaml

from npu_sft.devices import DeviceProcess
from npu_sft.engine import DistributedLaunch, EngineSettings
from npu_sft.engine.process import CompletedCommand
from npu_sft.training import FailureKind, RetryPolicy, StallSettings, TrainingFailed, attempts, run_training
from npu_sft.training.settings import GuardSettings
from tests.unit.training.test_checkpoints import truncate, write_checkpoint, write_safetensors, write_torch_archive
from tests.unit.training.test_failures import HCCL_DEVICE_BUSY, NPU_OOM, RANK_KILLED, UNKNOWN_KEY

# --------------------------------------------------------------------------------------------------------------------
# The retry loop, with a scripted engine
# --------------------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedEngine:
    """Plays one scripted attempt per call: writes trainer-log records and checkpoints, then exits with a tail."""

    def __init__(self, output_dir: Path, script: list[dict]):
        self.output_dir = output_dir
        self.script = script
        self.configs: list[dict] = []

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, log_file: Path | None = None,
                 on_line=None, stop=None) -> CompletedCommand:
        step = self.script[len(self.configs)]
        self.configs.append(yaml.safe_load(Path(argv[-1]).read_text()))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / "trainer_log.jsonl").open("a") as log:
            for current in step.get("steps", []):
                loss = step.get("losses", {}).get(current, 10.0 - current / 10)  # json writes a NaN loss as NaN
                log.write(json.dumps({"current_steps": current, "total_steps": 30, "loss": loss,
                                      "percentage": round(current / 30 * 100, 2)}) + "\n")
        for checkpoint in step.get("checkpoints", []):
            write_checkpoint(self.output_dir, checkpoint)
        for checkpoint in step.get("rng_only_checkpoints", []):  # what a node without shared storage gets
            (self.output_dir / f"checkpoint-{checkpoint}").mkdir()
            write_torch_archive(self.output_dir / f"checkpoint-{checkpoint}" / "rng_state_1.pth")
        for path in step.get("truncate", []):
            truncate(self.output_dir / path)
        if step.get("final_outputs"):
            write_final_outputs(self.output_dir, without=step.get("without", ()))
        for name, content in step.get("files", {}).items():
            (self.output_dir / name).write_text(json.dumps(content))
        for line in step.get("lines", []):
            on_line(line)
        time.sleep(step.get("pause_s", 0))
        if step.get("more_steps"):
            with (self.output_dir / "trainer_log.jsonl").open("a") as log:
                for current in step["more_steps"]:
                    log.write(json.dumps({"current_steps": current, "total_steps": 30, "loss": 1.0}) + "\n")
        if step.get("hang"):  # a rank stopped: nothing more until the watchdog stops the process group
            assert stop is not None and stop.wait(20), "the watchdog never stopped the hung attempt"
            return CompletedCommand(list(argv), -9, ["(killed)"], log_file, 1.0)
        return CompletedCommand(list(argv), step["returncode"], step.get("tail", []), log_file, 1.0)


def write_final_outputs(output_dir: Path, without: Sequence[str] = ()) -> None:
    """What LLaMA-Factory leaves in output_dir once a 51-step training and its evaluation are done."""
    files = {
        "trainer_state.json": {"global_step": 51, "max_steps": 51, "log_history": []},
        "adapter_config.json": {"peft_type": "LORA", "r": 16},
        "train_results.json": {"epoch": 1.0, "train_loss": 2.1, "train_runtime": 20.0},
        "eval_results.json": {"epoch": 1.0, "eval_loss": 2.4},
        "all_results.json": {"epoch": 1.0, "train_loss": 2.1, "eval_loss": 2.4},
    }
    for name, content in files.items():
        if name not in without:
            (output_dir / name).write_text(json.dumps(content))
    if "adapter_model.safetensors" not in without:
        write_safetensors(output_dir / "adapter_model.safetensors")


# torchrun's report when rank 1 aborts while the processes shut down, after the work is done.
SHUTDOWN_ABORT = [
    "[rank1]: terminate called without an active exception",
    *(line.replace("-9 (pid: 645)  (SIGKILL)", "-6 (pid: 645)  (SIGABRT)").replace("Signal 9 (SIGKILL)", "Signal 6 (SIGABRT)")
      for line in RANK_KILLED[RANK_KILLED.index("llamafactory.launcher FAILED"):]),
]


@pytest.fixture
def job(tmp_path: Path) -> dict:
    config_file = tmp_path / "llamafactory.yaml"
    config_file.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "output"), "overwrite_output_dir": True}))
    return {
        "engine": EngineSettings(python=sys.executable),
        "launch": DistributedLaunch(nproc_per_node=2, master_port=29555),
        "config_file": config_file,
        "output_dir": tmp_path / "output",
        "device_env": {},
        "log_file": tmp_path / "logs" / "train.log",
        "on_line": lambda line: None,
        "poll_interval_s": 0.01,
    }


def test_hccl_busy_waits_for_idle_cards_then_the_settle_time_then_retries(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [
        {"returncode": 1, "tail": HCCL_DEVICE_BUSY},
        {"returncode": 0, "steps": [2, 4]},
    ])
    clock = FakeClock()
    probes: list[tuple[int, ...]] = []

    def npu_smi(ids: Sequence[int]) -> dict[int, tuple[DeviceProcess, ...]]:
        probes.append(tuple(ids))
        still_there = (DeviceProcess(pid=927000, name="python", memory_mb=3200),) if len(probes) < 3 else ()
        return {device_id: still_there for device_id in ids}

    events: list[str] = []
    result = run_training(
        **job, on_metrics=lambda m: None, on_event=events.append, run_command=engine,
        policy=RetryPolicy(max_attempts=3, device_settle_s=10, device_poll_s=5),
        device_ids=(2, 3), device_probe=npu_smi, sleep=clock.sleep, clock=clock,
    )
    assert len(engine.configs) == 2
    assert probes == [(2, 3)] * 3  # busy, busy, idle
    assert clock.sleeps == [5, 5, 10]  # two polls while pid 927000 holds the cards, then HCCL's 10 s
    assert [a.failure.kind if a.failure else None for a in result.attempts] == [FailureKind.DEVICE_BUSY, None]
    assert any("pid 927000" in event for event in events)


def test_cards_that_never_come_free_end_the_training(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [{"returncode": 1, "tail": HCCL_DEVICE_BUSY}])
    clock = FakeClock()

    def npu_smi(ids: Sequence[int]) -> dict[int, tuple[DeviceProcess, ...]]:
        return {device_id: (DeviceProcess(pid=4242),) for device_id in ids}

    with pytest.raises(TrainingFailed, match=r"still run processes after 60 s \(0: pid 4242\)"):
        run_training(**job, on_metrics=lambda m: None, run_command=engine, device_ids=(0,), device_probe=npu_smi,
                     policy=RetryPolicy(device_release_timeout_s=60, device_poll_s=5), sleep=clock.sleep, clock=clock)
    assert len(engine.configs) == 1


@pytest.mark.parametrize(
    ("tail", "kind"), [(NPU_OOM, FailureKind.OUT_OF_MEMORY), (UNKNOWN_KEY, FailureKind.CONFIG_ERROR)]
)
def test_out_of_memory_and_config_errors_are_not_retried(job: dict, tail: list[str], kind: FailureKind) -> None:
    engine = ScriptedEngine(job["output_dir"], [{"returncode": 1, "tail": tail}, {"returncode": 0}])
    clock = FakeClock()
    with pytest.raises(TrainingFailed, match=r"^training failed after 1 attempt\(s\) \(not retryable\)") as raised:
        run_training(**job, on_metrics=lambda m: None, run_command=engine, sleep=clock.sleep, clock=clock)
    assert raised.value.failure.kind is kind and len(raised.value.attempts) == 1
    assert len(engine.configs) == 1 and clock.sleeps == []


def test_crash_resumes_from_the_newest_complete_checkpoint_and_logs_each_step_once(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [
        {"returncode": 1, "tail": RANK_KILLED, "steps": [2, 4, 6, 8, 10, 12, 14], "checkpoints": [5, 10]},
        {"returncode": 0, "steps": [12, 14, 16, 18, 20]},
    ])
    logged: list[tuple[str, float, int]] = []
    progress: list[float] = []
    clock = FakeClock()
    result = run_training(**job, on_metrics=logged.extend, on_progress=progress.append, run_command=engine,
                          policy=RetryPolicy(retry_delay_s=2), sleep=clock.sleep, clock=clock)
    assert engine.configs[0].get("resume_from_checkpoint") is None
    assert engine.configs[1]["resume_from_checkpoint"] == str(job["output_dir"] / "checkpoint-10")
    assert engine.configs[1]["overwrite_output_dir"] is True
    loss_steps = [step for key, _, step in logged if key == "loss"]
    assert loss_steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # 12 and 14 ran twice, logged once
    assert progress[-1] == pytest.approx(66.67)
    assert [(a.resumed_from_step, a.last_step) for a in result.attempts] == [(0, 14), (10, 20)]
    assert clock.sleeps == [2]
    # Each attempt's trainer log stays readable.
    assert (job["output_dir"] / "trainer_log.before-attempt-2.jsonl").is_file()
    assert "training attempt 2/3, resuming from checkpoint-10" in job["log_file"].read_text()


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [
        {"returncode": -9, "steps": [2, 4, 6], "checkpoints": [3, 6], "truncate": ["checkpoint-6/optimizer.pt"]},
        {"returncode": 0, "steps": [4, 6, 8]},
    ])
    events: list[str] = []
    clock = FakeClock()
    run_training(**job, on_metrics=lambda m: None, on_event=events.append, run_command=engine,
                 sleep=clock.sleep, clock=clock)
    assert engine.configs[1]["resume_from_checkpoint"] == str(job["output_dir"] / "checkpoint-3")
    assert (job["output_dir"] / "incomplete-checkpoint-6").is_dir()
    assert any("skipping incomplete checkpoint-6 (optimizer.pt is not a complete zip archive" in e for e in events)


def test_attempts_are_bounded(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [{"returncode": 1, "tail": RANK_KILLED}] * 2)
    clock = FakeClock()
    expected = r"after 2 attempt\(s\) \(training.max_attempts reached\): crashed: rank 1"
    with pytest.raises(TrainingFailed, match=expected) as raised:
        run_training(**job, on_metrics=lambda m: None, run_command=engine, policy=RetryPolicy(max_attempts=2),
                     sleep=clock.sleep, clock=clock)
    assert len(raised.value.attempts) == 2 and len(engine.configs) == 2


def test_a_rerun_of_the_task_resumes_and_skips_steps_mlflow_already_has(job: dict) -> None:
    # The orchestrator itself died after checkpoint-10; the task runs again on the same run directory.
    write_checkpoint(job["output_dir"], 10)
    engine = ScriptedEngine(job["output_dir"], [{"returncode": 0, "steps": [12, 14, 16]}])
    logged: list[tuple[str, float, int]] = []
    run_training(**job, on_metrics=logged.extend, run_command=engine, logged_steps={"loss": 14})
    assert engine.configs[0]["resume_from_checkpoint"] == str(job["output_dir"] / "checkpoint-10")
    assert [step for key, _, step in logged if key == "loss"] == [16]


def test_a_node_without_the_shared_checkpoints_does_not_start_over(job: dict) -> None:
    # Node 1 of 2 with its own disk: its checkpoint dirs only hold its rank's RNG state.
    engine = ScriptedEngine(job["output_dir"], [
        {"returncode": 1, "tail": RANK_KILLED, "rng_only_checkpoints": [10]},
        {"returncode": 0},
    ])
    job["launch"] = DistributedLaunch(nproc_per_node=1, master_port=29555, nnodes=2, node_rank=1)
    with pytest.raises(TrainingFailed, match="node 1 holds no complete checkpoint"):
        run_training(**job, on_metrics=lambda m: None, run_command=engine, sleep=lambda s: None)
    assert len(engine.configs) == 1


# --------------------------------------------------------------------------------------------------------------------
# A training that finished counts as finished
# --------------------------------------------------------------------------------------------------------------------


def evaluating(job: dict, **extra: object) -> dict:
    """The job with a config that evaluates after training (as the seed's and the demo's do)."""
    config = {"output_dir": str(job["output_dir"]), "overwrite_output_dir": True, "eval_strategy": "steps", **extra}
    job["config_file"].write_text(yaml.safe_dump(config))
    return job


def test_a_crash_after_the_final_outputs_counts_as_finished(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [
        {"returncode": 1, "tail": SHUTDOWN_ABORT, "steps": [2, 4, 6], "checkpoints": [51], "final_outputs": True},
        {"returncode": 0},
    ])
    events: list[str] = []
    result = run_training(**evaluating(job), on_metrics=lambda m: None, on_event=events.append, run_command=engine,
                          policy=RetryPolicy(max_attempts=1))
    assert len(engine.configs) == 1 and len(result.attempts) == 1
    (attempt,) = result.attempts
    assert attempt.failure is None and attempt.returncode == 1
    assert attempt.exit_crash is not None and attempt.exit_crash.evidence == "rank 1 (pid 645) was killed by SIGABRT"
    assert any("wrote all its final outputs" in e and "rank 1 (pid 645) was killed by SIGABRT" in e for e in events)


@pytest.mark.parametrize("missing", ["eval_results.json", "adapter_model.safetensors", "all_results.json"])
def test_a_crash_before_the_final_outputs_are_whole_is_retried(job: dict, missing: str) -> None:
    engine = ScriptedEngine(job["output_dir"], [
        {"returncode": 1, "tail": RANK_KILLED, "steps": [2, 4], "checkpoints": [2], "final_outputs": True,
         "without": [missing]},
        {"returncode": 0, "steps": [4, 6]},
    ])
    result = run_training(**evaluating(job), on_metrics=lambda m: None, run_command=engine, sleep=lambda s: None)
    assert len(engine.configs) == 2 and result.attempts[0].failure is not None


def test_a_final_checkpoint_present_starts_no_attempt(job: dict) -> None:
    # The orchestrator died after the last checkpoint; the task runs again. Nothing is left to train: the adapter is
    # taken from checkpoint-51, which is evaluated as the training would have done.
    write_checkpoint(job["output_dir"], 51)
    engine = ScriptedEngine(job["output_dir"], [
        {"returncode": 0, "files": {"eval_results.json": {"eval_loss": 2.4}, "all_results.json": {"eval_loss": 2.4}}},
    ])
    events: list[str] = []
    job = evaluating(job, deepspeed="ds_z2_config.json", resume_from_checkpoint="checkpoint-40")
    result = run_training(**job, on_metrics=lambda m: None, on_event=events.append, run_command=engine)
    assert result.attempts == [] and result.finished_from_checkpoint == job["output_dir"] / "checkpoint-51"
    (evaluation,) = engine.configs
    assert evaluation["do_train"] is False and evaluation["do_eval"] is True
    assert evaluation["adapter_name_or_path"] == str(job["output_dir"] / "checkpoint-51")
    assert "deepspeed" not in evaluation and "resume_from_checkpoint" not in evaluation
    assert (job["output_dir"] / "adapter_model.safetensors").is_file()
    assert json.loads((job["output_dir"] / "trainer_state.json").read_text())["global_step"] == 51
    assert any("checkpoint-51 is the training's last step: nothing is left to train" in e for e in events), events


def test_a_crash_after_the_last_checkpoint_evaluates_it_instead_of_training_again(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [
        {"returncode": 1, "tail": RANK_KILLED, "steps": [2, 4, 50], "checkpoints": [51]},
        {"returncode": 0, "files": {"eval_results.json": {"eval_loss": 2.4}, "all_results.json": {"eval_loss": 2.4}}},
    ])
    # Even when that was the last attempt allowed, the finished training does not end FAILED.
    result = run_training(**evaluating(job), on_metrics=lambda m: None, run_command=engine,
                          policy=RetryPolicy(max_attempts=1))
    assert len(engine.configs) == 2 and engine.configs[1]["do_train"] is False
    assert len(result.attempts) == 1 and result.finished_from_checkpoint is not None


def test_a_final_checkpoint_without_evaluation_runs_nothing(job: dict) -> None:
    write_checkpoint(job["output_dir"], 51)
    engine = ScriptedEngine(job["output_dir"], [])
    result = run_training(**job, on_metrics=lambda m: None, run_command=engine)
    assert engine.configs == [] and result.finished_from_checkpoint is not None


def test_a_failed_evaluation_of_the_final_checkpoint_fails_the_training(job: dict) -> None:
    write_checkpoint(job["output_dir"], 51)
    engine = ScriptedEngine(job["output_dir"], [{"returncode": 1, "tail": NPU_OOM}])
    with pytest.raises(TrainingFailed, match="evaluating the final checkpoint-51 failed"):
        run_training(**evaluating(job), on_metrics=lambda m: None, run_command=engine)


def test_a_hung_attempt_is_stopped_by_the_watchdog_and_resumed_from_its_newest_checkpoint(
    job: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempts, "STALL_SAMPLE_S", 0.01)
    engine = ScriptedEngine(job["output_dir"], [
        {"steps": [1, 2, 3, 4], "checkpoints": [2], "hang": True},
        {"returncode": 0, "steps": list(range(5, 31))},
    ])
    events: list[str] = []
    policy = RetryPolicy(max_attempts=2, retry_delay_s=0, stall=StallSettings(step_floor_s=0.5, startup_s=5))
    started = time.monotonic()
    result = run_training(**job, on_metrics=lambda m: None, on_event=events.append, run_command=engine, policy=policy)
    assert time.monotonic() - started < 10
    first, second = result.attempts
    assert first.failure is not None and first.failure.kind is FailureKind.STALLED and first.failure.retryable
    assert first.failure.evidence.startswith("no progress for ") and " s while training (deadline " in (
        first.failure.evidence
    )
    assert "no rank process found on this host" in first.failure.evidence  # the scripted engine has no ranks
    assert second.resumed_from_step == 2 and second.failure is None
    assert any("stalled and was stopped, retryable: no progress" in event for event in events), events


def test_a_long_checkpoint_save_is_not_a_stall(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [{
        "returncode": 0, "steps": [1, 2], "pause_s": 1.5, "more_steps": [3, 4],
        "lines": ["[INFO|trainer.py:3815] 2026-12-05 23:57:25,206 >> Saving model checkpoint to /out/checkpoint-2"],
    }])
    policy = RetryPolicy(max_attempts=1, stall=StallSettings(step_floor_s=0.3, startup_s=5, phase_s=10))
    result = run_training(**job, on_metrics=lambda m: None, run_command=engine, policy=policy)
    assert [attempt.failure for attempt in result.attempts] == [None]


def test_a_diverged_loss_stops_the_attempt_at_once_and_is_not_retried(job: dict) -> None:
    engine = ScriptedEngine(job["output_dir"], [
        {"steps": [1, 2, 3, 4, 5], "losses": {3: math.nan, 4: math.nan, 5: math.nan}, "checkpoints": [2], "hang": True},
        {"returncode": 0, "steps": list(range(3, 31))},
    ])
    policy = RetryPolicy(max_attempts=3, retry_delay_s=0, guards=GuardSettings(diverged_steps=3))
    started = time.monotonic()
    with pytest.raises(TrainingFailed, match=(
        r"^training failed after 1 attempt\(s\) \(not retryable\): diverged and was stopped: "
        r"loss nan at logged steps 3, 4, 5 \(3 in a row, from step 3\)"
    )) as raised:
        run_training(**job, on_metrics=lambda m: None, run_command=engine, policy=policy)
    assert time.monotonic() - started < 10  # stopped by the guard, not left to run (the scripted engine hangs)
    assert raised.value.failure.kind is FailureKind.DIVERGED and not raised.value.failure.retryable
    assert len(engine.configs) == 1


def test_a_rank_on_the_cpu_under_an_npu_lease_stops_the_attempt_as_a_device_error(job: dict) -> None:
    line = ("[rank1]: [INFO|2026-12-06 06:00:00] llamafactory.hparams.parser:524 >> Process rank: 1, world size: 2, "
            "device: cpu, distributed training: True, compute dtype: torch.bfloat16")
    engine = ScriptedEngine(job["output_dir"], [{"lines": [line], "hang": True}, {"returncode": 0}])
    with pytest.raises(TrainingFailed, match=r"ran on the wrong device and was stopped: rank 1 runs on cpu while its "
                                             r"lease holds npu devices") as raised:
        run_training(**job, on_metrics=lambda m: None, run_command=engine, device_kind="npu")
    assert raised.value.failure.kind is FailureKind.WRONG_DEVICE and len(engine.configs) == 1
    # The same line under a CPU lease is the ordinary case.
    fine = ScriptedEngine(job["output_dir"], [{"lines": [line], "returncode": 0}])
    assert run_training(**job, on_metrics=lambda m: None, run_command=fine, device_kind="cpu").attempts[0].failure is None

