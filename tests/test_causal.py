"""Causal checks on tiny random models: each test pins an exact identity (or a sanity property) that a wrong
hook, a wrong position, or a wrong sign would break."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import handbuilt
from factscope import causal, models
from factscope.data import GROUPS, encode_all, load_facts, relation_targets
from factscope.decompose import decompose
from factscope.errors import FactscopeError
from factscope.models import load_model

N_FACTS = 12


@pytest.fixture(scope="module")
def loaded(model_dirs):
    cache = {}

    def get(family: str):
        if family not in cache:
            model = load_model(str(model_dirs[family]), prepend_bos=True)
            # landmarks and one more relation, so R_r has several attributes and prompts differ in length
            facts = load_facts()
            facts = facts[:8] + [f for f in facts if f.relation != facts[0].relation][:4]
            cache[family] = (model, encode_all(facts[:N_FACTS], model.tokenizer, model.prepend_bos))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def attributions(loaded):
    cache = {}

    def get(family: str) -> pd.DataFrame:
        if family not in cache:
            model, encoded = loaded(family)
            cache[family] = decompose(model, encoded, known_only=False).attributions
        return cache[family]

    return get


def own_target(table: pd.DataFrame) -> pd.DataFrame:
    """decompose's attributions to each prompt's own attribute token."""
    return table[table["is_correct_target"]]


def per_prompt(frame: pd.DataFrame, encoded) -> torch.Tensor:
    values = frame.groupby("prompt_id")["value"].sum()
    return torch.tensor(values.loc[[item.fact.prompt_id for item in encoded]].to_numpy(), dtype=torch.float32)


def answer_logits(logits: torch.Tensor, batch: causal.Batch) -> torch.Tensor:
    return logits[batch.rows, batch.answers].cpu()


# --- passes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_end_logits_are_the_models_logits_at_end(loaded, family):
    model, encoded = loaded(family)
    batch = causal.make_batch(model, encoded)
    with torch.inference_mode():
        full = model.bridge(batch.tokens, attention_mask=batch.mask)[batch.rows, batch.ends]
    torch.testing.assert_close(causal.end_logits(model, batch), full, atol=1e-5, rtol=0)


def test_starting_in_the_middle_reproduces_the_full_pass(loaded):
    model, encoded = loaded("llama")
    batch = causal.make_batch(model, encoded)
    store = {}
    full = causal.end_logits(model, batch, [causal.capture(store, "blocks.2.hook_resid_pre")])
    resumed = models.end_logits(model, None, batch.mask, batch.ends, resid=store["blocks.2.hook_resid_pre"], start=2)
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)
    assert len(model.bridge.original_model.model.layers) == model.cfg.n_layers  # the skipped blocks are back
    torch.testing.assert_close(causal.end_logits(model, batch), full, atol=0, rtol=0)


# --- knockout ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_knockout_over_no_heads_is_bit_identical(loaded, family):
    model, encoded = loaded(family)
    batch = causal.make_batch(model, encoded)
    clean = causal.end_logits(model, batch)
    assert torch.equal(causal.knockout_logits(model, batch, "subject", []), clean)
    assert not torch.equal(causal.knockout_logits(model, batch, "subject", [(0, 0), (1, 2)]), clean)


def test_knocking_out_all_but_the_subject_leaves_attention_on_subject_and_end(loaded):
    model, encoded = loaded("llama")
    batch = causal.make_batch(model, encoded)
    everything = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    store = {}
    with model.bridge.hooks(fwd_hooks=[causal.capture(store, "blocks.1.attn.hook_pattern")]):
        logits = causal.knockout_logits(model, batch, ("bos", "prefix", "relation"), everything)
    pattern = store["blocks.1.attn.hook_pattern"][batch.rows, :, batch.ends]  # [batch, head, key]
    allowed = batch.onehot[..., GROUPS.index("subject")].clone()
    allowed[batch.rows, batch.ends] = 1.0
    assert torch.isfinite(logits).all()
    assert float((pattern * (1 - allowed[:, None, :])).abs().max()) == 0.0
    torch.testing.assert_close((pattern * allowed[:, None, :]).sum(-1), torch.ones(pattern.shape[:2]), atol=1e-6, rtol=0)
    # other queries are untouched: the first token still attends only to itself
    assert torch.allclose(store["blocks.1.attn.hook_pattern"][:, :, 0, 0], torch.ones(1))


def test_end_is_never_blocked(loaded):
    model, encoded = loaded("llama")
    batch = causal.make_batch(model, encoded)
    keys = causal.blocked_keys(batch, GROUPS)
    assert not keys[batch.rows, batch.ends].any()
    assert keys.sum() == batch.mask.sum() - len(batch)
    with pytest.raises(FactscopeError, match="unknown token group"):
        causal.blocked_keys(batch, "verb")


def test_knockout_table(loaded):
    model, encoded = loaded("llama")
    calls = []
    table = causal.knockout(model, encoded, window=2, progress=calls.append)
    assert len(table) == 2 * model.cfg.n_layers
    assert sum(calls) == causal.n_passes("knockout", model.cfg.n_layers)
    assert set(table["blocked"]) == {"subject", "relation"}
    assert table[["first_layer", "last_layer"]].to_numpy().tolist()[:3] == [[0, 0], [0, 1], [1, 2]]
    assert table["accuracy_after"].between(0, 1).all() and np.isfinite(table["rel_change_p"]).all()
    none = causal.knockout(model, encoded, heads={"empty": []}, progress=calls.append)
    assert (none["delta_logit"] == 0).all() and (none["rel_change_p"] == 0).all()
    assert none["head_set"].tolist() == ["empty", "empty"] and (none["condition"] == "heads").all()
    assert sum(calls) == causal.n_passes("knockout", model.cfg.n_layers) + causal.n_passes("knockout", 3, heads={"empty": []})


@pytest.fixture(scope="module")
def handbuilt_model(tmp_path_factory):
    model = load_model(str(handbuilt.build_model_dir(tmp_path_factory.mktemp("handbuilt") / "model")))
    encoded = encode_all(handbuilt.facts(), model.tokenizer, model.prepend_bos)
    attributions = decompose(model, encoded, known_only=False).attributions
    return model, encoded, attributions


@pytest.mark.parametrize(("head", "source"), [(handbuilt.SUBJECT_HEAD, "subject"), (handbuilt.RELATION_HEAD, "relation")])
def test_knocking_out_a_handbuilt_head_removes_exactly_its_dla(handbuilt_model, head, source):
    """The hand-set subject (relation) head reads values only from subject (relation keyword) tokens: cut its
    END→group attention and it writes nothing, so every target's logit drops by exactly its DLA."""
    model, encoded, table = handbuilt_model
    batch = causal.make_batch(model, encoded)
    part = table[(table["component"] == "attn") & (table["head"] == head) & (table["source"] == source)]
    dla = part.set_index(["prompt_id", "target"])["value"]
    change = causal.knockout_logits(model, batch, source, [(0, head)], freeze_final_scale=True) - causal.end_logits(model, batch)
    ablated = causal.ablated_logits(model, batch, [("attn", 0, head, source)], "zero", freeze_final_scale=True)
    names = relation_targets(encoded)
    for row, item in enumerate(encoded):
        for token, name in names[item.fact.relation].items():
            name = item.fact.attribute if token == item.attribute_token else name
            assert abs(float(change[row, token]) + float(dla[(item.fact.prompt_id, name)])) < 1e-4
            assert abs(float(ablated[row, token] - causal.end_logits(model, batch)[row, token]) + float(dla[(item.fact.prompt_id, name)])) < 1e-4
    assert float(dla.abs().max()) > 1.0
    # without the subject head the model can only guess within the relation: accuracy falls
    if source == "subject":
        table = causal.knockout(model, encoded, blocked=["subject"], heads={"subject_head": [(0, head)]})
        assert table["accuracy_before"].iloc[0] == 1.0 and table["accuracy_after"].iloc[0] < 0.5


