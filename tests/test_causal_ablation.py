"""Path ablation: removing a path moves a frozen-scale logit by exactly minus its DLA, and the grid of
mechanism sets adds up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from causal_helpers import answer_logits, attributions, own_target, per_prompt, tiny

from factscope import bootstrap
from factscope.causal.ablation import ablated_logits, ablation_grid, ablation_passes, path_means, robustness_summary
from factscope.causal.edits import final_scale
from factscope.causal.sites import Embed, HeadPath, MlpPath, parse, taxonomy_paths
from factscope.data import GROUPS, relation_targets
from factscope.errors import FactscopeError
from factscope.forward import act_name, capture, make_batch


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_ablating_no_paths_is_bit_identical(model_dirs, family):
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    clean = batch.logits(model)
    assert torch.equal(ablated_logits(model, batch, [], "zero"), clean)
    assert torch.equal(ablated_logits(model, batch, [], "mean"), clean)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("source", ["subject", "relation", "bos"])
def test_zero_ablating_a_last_layer_head_path_removes_exactly_its_dla(model_dirs, family, source):
    """The last layer's MLP reads END after its attention, so it is removed too; with the final norm's scale
    frozen, the attribute's logit then drops by exactly the two DLAs."""
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    last, head = model.cfg.n_layers - 1, 1
    dla = own_target(attributions(model_dirs, family))
    expected = per_prompt(dla[(dla["component"] == "attn") & (dla["layer"] == last) & (dla["head"] == head) & (dla["source"] == source)], encoded)
    expected += per_prompt(dla[(dla["component"] == "mlp") & (dla["layer"] == last)], encoded)
    clean = batch.logits(model)
    ablated = ablated_logits(model, batch, [HeadPath(last, head, source), MlpPath(last)], "zero", freeze_final_scale=True)
    change = answer_logits(ablated - clean, batch)
    assert expected.abs().max() > 1e-4  # a path that is really there
    torch.testing.assert_close(change, -expected, atol=1e-5, rtol=0)


def _path_dla(dla: pd.DataFrame, layer: int, head: int, source: str, mlp_layer: int, encoded) -> torch.Tensor:
    expected = per_prompt(dla[(dla["component"] == "attn") & (dla["layer"] == layer) & (dla["head"] == head) & (dla["source"] == source)], encoded)
    return expected + per_prompt(dla[(dla["component"] == "mlp") & (dla["layer"] == mlp_layer)], encoded)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("source", ["subject", "relation"])
