"""The pipeline's `eval:` block: what the eval stage generates and how, validated with the rest of the config."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="generate answers for the held-out split and score them (BLEU-4, ROUGE)")
    baseline: bool = Field(
        True, description="score the base model (no adapter) the same way, once per model, eval split and settings"
    )
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per answer")
    max_samples: int | None = Field(None, ge=1, description="score only the first N held-out rows")
    batch_size: int = Field(4, ge=1, description="rows generated at once on each device")
    do_sample: bool = Field(
        False, description="greedy decoding by default: two evaluations of one adapter give the same scores"
    )
    temperature: float = Field(0.95, gt=0, description="used only with do_sample")
    top_p: float = Field(0.7, gt=0, le=1, description="used only with do_sample")
    top_k: int = Field(50, ge=0, description="used only with do_sample")
    num_beams: int = Field(1, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    samples: int = Field(8, ge=0, description="rows shown side by side (prompt, reference, base, adapter) in the run")

    def generation_args(self) -> dict[str, Any]:
        """LLaMA-Factory's generating arguments. Its own default samples at temperature 0.95, so do_sample is always
        written out; the sampling knobs only when they are used, so they never change a greedy run's cache key."""
        args: dict[str, Any] = {
            "do_sample": self.do_sample,
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            args.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return args
