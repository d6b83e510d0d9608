"""Host memory of the training ranks, read from /proc while an attempt runs."""

from __future__ import annotations

from pathlib import Path


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
