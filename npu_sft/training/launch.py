"""How a training is launched on its lease: torchrun's node layout and the variables every launch gets."""

from __future__ import annotations

from npu_sft.devices import Lease
from npu_sft.engine import DistributedLaunch
from npu_sft.training.settings import TrainingSettings


def distributed_launch(settings: TrainingSettings, *, nproc_per_node: int, master_port: int) -> DistributedLaunch:
    """torchrun's layout for a training: the lease's processes and port on this node, the nodes from `training:`."""
    return DistributedLaunch(
        nproc_per_node=nproc_per_node,
        master_port=master_port,
        nnodes=settings.nnodes,
        node_rank=settings.node_rank,
        master_addr=settings.master_addr,
    )


def launch_on(lease: Lease, training: TrainingSettings | None = None) -> DistributedLaunch:
    """torchrun's layout on a device lease: the lease's processes and its reserved MASTER_PORT on this node; a
    training's nodes come from `training:`, a predict run (the eval stage) stays on this node."""
    if training is None:
        return DistributedLaunch(nproc_per_node=lease.nproc_per_node, master_port=lease.master_port)
    return distributed_launch(training, nproc_per_node=lease.nproc_per_node, master_port=lease.master_port)


def launch_env(device_kind: str) -> dict[str, str]:
    """Variables every training launch gets on top of the device lease's."""
    env = {"RECORD_VRAM": "1"}  # LLaMA-Factory then logs the device allocator's peak with every step
    if device_kind == "cpu":
        # Under torchrun accelerate names the CPU "cpu:0", and torch.load(map_location="cpu:0") cannot restore the
        # optimizer state of a checkpoint: resuming would fail. Plain "cpu" is the same device.
        env["ACCELERATE_TORCH_DEVICE"] = "cpu"
    return env
