"""The exactness invariant of the decomposition, and its per-head numbers against independent computations."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from tiny_models import FAMILIES

from factscope.taxonomy import groups_present
from factscope.data import GROUPS, load_facts, encode_all, relation_targets
from factscope.decompose import decompose
from factscope.models import load_model

FACTS = load_facts()[::6]  # 24 prompts over all 12 relations: every relation keeps ≥ 2 targets


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, model_dirs):
    return request.param, load_model(str(model_dirs[request.param]), prepend_bos=True)


@pytest.fixture(scope="module")
def family_run(family_model):
    family, model = family_model
    encoded = encode_all(FACTS, model.tokenizer, model.prepend_bos)
    return family, model, encoded, decompose(model, encoded, batch_size=7, known_only=False)


def test_parts_sum_to_the_models_own_logit(family_run):
    _, model, encoded, run = family_run
    totals = run.attributions.groupby(["prompt_id", "target"])["value"].sum()
    by_id = {item.fact.prompt_id: item for item in encoded}
    checked = 0
    for (prompt_id, target), total in totals.items():
        item = by_id[prompt_id]
        token = {name: tok for tok, name in relation_targets(encoded)[item.fact.relation].items()}[target]
        with torch.inference_mode():
            logits = model.bridge(torch.tensor([item.token_ids]))[0, -1]
        assert abs(total - float(logits[token])) < 1e-4, (prompt_id, target)
        checked += 1
    assert checked == sum(len(relation_targets(encoded)[i.fact.relation]) for i in encoded)
    assert run.max_abs_reconstruction_error < 1e-4
    assert run.max_abs_head_error < 1e-4


def test_the_bridge_computes_the_hf_models_logits(family_model, model_dirs):
    """The parts add up to the bridge's logit; that logit must be the model's own (parallel residual, partial rotary,
    GQA and qkv biases included): the weights are not folded, so the logits themselves are equal."""
    import transformers

    family, model = family_model
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    for item in encode_all(FACTS[:3], model.tokenizer, model.prepend_bos):
        tokens = torch.tensor([item.token_ids])
        with torch.inference_mode():
            ours, theirs = model.bridge(tokens)[0], hf_model(tokens).logits[0]
        assert (ours - theirs).abs().max() < 1e-5, family


def test_every_target_of_the_relation_is_decomposed(family_run):
    _, _, encoded, run = family_run
    targets = relation_targets(encoded)
    for item in encoded:
        rows = run.attributions[run.attributions["prompt_id"] == item.fact.prompt_id]
        assert set(rows["target"]) == set(targets[item.fact.relation].values())
        assert set(rows.loc[rows["is_correct_target"], "target"]) == {item.fact.attribute}


def test_head_split_matches_a_per_position_loop(family_run):
    """An independent, loop-based computation: Σ_k pattern[h,END,k] · (v_k − b_V) W_O[h] · (gain ⊙ u_t) / scale,
    summed by group."""
    family, model, encoded, run = family_run
    if family == "gemma3":
        pytest.skip("the post-norm path is checked against hook_attn_out in test_gemma_post_norm_heads")
    bridge, item = model.bridge, encoded[3]
    target = item.attribute_token
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(torch.tensor([item.token_ids]))
        scale = cache["ln_final.hook_scale"][0, -1, 0]
        u = bridge.W_U[:, target] * model.final_norm[0]
        centre = model.cfg.normalization_type == "LN"
        rows = run.attributions
        rows = rows[(rows.prompt_id == item.fact.prompt_id) & rows.is_correct_target & (rows.component == "attn")]
        for layer in range(model.cfg.n_layers):
            pattern, values = cache[f"blocks.{layer}.attn.hook_pattern"][0], cache[f"blocks.{layer}.attn.hook_v"][0]
            if model.b_V(layer) is not None:
                values = values - model.b_V(layer)
            group_size = model.cfg.n_heads // values.shape[1]
            for head in range(model.cfg.n_heads):
                expected = dict.fromkeys(GROUPS, 0.0)
                for k, group in enumerate(item.groups):
                    out = pattern[head, -1, k] * values[k, head // group_size] @ bridge.blocks[layer].attn.W_O[head]
                    if centre:
                        out = out - out.mean()
                    expected[group] += float(out @ u / scale)
                got = rows[(rows.layer == layer) & (rows["head"] == head)].set_index("source")["value"]
                assert set(got.index) == set(groups_present(model.prepend_bos))
                for group in got.index:
                    assert got[group] == pytest.approx(expected[group], abs=1e-5)


def value_bias_dla(model, cache, token: int) -> torch.Tensor:
    """[layer, head]: each head's value bias through its W_O to the logit (factscope counts it as attention bias;
    TransformerLens's head results include it)."""
    scale, u = cache["ln_final.hook_scale"][0, -1, 0], model.bridge.W_U[:, token] * model.final_norm[0]
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        if model.b_V(layer) is not None:
            b_v = model.b_V(layer).repeat_interleave(model.cfg.n_heads // model.b_V(layer).shape[0], dim=0)
            vectors = torch.einsum("hd,hdm->hm", b_v, model.W_O(layer))
            if model.cfg.normalization_type == "LN":
                vectors = vectors - vectors.mean(-1, keepdim=True)
            out[layer] = vectors @ u / scale
    return out


def test_head_totals_match_transformer_lens_stack_head_results(family_run):
    family, model, encoded, run = family_run
    if family == "gemma3":
        pytest.skip("TransformerLens's stack_head_results ignores Gemma's attention post-norm")
    for item in encoded[:4]:
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(torch.tensor([item.token_ids]))
            stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [layer*head, 1, d_model]
            u = model.bridge.W_U[:, item.attribute_token] * model.final_norm[0]  # apply_ln scales, without the gain
            tl = (stack[:, 0] @ u).reshape(model.cfg.n_layers, model.cfg.n_heads)
            tl = tl - value_bias_dla(model, cache, item.attribute_token)
        rows = run.attributions
        ours = (
            rows[(rows.prompt_id == item.fact.prompt_id) & rows.is_correct_target & (rows.component == "attn")]
            .groupby(["layer", "head"])["value"].sum()
            .unstack()
            .to_numpy()
        )
        assert torch.allclose(torch.tensor(ours), tl.float(), atol=1e-4)


def test_gemma_post_norm_heads_sum_to_attention_output(model_dirs):
    """With the post-norm's scale frozen, the heads' outputs at END add up to hook_attn_out exactly."""
    model = load_model(str(model_dirs["gemma3"]), prepend_bos=True)
    item = encode_all(FACTS[:1], model.tokenizer, True)[0]
    run = decompose(model, [item], known_only=False)
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.tensor([item.token_ids]))
    scale = cache["ln_final.hook_scale"][0, -1, 0]
    u = model.bridge.W_U[:, item.attribute_token] * model.final_norm[0]
    rows = run.attributions[run.attributions.is_correct_target]
    for layer in range(model.cfg.n_layers):
        expected = float(cache[f"blocks.{layer}.hook_attn_out"][0, -1] @ u / scale)
        got = rows[(rows.layer == layer) & rows.component.isin(["attn", "bias"])]["value"].sum()
        assert got == pytest.approx(expected, abs=1e-5)


