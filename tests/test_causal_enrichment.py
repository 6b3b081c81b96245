"""Subject enrichment: ranks of a and of the rest of R_r at the last subject token, and its summary."""

from __future__ import annotations

from causal_helpers import tiny

from factscope.causal.enrichment import enrichment_summary, subject_enrichment
from factscope.causal.trace import trace_effects, trace_table


def test_subject_enrichment(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    table = subject_enrichment(model, encoded)
    vocab = model.bridge.W_U.shape[1]
    assert list(table["layer"]) == list(range(model.cfg.n_layers))
    assert table["mean_rank_a"].between(1, vocab).all() and table["mean_rank_others"].between(1, vocab).all()
    summary = enrichment_summary(table, trace_table(trace_effects(model, encoded[:3], seeds=(0,), kinds=("mlp",))))
    assert 0 <= summary["mlp_trace_peak_layer"] < model.cfg.n_layers
