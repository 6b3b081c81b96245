"""Attribute extraction rate, and the logit lens it reads sublayers through."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from causal_helpers import tiny

from factscope.causal.extraction import extraction_rate, extraction_summary
from factscope.causal.scores import model_lens
from factscope.end_maths import lens_logits
from factscope.forward import capture, make_batch


def test_extraction_rate(model_dirs):
    model, encoded = tiny(model_dirs, "gemma3")
    table = extraction_rate(model, encoded)
    assert len(table) == 2 * model.cfg.n_layers
    assert table["extraction_rate"].between(0, 1).all() and table["attribute_rate"].between(0, 1).all()
    for suffix in ("", "_normed"):
        assert table[f"extraction_rate{suffix}"].between(0, 1).all() and table[f"attribute_rate{suffix}"].between(0, 1).all()
        assert (table[f"extraction_rate_top_k{suffix}"] >= table[f"extraction_rate{suffix}"]).all()
    # Geva et al.'s per-example rate: extracted at some layer — at least the best layer's rate, one value per sublayer
    for _, rows in table.groupby("sublayer"):
        assert rows["any_layer_rate"].nunique() == 1 and rows["any_layer_rate"].iloc[0] <= 1
        assert rows["any_layer_rate"].iloc[0] >= rows["extraction_rate"].max() - 1e-6  # the table is float32
        assert rows["any_layer_rate"].iloc[0] <= rows["extraction_rate"].sum() + 1e-9  # a union is at most the sum
        everything = extraction_rate(model, encoded, top_k=model.bridge.W_U.shape[1])
    assert (everything["extraction_rate_top_k"] == 1.0).all() and (everything["extraction_rate_top_k_normed"] == 1.0).all()


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_extraction_rate_projects_with_the_raw_unembedding_and_keeps_the_normed_reading(model_dirs, family):
    """Geva et al.'s projection is the sublayer output times W_U, no final norm; through the final norm (the logit
    lens) is the second column. The two differ where the norm has a gain or a bias, as in both these models."""
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    store = {}
    predicted = batch.logits(model, [capture(store, "blocks.1.hook_attn_out", at_end=batch.ends)]).argmax(-1)
    output = store["blocks.1.hook_attn_out"]
    raw = (output.float() @ model.W_U.float()).argmax(-1)
    normed = lens_logits(output, model_lens(model)).argmax(-1)
    row = extraction_rate(model, encoded).set_index(["layer", "sublayer"]).loc[(1, "attn")]
    assert row["extraction_rate"] == float((raw == predicted).float().mean())
    assert row["extraction_rate_normed"] == float((normed == predicted).float().mean())
    assert row["attribute_rate"] == float((raw == batch.answers).float().mean())


def test_extraction_summary_reads_the_raw_rate_and_keeps_the_normed_one():
    table = pd.DataFrame({"layer": [0, 1, 0, 1], "sublayer": ["attn", "attn", "mlp", "mlp"],
                          "extraction_rate": [0.1, 0.3, 0.2, 0.0], "attribute_rate": [0.1, 0.2, 0.1, 0.0],
                          "extraction_rate_normed": [0.5, 0.2, 0.0, 0.1]})
    summary = extraction_summary(table)
    assert summary["attn"] == {"layer": 1, "extraction_rate": 0.3, "attribute_rate": 0.2, "extraction_rate_normed": 0.2,
                               "best_normed": {"layer": 0, "extraction_rate": 0.5}}
    assert summary["mlp"]["layer"] == 0


def test_logit_lens_of_the_final_residual_is_the_output(model_dirs):
    model, encoded = tiny(model_dirs, "gpt2")
    batch = make_batch(model, encoded)
    store = {}
    logits = batch.logits(model, [capture(store, "blocks.2.hook_resid_post", at_end=batch.ends)])
    torch.testing.assert_close(lens_logits(store["blocks.2.hook_resid_post"], model_lens(model)), logits, atol=1e-4,
                               rtol=0)
