"""Attribution patching: exact to first order (small noise), its error statistics, the sampled exact check, and
`trace --method atp|both` through the checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from causal_helpers import tiny

from factscope.causal import atp, trace_checks
from factscope.causal.trace import trace_effects
from factscope.forward import make_batch


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_atp_is_exact_to_first_order(model_dirs, family):
    """With little noise a restoration is a small change, so AtP's error (second order) is small against the
    effects themselves (first order), for single-layer restorations; zeros where the exact trace restores nothing.
    (Windows of several layers add the documented path counted twice.)"""
    model, encoded = tiny(model_dirs, family)
    options = dict(noise=0.01, seeds=(1,), window=1)
    exact = trace_effects(model, encoded, **options)
    estimate = atp.atp_trace(model, encoded, **options, chunk=5)
    assert torch.allclose(estimate.p_corrupted, exact.p_corrupted, atol=1e-6)
    table = atp.full_agreement(exact, {"atp": estimate}).set_index("kind")
    assert table.loc["all", "pearson"] > 0.999
    assert table.loc["all", "max_abs_error"] < 0.05 * float(exact.effects.abs().max())
    first = encoded[0].groups.index("subject")
    assert (estimate.effects[..., 0, :first] == 0).all()


def full_width_atp(model, encoded, noise_scale: float, dropped: int | None) -> torch.Tensor:
    """AtP of every residual restoration by its definition, every prompt at full width in one plain forward (no
    cache): (clean − corrupted) · ∂Σp(a)/∂resid, with layer `dropped`'s attention and MLP outputs detached (None:
    none), [layer, batch, pos]."""
    from factscope.causal.trace import _clean_states, subject_noise
    from factscope.forward import act_name

    batch = make_batch(model, encoded)
    clean, std = _clean_states(model, batch, ("resid",))
    noise = subject_noise(batch, noise_scale * std, 0, model.cfg.d_model)
    names = [act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    store = {}
    hooks = [(act_name("embed"), lambda x, hook: (x + noise).detach().requires_grad_(True)),
             *((act_name(site, dropped), lambda x, hook: x.detach()) for site in ("attn_out", "mlp_out")
               if dropped is not None),
             *((name, lambda x, hook, name=name: store.__setitem__(name, x)) for name in names)]
    hooks.append((act_name("final_out"), lambda x, hook: store.__setitem__("normed", x[batch.rows, batch.ends])))
    with torch.enable_grad():
        model.bridge.run_with_hooks(batch.tokens, attention_mask=batch.mask, fwd_hooks=hooks)
        p = (store["normed"] @ model.W_U + model.b_U).float().softmax(-1)[batch.rows, batch.answers]
        grads = torch.autograd.grad(p.sum(), [store[n] for n in names])
    return torch.stack([((clean[name] - store[name].detach()) * grad).sum(-1) for name, grad in zip(names, grads)])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "neox", "qwen2"])
def test_atp_and_graddrop_equal_the_full_width_definition(model_dirs, family):
    """AtP and GradDrop from one recorded pass of the subject-to-END tokens (the prefix from the clean run's keys
    and values; a gate per layer, L backward passes) equal the definitions computed the slow way, every prompt at
    full width: AtP from one plain forward; GradDrop from a separate forward per layer ℓ in which layer ℓ's
    attention and MLP outputs are detached, its AtP of every residual restoration, then Σ_ℓ |·| / (L − 1)."""
    model, encoded = tiny(model_dirs, family)
    n_layers = model.cfg.n_layers
    restorable = atp._restorable(make_batch(model, encoded))
    plain = atp.atp_trace(model, encoded, noise=3.0, seeds=(0,), window=1, kinds=("resid",), chunk=5)
    assert torch.allclose(plain.effects[0, 0], full_width_atp(model, encoded, 3.0, None) * restorable, atol=1e-6)
    expected = sum(full_width_atp(model, encoded, 3.0, dropped).abs() for dropped in range(n_layers)) / (n_layers - 1)
    got = atp.atp_trace(model, encoded, noise=3.0, seeds=(0,), window=1, kinds=("resid",), chunk=5, graddrop=True)
    assert torch.allclose(got.effects[0, 0], expected * restorable, atol=1e-6)
    # the last layer's residual is downstream of every gate: all L estimates are AtP's, so GradDrop = L/(L−1)·|AtP|
    last = plain.effects[0, 0, -1].abs() * n_layers / (n_layers - 1)
    assert torch.allclose(got.effects[0, 0, -1], last, atol=1e-7)
    assert not torch.allclose(got.effects[0, 0, 0], plain.effects[0, 0, 0].abs() * n_layers / (n_layers - 1), rtol=1e-2, atol=0)


def test_atp_from_the_subject_on_keeps_sliding_windows_and_subjects_at_position_zero(tmp_path, monkeypatch):
    """Gemma-3 with a sliding window shorter than the prompts and layer types that differ between neighbours,
    without BOS, and half the prompts starting with their subject (no prefix to reuse, beside rows with one in the
    same chunk): AtP still equals its full-width definition."""
    from dataclasses import replace

    import tiny_models
    from causal_helpers import _tiny

    from factscope.data import encode

    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    monkeypatch.setitem(tiny_models.FAMILIES, "gemma3", dict(tiny_models.FAMILIES["gemma3"], layer_types=layer_types, sliding_window=3))
    model, encoded = _tiny(str(tiny_models.build_model_dir("gemma3", tmp_path / "gemma3-mixed")))
    facts = [item.fact for item in encoded]
    facts = [replace(fact, prompt=fact.prompt.removeprefix("Fact: ")) if i % 2 and
             fact.prompt.removeprefix("Fact: ").startswith(fact.subject) else fact for i, fact in enumerate(facts)]
    encoded = [encode(fact, model.tokenizer, prepend_bos=False) for fact in facts]
    starts = [item.subject_positions[0] for item in encoded]
    assert 0 in starts and max(starts) > 0 and max(len(item.token_ids) for item in encoded) > 2 * 3
    got = atp.atp_trace(model, encoded, noise=3.0, seeds=(0,), window=1, kinds=("resid",), chunk=5)
    expected = full_width_atp(model, encoded, 3.0, None) * atp._restorable(make_batch(model, encoded))
    assert torch.allclose(got.effects[0, 0], expected, atol=1e-6) and expected.abs().max() > 0


def test_agreement_statistics():
    generator = torch.Generator().manual_seed(0)
    exact = torch.rand((2, 3, 4, 5), generator=generator) * 0.2
    cells = torch.ones(exact.shape, dtype=torch.bool)
    perfect = atp.agreement(exact, exact, cells, ("resid", "mlp"), sampled=False).set_index("kind")
    assert np.allclose(perfect[["pearson", "spearman", "top_k_overlap"]].to_numpy(dtype=float), 1.0)
    assert (perfect["false_negatives"] == 0).all() and perfect.loc["all", "n_cells"] == exact.numel()
    missed = exact.clone()
    big = exact >= atp.THRESHOLD
    missed[0, 0, 0, 0] = 0.0
    exact[0, 0, 0, 0] = 0.19  # above the threshold, AtP gives nothing
    table = atp.agreement(exact, missed, cells, ("resid", "mlp"), sampled=False).set_index("kind")
    assert table.loc["resid", "false_negatives"] == 1 and table.loc["mlp", "false_negatives"] == 0
    assert table.loc["all", "n_exact_above"] == int(big.sum()) + (not bool(big[0, 0, 0, 0]))
    assert np.isnan(atp.agreement(exact, torch.zeros_like(exact), cells, ("resid", "mlp"), False)["pearson"]).all()


def test_sampled_exact_check_matches_the_full_trace(model_dirs):
    """The sample's exact effects are the exact trace's on those cells; the sample holds AtP's top cells."""
    model, encoded = tiny(model_dirs, "llama")
    options = dict(noise=3.0, seeds=(0, 1), window=2)
    exact = trace_effects(model, encoded, **options)
    estimate = atp.atp_trace(model, encoded, **options)
    cells = atp.sample_cells(estimate.effects.mean(0), atp._restorable(make_batch(model, encoded)))
    assert int(cells[0].sum()) == atp.N_TOP + atp.N_RANDOM
    got = atp.exact_cells(model, estimate, cells, (0, 1), 3.0)
    # exact tracing restores MLP0 apart too (single MLP layers, windows without MLP0): AtP's kinds come first
    assert exact.kinds[: len(estimate.kinds)] == estimate.kinds
    assert torch.allclose(got[cells], exact.effects.mean(0)[: len(estimate.kinds)][cells], atol=1e-7)
    assert (got[~cells] == 0).all()
    top = torch.argmax(estimate.effects.mean(0)[1].flatten())
    assert cells[1].flatten()[top]


