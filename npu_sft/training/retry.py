"""Between two attempts: how many are allowed, how long to wait, and (on NPUs) npu-smi confirming the cards are idle."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from npu_sft.devices import DeviceProcess
from npu_sft.training.errors import DevicesStillBusy
from npu_sft.training.failures import Failure, FailureKind
from npu_sft.training.settings import GuardSettings, StallSettings, TrainingSettings


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    retry_delay_s: float = 5.0
    device_settle_s: float = 10.0
    device_release_timeout_s: float = 600.0
    device_poll_s: float = 5.0
    stall: StallSettings = field(default_factory=StallSettings)
    guards: GuardSettings = field(default_factory=GuardSettings)

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
            guards=settings.guards,
        )


DeviceProbe = Callable[[Sequence[int]], Mapping[int, Sequence[DeviceProcess]]]


def wait_for_idle_devices(
    ids: Sequence[int],
    probe: DeviceProbe,
    *,
    timeout_s: float,
    poll_s: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    on_wait: Callable[[str], None],
) -> None:
    """Return once `probe` (npu-smi's process table) lists no process on any of `ids`; DevicesStillBusy after
    `timeout_s`. Only waits: the processes may belong to someone else, so they are never killed from here."""
    deadline = clock() + timeout_s
    while True:
        busy = {device_id: procs for device_id, procs in probe(ids).items() if procs}
        if not busy:
            return
        holders = "; ".join(
            f"{device_id}: pid {', '.join(str(proc.pid) for proc in procs)}"
            for device_id, procs in sorted(busy.items())
        )
        if clock() >= deadline:
            raise DevicesStillBusy(
                f"cards still run processes after {timeout_s:.0f} s ({holders}); stop them (npu-smi info lists them) "
                "and run the pipeline again"
            )
        on_wait(f"waiting for the previous training processes to leave the cards ({holders})")
        sleep(poll_s)


def wait_before_retry(
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
