"""The causal verdicts can come out every way: constructed tables for each outcome (agrees, departs, inconclusive)
of additivity under noise, read at the scale a rule stated in advance picks, and of the MLP enrichment at the last
subject token once MLP0 is set apart."""

from __future__ import annotations

import pandas as pd
import pytest

from factscope.causal_readings import HALVING_RULE
from factscope.report.text_causal import KEPT_WITHOUT_MLP0, mlp0_verdict, noise_verdict

SCALES = (0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0)
CHANCE = 0.25


def noise_rows(mechanism: str, margin_ci: tuple[float, float], area_ci: tuple[float, float], halved: float = 0.15,
               at_chance: bool = False) -> list[dict]:
    """One mechanism's rows of noise_robustness.csv: the full model's accuracy halves at `halved`; the margin at that
    scale and the area between the curves have the given intervals; `at_chance`: the full model ranks a first
    among R_r at chance (CHANCE) at every noisy scale."""
    rows = []
    for scale in SCALES:
        model_first = 1.0 if scale == 0 else CHANCE if at_chance else max(CHANCE + 0.05, 1.0 - scale)
        rows.append({
            "mechanism": mechanism, "noise_scale": scale, "accuracy": 1.0 if scale < halved else 0.4,
            "first_among_r": model_first, "alone_first_among_r": model_first - sum(margin_ci) / 2,
            "margin": sum(margin_ci) / 2, "accuracy_halved": True, "chance_first_among_r": CHANCE,
            "halved_scale": halved, "halved_scale_low": halved, "halved_scale_high": halved,
            "margin_at_halved": sum(margin_ci) / 2, "margin_at_halved_low": margin_ci[0], "margin_at_halved_high": margin_ci[1],
            "margin_area": sum(area_ci) / 2, "margin_area_low": area_ci[0], "margin_area_high": area_ci[1],
        })
    return rows


def noise_table(*mechanisms: list[dict]) -> pd.DataFrame:
    everything = noise_rows("all", (-0.9, -0.8), (-0.9, -0.8))  # noise on every path: never judged
    return pd.DataFrame([row for rows in (*mechanisms, everything) for row in rows])


@pytest.mark.parametrize(("margin", "area", "at_chance", "status"), [
    ((0.10, 0.30), (0.05, 0.20), False, "agrees"),
    ((-0.30, -0.10), (-0.20, -0.05), False, "departs"),
    ((-0.05, 0.20), (0.00, 0.10), False, "inconclusive"),   # the margin's interval crosses 0
    ((0.10, 0.30), (0.05, 0.20), True, "inconclusive"),     # the model is at chance at every noisy scale
    ((0.10, 0.30), (-0.30, -0.10), False, "inconclusive"),  # the area between the curves says the opposite
])
def test_noise_verdict_outcomes(margin, area, at_chance, status):
    verdict = noise_verdict(noise_table(noise_rows("mlps", margin, area, at_chance=at_chance)))
    assert verdict.status == status
    # the text states the rule, the scale it picked, and the outcome per mechanism
    assert HALVING_RULE in verdict.text and "at 0.15×" in verdict.text and f"— {status}" in verdict.text


def test_noise_verdict_departs_if_any_mechanism_departs_and_agrees_only_if_all_agree():
    agree, depart = noise_rows("mlps", (0.1, 0.3), (0.05, 0.2)), noise_rows("relation_heads", (-0.3, -0.1), (-0.2, -0.1))
    unsure = noise_rows("subject_heads", (-0.1, 0.3), (0.0, 0.2))
    assert noise_verdict(noise_table(agree, depart)).status == "departs"
    assert noise_verdict(noise_table(agree, unsure)).status == "inconclusive"
    assert noise_verdict(noise_table(agree, noise_rows("subject_heads", (0.2, 0.4), (0.1, 0.3)))).status == "agrees"


def test_a_noise_table_from_before_the_rule_gets_no_verdict():
    old = noise_table(noise_rows("mlps", (0.1, 0.3), (0.05, 0.2))).drop(columns=[
        c for c in noise_table(noise_rows("mlps", (0.1, 0.3), (0.05, 0.2))).columns if "halved" in c or "area" in c])
    verdict = noise_verdict(old)
    assert verdict.status == "inconclusive" and "predates" in verdict.text


def trace_table(kept_ci: tuple[float, float], window_ci: tuple[float, float] = (0.40, 0.60)) -> pd.DataFrame:
    """causal_trace rows at the last subject token of a 3-layer model (window 4): the MLP window peaks at layer 0
    (layers 0–1, Δp 0.5), MLP0 alone recovers 0.3, the window without MLP0 (layer 1) 0.25, with the given
    intervals of the share it keeps and of the window's own effect."""
    effects = {"mlp": [0.5, 0.4, 0.1], "mlp_single": [0.3, 0.2, 0.05], "mlp_without_mlp0": [0.25, 0.4, 0.1]}
    windows = {"mlp": [(0, 1), (0, 2), (1, 2)], "mlp_single": [(0, 0), (1, 1), (2, 2)],
               "mlp_without_mlp0": [(1, 1), (1, 2), (1, 2)]}
    rows = []
    for kind, values in effects.items():
        for layer, value in enumerate(values):
            rows.append({
                "kind": kind, "layer": layer, "token": "last_subject", "level": "position",
                "first_layer": windows[kind][layer][0], "last_layer": windows[kind][layer][1], "indirect_effect": value,
                "peak_layer_low": 0.0, "peak_layer_high": 1.0,
                "peak_effect_low": window_ci[0] if kind == "mlp" else 0.2, "peak_effect_high": window_ci[1] if kind == "mlp" else 0.4,
                "mlp0_alone": 0.3, "mlp0_alone_low": 0.2, "mlp0_alone_high": 0.4,
                "peak_without_mlp0": 0.25, "peak_without_mlp0_low": 0.15, "peak_without_mlp0_high": 0.35,
                "peak_kept_without_mlp0": sum(kept_ci) / 2, "peak_kept_without_mlp0_low": kept_ci[0],
                "peak_kept_without_mlp0_high": kept_ci[1], "p_clean": 0.6, "p_corrupted": 0.05,
            })
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("kept", "window", "status"), [
    ((0.60, 0.80), (0.40, 0.60), "agrees"),        # most of the window's effect survives without MLP0
    ((0.10, 0.30), (0.40, 0.60), "departs"),       # the window is mostly MLP0
    ((0.30, 0.70), (0.40, 0.60), "inconclusive"),  # the share's interval straddles the line
    ((0.60, 0.80), (-0.05, 0.60), "inconclusive"),  # the window's own effect is not clearly above 0
])
def test_mlp0_verdict_outcomes(kept, window, status):
    verdict = mlp0_verdict(trace_table(kept, window))
    assert verdict.status == status
    assert f"more than {KEPT_WITHOUT_MLP0:.0%}" in verdict.text
    # worded from the numbers: MLP0 alone against the window, and the window's layers without MLP0
    assert "restoring MLP0 alone recovers Δp +0.300" in verdict.text and "of it" in verdict.text
    assert "layer 1 without MLP0 recover Δp +0.250" in verdict.text and "(layers 0–1)" in verdict.text


def test_a_trace_without_mlp0_kinds_gets_no_verdict():
    old = trace_table((0.6, 0.8))
    old = old[old["kind"] == "mlp"].drop(columns=[c for c in old.columns if "mlp0" in c])
    verdict = mlp0_verdict(old)
    assert verdict.status == "inconclusive" and "rerun `factscope trace" in verdict.text
