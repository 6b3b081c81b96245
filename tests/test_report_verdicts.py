"""Each verdict on the paper's claims can come out either way: constructed tables for every outcome (agrees,
departs, inconclusive), so that no verdict is an identity of the method."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from factscope.report.prose import Verdict
from factscope.report.text import (MIN_VERDICT_PROMPTS, _additivity_verdict, _breadth_verdict, _destructive_verdict,
                                    _mlp_boost_verdict, sized)
from factscope.report.text_causal import ablation_effects

CLAIM = "additive"


def ablation_table(total_delta: float, interaction_ci: tuple[float, float], n_prompts: int = 40) -> pd.DataFrame:
    """Two mechanisms, A and B, each moving a − mean(R∖a) by −2 alone; removing both moves it by `total_delta`
    as a total effect; the direct effects add up exactly, as they do by construction."""
    rows = []
    for effect, together, ci in (("total", total_delta, interaction_ci), ("direct", -4.0, (-0.01, 0.01))):
        for names, delta in (("none", 0.0), ("A", -2.0), ("B", -2.0), ("A + B", together)):
            n = 0 if names == "none" else names.count("+") + 1
            summed = -4.0 if n == 2 else float("nan")
            rows.append({
                "effect": effect, "mechanism_set": names, "n_mechanisms": n, "n_prompts": n_prompts,
                "delta_logit_diff": delta, "sum_alone_delta_logit_diff": summed,
                "interaction_logit_diff": delta - summed if n == 2 else float("nan"),
                "interaction_logit_diff_low": ci[0] if n == 2 else float("nan"),
                "interaction_logit_diff_high": ci[1] if n == 2 else float("nan"),
                "accuracy": 1.0,
            })
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("together", "ci", "status"), [
    (-4.1, (-0.5, 0.3), "agrees"),           # interaction −0.1, interval inside ±25% of 4 = ±1
    (-2.4, (1.2, 2.0), "departs"),           # sub-additive: +1.6, interval wholly beyond +1
    (-3.2, (0.3, 1.4), "inconclusive"),      # +0.8, but the interval crosses the band's edge
])
def test_additivity_is_judged_on_total_effects(together, ci, status):
    verdict = _additivity_verdict(CLAIM, ablation_effects(ablation_table(together, ci)))
    assert verdict.status == status
    assert "total effects" in verdict.text and "Sanity check, not evidence" in verdict.text
    assert f"interaction {together + 4.0:+.2f}" in verdict.text


def test_exactly_additive_direct_effects_do_not_make_a_departure_agree():
    """The direct effects add up exactly in every case: the verdict follows the total effects all the same."""
    table = ablation_table(-2.4, (1.2, 2.0))
    direct = table[table["effect"] == "direct"]
    assert direct["interaction_logit_diff"].abs().max() == 0.0
    assert _additivity_verdict(CLAIM, ablation_effects(table)).status == "departs"


def test_too_few_prompts_give_no_additivity_verdict():
    verdict = _additivity_verdict(CLAIM, ablation_effects(ablation_table(-2.4, (1.2, 2.0), n_prompts=3)))
    assert verdict.status == "inconclusive" and "too few prompts (3;" in verdict.text


# ---------------------------------------------------------------------------------------------------------------
# Breadth on held-out prompts, MLP boosting, destructive interference among the paper's mechanisms


def breadth(subject_ci: tuple[float, float], relation_ci: tuple[float, float]) -> dict:
    def entry(ci):
        return {"to_a": 1.0, "to_others": sum(ci) / 2, "fraction": sum(ci) / 2, "fraction_ci": list(ci),
                "fraction_in_sample": sum(ci) / 2 + 0.1, "n_prompts": 40}
    return {"bar": 0.5, "subject": entry(subject_ci), "relation": entry(relation_ci)}


@pytest.mark.parametrize(("subject_ci", "relation_ci", "status"), [
    ((0.0, 0.2), (0.6, 0.9), "agrees"),        # subject heads specific, relation heads broad, both clear of the bar
    ((0.0, 0.2), (0.2, 0.4), "departs"),       # relation heads wholly specific: "broad" fails
    ((0.6, 0.8), (0.6, 0.9), "departs"),       # subject heads as broad as relation heads
    ((0.0, 0.2), (0.4, 0.8), "inconclusive"),  # the relation heads' interval crosses the bar
])
def test_breadth_is_judged_on_held_out_prompts(subject_ci, relation_ci, status):
    verdict = _breadth_verdict("broad", breadth(subject_ci, relation_ci))
    assert verdict.status == status and "did not choose the heads" in verdict.text and "in-sample" in verdict.text


@pytest.mark.parametrize(("ci", "status"), [((0.6, 0.9), "agrees"), ((0.05, 0.3), "departs"), ((0.3, 0.7), "inconclusive")])
def test_mlp_boosting_verdict_can_come_out_each_way(ci, status):
    boost = {"bar": 0.5, "to_a": 2.0, "to_others": sum(ci), "fraction": sum(ci) / 2, "fraction_ci": list(ci)}
    assert _mlp_boost_verdict("boost", boost).status == status
    assert _mlp_boost_verdict("boost", None).status == "not run"


def shares_run(rows: dict[str, tuple[float, float, float]]) -> SimpleNamespace:
    """A run holding only mechanisms.csv's pooled a − mean(R∖a) rows: mechanism → (mean, low, high) of the share."""
    total = sum(mean for mean, _, _ in rows.values())
    table = pd.DataFrame([
        {"relation": "all", "metric": "logit_diff", "mechanism": name, "mean_value": mean, "share": mean / total,
         "share_low": low / total, "share_high": high / total, "negative_fraction": 0.5 if mean < 0 else 0.0}
        for name, (mean, low, high) in rows.items()])
    return SimpleNamespace(mechanisms=table)


@pytest.mark.parametrize(("relation_heads", "status"), [
    ((1.0, 0.5, 1.5), "agrees"),
    ((-0.5, -0.8, -0.2), "departs"),
    ((-0.1, -0.4, 0.3), "inconclusive"),
    ((0.2, -0.1, 0.5), "inconclusive"),  # positive, but the interval reaches below zero
])
def test_destructive_interference_is_judged_on_the_papers_mechanisms(relation_heads, status):
    run = shares_run({"subject_heads": (3.0, 2.5, 3.5), "relation_heads": relation_heads, "mlps": (2.0, 1.5, 2.5),
                      "other_heads": (-1.0, -1.3, -0.7)})  # the catch-all is negative in every case
    verdict = _destructive_verdict("constructive", run)
    assert verdict.status == status
    assert "no mechanism of the paper" in verdict.text  # the catch-all is reported, never judged


@pytest.mark.parametrize(("n_prompts", "n_relations", "status"), [
    (108, 11, "departs"),                       # enough: the verdict stands, its sample stated
    (17, 9, "inconclusive"),                    # too few prompts
    (400, 2, "inconclusive"),                   # many prompts, too few relations
    (MIN_VERDICT_PROMPTS, 5, "departs"),        # at the minimums
])
def test_small_samples_get_no_firm_verdict(n_prompts, n_relations, status):
    verdict = sized(Verdict("x", "claim", "departs", "Numbers."), n_prompts, n_relations)
    assert verdict.status == status and f"(n = {n_prompts} prompts, {n_relations} relations)" in verdict.text
    assert ('would say "departs"' in verdict.text) == (status == "inconclusive")
    assert sized(Verdict("x", "claim", "not run", "Not checked."), 3, 1).status == "not run"
