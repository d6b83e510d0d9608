from __future__ import annotations

import pytest

from npu_sft.publishing.gate import Champion, decide, describe_gate
from npu_sft.publishing.settings import GateSettings

ADAPTER = {"eval/rouge_l": 14.5, "base/rouge_l": 0.3, "gain/rouge_l": 14.2}


def test_a_first_adapter_better_than_its_base_model_is_promoted() -> None:
    decision = decide(GateSettings(), ADAPTER, champion=None)
    assert decision.promote
    assert decision.reason == "gain over the base model +14.2 (14.5 vs 0.3) > 0; no champion yet: promoted to champion"


def test_an_adapter_worse_than_the_champion_stays_candidate() -> None:
    decision = decide(GateSettings(), ADAPTER, Champion("3", 20.0))
    assert not decision.promote
    assert "14.5 does not beat champion version 3's 20" in decision.reason


def test_an_adapter_better_than_the_champion_is_promoted() -> None:
    decision = decide(GateSettings(), ADAPTER, Champion("3", 10.0))
    assert decision.promote and "14.5 beats champion version 3's 10" in decision.reason


@pytest.mark.parametrize(
    ("gate", "metrics", "says"),
    [
        (GateSettings(threshold=20.0), ADAPTER, "eval/rouge_l 14.5 misses threshold 20"),
        (GateSettings(min_gain=20.0), ADAPTER, "+14.2 (14.5 vs 0.3) <= 20"),
        (GateSettings(), {"eval/rouge_l": 0.2, "base/rouge_l": 0.3, "gain/rouge_l": -0.1}, "<= 0"),
        (GateSettings(), {"eval_loss": 2.0}, "no eval/rouge_l in the run"),
        (GateSettings(), {"eval/rouge_l": 14.5}, "no gain/rouge_l (the base model was not scored)"),
    ],
)
def test_a_failed_check_says_which_and_the_numbers(gate: GateSettings, metrics: dict, says: str) -> None:
    decision = decide(gate, metrics, champion=None)
    assert not decision.promote
    assert says in decision.reason and decision.reason.endswith("not promoted")


def test_lower_is_better_for_a_lower_direction() -> None:
    gate = GateSettings(metric="bleu_4", direction="lower", threshold=5.0, min_gain=None)
    assert decide(gate, {"eval/bleu_4": 4.0}, Champion("1", 4.5)).promote
    assert not decide(gate, {"eval/bleu_4": 4.8}, Champion("1", 4.5)).promote
    assert not decide(gate, {"eval/bleu_4": 6.0}, None).promote


def test_a_champion_without_the_score_does_not_block() -> None:
    assert decide(GateSettings(), ADAPTER, Champion("1", None)).promote


def test_the_gate_reads_as_one_line_in_the_plan() -> None:
    assert describe_gate(GateSettings()) == (
        "champion when eval/rouge_l (higher is better) beats the base model by more than 0 and beats the current "
        "champion"
    )
    assert describe_gate(GateSettings(metric="bleu_4", threshold=30, min_gain=None, beat_champion=False)) == (
        "champion when eval/bleu_4 (higher is better) reaches 30"
    )
    assert describe_gate(GateSettings(min_gain=None, beat_champion=False)) == (
        "every version with a finite eval/rouge_l becomes champion"
    )
