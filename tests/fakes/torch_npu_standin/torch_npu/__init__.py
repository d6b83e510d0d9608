"""Stand-in for torch_npu in the engine env (put on PYTHONPATH), with the API the seeds use: `import torch_npu`
adds `torch.npu` (is_available, device_count, set_device, synchronize) and `Tensor.npu()`. Tensors stay on the CPU.
Enough for the device probe (engine/scripts/probe_devices.py), not for LLaMA-Factory: transformers imports more of it.

FAKE_TORCH_NPU picks the host it plays (the texts are the ones Ascend users report):
  ok:N             N cards that compute (default ok:8; ASCEND_RT_VISIBLE_DEVICES narrows them as the runtime does)
  no-cann          CANN's libraries not loaded (its set_env.sh not sourced): the import fails
  unavailable      the driver sees no card: is_available() is False
  no-kernels:I     card I fails every op: CANN's kernels package missing or not matching the toolkit
                   (LLaMA-Factory #3779, #4610)
FAKE_TORCH_NPU_CHIP names the chip `torch.npu.get_device_name` reports (default 910B3: "Ascend910B3").
"""

import os
import types

import torch

__version__ = "2.14.0"

_MODE = os.environ.get("FAKE_TORCH_NPU", "ok:8")
if _MODE == "no-cann":
    raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")

_kind, _, _arg = _MODE.partition(":")
_cards = int(_arg) if _kind == "ok" and _arg else 8
_visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
if _visible:
    _cards = len([part for part in _visible.split(",") if part.strip()])
_current = [0]
_CHIP = os.environ.get("FAKE_TORCH_NPU_CHIP", "910B3")

_NO_BINARY = (
    "call aclnnCast failed, detail:EZ9999: Inner Error!\n"
    "EZ9999: 2024-05-17-01:30:26.960.959  Op Cast does not has any binary.\n"
    "        TraceBack (most recent call last):\n"
    "        Kernel Run failed. opType: 53, Cast\n"
    "        launch failed for Cast, errno:561000."
)


def _set_device(index: int) -> None:
    if not 0 <= index < _cards:
        raise RuntimeError(f"Invalid device ID {index}")
    _current[0] = index


def _to_npu(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    if _kind == "no-kernels" and _current[0] == int(_arg):
        raise RuntimeError(_NO_BINARY)
    return tensor.clone()


torch.npu = types.SimpleNamespace(
    is_available=lambda: _kind != "unavailable",
    device_count=lambda: 0 if _kind == "unavailable" else _cards,
    set_device=_set_device,
    synchronize=lambda *args: None,
    get_device_name=lambda device=None: f"Ascend{_CHIP}",
)
torch.Tensor.npu = _to_npu
