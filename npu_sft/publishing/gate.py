"""The publish gate: whether a new adapter version becomes `champion`, and why, from the eval stage's scores.

The decision is pure (numbers in, verdict and reason out), so it is tested without a registry; `versions.py`
applies it to the registry's aliases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from npu_sft.publishing.settings import GateSettings


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str  # one line with the numbers on both sides


@dataclass(frozen=True)
class Champion:
    version: str
    score: float | None  # its eval/<metric>; None when its run has none (an older run)


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "higher" else a < b


def decide(gate: GateSettings, metrics: Mapping[str, float], champion: Champion | None) -> GateDecision:
    """Promote only when every check the gate asks for passes; the reason names each number compared."""
    key = f"eval/{gate.metric}"
    score = metrics.get(key)
    if score is None or not math.isfinite(score):
        return GateDecision(False, f"no {key} in the run (is eval.enabled on?): not promoted")
    checks: list[str] = []
    if gate.threshold is not None:
        ok = score >= gate.threshold if gate.direction == "higher" else score <= gate.threshold
        checks.append(f"{key} {score:.4g} {'meets' if ok else 'misses'} threshold {gate.threshold:g}")
        if not ok:
            return GateDecision(False, "; ".join(checks) + ": not promoted")
    if gate.min_gain is not None:
        gain = metrics.get(f"gain/{gate.metric}")
        if gain is None:
            return GateDecision(False, f"no gain/{gate.metric} (the base model was not scored): not promoted")
        signed_gain = gain if gate.direction == "higher" else -gain
        ok = signed_gain > gate.min_gain
        base = metrics.get(f"base/{gate.metric}", math.nan)
        checks.append(f"gain over the base model {gain:+.4g} ({score:.4g} vs {base:.4g}) {'>' if ok else '<='} {gate.min_gain:g}")
        if not ok:
            return GateDecision(False, "; ".join(checks) + ": not promoted")
    if gate.beat_champion and champion is not None:
        if champion.score is None:
            checks.append(f"champion version {champion.version} has no {key}")
        else:
            ok = _better(score, champion.score, gate.direction)
            checks.append(f"{score:.4g} {'beats' if ok else 'does not beat'} champion version {champion.version}'s {champion.score:.4g}")
            if not ok:
                return GateDecision(False, "; ".join(checks) + ": not promoted")
    if champion is None:
        checks.append("no champion yet")
    return GateDecision(True, "; ".join(checks) + ": promoted to champion")


def describe_gate(gate: GateSettings) -> str:
    """The gate's checks as one line (`npu-sft plan`), in the order `decide` applies them."""
    key = f"eval/{gate.metric}"
    checks = []
    if gate.threshold is not None:
        checks.append(f"reaches {gate.threshold:g}")
    if gate.min_gain is not None:
        checks.append(f"beats the base model by more than {gate.min_gain:g}")
    if gate.beat_champion:
        checks.append("beats the current champion")
    if not checks:
        return f"every version with a finite {key} becomes champion"
    listed = checks[0] if len(checks) == 1 else ", ".join(checks[:-1]) + " and " + checks[-1]
    return f"champion when {key} ({gate.direction} is better) {listed}"
