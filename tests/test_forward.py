"""Passes at END: they give the model's own logits, starting in the middle changes nothing, and hook names
come from one place."""

from __future__ import annotations

import pytest
import torch
from causal_helpers import tiny

from factscope.forward import act_name, capture, end_logits, make_batch, target_ids


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_end_logits_are_the_models_logits_at_end(model_dirs, family):
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    with torch.inference_mode():
        full = model.bridge(batch.tokens, attention_mask=batch.mask)[batch.rows, batch.ends]
    torch.testing.assert_close(batch.logits(model), full, atol=1e-5, rtol=0)


def test_starting_in_the_middle_reproduces_the_full_pass(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded)
    store = {}
    full = batch.logits(model, [capture(store, "blocks.2.hook_resid_pre")])
    resumed = end_logits(model, None, batch.mask, batch.ends, resid=store["blocks.2.hook_resid_pre"], start=2)
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)
    assert len(model.bridge.original_model.model.layers) == model.cfg.n_layers  # the skipped blocks are back
    torch.testing.assert_close(batch.logits(model), full, atol=0, rtol=0)


def test_act_names_are_transformer_lens_hook_names(model_dirs):
    model, _ = tiny(model_dirs, "gemma3")
    names = {act_name(kind, 1) for kind in ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_scores", "pattern", "v", "z", "post_norm_scale")}
    names |= {act_name(kind) for kind in ("embed", "pos_embed", "final_scale", "final_out")} - {"hook_pos_embed"}  # gemma: rotary
    assert names <= set(model.bridge.hook_dict)
    assert act_name("pattern", 3) == "blocks.3.attn.hook_pattern" and act_name("final_scale") == "ln_final.hook_scale"
    for bad in [("pattern", None), ("embed", 0), ("attention", 0)]:
        with pytest.raises(ValueError):
            act_name(*bad)


def test_target_ids(model_dirs):
    _, encoded = tiny(model_dirs, "llama")
    targets = {item.fact.relation: {} for item in encoded}
    for item in encoded:
        targets[item.fact.relation].setdefault(item.attribute_token, item.fact.attribute)
    with_answer, valid = target_ids(encoded, targets, with_answer=True)
    others, others_valid = target_ids(encoded, targets, with_answer=False)
    for row, item in enumerate(encoded):
        n = len(targets[item.fact.relation])
        assert with_answer[row, 0] == item.attribute_token and valid[row].sum() == n and (with_answer[row, n:] == item.attribute_token).all()
        assert torch.equal(others[row, : n - 1], with_answer[row, 1:n]) and others_valid[row].sum() == n - 1
        assert (others[row, n - 1 :] == 0).all()
