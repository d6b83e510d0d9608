"""The pipeline's `serve:` block: the API server the serve stage starts, validated with the rest of the config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    prompt: str = "Who are you?"
    max_tokens: int = Field(32, ge=1)
    max_concurrent: int = Field(
        1, ge=1, description="requests the server generates for at once (LLaMA-Factory's MAX_CONCURRENT); more queue"
    )
    do_sample: bool = Field(
        False,
        description="greedy unless true: sampling fails on Ascend NPUs (ACL stream synchronize failed, 507018); a "
        "request may still send do_sample: true",
    )
    startup_timeout_s: float = Field(300, gt=0)
