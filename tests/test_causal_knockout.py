"""Attention knockout on tiny random models and on the hand-built one, whose heads have known DLA."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from causal_helpers import tiny

import handbuilt
from factscope.causal.ablation import ablated_logits
from factscope.causal.knockout import NON_SUBJECT, blocked_keys, knockout, knockout_logits, knockout_passes
from factscope.causal.sites import HeadPath
from factscope.data import GROUPS, encode, relation_targets
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
        logits = knockout_logits(model, batch, NON_SUBJECT, everything)
    pattern = store["blocks.1.attn.hook_pattern"][batch.rows, :, batch.ends]  # [batch, head, key]
    allowed = batch.subject.float()
    allowed[batch.rows, batch.ends] = 1.0
    assert torch.isfinite(logits).all()
    assert float((pattern * (1 - allowed[:, None, :])).abs().max()) == 0.0
    torch.testing.assert_close((pattern * allowed[:, None, :]).sum(-1), torch.ones(pattern.shape[:2]), atol=1e-6, rtol=0)
    # other queries are untouched: the first token still attends only to itself
    assert torch.allclose(store["blocks.1.attn.hook_pattern"][:, :, 0, 0], torch.ones(1))


def test_end_is_blocked_only_when_named(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded)
    but_end = tuple(group for group in GROUPS if group != "end")
    keys = blocked_keys(batch, but_end)
    assert not keys[batch.rows, batch.ends].any()
    assert keys.sum() == batch.mask.sum() - len(batch)
    end = blocked_keys(batch, "end")
    assert end.sum() == len(batch) and end[batch.rows, batch.ends].all()
    # Geva's non-subject positions: neither the subject's own (position 0 included) nor END
    non_subject = blocked_keys(batch, NON_SUBJECT)
    assert not (non_subject & batch.subject).any() and not non_subject[batch.rows, batch.ends].any()
    assert non_subject.sum() == batch.mask.sum() - batch.subject.sum() - len(batch)
    with pytest.raises(FactscopeError, match="nothing to attend to"):
        blocked_keys(batch, GROUPS)
    with pytest.raises(FactscopeError, match="unknown token group"):
        blocked_keys(batch, "verb")


def test_the_subject_knockout_spares_the_sink_at_position_zero(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    first = next(item.fact for item in encoded if item.fact.prompt.removeprefix("Fact: ").startswith(item.fact.subject))
    fact = replace(first, prompt=first.prompt.removeprefix("Fact: "))
    item = encode(fact, model.tokenizer, prepend_bos=False)
    batch = make_batch(model, [item])
    assert item.subject_positions[0] == 0 and item.groups[0] == "first"
    assert not blocked_keys(batch, "subject")[0, 0] and blocked_keys(batch, "first")[0, 0]
    assert not blocked_keys(batch, NON_SUBJECT)[0, 0]


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
