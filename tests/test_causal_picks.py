"""Numbers picked from candidates carry intervals that re-pick them in every bootstrap resample (causal tracing's
peaks, MLP0 apart from the peak MLP window, the knockout's worst window, the extraction rate's best layer), and
the noise check is read at the scale a rule stated in advance picks. Hand-built arrays, so that every expected
number is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from causal_helpers import tiny

from factscope import bootstrap
from factscope.causal.enrichment import enrichment_summary, subject_enrichment
from factscope.causal.extraction import best_layer_intervals, extraction_rate, extraction_summary
from factscope.causal.knockout import knockout, knockout_summary, worst_window_intervals
from factscope.causal.noise import halving_columns, noise_summary
from factscope.causal.trace import TraceEffects, _peak_intervals, trace_effects, trace_peaks, trace_summary, trace_table
from factscope.causal_readings import mlp0_split
from factscope.forward import make_batch


def test_trace_peak_intervals_re_pick_the_layer():
    """Two layers whose prompts take turns at being larger: the peak's layer moves between them from resample to
    resample, so its interval spans both; a clear peak's interval is its own layer."""
    prompts = 40
    alternating = np.where(np.arange(prompts) % 2 == 0, 1.0, 0.0)
    summed = np.stack([np.stack([0.5 + 0.4 * alternating, 0.9 - 0.4 * alternating, np.zeros(prompts)]),  # a tie
                       np.stack([np.zeros(prompts), np.ones(prompts), np.zeros(prompts)])])  # layer 1, clearly
    out = _peak_intervals(summed, np.ones(prompts))
    assert (out["peak_layer_low"][0], out["peak_layer_high"][0]) == (0.0, 1.0)
    assert (out["peak_layer_low"][1], out["peak_layer_high"][1]) == (1.0, 1.0)
    # the re-picked peak effect is the larger of two noisy means: at least each one's resampled mean, resample by resample
    weights = bootstrap.resample_weights(prompts)
    fixed = bootstrap.interval(weights @ summed[0, 0])
    assert out["peak_effect_low"][0] >= fixed[0] - 1e-12 and out["peak_effect_high"][0] >= fixed[1] - 1e-12


def _mlp0_trace(model_dirs, window_effect, single_effect, without_effect, prompts: int = 12, spread: float = 0.02):
    """A synthetic trace of the three MLP kinds with the given per-layer effects at each prompt's last subject token
    (plus a seeded wobble of width `spread`, independent per kind, layer and prompt), on the tiny Llama's batch."""
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded[:prompts])
    kinds = ("mlp", "mlp_single", "mlp_without_mlp0")
    effects = torch.zeros((1, 3, 3, *batch.tokens.shape))
    wobble = (torch.rand((3, 3, len(batch)), generator=torch.Generator().manual_seed(0)) - 0.5) * spread
    for row, item in enumerate(batch.items):
        last = item.subject_positions[-1]
        for k, values in enumerate((window_effect, single_effect, without_effect)):
            effects[0, k, :, row, last] = torch.tensor(values) + wobble[k, :, row]
    trace = TraceEffects(effects, torch.ones(len(batch)), torch.zeros(1, len(batch)), 1.0, kinds, 4, batch)
    return trace_table(trace)


def test_mlp0_split_reads_the_peak_window_with_and_without_mlp0(model_dirs):
    table = _mlp0_trace(model_dirs, [0.5, 0.3, 0.1], [0.4, 0.05, 0.02], [0.1, 0.3, 0.1], spread=0.0)
    split = mlp0_split(table)
    assert split["window"]["layer"] == 0 and split["window"]["layers"] == [0, 1]
    assert split["window"]["effect"] == pytest.approx(0.5) and split["mlp0_alone"]["effect"] == pytest.approx(0.4)
    # window 4 around layer 0 is layers 0–1: without MLP0 it is layer 1 alone
    assert split["without_mlp0"]["layers"] == [1, 1] and split["without_mlp0"]["effect"] == pytest.approx(0.1)
    assert split["without_mlp0"]["kept_share"] == pytest.approx(0.2)
    assert split["best_single_layer"]["layer"] == 0
    # no spread over prompts: every resample gives the same numbers, and the intervals are points
    assert split["without_mlp0"]["effect_ci"] == pytest.approx([0.1, 0.1])
    assert split["without_mlp0"]["kept_share_ci"] == pytest.approx([0.2, 0.2])
    summary = trace_summary(table, trace_peaks(table))
    assert summary["mlp0"] == split


