"""Attention knockout on tiny random models and on the hand-built one, whose heads have known DLA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from causal_helpers import tiny

import handbuilt
from factscope.causal.ablation import ablated_logits
from factscope.causal.knockout import blocked_keys, knockout, knockout_logits, knockout_passes
from factscope.causal.sites import HeadPath
from factscope.data import GROUPS, relation_targets
from factscope.errors import FactscopeError
from factscope.forward import capture, make_batch


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_knockout_over_no_heads_is_bit_identical(model_dirs, family):
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    clean = batch.logits(model)
    assert torch.equal(knockout_logits(model, batch, "subject", []), clean)
    assert not torch.equal(knockout_logits(model, batch, "subject", [(0, 0), (1, 2)]), clean)


def test_knocking_out_all_but_the_subject_leaves_attention_on_subject_and_end(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded)
    everything = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    store = {}
    with model.bridge.hooks(fwd_hooks=[capture(store, "blocks.1.attn.hook_pattern")]):
        logits = knockout_logits(model, batch, ("bos", "prefix", "relation"), everything)
    pattern = store["blocks.1.attn.hook_pattern"][batch.rows, :, batch.ends]  # [batch, head, key]
    allowed = batch.onehot[..., GROUPS.index("subject")].clone()
    allowed[batch.rows, batch.ends] = 1.0
    assert torch.isfinite(logits).all()
    assert float((pattern * (1 - allowed[:, None, :])).abs().max()) == 0.0
    torch.testing.assert_close((pattern * allowed[:, None, :]).sum(-1), torch.ones(pattern.shape[:2]), atol=1e-6, rtol=0)
    # other queries are untouched: the first token still attends only to itself
    assert torch.allclose(store["blocks.1.attn.hook_pattern"][:, :, 0, 0], torch.ones(1))


def test_end_is_never_blocked(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded)
    keys = blocked_keys(batch, GROUPS)
    assert not keys[batch.rows, batch.ends].any()
    assert keys.sum() == batch.mask.sum() - len(batch)
    with pytest.raises(FactscopeError, match="unknown token group"):
        blocked_keys(batch, "verb")


def test_knockout_table(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    calls = []
    table = knockout(model, encoded, window=2, progress=calls.append)
    assert len(table) == 2 * model.cfg.n_layers
    assert sum(calls) == knockout_passes(model.cfg.n_layers)
    assert set(table["blocked"]) == {"subject", "relation"}
    assert table[["first_layer", "last_layer"]].to_numpy().tolist()[:3] == [[0, 0], [0, 1], [1, 2]]
    assert table["accuracy_after"].between(0, 1).all() and np.isfinite(table["rel_change_p"]).all()
    none = knockout(model, encoded, heads={"empty": []}, progress=calls.append)
    assert (none["delta_logit"] == 0).all() and (none["rel_change_p"] == 0).all()
    assert none["head_set"].tolist() == ["empty", "empty"] and (none["condition"] == "heads").all()
    assert sum(calls) == knockout_passes(model.cfg.n_layers) + knockout_passes(3, heads={"empty": []})


@pytest.mark.parametrize(("head", "source"), [(handbuilt.SUBJECT_HEAD, "subject"), (handbuilt.RELATION_HEAD, "relation")])
def test_knocking_out_a_handbuilt_head_removes_exactly_its_dla(handbuilt_run, head, source):
    """The hand-set subject (relation) head reads values only from subject (relation keyword) tokens: cut its
    END→group attention and it writes nothing, so every target's logit drops by exactly its DLA."""
    model, encoded, result, _ = handbuilt_run
    table = result.attributions
    batch = make_batch(model, encoded)
    part = table[(table["component"] == "attn") & (table["head"] == head) & (table["source"] == source)]
    dla = part.set_index(["prompt_id", "target"])["value"]
    change = knockout_logits(model, batch, source, [(0, head)], freeze_final_scale=True) - batch.logits(model)
    ablated = ablated_logits(model, batch, [HeadPath(0, head, source)], "zero", freeze_final_scale=True)
    names = relation_targets(encoded)
    for row, item in enumerate(encoded):
        for token, name in names[item.fact.relation].items():
            name = item.fact.attribute if token == item.attribute_token else name
            assert abs(float(change[row, token]) + float(dla[(item.fact.prompt_id, name)])) < 1e-4
            assert abs(float(ablated[row, token] - batch.logits(model)[row, token]) + float(dla[(item.fact.prompt_id, name)])) < 1e-4
    assert float(dla.abs().max()) > 1.0
    # without the subject head the model can only guess within the relation: accuracy falls
    if source == "subject":
        table = knockout(model, encoded, blocked=["subject"], heads={"subject_head": [(0, head)]})
        assert table["accuracy_before"].iloc[0] == 1.0 and table["accuracy_after"].iloc[0] < 0.5