def test_direct_zero_ablation_of_any_layers_paths_removes_exactly_their_dla(model_dirs, family, source):
    """As a direct effect the paths of early layers too move the logit by exactly minus their DLA: nothing
    downstream reacts, the final scale is frozen. Their total effect differs (the layers above react)."""
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    paths = [HeadPath(0, 1, source), MlpPath(0)]
    expected = _path_dla(own_target(attributions(model_dirs, family)), 0, 1, source, 0, encoded)
    clean = batch.logits(model)
    direct = answer_logits(ablated_logits(model, batch, paths, "zero", effect="direct") - clean, batch)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(direct, -expected, atol=1e-5, rtol=0)
    total = answer_logits(ablated_logits(model, batch, paths, "zero", freeze_final_scale=True) - clean, batch)
    assert (total + expected).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_direct_mean_ablation_removes_the_dla_against_the_mean(model_dirs, family):
    """Mean-ablating a path directly moves the logit by minus its DLA against the DLA of the path's dataset-mean
    vector (read through each prompt's own frozen final scale)."""
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    layer, head, source = 1, 2, "subject"
    paths = [HeadPath(layer, head, source), MlpPath(layer)]
    dla = _path_dla(own_target(attributions(model_dirs, family)), layer, head, source, layer, encoded)
    means = path_means(model, batch, paths)
    mean_vector = means.heads[layer][head, GROUPS.index(source)] + means.vectors[act_name("mlp_out", layer)]
    if model.centres:
        mean_vector = mean_vector - mean_vector.mean()
    gain, _ = model.final_norm
    scale = final_scale(model, batch)[batch.rows, batch.ends]  # [batch, 1]
    mean_dla = ((mean_vector * gain / scale) * model.W_U[:, batch.answers].float().T).sum(-1).cpu()
    change = answer_logits(ablated_logits(model, batch, paths, "mean", means, effect="direct") - batch.logits(model), batch)
    assert (dla - mean_dla).abs().max() > 1e-4
    torch.testing.assert_close(change, mean_dla - dla, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_zero_ablating_all_last_layer_paths_removes_their_dla_for_every_target(model_dirs, family):
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    last = model.cfg.n_layers - 1
    table = attributions(model_dirs, family)
    part = table[((table["component"] == "attn") | (table["component"] == "mlp")) & (table["layer"] == last)]
    dla = part.groupby(["prompt_id", "target"])["value"].sum()
    paths = [HeadPath(last, head, "all") for head in range(model.cfg.n_heads)] + [MlpPath(last)]
    change = ablated_logits(model, batch, paths, "zero", freeze_final_scale=True) - batch.logits(model)
    names = relation_targets(encoded)
    for row, item in enumerate(encoded):
        for token, name in names[item.fact.relation].items():
            name = item.fact.attribute if token == item.attribute_token else name  # decompose's spelling
            assert abs(float(change[row, token]) + float(dla[(item.fact.prompt_id, name)])) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_ablating_everything_leaves_the_bias_only_logits(model_dirs, family):
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    cfg = model.cfg
    everything = [HeadPath(layer, head, "all") for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    everything += [MlpPath(layer) for layer in range(cfg.n_layers)] + [Embed()]
    dla = own_target(attributions(model_dirs, family))
    bias_only = per_prompt(dla[dla["component"].isin(["bias", "unembed_bias"])], encoded)
    frozen = ablated_logits(model, batch, everything, "zero", freeze_final_scale=True)
    torch.testing.assert_close(answer_logits(frozen, batch), bias_only, atol=1e-5, rtol=0)
    if family == "llama":  # no biases at all: END's residual is exactly zero, so the norm outputs zero too
        unfrozen = ablated_logits(model, batch, everything, "zero")
        b_u = model.bridge.b_U if model.bridge.b_U is not None else torch.zeros(())
        torch.testing.assert_close(unfrozen, b_u.expand_as(unfrozen), atol=1e-5, rtol=0)


def test_head_path_edit_equals_editing_hook_z(model_dirs):
    """Without an attention post-norm, the residual-stream edit is the brief's z_END −= Σ_{k∈group} pattern·v_k."""
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded)
    layer, head, group = 1, 2, GROUPS.index("subject")
    store = {}

    def edit_z(z, hook):
        pattern = store["blocks.1.attn.hook_pattern"][batch.rows, head, batch.ends]  # [batch, key]
        values = store["blocks.1.attn.hook_v"][:, :, head // (model.cfg.n_heads // store["blocks.1.attn.hook_v"].shape[2])]
        z = z.clone()
        z[batch.rows, batch.ends, head] -= torch.einsum("bk,bk,bkd->bd", pattern, batch.onehot[..., group], values)
        return z

    hooks = [capture(store, "blocks.1.attn.hook_pattern"), capture(store, "blocks.1.attn.hook_v"), ("blocks.1.attn.hook_z", edit_z)]
    by_z = batch.logits(model, hooks)
    by_resid = ablated_logits(model, batch, [HeadPath(layer, head, "subject")], "zero")
    torch.testing.assert_close(by_resid, by_z, atol=1e-5, rtol=0)
    assert (by_resid - batch.logits(model)).abs().max() > 1e-4


def test_mean_ablation_on_one_prompt_changes_nothing(model_dirs):
    model, encoded = tiny(model_dirs, "gpt2")
    batch = make_batch(model, encoded[:1])
    paths = [HeadPath(layer, head, "all") for layer in range(3) for head in range(4)] + [MlpPath(0), MlpPath(2), Embed()]
    torch.testing.assert_close(ablated_logits(model, batch, paths, "mean"), batch.logits(model), atol=1e-5, rtol=0)
    assert (ablated_logits(model, batch, paths, "zero") - batch.logits(model)).abs().max() > 1e-3


def test_bad_paths_are_reported(model_dirs):
    model, _ = tiny(model_dirs, "llama")
    for bad, message in [
        (HeadPath(9, 0, "subject"), "does not exist"),
        (HeadPath(0, 0, "verb"), "unknown source group"),
        (MlpPath(-1), "out of range"),
        (("head", 0), "expected"),
    ]:
        with pytest.raises(FactscopeError, match=message):
            parse(model, [bad])
    assert parse(model, [MlpPath(1), MlpPath(1), HeadPath(0, 0, "all")]).n_paths == 1 + len(GROUPS)


def test_ablation_grid(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    mechanisms = {
        "subject": [HeadPath(layer, head, "subject") for layer in range(3) for head in range(4)],
        "relation": [HeadPath(layer, head, "relation") for layer in range(3) for head in range(4)],
        "mlp": [MlpPath(layer) for layer in range(3)],
    }
    calls = []
    grid = ablation_grid(model, encoded, mechanisms, mode="zero", progress=calls.append)
    assert sum(calls) == ablation_passes(len(mechanisms))
    assert list(grid["effect"]) == ["total"] * 8 + ["direct"] * 8
    direct = grid[grid["effect"] == "direct"].reset_index(drop=True)
    grid = grid[grid["effect"] == "total"].reset_index(drop=True)
    assert list(grid["mechanism_set"]) == list(direct["mechanism_set"]) == [
        "none", "subject", "relation", "mlp", "subject + relation", "subject + mlp", "relation + mlp", "subject + relation + mlp"
    ]
    assert list(grid["n_removed"]) == [0, 12, 12, 3, 24, 15, 15, 27]
    # disjoint paths' direct effects add up on logits: the final residual is linear in them at a frozen scale
    assert np.allclose(direct["interaction_logit"][4:], 0, atol=1e-4) and np.allclose(direct["interaction_logit_diff"][4:], 0, atol=1e-4)
    assert direct.iloc[0]["mean_logit"] == grid.iloc[0]["mean_logit"]
    for table in (grid, direct):  # each interval holds its point estimate
        for column, point in (("accuracy", "accuracy"), ("delta_logit_diff", "delta_logit_diff"), ("interaction_logit_diff", "interaction_logit_diff")):
            rows = table[table[f"{column}_low"].notna()]
            assert (rows[f"{column}_low"] <= rows[point] + 1e-9).all() and (rows[point] <= rows[f"{column}_high"] + 1e-9).all()
    assert grid["interaction_logit_diff_low"].notna().sum() == 4 and grid["accuracy_low"].notna().all()
    alone = grid.set_index("mechanism_set")["delta_logit"]
    together = grid.set_index("mechanism_set").loc["subject + mlp"]
    assert together["interaction_logit"] == pytest.approx(together["delta_logit"] - alone["subject"] - alone["mlp"])
    assert grid.loc[grid["n_mechanisms"] < 2, "interaction_logit"].isna().all()
    assert grid.iloc[0]["delta_logit"] == 0 and np.isfinite(grid["mean_logit_diff"]).all()
    summary = robustness_summary(pd.concat([grid, direct]))
    assert set(summary["accuracy_single_removed"]) == set(mechanisms)
    assert summary["direct"]["interaction_logit_diff_all"] == pytest.approx(direct.iloc[-1]["interaction_logit_diff"])
    assert summary["accuracy_all_removed_ci"] == [grid.iloc[-1]["accuracy_low"], grid.iloc[-1]["accuracy_high"]]
    assert summary["bootstrap"] == bootstrap.record(2)  # the tiny dataset has two relations: too few, over prompts
    everything, alone_diff = grid.iloc[-1], grid.set_index("mechanism_set")["delta_logit_diff"]
    assert summary["interaction_logit_diff_all"] == pytest.approx(everything["delta_logit_diff"] - alone_diff[list(mechanisms)].sum())
    mean_grid = ablation_grid(model, encoded, mechanisms)  # mean mode differs from zero mode
    assert not np.allclose(mean_grid["mean_logit"][1:8], grid["mean_logit"][1:])


def test_taxonomy_paths():
    heads = pd.DataFrame({"layer": [0, 1, 2, 2], "head": [1, 0, 3, 2], "class": ["subject", "mixed", "relation", "negligible"]})
    paths = taxonomy_paths(heads, 3)
    assert paths == {
        "subject_heads": [HeadPath(0, 1, "subject")],
        "relation_heads": [HeadPath(2, 3, "relation")],
        "mixed_subject": [HeadPath(1, 0, "subject")],
        "mixed_relation": [HeadPath(1, 0, "relation")],
        # every head's END←END part, negligible heads' too: the partition's `end_heads`
        "end_heads": [HeadPath(0, 1, "end"), HeadPath(1, 0, "end"), HeadPath(2, 3, "end"), HeadPath(2, 2, "end")],
        "mlps": [MlpPath(0), MlpPath(1), MlpPath(2)],
    }
