"""The pipeline's `serve:` block: the API server the serve stage starts, validated with the rest of the config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The seeds' environment for vLLM on Ascend: vLLM starts its workers as child processes, which must be spawned (not
# forked) once the NPU is initialised; a smaller allocator split keeps the memory from fragmenting.
VLLM_ENV = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
VLLM_NPU_ENV = {"PYTORCH_NPU_ALLOC_CONF": "max_split_size_mb:256"}


class VllmSettings(BaseModel):
    """LLaMA-Factory's vLLM options (`--vllm_*`), used with `backend: vllm`."""

    model_config = ConfigDict(extra="forbid")

    maxlen: int = Field(4096, ge=1, description="vllm_maxlen: prompt plus answer tokens")
    gpu_util: float = Field(0.7, gt=0, lt=1, description="vllm_gpu_util: the share of device memory vLLM takes")
    enforce_eager: bool = Field(False, description="vllm_enforce_eager: no graph capture")
    max_lora_rank: int = Field(32, ge=1, description="vllm_max_lora_rank: at least the adapter's lora_rank")

    def engine_args(self) -> list[str]:
        return [
            "--vllm_maxlen", str(self.maxlen),
            "--vllm_gpu_util", str(self.gpu_util),
            "--vllm_enforce_eager", str(self.enforce_eager).lower(),
            "--vllm_max_lora_rank", str(self.max_lora_rank),
        ]  # fmt: skip


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    prompt: str = "Who are you?"
    max_tokens: int = Field(32, ge=1)
    max_concurrent: int = Field(
        1, ge=1, description="requests the server generates for at once (LLaMA-Factory's MAX_CONCURRENT); more queue"
    )
    backend: Literal["huggingface", "vllm"] = Field(
        "huggingface", description="LLaMA-Factory's infer_backend; vllm (vllm-ascend on NPUs) needs NPUs or GPUs"
    )
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    do_sample: bool = Field(
        False,
        description="greedy unless true: sampling fails on Ascend NPUs (ACL stream synchronize failed, 507018); a "
        "request may still send do_sample: true",
    )
    startup_timeout_s: float = Field(300, gt=0)
    api_key_secret: str | None = Field(
        None,
        description="name of the Prefect Secret block holding the key clients send when the flow keeps serving; "
        "unset: the worker's NPU_SFT_API_KEY",
    )

    def backend_args(self) -> list[str]:
        """The engine arguments after `api --model_name_or_path ... --template ...`."""
        args = ["--infer_backend", self.backend, "--do_sample", str(self.do_sample).lower()]
        return args + self.vllm.engine_args() if self.backend == "vllm" else args

    def backend_env(self, device_kind: str) -> dict[str, str]:
        """What the backend needs in its environment on `device_kind` (the seeds' vLLM variables on NPUs)."""
        if self.backend != "vllm":
            return {}
        if device_kind == "cpu":
            raise ValueError("serve.backend: vllm does not run on the CPU; use huggingface, or NPUs/GPUs")
        return {**VLLM_ENV, **(VLLM_NPU_ENV if device_kind == "npu" else {})}
