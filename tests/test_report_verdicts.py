"""Each verdict on the paper's claims can come out either way: constructed tables for every outcome (agrees,
departs, inconclusive), so that no verdict is an identity of the method."""

from __future__ import annotations

import pandas as pd
import pytest

from factscope.report.text import _additivity_verdict
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
