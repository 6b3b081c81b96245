"""Attribute extraction rate, and the logit lens it reads sublayers through."""

from __future__ import annotations

import torch
from causal_helpers import tiny

from factscope.causal.extraction import extraction_rate
from factscope.causal.scores import logit_lens
from factscope.forward import capture, make_batch


def test_extraction_rate(model_dirs):
    model, encoded = tiny(model_dirs, "gemma3")
    table = extraction_rate(model, encoded)
    assert len(table) == 2 * model.cfg.n_layers
    assert table["extraction_rate"].between(0, 1).all() and table["attribute_rate"].between(0, 1).all()
    assert (table["extraction_rate_top_k"] >= table["extraction_rate"]).all()
    everything = extraction_rate(model, encoded, top_k=model.bridge.W_U.shape[1])
    assert (everything["extraction_rate_top_k"] == 1.0).all()


def test_logit_lens_of_the_final_residual_is_the_output(model_dirs):
    model, encoded = tiny(model_dirs, "gpt2")
    batch = make_batch(model, encoded)
    store = {}
    logits = batch.logits(model, [capture(store, "blocks.2.hook_resid_post", at_end=batch.ends)])
    torch.testing.assert_close(logit_lens(model, store["blocks.2.hook_resid_post"]), logits, atol=1e-4, rtol=0)