@pytest.mark.parametrize("method, graddrop", [("atp", False), ("both", False), ("atp", True), ("both", True)])
def test_trace_methods_write_their_tables(model_dirs, method, graddrop):
    model, encoded = tiny(model_dirs, "gpt2")
    calls = []
    tables, summary = trace_checks(model, encoded[:6], seeds=(0,), window=2, method=method, graddrop=graddrop,
                                   progress=lambda label, total: _Bar(calls, total))
    expected = {"atp_trace", "atp_agreement"} | ({"causal_trace", "trace_peaks"} if method == "both" else set())
    assert set(tables) == expected
    agreement = tables["atp_agreement"]
    estimators = ["atp", "graddrop"] if graddrop else ["atp"]
    assert list(agreement["kind"]) == ["resid", "attn", "mlp", "all"] * len(estimators)
    assert list(agreement["estimator"].drop_duplicates()) == estimators
    assert bool(agreement["sampled"].all()) == (method == "atp")
    # both estimators are checked on the same cells: with a sample, the union of each one's top cells and the draw
    assert agreement.groupby("kind")["n_cells"].nunique().eq(1).all()
    line = summary["trace"]["atp_agreement"]
    assert line["n_cells"] == int(agreement["n_cells"].iloc[3]) and summary["trace"]["method"] == method
    assert ("graddrop" in line) == graddrop and summary["trace"]["graddrop"] == graddrop
    assert set(tables["atp_trace"].columns) >= {"kind", "layer", "token", "indirect_effect", "sem"}
    assert calls and calls[0][0] == calls[0][1]  # every announced pass ticked


class _Bar:
    def __init__(self, calls, total):
        self.calls, self.total, self.done = calls, total, 0

    def __enter__(self):
        return self.advance

    def advance(self, n):
        self.done += n

    def __exit__(self, *exc):
        self.calls.append((self.done, self.total))
