"""Attribution patching of `ablate`'s paths: exact for direct effects (linear), first-order exact for total
effects of small edits, the sampled exact check, and `ablate --method atp|both` through the checks."""

from __future__ import annotations

import pytest
import torch
from causal_helpers import tiny

from factscope.causal import ablate_checks, atp_paths
from factscope.causal.sites import HeadPath, MlpPath
from factscope.forward import make_batch

FAMILIES = ["llama", "gemma3", "gpt2"]  # RMSNorm; RMSNorm with attention post-norm and GQA; LayerNorm with biases


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_atp_of_the_direct_effect_is_exact(model_dirs, family, mode):
    """The direct effect is linear in the removed vector (final-norm scale frozen), so AtP equals exact direct
    path ablation on every path and prompt, across chunks (the mean is over all prompts, not per chunk)."""
    model, encoded = tiny(model_dirs, family)
    total, direct = atp_paths.atp_path_effects(model, encoded, mode, chunk=5)
    exact = atp_paths.exact_path_effects(model, encoded, direct.present, mode, effect="direct")
    finite = torch.isfinite(direct.effects)
    assert finite.any()
    assert torch.allclose(direct.effects[finite], exact.effects[finite], atol=1e-5)
    assert direct.effects[finite].abs().max() > 1e-3  # not trivially zero (tiny Gemma's largest is ~1.5e-3)
    # every head of every layer, each present group once, one MLP per layer
    kinds = atp_paths.path_kinds(model)
    assert direct.present[kinds.index("mlp")].sum() == model.cfg.n_layers
    assert direct.present[kinds.index("subject")].all()


def test_atp_of_the_total_effect_is_first_order_exact(model_dirs):
    """With every path scaled towards its mean (a small edit), AtP's total effect matches exact ablation to
    first order; at full size it does not have to, and the table says by how much."""
    model, encoded = tiny(model_dirs, "llama")
    total, _ = atp_paths.atp_path_effects(model, encoded, "mean")
    exact = atp_paths.exact_path_effects(model, encoded, total.present, "mean")
    table = atp_paths.path_agreement(exact, total, total.present, sampled=False).set_index("kind")
    assert table.loc["all", "n_cells"] == int(torch.isfinite(total.effects)[total.present].sum())
    # random tiny models are nearly linear: AtP tracks the exact total effect closely, but not exactly
    assert table.loc["all", "pearson"] > 0.9
    assert table.loc["all", "max_abs_error"] > 1e-6


def test_the_sample_holds_the_top_paths_and_its_exact_effects_are_the_full_ones(model_dirs):
    model, encoded = tiny(model_dirs, "gpt2")
    total, _ = atp_paths.atp_path_effects(model, encoded, "mean")
    chosen = atp_paths.sample_paths(total)
    kinds = total.kinds
    assert int(chosen[kinds.index("mlp")].sum()) == min(atp_paths.N_TOP + atp_paths.N_RANDOM, model.cfg.n_layers)
    assert not (chosen & ~total.present).any()
    drop = -total.effects.nan_to_num().mean(-1)
    k = kinds.index("subject")
    assert chosen[k].flatten()[torch.argmax(drop[k].flatten())]
    sampled = atp_paths.exact_path_effects(model, encoded, chosen, "mean")
    full = atp_paths.exact_path_effects(model, encoded, total.present, "mean")
    assert torch.allclose(sampled.effects[chosen], full.effects[chosen], atol=1e-6)
    assert (sampled.effects[~chosen] == 0).all()