def test_logit_lens_final_layer_is_the_model_output(family_run):
    _, model, encoded, run = family_run
    last = run.logit_lens[run.logit_lens.layer == model.cfg.n_layers - 1].set_index("prompt_id")
    recall = run.recall.set_index("prompt_id")
    assert (last["rank"] == recall.loc[last.index, "rank"]).all()
    assert last["prob"].to_numpy() == pytest.approx(recall.loc[last.index, "prob"].to_numpy(), abs=1e-5)


def test_batching_and_padding_do_not_change_numbers(family_model):
    _, model = family_model
    encoded = encode_all(FACTS[:10], model.tokenizer, model.prepend_bos)
    one = decompose(model, encoded, batch_size=1, known_only=False).attributions
    many = decompose(model, encoded, batch_size=10, known_only=False).attributions
    floats = ["value", "centred", "logit_diff"]
    pd.testing.assert_frame_equal(one.drop(columns=floats), many.drop(columns=floats))
    assert (one["value"] - many["value"]).abs().max() < 1e-5
    assert (one["centred"] - many["centred"]).abs().max() < 1e-5


def test_centred_is_value_less_one_shift_per_part(family_run):
    """`centred` removes from each part what it adds to every logit alike: one number per part, whatever the target,
    so the differences between targets (and a − mean(R∖a)) are the same in both columns."""
    _, _, _, run = family_run
    rows = run.attributions
    shift = (rows["value"] - rows["centred"]).groupby([rows[k] for k in ("prompt_id", "component", "layer", "head", "source")])
    assert (shift.max() - shift.min()).max() < 1e-5
    assert shift.max().abs().max() > 1e-4  # and the shift is not nothing: the columns differ


