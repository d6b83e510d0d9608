"""What `npu-sft doctor` found: one line per check, ok / warning / error, with the fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    check: str  # what was looked at: "devices", "NPU 3", "CANN", "HCCL timeout", ...
    status: Status
    detail: str  # what was seen, with the numbers
    fix: str = ""  # what to do; empty for ok


def ok(check: str, detail: str) -> Finding:
    return Finding(check, "ok", detail)


def worst(findings: list[Finding]) -> Status:
    statuses = {finding.status for finding in findings}
    return "error" if "error" in statuses else "warning" if "warning" in statuses else "ok"
