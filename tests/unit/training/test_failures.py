"""Failure classification on exact engine output."""

from __future__ import annotations

import pytest

from npu_sft.engine.process import CompletedCommand
from npu_sft.training import FailureKind, TrainingFailed, classify_failure

SITE = "/work/main/.npu-sft/engine/lib/python3.11/site-packages"

# The seed's FAQ (Ascend LLaMA-Factory docs), verbatim: HCCL cannot open a card the last training still holds.
HCCL_DEVICE_BUSY = """\
    RuntimeError: [ERROR] HCCL error in: torch_npu/csrc/distributed/ProcessGroupHCCL.cpp:64
[ERROR] 2024-05-21-11:57:54 (PID:927000, Device:3, RankID:3) ERR02200 DIST call hccl api failed.
EJ0001: 2024-05-21-11:57:54.167.645 Failed to initialize the HCCP process. Reason: Maybe the last training process is running.
        Solution: Wait for 10s after killing the last training process and try again.
        TraceBack (most recent call last):
        tsd client wait response fail, device response code[1]. unknown device error.[FUNC:WaitRsp][FILE:process_mode_manager.cpp][LINE:290]
        Fail to get sq reg virtual addr, deviceId=3, sqId=40.[FUNC:Setup][FILE:stream.cc][LINE:1102]
        stream setup failed, retCode=0x7020010.[FUNC:SyncGetDevMsg][FILE:api_impl.cc][LINE:4643]
        Sync get device msg failed, retCode=0x7020010.[FUNC:GetDevErrMsg][FILE:api_impl.cc][LINE:4704]
        rtGetDevMsg execute failed, reason=[driver error:internal error][FUNC:FuncErrorReason][FILE:error_message_manage.cc][LINE:53]
""".splitlines()

# torchrun's report after `kill -9` of rank 1 during a 2-rank gloo run (captured on this project's engine env).
RANK_KILLED = f"""\
 47%|████▋     | 24/51 [00:01<00:01, 15.03it/s][rank0]: Traceback (most recent call last):
[rank0]:   File "{SITE}/torch/nn/parallel/distributed.py", line 2364, in _distributed_broadcast_coalesced
[rank0]:     dist._broadcast_coalesced(
[rank0]: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:53992: Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application. Check the logs of the remote worker before reporting an error. GLHF! 🏖️
W1122 20:43:40.475000 630 {SITE}/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 644 closing signal SIGTERM
E1122 20:43:40.591000 630 {SITE}/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 645) of binary: /work/main/.npu-sft/engine/bin/python
Traceback (most recent call last):
  File "{SITE}/torch/distributed/launcher/api.py", line 386, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
=====================================================
llamafactory.launcher FAILED
-----------------------------------------------------
Failures:
[1]:
  time      : 2026-11-22_20:43:40
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 644)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 644
-----------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_20:43:40
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 645)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 645
=====================================================""".splitlines()

# An unknown key in the LLaMA-Factory YAML (`lora_rnk: 8`), as the engine prints it under torchrun.
UNKNOWN_KEY = f"""\
[rank0]: Traceback (most recent call last):
[rank0]:   File "{SITE}/llamafactory/hparams/parser.py", line 107, in _parse_args
[rank0]:     return parser.parse_dict(args, allow_extra_keys=allow_extra_keys)
[rank0]:   File "{SITE}/transformers/hf_argparser.py", line 383, in parse_dict
[rank0]:     raise ValueError(f"Some keys are not used by the HfArgumentParser: {{sorted(unused_keys)}}")
[rank0]: ValueError: Some keys are not used by the HfArgumentParser: ['lora_rnk']
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: """.splitlines()

# `bf16: true` on a host without bf16 support: raised before the process group exists, so without rank prefixes.
BAD_ARGUMENT = f"""\
Traceback (most recent call last):
  File "{SITE}/llamafactory/hparams/training_args.py", line 153, in __post_init__
    BaseTrainingArguments.__post_init__(self)
  File "{SITE}/transformers/training_args.py", line 1738, in _validate_args
    raise ValueError(error_message)
[INFO|configuration_utils.py:847] 2026-11-22 20:47:35,104 >> Model config Qwen2Config {{
ValueError: Your setup doesn't support bf16/gpu. You need to assign use_cpu if you want to train the model on CPU.
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: """.splitlines()

CUDA_OOM = [
    "[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of "
    "79.15 GiB of which 1.06 GiB is free. Of the allocated memory 75.31 GiB is allocated by PyTorch",
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
]
NPU_OOM = [
    "[rank3]: RuntimeError: NPU out of memory. Tried to allocate 1.53 GiB (NPU 3; 60.97 GiB total capacity; "
    "57.11 GiB already allocated; 57.11 GiB current active; 1.02 GiB free; 59.37 GiB reserved in total by PyTorch)",
]
NPU_ERROR_MEMORY = [
    "RuntimeError: [ERROR] 2024-06-03-10:21:09 (PID:4120, Device:0, RankID:0) ERR00100 PTA call acl api failed: "
    "memory allocation failed",
]


def test_seed_hccl_busy_text_is_a_retryable_device_busy() -> None:
    failure = classify_failure(HCCL_DEVICE_BUSY, 1)
    assert failure.kind is FailureKind.DEVICE_BUSY and failure.retryable
    assert "Maybe the last training process is running" in failure.evidence