def test_logit_diff_is_value_minus_mean_of_other_targets(family_run):
    _, _, _, run = family_run
    rows = run.attributions
    part = rows[(rows.component == "mlp") & (rows.layer == 1)]
    for _, group in part.groupby("prompt_id"):
        correct = group[group.is_correct_target].iloc[0]
        others = group.loc[~group.is_correct_target, "value"]
        assert correct["logit_diff"] == pytest.approx(correct["value"] - others.mean(), abs=1e-5)


def test_known_only_keeps_exactly_the_correct_prompts(family_model):
    _, model = family_model
    encoded = encode_all(FACTS, model.tokenizer, model.prepend_bos)
    run = decompose(model, encoded, known_only=True)
    assert set(run.attributions["prompt_id"]) == set(run.recall.loc[run.recall["correct"], "prompt_id"])


def test_analyze_cli_writes_tables_and_reports_its_error(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "factscope", "analyze", "--model", str(tiny_llama_dir), "--out", str(out), "--all-prompts"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["known_only"] is False and summary["n_analysed"] == summary["n_prompts"] == len(load_facts())
    assert summary["max_abs_reconstruction_error"] < 1e-3
    assert "prepend_bos" in summary
    table = pd.read_parquet(out / "attributions.parquet")
    assert {"prompt_id", "relation", "target", "is_correct_target", "component", "layer", "head", "source", "value"} <= set(table.columns)
    assert set(table["source"]) == {"first", "prefix", "subject", "relation", "end", "all"}  # no BOS: the tiny tokenizer adds none
    assert (out / "logit_lens.parquet").is_file() and (out / "recall.csv").is_file()


@pytest.mark.real
def test_real_default_model_is_exact_and_matches_transformer_lens():
    model = load_model()
    encoded = encode_all(load_facts(), model.tokenizer, model.prepend_bos)
    run = decompose(model, encoded, batch_size=16, known_only=False)
    assert run.max_abs_reconstruction_error < 1e-3
    assert run.max_abs_head_error < 1e-3
    for item in encoded[:3]:
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(torch.tensor([item.token_ids]))
            stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)
            u = model.bridge.W_U[:, item.attribute_token] * model.final_norm[0]
            tl = (stack[:, 0] @ u).reshape(model.cfg.n_layers, model.cfg.n_heads)
        rows = run.attributions
        ours = (
            rows[(rows.prompt_id == item.fact.prompt_id) & rows.is_correct_target & (rows.component == "attn")]
            .groupby(["layer", "head"])["value"].sum().unstack().to_numpy()
        )
        assert torch.allclose(torch.tensor(ours), tl.float(), atol=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_precision_parts_add_up_within_the_dtypes_tolerance(family, dtype, model_dirs):
    """The model runs in bf16/fp16, the parts are summed in fp32, and they must add up to the model's own final
    residual; its half-precision logits differ from that fp32 reference by rounding only."""
    from factscope.taxonomy import TOLERANCES

    model = load_model(str(model_dirs[family]), prepend_bos=True, dtype=dtype)
    assert model.W_U.dtype == getattr(torch, dtype)
    run = decompose(model, encode_all(FACTS, model.tokenizer, True), known_only=False)
    assert run.attributions["value"].notna().all()
    assert run.max_abs_reconstruction_error < TOLERANCES[dtype]
    assert run.max_abs_head_error < TOLERANCES[dtype]
    assert run.max_abs_model_logit_error < TOLERANCES[dtype]


def test_dtype_and_threads_reach_the_run(tiny_llama_dir, tmp_path):
    import json

    from factscope import stages

    run = tmp_path / "run"
    stages.analyze(str(tiny_llama_dir), out=run, dtype="bfloat16", threads=1, all_prompts=True, report=False)
    assert json.loads((run / "run.json").read_text())["config"]["dtype"] == "bfloat16"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16" and summary["max_abs_reconstruction_error"] < summary["tolerance"]
