"""Causal tracing: zero noise has zero effect, seeds are deterministic, and the stacked, resumed, chunked
restorations equal one plain forward pass per restoration."""

from __future__ import annotations

import pytest
import torch
from causal_helpers import tiny

from factscope.causal.sites import layer_window
from factscope.causal.trace import subject_noise, trace_effects, trace_passes, trace_peaks, trace_table
from factscope.forward import capture, make_batch


def test_tracing_with_zero_noise_has_zero_effect(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    trace = trace_effects(model, encoded[:4], noise=0.0, seeds=(0,))
    assert float(trace.effects.abs().max()) < 1e-6
    table = trace_table(trace)
    assert table["indirect_effect"].abs().max() < 1e-6


def test_tracing_is_deterministic_per_seed(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    first = trace_effects(model, encoded[:4], seeds=(3,), kinds=("resid",))
    again = trace_effects(model, encoded[:4], seeds=(3,), kinds=("resid",))
    other = trace_effects(model, encoded[:4], seeds=(4,), kinds=("resid",))
    assert torch.equal(first.effects, again.effects) and torch.equal(first.p_corrupted, again.p_corrupted)
    assert not torch.equal(first.p_corrupted, other.p_corrupted)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stacked_restorations_match_one_forward_per_restoration(model_dirs, family):
    """The batched, resumed-in-the-middle, chunked restorations against the plain way: one full forward with
    the noise and one restored state."""
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    trace = trace_effects(model, encoded, noise=3.0, seeds=(1,), window=2, max_rows=40)
    noise = subject_noise(batch, trace.noise_std, 1, model.cfg.d_model)
    store = {}
    names = [f"blocks.{layer}.{hook}" for layer in range(3) for hook in ("hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    batch.logits(model, [capture(store, name) for name in names])
    row = 5
    item = encoded[row]
    first_subject = item.groups.index("subject")
    for kind, layer, pos in [("resid", 0, first_subject), ("resid", 1, item.end), ("attn", 1, first_subject + 1), ("mlp", 0, first_subject), ("mlp", 2, item.end - 1)]:
        hook_name = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}[kind]
        first, last = (layer, layer) if kind == "resid" else layer_window(layer, 2, 3)

        def restore(x, hook, name=None):
            x = x.clone()
            x[row, pos] = store[name][row, pos]
            return x

        hooks = [("hook_embed", lambda x, hook: x + noise)]
        for j in range(first, last + 1):
            name = f"blocks.{j}.{hook_name}"
            hooks.append((name, lambda x, hook, name=name: restore(x, hook, name)))
        p = batch.logits(model, hooks).softmax(-1)[row, item.attribute_token]
        expected = float(p - trace.p_corrupted[0, row])
        got = float(trace.effects[0, trace.kinds.index(kind), layer, row, pos])
        assert got == pytest.approx(expected, abs=1e-6), (kind, layer, pos)
    assert (trace.effects[..., :first_subject] == 0).all()


def test_trace_table(model_dirs):
    model, encoded = tiny(model_dirs, "gpt2")
    calls = []
    table = trace_table(trace_effects(model, encoded, seeds=(0, 1), progress=calls.append))
    assert sum(calls) == trace_passes(3, seeds=(0, 1))
    tokens = {"first_subject", "last_subject", "further_tokens", "last_token", "subject", "relation", "prefix", "bos"}
    assert tokens <= set(table["token"]) and set(table["kind"]) == {"resid", "attn", "mlp"}
    assert not table.duplicated(["kind", "layer", "token"]).any()
    prefix = table[table["token"].isin(["bos", "prefix"])]
    assert (prefix["indirect_effect"] == 0).all()  # the noise cannot reach positions before the subject
    # restoring END's residual after the last layer restores the clean output exactly
    end = table[(table["kind"] == "resid") & (table["layer"] == 2) & (table["token"] == "last_token")].iloc[0]
    assert end["indirect_effect"] == pytest.approx(end["p_clean"] - end["p_corrupted"], abs=1e-6)
    peaks = trace_peaks(table)
    assert len(peaks) == table.groupby(["kind", "token"]).ngroups