def test_mlp0_split_re_picks_the_window_in_every_resample(model_dirs):
    """Windows at layers 0 and 1 nearly tied: the share kept without MLP0 is read at whichever peaks in each
    resample, so its interval reaches both layers' shares (0.2 at layer 0, 1.0 at layer 1)."""
    table = _mlp0_trace(model_dirs, [0.5, 0.5, 0.1], [0.4, 0.05, 0.02], [0.1, 0.5, 0.1], spread=0.2)
    split = mlp0_split(table)
    low, high = split["without_mlp0"]["kept_share_ci"]
    assert low < 0.3 and high > 0.9


def test_trace_summary_and_enrichment_carry_mlp0_on_a_tiny_model(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    table = trace_table(trace_effects(model, encoded[:6], seeds=(0,), window=2))
    split = trace_summary(table, trace_peaks(table))["mlp0"]
    mlp = table[(table["kind"] == "mlp") & (table["token"] == "last_subject")]
    single = table[(table["kind"] == "mlp_single") & (table["token"] == "last_subject") & (table["layer"] == 0)]
    assert split["window"]["effect"] == pytest.approx(mlp["indirect_effect"].max())
    assert split["mlp0_alone"]["effect"] == pytest.approx(float(single["indirect_effect"].iloc[0]))
    for entry in (split["window"], split["mlp0_alone"], split["without_mlp0"]):
        low, high = entry["effect_ci"]
        assert low <= high
    enrichment = enrichment_summary(subject_enrichment(model, encoded[:6]), table)
    assert enrichment["mlp0"] == split and len(enrichment["mlp_trace_peak_layer_ci"]) == 2


def test_knockout_worst_window_is_re_picked():
    """Windows 1 and 2 nearly tied for worst: the worst window's centre moves between them over the resamples; its
    size's interval is that of the minimum, below either window's own."""
    prompts = 60
    generator = np.random.default_rng(0)
    changes = np.stack([np.full(prompts, -0.1), -0.5 + generator.normal(0, 0.3, prompts),
                        -0.5 + generator.normal(0, 0.3, prompts), np.zeros(prompts)])
    out = worst_window_intervals(changes, np.arange(4))
    assert (out["worst_layer_low"], out["worst_layer_high"]) == (1.0, 2.0)
    weights = bootstrap.resample_weights(prompts)
    own = [bootstrap.interval(weights @ changes[w]) for w in (1, 2)]
    assert out["worst_rel_change_p_high"] <= min(high for _, high in own) + 1e-12
    # a prompt with p_before 0 (NaN change) is left out, not propagated
    changes[0, 0] = np.nan
    assert np.isfinite(list(worst_window_intervals(changes, np.arange(4)).values())).all()


def test_knockout_summary_reports_the_re_picked_worst_window(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    table = knockout(model, encoded, window=2)
    summary = knockout_summary(table)
    entry = summary["subject_worst_window"]
    windows = table[(table["condition"] == "window") & (table["blocked"] == "subject")]
    assert entry["layer"] == int(windows.loc[windows["rel_change_p"].idxmin(), "layer"])
    low, high = entry["layer_ci"]
    assert 0 <= low <= high < model.cfg.n_layers
    picked = entry["picked_rel_change_p_ci"]
    assert picked[0] <= picked[1] and picked[0] <= entry["rel_change_p_ci"][0] + 1e-9


def test_extraction_best_layer_is_re_picked_and_absent_where_nothing_extracts(model_dirs):
    events = np.zeros((4, 30))
    events[1, :15] = 1
    events[2, 10:26] = 1  # layers 1 and 2 nearly tied
    out = best_layer_intervals(events)
    assert (out["best_layer_low"], out["best_layer_high"]) == (1.0, 2.0)
    nothing = best_layer_intervals(np.zeros((4, 30)))
    assert np.isnan(nothing["best_layer_low"]) and nothing["best_rate_high"] == 0
    table = pd.DataFrame({"layer": [0, 1], "sublayer": ["mlp", "mlp"], "extraction_rate": [0.0, 0.0],
                          "attribute_rate": [0.0, 0.0], **{name: [value] * 2 for name, value in nothing.items()}})
    assert extraction_summary(table)["mlp"]["layer"] is None
    model, encoded = tiny(model_dirs, "gpt2")
    summary = extraction_summary(extraction_rate(model, encoded))
    for entry in summary.values():
        assert len(entry["extraction_rate_ci"]) == 2


def _noise_curves(accuracy, model_first, alone_first, prompts: int = 50, spread: float = 0.0, seed: int = 0):
    """[scale, prompt] arrays whose means are the given curves (each prompt's value the curve plus a seeded
    wobble of `spread`, clipped to [0, 1])."""
    generator = np.random.default_rng(seed)

    def of(curve):
        return np.clip(np.asarray(curve, dtype=float)[:, None] + generator.normal(0, spread, (len(curve), prompts)), 0, 1)

    return of(accuracy), of(model_first), of(alone_first)


SCALES = np.array([0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0])


def test_halving_rule_picks_the_first_grid_scale_at_half_the_clean_accuracy():
    accuracy = [1.0, 0.9, 0.7, 0.5, 0.2, 0.0, 0.0, 0.0]
    model_first = [1.0, 0.95, 0.9, 0.8, 0.6, 0.3, 0.3, 0.3]
    alone_first = [0.9, 0.7, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3]
    out = halving_columns(SCALES, *_noise_curves(accuracy, model_first, alone_first))
    assert out["accuracy_halved"] and out["halved_scale"] == 0.15  # 0.5 ≤ 1.0 / 2 first at 0.15, not interpolated
    assert out["margin_at_halved"] == pytest.approx(0.4)
    margin = np.subtract(model_first, alone_first)[:4]
    assert out["margin_area"] == pytest.approx(np.trapezoid(margin, SCALES[:4]) / 0.15)
    # identical prompts: every resample picks the same scale
    assert (out["halved_scale_low"], out["halved_scale_high"]) == (0.15, 0.15)


def test_halving_rule_falls_back_to_the_largest_scale_and_re_picks_per_resample():
    never = halving_columns(SCALES, *_noise_curves([1.0] * 8, [1.0] * 8, [0.5] * 8))
    assert not never["accuracy_halved"] and never["halved_scale"] == 2.0
    # accuracy right at half between 0.1 and 0.15: resamples disagree on which scale is first at half
    wobbly = halving_columns(SCALES, *_noise_curves([1.0, 0.8, 0.52, 0.48, 0.2, 0, 0, 0], [1.0] * 8, [0.5] * 8,
                                                   spread=0.3))
    assert wobbly["halved_scale_low"] < wobbly["halved_scale_high"]
    no_clean = halving_columns(SCALES[1:], *_noise_curves([1.0] * 7, [1.0] * 7, [0.5] * 7))
    assert np.isnan(no_clean["halved_scale"]) and not no_clean["accuracy_halved"]


def test_noise_summary_reads_at_the_halved_scale(model_dirs):
    from causal_helpers import tiny as tiny_model

    from factscope.causal.noise import noise_robustness
    from factscope.causal.sites import MlpPath

    model, encoded = tiny_model(model_dirs, "llama")
    table = noise_robustness(model, encoded, {"mlp": [MlpPath(1), MlpPath(2)]}, scales=(0.0, 0.1, 1.0), seeds=(0,))
    assert {"halved_scale", "margin_at_halved_low", "margin_area_high", "chance_first_among_r"} <= set(table.columns)
    reading = noise_summary(table)["mlp"]["at_halved"]
    assert reading["halved_scale"] in (0.1, 1.0) and "half its clean" in reading["rule"]
    assert 0 < reading["chance_first_among_r"] < 1