# --- path ablation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_ablating_no_paths_is_bit_identical(loaded, family):
    model, encoded = loaded(family)
    batch = causal.make_batch(model, encoded)
    clean = causal.end_logits(model, batch)
    assert torch.equal(causal.ablated_logits(model, batch, [], "zero"), clean)
    assert torch.equal(causal.ablated_logits(model, batch, [], "mean"), clean)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("source", ["subject", "relation", "bos"])
def test_zero_ablating_a_last_layer_head_path_removes_exactly_its_dla(loaded, attributions, family, source):
    """The last layer's MLP reads END after its attention, so it is removed too; with the final norm's scale
    frozen, the attribute's logit then drops by exactly the two DLAs."""
    model, encoded = loaded(family)
    batch = causal.make_batch(model, encoded)
    last, head = model.cfg.n_layers - 1, 1
    dla = own_target(attributions(family))
    expected = per_prompt(dla[(dla["component"] == "attn") & (dla["layer"] == last) & (dla["head"] == head) & (dla["source"] == source)], encoded)
    expected += per_prompt(dla[(dla["component"] == "mlp") & (dla["layer"] == last)], encoded)
    clean = causal.end_logits(model, batch)
    ablated = causal.ablated_logits(model, batch, [("attn", last, head, source), ("mlp", last)], "zero", freeze_final_scale=True)
    change = answer_logits(ablated - clean, batch)
    assert expected.abs().max() > 1e-4  # a path that is really there
    torch.testing.assert_close(change, -expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_zero_ablating_all_last_layer_paths_removes_their_dla_for_every_target(loaded, attributions, family):
    model, encoded = loaded(family)
    batch = causal.make_batch(model, encoded)
    last = model.cfg.n_layers - 1
    table = attributions(family)
    part = table[((table["component"] == "attn") | (table["component"] == "mlp")) & (table["layer"] == last)]
    dla = part.groupby(["prompt_id", "target"])["value"].sum()
    paths = [("attn", last, head, "all") for head in range(model.cfg.n_heads)] + [("mlp", last)]
    change = causal.ablated_logits(model, batch, paths, "zero", freeze_final_scale=True) - causal.end_logits(model, batch)
    names = relation_targets(encoded)
    for row, item in enumerate(encoded):
        for token, name in names[item.fact.relation].items():
            name = item.fact.attribute if token == item.attribute_token else name  # decompose's spelling
            assert abs(float(change[row, token]) + float(dla[(item.fact.prompt_id, name)])) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_ablating_everything_leaves_the_bias_only_logits(loaded, attributions, family):
    model, encoded = loaded(family)
    batch = causal.make_batch(model, encoded)
    cfg = model.cfg
    everything = [("attn", layer, head, "all") for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    everything += [("mlp", layer) for layer in range(cfg.n_layers)] + [("embed",)]
    dla = own_target(attributions(family))
    bias_only = per_prompt(dla[dla["component"].isin(["bias", "unembed_bias"])], encoded)
    frozen = causal.ablated_logits(model, batch, everything, "zero", freeze_final_scale=True)
    torch.testing.assert_close(answer_logits(frozen, batch), bias_only, atol=1e-5, rtol=0)
    if family == "llama":  # no biases at all: END's residual is exactly zero, so the norm outputs zero too
        unfrozen = causal.ablated_logits(model, batch, everything, "zero")
        b_u = model.bridge.b_U if model.bridge.b_U is not None else torch.zeros(())
        torch.testing.assert_close(unfrozen, b_u.expand_as(unfrozen), atol=1e-5, rtol=0)


def test_head_path_edit_equals_editing_hook_z(loaded):
    """Without an attention post-norm, the residual-stream edit is the brief's z_END −= Σ_{k∈group} pattern·v_k."""
    model, encoded = loaded("llama")
    batch = causal.make_batch(model, encoded)
    layer, head, group = 1, 2, GROUPS.index("subject")
    store = {}

    def edit_z(z, hook):
        pattern = store["blocks.1.attn.hook_pattern"][batch.rows, head, batch.ends]  # [batch, key]
        values = store["blocks.1.attn.hook_v"][:, :, head // (model.cfg.n_heads // store["blocks.1.attn.hook_v"].shape[2])]
        z = z.clone()
        z[batch.rows, batch.ends, head] -= torch.einsum("bk,bk,bkd->bd", pattern, batch.onehot[..., group], values)
        return z

    hooks = [causal.capture(store, "blocks.1.attn.hook_pattern"), causal.capture(store, "blocks.1.attn.hook_v"), ("blocks.1.attn.hook_z", edit_z)]
    by_z = causal.end_logits(model, batch, hooks)
    by_resid = causal.ablated_logits(model, batch, [("attn", layer, head, "subject")], "zero")
    torch.testing.assert_close(by_resid, by_z, atol=1e-5, rtol=0)
    assert (by_resid - causal.end_logits(model, batch)).abs().max() > 1e-4


def test_mean_ablation_on_one_prompt_changes_nothing(loaded):
    model, encoded = loaded("gpt2")
    batch = causal.make_batch(model, encoded[:1])
    paths = [("attn", layer, head, "all") for layer in range(3) for head in range(4)] + [("mlp", 0), ("mlp", 2), ("embed",)]
    torch.testing.assert_close(causal.ablated_logits(model, batch, paths, "mean"), causal.end_logits(model, batch), atol=1e-5, rtol=0)
    assert (causal.ablated_logits(model, batch, paths, "zero") - causal.end_logits(model, batch)).abs().max() > 1e-3


def test_bad_paths_are_reported(loaded):
    model, _ = loaded("llama")
    for bad, message in [
        (("attn", 9, 0, "subject"), "does not exist"),
        (("attn", 0, 0, "verb"), "unknown source group"),
        (("mlp", -1), "out of range"),
        (("head", 0), "expected"),
    ]:
        with pytest.raises(FactscopeError, match=message):
            causal.parse_paths(model, [bad])
    assert causal.parse_paths(model, [("mlp", 1), ("mlp", 1), ("attn", 0, 0, "all")]).n_paths == 1 + len(GROUPS)


def test_ablation_grid(loaded):
    model, encoded = loaded("llama")
    mechanisms = {
        "subject": [("attn", layer, head, "subject") for layer in range(3) for head in range(4)],
        "relation": [("attn", layer, head, "relation") for layer in range(3) for head in range(4)],
        "mlp": [("mlp", layer) for layer in range(3)],
    }
    calls = []
    grid = causal.ablation_grid(model, encoded, mechanisms, mode="zero", progress=calls.append)
    assert sum(calls) == causal.n_passes("ablation_grid", 3, mechanisms=mechanisms, mode="zero")
    assert list(grid["mechanism_set"]) == [
        "none", "subject", "relation", "mlp", "subject + relation", "subject + mlp", "relation + mlp", "subject + relation + mlp"
    ]
    assert list(grid["n_removed"]) == [0, 12, 12, 3, 24, 15, 15, 27]
    alone = grid.set_index("mechanism_set")["delta_logit"]
    together = grid.set_index("mechanism_set").loc["subject + mlp"]
    assert together["interaction_logit"] == pytest.approx(together["delta_logit"] - alone["subject"] - alone["mlp"])
    assert grid.loc[grid["n_mechanisms"] < 2, "interaction_logit"].isna().all()
    assert grid.iloc[0]["delta_logit"] == 0 and np.isfinite(grid["mean_logit_diff"]).all()
    summary = causal.robustness_summary(grid)
    assert set(summary["accuracy_single_removed"]) == set(mechanisms)
    everything, alone_diff = grid.iloc[-1], grid.set_index("mechanism_set")["delta_logit_diff"]
    assert summary["interaction_logit_diff_all"] == pytest.approx(everything["delta_logit_diff"] - alone_diff[list(mechanisms)].sum())
    mean_grid = causal.ablation_grid(model, encoded, mechanisms)  # mean mode differs from zero mode
    assert not np.allclose(mean_grid["mean_logit"][1:], grid["mean_logit"][1:])


# --- causal tracing ----------------------------------------------------------------------------------------------


def test_tracing_with_zero_noise_has_zero_effect(loaded):
    model, encoded = loaded("llama")
    trace = causal.trace_effects(model, encoded[:4], noise=0.0, seeds=(0,))
    assert float(trace.effects.abs().max()) < 1e-6
    table = causal.trace_table(trace)
    assert table["indirect_effect"].abs().max() < 1e-6


def test_tracing_is_deterministic_per_seed(loaded):
    model, encoded = loaded("llama")
    first = causal.trace_effects(model, encoded[:4], seeds=(3,), kinds=("resid",))
    again = causal.trace_effects(model, encoded[:4], seeds=(3,), kinds=("resid",))
    other = causal.trace_effects(model, encoded[:4], seeds=(4,), kinds=("resid",))
    assert torch.equal(first.effects, again.effects) and torch.equal(first.p_corrupted, again.p_corrupted)
    assert not torch.equal(first.p_corrupted, other.p_corrupted)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stacked_restorations_match_one_forward_per_restoration(loaded, family):
    """The batched, resumed-in-the-middle, chunked restorations against the plain way: one full forward with
    the noise and one restored state."""
    model, encoded = loaded(family)
    batch = causal.make_batch(model, encoded)
    trace = causal.trace_effects(model, encoded, noise=3.0, seeds=(1,), window=2, max_rows=40)
    noise = causal.subject_noise(batch, trace.noise_std, 1, model.cfg.d_model)
    store = {}
    names = [f"blocks.{layer}.{hook}" for layer in range(3) for hook in ("hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    causal.end_logits(model, batch, [causal.capture(store, name) for name in names])
    row = 5
    item = encoded[row]
    first_subject = item.groups.index("subject")
    for kind, layer, pos in [("resid", 0, first_subject), ("resid", 1, item.end), ("attn", 1, first_subject + 1), ("mlp", 0, first_subject), ("mlp", 2, item.end - 1)]:
        hook_name = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}[kind]
        first, last = (layer, layer) if kind == "resid" else causal.layer_window(layer, 2, 3)

        def restore(x, hook, name=None):
            x = x.clone()
            x[row, pos] = store[name][row, pos]
            return x

        hooks = [("hook_embed", lambda x, hook: x + noise)]
        for j in range(first, last + 1):
            name = f"blocks.{j}.{hook_name}"
            hooks.append((name, lambda x, hook, name=name: restore(x, hook, name)))
        p = causal.end_logits(model, batch, hooks).softmax(-1)[row, item.attribute_token]
        expected = float(p - trace.p_corrupted[0, row])
        got = float(trace.effects[0, trace.kinds.index(kind), layer, row, pos])
        assert got == pytest.approx(expected, abs=1e-6), (kind, layer, pos)
    assert (trace.effects[..., :first_subject] == 0).all()


def test_trace_table(loaded):
    model, encoded = loaded("gpt2")
    calls = []
    table = causal.trace_table(causal.trace_effects(model, encoded, seeds=(0, 1), progress=calls.append))
    assert sum(calls) == causal.n_passes("trace_effects", 3, seeds=(0, 1))
    tokens = {"first_subject", "last_subject", "further_tokens", "last_token", "subject", "relation", "prefix", "bos"}
    assert tokens <= set(table["token"]) and set(table["kind"]) == {"resid", "attn", "mlp"}
    assert not table.duplicated(["kind", "layer", "token"]).any()
    prefix = table[table["token"].isin(["bos", "prefix"])]
    assert (prefix["indirect_effect"] == 0).all()  # the noise cannot reach positions before the subject
    # restoring END's residual after the last layer restores the clean output exactly
    end = table[(table["kind"] == "resid") & (table["layer"] == 2) & (table["token"] == "last_token")].iloc[0]
    assert end["indirect_effect"] == pytest.approx(end["p_clean"] - end["p_corrupted"], abs=1e-6)
    peaks = causal.trace_peaks(table)
    assert len(peaks) == table.groupby(["kind", "token"]).ngroups


# --- extraction rate, enrichment, noise --------------------------------------------------------------------------


def test_extraction_rate(loaded):
    model, encoded = loaded("gemma3")
    table = causal.extraction_rate(model, encoded)
    assert len(table) == 2 * model.cfg.n_layers
    assert table["extraction_rate"].between(0, 1).all() and table["attribute_rate"].between(0, 1).all()
    assert (table["extraction_rate_top_k"] >= table["extraction_rate"]).all()
    everything = causal.extraction_rate(model, encoded, top_k=model.bridge.W_U.shape[1])
    assert (everything["extraction_rate_top_k"] == 1.0).all()


def test_logit_lens_of_the_final_residual_is_the_output(loaded):
    model, encoded = loaded("gpt2")
    batch = causal.make_batch(model, encoded)
    store = {}
    logits = causal.end_logits(model, batch, [causal.capture(store, "blocks.2.hook_resid_post", at_end=batch.ends)])
    torch.testing.assert_close(causal.logit_lens(model, store["blocks.2.hook_resid_post"]), logits, atol=1e-4, rtol=0)


def test_subject_enrichment(loaded):
    model, encoded = loaded("llama")
    table = causal.subject_enrichment(model, encoded)
    vocab = model.bridge.W_U.shape[1]
    assert list(table["layer"]) == list(range(model.cfg.n_layers))
    assert table["mean_rank_a"].between(1, vocab).all() and table["mean_rank_others"].between(1, vocab).all()
    summary = causal.enrichment_summary(table, causal.trace_table(causal.trace_effects(model, encoded[:3], seeds=(0,), kinds=("mlp",))))
    assert 0 <= summary["mlp_trace_peak_layer"] < model.cfg.n_layers


def test_noise_robustness(loaded):
    model, encoded = loaded("llama")
    batch = causal.make_batch(model, encoded)
    clean = causal.scores(causal.end_logits(model, batch), batch)
    mechanisms = {"subject": [("attn", 2, head, "subject") for head in range(4)], "mlp": [("mlp", 1), ("mlp", 2)]}
    calls = []
    table = causal.noise_robustness(model, encoded, mechanisms, scales=(0.0, 2.0), seeds=(0, 1), progress=calls.append)
    assert sum(calls) == causal.n_passes("noise_robustness", 3, mechanisms=mechanisms, scales=(0.0, 2.0), seeds=(0, 1))
    assert list(table["mechanism"]) == ["subject", "subject", "mlp", "mlp", "all", "all"]
    at_zero = table[table["noise_scale"] == 0]
    assert np.allclose(at_zero["mean_logit"], float(clean["logit"].mean()), atol=1e-6, rtol=0)
    noisy = table[table["noise_scale"] == 2.0]
    assert (noisy["mean_logit"] != at_zero["mean_logit"].to_numpy()).all()
    again = causal.noise_robustness(model, encoded, mechanisms, scales=(0.0, 2.0), seeds=(0, 1))
    pd.testing.assert_frame_equal(table, again)


def test_noise_has_the_requested_size(loaded):
    """Noise on a path has squared norm scale² × the path's squared norm in expectation (heads: through the
    head's own output map; MLPs: in the residual stream)."""
    model, encoded = loaded("llama")
    batch = causal.make_batch(model, encoded)
    paths = causal.parse_paths(model, [("attn", 2, head, "all") for head in range(4)] + [("mlp", 1)])
    ratios = {"head": [], "mlp": []}

    class Spy(causal.Noise):
        def head(self, layer, out_end, paths_, weights, head_map):
            noisy = super().head(layer, out_end, paths_, weights, head_map)
            expected = self.scale**2 * (paths_ * weights[..., None]).pow(2).sum((1, 2, 3))
            ratios["head"].append((noisy - out_end).pow(2).sum(-1) / expected)
            return noisy

        def vector(self, key, x_end):
            noisy = super().vector(key, x_end)
            ratios["mlp"].append((noisy - x_end).pow(2).sum(-1) / (self.scale**2 * x_end.pow(2).sum(-1)))
            return noisy

    for seed in range(30):
        causal.end_logits(model, batch, causal.edit_hooks(model, batch, paths, Spy(2.0, seed)))
    assert float(torch.cat(ratios["head"]).mean()) == pytest.approx(1.0, abs=0.1)
    assert float(torch.cat(ratios["mlp"]).mean()) == pytest.approx(1.0, abs=0.1)


def test_taxonomy_paths():
    heads = pd.DataFrame({"layer": [0, 1, 2, 2], "head": [1, 0, 3, 2], "class": ["subject", "mixed", "relation", "negligible"]})
    paths = causal.taxonomy_paths(heads, 3)
    assert paths == {
        "subject_heads": [("attn", 0, 1, "subject")],
        "relation_heads": [("attn", 2, 3, "relation")],
        "mixed_subject": [("attn", 1, 0, "subject")],
        "mixed_relation": [("attn", 1, 0, "relation")],
        "mlps": [("mlp", 0), ("mlp", 1), ("mlp", 2)],
    }