@pytest.mark.parametrize("tail", [CUDA_OOM, NPU_OOM, NPU_ERROR_MEMORY], ids=["cuda", "npu", "npu-error-code"])
def test_out_of_memory_is_not_retryable(tail: list[str]) -> None:
    failure = classify_failure(tail, 1)
    assert failure.kind is FailureKind.OUT_OF_MEMORY and not failure.retryable
    assert "memory" in failure.evidence and not failure.evidence.startswith("[rank")


def test_unknown_key_is_a_config_error() -> None:
    failure = classify_failure(UNKNOWN_KEY, 1)
    assert failure.kind is FailureKind.CONFIG_ERROR and not failure.retryable
    assert failure.evidence == "ValueError: Some keys are not used by the HfArgumentParser: ['lora_rnk']"


def test_value_error_from_argument_checks_is_a_config_error() -> None:
    failure = classify_failure(BAD_ARGUMENT, 1)
    assert failure.kind is FailureKind.CONFIG_ERROR
    assert failure.evidence.startswith("ValueError: Your setup doesn't support bf16/gpu")


def test_lora_target_missing_from_the_model_is_a_config_error() -> None:
    tail = [
        "[rank0]: Traceback (most recent call last):",
        f'[rank0]:   File "{SITE}/llamafactory/model/adapter.py", line 301, in init_adapter',
        f'[rank0]:   File "{SITE}/peft/tuners/tuners_utils.py", line 880, in inject_adapter',
        "[rank0]:     raise ValueError(error_msg)",
        "[rank0]: ValueError: Target modules {'no_such_proj'} not found in the base model. Please check the target "
        "modules and try again.",
    ]
    assert classify_failure(tail, 1).kind is FailureKind.CONFIG_ERROR


def test_value_error_elsewhere_is_a_crash() -> None:
    tail = [
        "[rank0]: Traceback (most recent call last):",
        f'[rank0]:   File "{SITE}/transformers/models/qwen2/modeling_qwen2.py", line 301, in forward',
        "[rank0]: ValueError: Attention mask should be of size (4, 1, 128, 128)",
    ]
    failure = classify_failure(tail, 1)
    assert failure.kind is FailureKind.CRASHED and failure.retryable
    assert failure.evidence == "ValueError: Attention mask should be of size (4, 1, 128, 128)"


def test_killed_rank_is_a_retryable_crash_naming_the_rank() -> None:
    failure = classify_failure(RANK_KILLED, 1)
    assert failure.kind is FailureKind.CRASHED and failure.retryable
    assert failure.evidence == "rank 1 (pid 645) was killed by SIGKILL"


def test_killed_launcher_is_a_retryable_crash() -> None:
    failure = classify_failure(["{'loss': 5.1, 'epoch': 0.4}"], -9)
    assert failure.kind is FailureKind.CRASHED and failure.evidence == "the launcher was killed by signal 9"


def test_success_is_not_a_failure() -> None:
    with pytest.raises(ValueError, match="exited with code 0"):
        classify_failure([], 0)


# LLaMA-Factory #5551 (910B2C, CANN 8.0.RC2), as torchrun prints it: rank 2 gave up waiting in main_process_first
# while rank 0 tokenized.
NPU_STREAM_SYNC_TIMEOUT = [
    "[rank2]: Traceback (most recent call last):",
    f'[rank2]:   File "{SITE}/llamafactory/data/loader.py", line 324, in get_dataset',
    '[rank2]:     with training_args.main_process_first(desc="pre-process dataset"):',
    "[rank2]: RuntimeError: npuSynchronizeDevice:torch_npu/csrc/core/npu/NPUStream.cpp:390 NPU function error: "
    "aclrtSynchronizeDevice, error code is 507046",
    "[rank2]: [ERROR] 2024-09-26-16:06:40 (PID:2671581, Device:2, RankID:2) ERR00100 PTA call acl api failed",
    "[rank2]: [Error]: In the specified timeout waiting event, all tasks in the specified stream are not completed.",
    "[rank2]: EE1002: 2024-09-26-16:06:40.565.510 Stream synchronize timeout. rtDeviceSynchronize execute failed, "
    "reason=[stream sync timeout]",
    "Root Cause (first observed failure):",
    "[0]:",
    "  rank      : 2 (local_rank: 2)",
    "  exitcode  : 1 (pid: 2671581)",
]
# LLaMA-Factory #2424 on GPUs: NCCL's watchdog after ddp_timeout's default 1800 s.
NCCL_WATCHDOG_TIMEOUT = [
    "[E ProcessGroupNCCL.cpp:475] [Rank 2] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=2, "
    "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=1800000) ran for 1800328 milliseconds before timing out.",
    "[E ProcessGroupNCCL.cpp:495] To avoid data inconsistency, we are taking the entire process down.",
]


@pytest.mark.parametrize("tail", [NPU_STREAM_SYNC_TIMEOUT, NCCL_WATCHDOG_TIMEOUT], ids=["hccl-507046", "nccl"])
def test_ranks_that_gave_up_waiting_for_each_other_are_not_retried_and_say_the_fix(tail: list[str]) -> None:
    failure = classify_failure(tail, 1)
    assert failure.kind is FailureKind.COLLECTIVE_TIMEOUT and not failure.retryable
    assert "507046" in failure.evidence or "Watchdog caught collective operation timeout" in failure.evidence
    assert not failure.evidence.startswith("[rank") and "HCCL_EXEC_TIMEOUT" in failure.fix
    failed = TrainingFailed(CompletedCommand(["torchrun"], 1, tail, None, 1.0), failure, [], "not retryable")
    assert str(failed).splitlines()[0].endswith("`npu-sft doctor CONFIG` compares the two)")
