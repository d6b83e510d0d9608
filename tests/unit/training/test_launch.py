"""How a launch is laid out on its lease: the lease's processes and port, the nodes from `training:`."""

from __future__ import annotations

from pathlib import Path

from npu_sft.devices import DeviceSettings, lease_devices
from npu_sft.engine import DistributedLaunch
from npu_sft.training import TrainingSettings, distributed_launch, launch_env, launch_on


def test_a_training_launch_on_a_lease_takes_its_ranks_and_port_and_the_nodes_from_the_settings(tmp_path: Path) -> None:
    devices = DeviceSettings(kind="cpu", cpu_virtual_devices=4, train=3, state_dir=tmp_path)
    training = TrainingSettings(nnodes=2, node_rank=1, master_addr="10.0.0.7")
    with lease_devices(devices, task="train") as lease:
        launch = launch_on(lease, training)
        assert launch == DistributedLaunch(
            nproc_per_node=3, master_port=lease.master_port, nnodes=2, node_rank=1, master_addr="10.0.0.7"
        )
        assert launch == distributed_launch(training, nproc_per_node=3, master_port=lease.master_port)


def test_a_predict_launch_on_a_lease_stays_on_this_node(tmp_path: Path) -> None:
    devices = DeviceSettings(kind="cpu", cpu_virtual_devices=2, eval=2, state_dir=tmp_path)
    with lease_devices(devices, task="eval") as lease:
        assert launch_on(lease) == DistributedLaunch(nproc_per_node=2, master_port=lease.master_port)


def test_launch_env_lets_cpu_runs_resume() -> None:
    assert launch_env("cpu") == {"RECORD_VRAM": "1", "ACCELERATE_TORCH_DEVICE": "cpu"}
    assert launch_env("npu") == {"RECORD_VRAM": "1"}