def test_exact_path_effects_are_the_ablation_of_that_path(model_dirs):
    """A path's exact effect is `ablated_logits` of that path alone (the helper indexes kinds and heads right)."""
    from factscope.causal.ablation import ablated_logits
    from factscope.causal.scores import other_targets, scores
    from factscope.data import relation_targets

    model, encoded = tiny(model_dirs, "llama")
    kinds = atp_paths.path_kinds(model)
    chosen = torch.zeros((len(kinds), model.cfg.n_layers, model.cfg.n_heads), dtype=torch.bool)
    chosen[kinds.index("relation"), 1, 2] = chosen[kinds.index("mlp"), 0, 0] = True
    got = atp_paths.exact_path_effects(model, encoded, chosen, "zero")
    batch = make_batch(model, encoded)
    others = other_targets(batch, relation_targets(encoded))
    clean = scores(batch.logits(model), batch, others)["logit_diff"]
    for path, (k, layer, head) in ((HeadPath(1, 2, "relation"), (kinds.index("relation"), 1, 2)), (MlpPath(0), (kinds.index("mlp"), 0, 0))):
        want = scores(ablated_logits(model, batch, [path], "zero"), batch, others)["logit_diff"] - clean
        assert torch.allclose(got.effects[k, layer, head], torch.from_numpy(want), atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("method", ["exact", "atp", "both"])
def test_ablate_methods_write_their_tables(model_dirs, method):
    import pandas as pd

    model, encoded = tiny(model_dirs, "llama")
    heads = pd.DataFrame({"layer": [0, 1], "head": [0, 1], "class": ["subject", "relation"]})
    calls = []
    tables, summary = ablate_checks(model, encoded, heads, noise_scales=(0.0, 1.0), seeds=(0,), window=1, method=method,
                                    progress=lambda label, total: _Bar(calls, label, total))
    has = {"path_ablations", "atp_path_agreement"} <= set(tables)
    assert has == (method != "exact") and ("path_ablations" in summary) == (method != "exact")
    assert all(done == total for _, done, total in calls)  # every announced pass ticked, no empty bar
    if method == "exact":
        return
    agreement = tables["atp_path_agreement"]
    assert list(agreement["kind"]) == [*atp_paths.path_kinds(model), "all"]
    assert bool(agreement["sampled"].all()) == (method == "atp")
    line = summary["path_ablations"]["atp_agreement"]
    assert line["n_cells"] == int(agreement["n_cells"].iloc[-1]) and line["threshold"] == atp_paths.THRESHOLD
    paths = tables["path_ablations"]
    n_paths = int(len(paths[(paths["method"] == "atp") & (paths["effect"] == "total")]))
    assert n_paths == (len(atp_paths.path_kinds(model)) - 1) * model.cfg.n_layers * model.cfg.n_heads + model.cfg.n_layers
    n_exact = int((paths["method"] == "exact").sum())
    assert n_exact <= n_paths and (method == "atp" or n_exact == n_paths)  # a tiny model's sample may hold them all


class _Bar:
    def __init__(self, calls, label, total):
        self.calls, self.label, self.total, self.done = calls, label, total, 0

    def __enter__(self):
        return self.advance

    def advance(self, n):
        self.done += n

    def __exit__(self, *exc):
        self.calls.append((self.label, self.done, self.total))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_cached_exact_ablation_is_the_full_pass(model_dirs, family, mode):
    """END alone from the path's layer up, earlier positions from the clean cache, gives what a full pass with
    the edit gives (`ablated_logits`), on every path."""
    model, encoded = tiny(model_dirs, family)
    present = atp_paths.present_paths(model, encoded)
    fast = atp_paths.exact_path_effects(model, encoded, present, mode, max_rows=7)  # several chunks per END position
    slow = atp_paths.exact_path_effects(model, encoded, present, mode, kv_cache=False)
    assert torch.allclose(fast.effects, slow.effects, atol=1e-5, equal_nan=True)
    assert slow.effects.nan_to_num().abs().max() > 1e-3


def test_a_pass_started_mid_model_keeps_each_layers_attention_type(tmp_path, monkeypatch):
    """Gemma-3 picks each layer's rotary embedding (local or global) and mask by its index in the layer list: a
    pass started at block l must give block l its own type, not layer 0's. With layer types that differ between
    neighbours, the cached END-only ablation (which starts at the path's layer) still equals the full pass."""
    import tiny_models
    from causal_helpers import _tiny

    spec = dict(tiny_models.FAMILIES["gemma3"], layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    monkeypatch.setitem(tiny_models.FAMILIES, "gemma3", spec)
    model, encoded = _tiny(str(tiny_models.build_model_dir("gemma3", tmp_path / "gemma3-mixed")))
    assert list(model.bridge.original_model.config.layer_types) == spec["layer_types"]
    present = atp_paths.present_paths(model, encoded)
    fast = atp_paths.exact_path_effects(model, encoded, present, "mean")
    slow = atp_paths.exact_path_effects(model, encoded, present, "mean", kv_cache=False)
    assert torch.allclose(fast.effects, slow.effects, atol=1e-5, equal_nan=True)
