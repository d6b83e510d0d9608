"""The pipeline config's `training:` section: attempts, retries, multi-node launch, the stall watchdog, the guards."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StallSettings(_Strict):
    """`training.stall`: progress deadlines; an attempt that misses one is stopped and counts as a failed attempt."""

    enabled: bool = True
    startup_s: float = Field(1800.0, gt=0, description="until the first logged step: model loading, tokenization")
    step_floor_s: float = Field(300.0, gt=0, description="the shortest deadline between two logged steps")
    step_factor: float = Field(
        10.0, ge=1, description="the deadline between logged steps: this times the longest interval seen so far"
    )
    phase_s: float = Field(3600.0, gt=0, description="an evaluation or a checkpoint save")


class GuardSettings(_Strict):
    """`training.guards`: an attempt that can only waste its devices is stopped at once and not retried."""

    enabled: bool = True
    diverged_steps: int = Field(
        3, ge=1, description="logged steps in a row with a NaN, infinite or zero loss that stop the run as diverged"
    )
    probe_devices: bool = Field(
        True, description="before the first attempt on NPUs or GPUs, the engine env multiplies a small matrix on each "
        "leased card (npu-sft doctor's check): a card that cannot compute stops the run in seconds, named"
    )


class TrainingSettings(_Strict):
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    max_attempts: int = Field(
        3, ge=1, description="attempts per training, the first included; a retry resumes from the newest complete "
        "checkpoint. Out-of-memory and configuration errors are never retried"
    )
    retry_delay_s: float = Field(5.0, ge=0, description="pause before a retry, so the ports and memory are let go")
    device_settle_s: float = Field(
        10.0, ge=0, description="after HCCL finds a card still busy (EJ0001), wait this long once npu-smi shows the "
        "cards idle (HCCL's own advice is 10 s)"
    )
    device_release_timeout_s: float = Field(
        600.0, gt=0, description="how long to wait for a previous training's processes to leave the cards"
    )
    stall: StallSettings = Field(default_factory=StallSettings)
    guards: GuardSettings = Field(default_factory=GuardSettings)
