"""Causal tracing: zero noise has zero effect, seeds are deterministic, the stacked, resumed, chunked
restorations equal one plain forward pass per restoration, the key/value-cached restorations equal the full-width
ones, and the table pools tokens as ROME does."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from causal_helpers import tiny

from factscope.causal.restorations import restored_layers, trace_sites
from factscope.causal.sites import layer_window
from factscope.causal.resume import shared_passes
from factscope.causal.trace import (
    TraceEffects, sem_at_draws, subject_noise, trace_effects, trace_labels, trace_passes, trace_peaks, trace_summary,
    trace_table,
)
from factscope.data import encode
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
    cases = [("resid", 0, first_subject), ("resid", 1, item.end), ("attn", 1, first_subject + 1), ("mlp", 0, first_subject),
             ("mlp", 2, item.end - 1), ("mlp_single", 1, first_subject), ("mlp_single", 2, item.end),
             ("mlp_single", 0, first_subject + 1), ("mlp_without_mlp0", 1, first_subject)]
    for kind, layer, pos in cases:
        hook_name = {"resid": "hook_resid_post", "attn": "hook_attn_out"}.get(kind, "hook_mlp_out")
        first, last = restored_layers(kind, layer, 2, 3)
        assert (first, last) == {"resid": (layer, layer), "mlp_single": (layer, layer),
                                 "mlp_without_mlp0": (max(1, layer_window(layer, 2, 3)[0]), layer_window(layer, 2, 3)[1])
                                 }.get(kind, layer_window(layer, 2, 3))

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
    assert tokens <= set(table["token"]) and set(table["kind"]) == {"resid", "attn", "mlp", "mlp_single", "mlp_without_mlp0"}
    # with the default window of 10 on 3 layers every MLP window holds MLP0: without it, each is layers 1–2, and
    # the restorations the kinds share are run once
    without = table[table["kind"] == "mlp_without_mlp0"]
    assert (without["first_layer"] == 1).all() and (without["last_layer"] == 2).all()
    assert len(trace_sites(("resid", "attn", "mlp", "mlp_single", "mlp_without_mlp0"), 10, 3)[0]) == 3 + 1 + 1 + 3 + 1
    assert not table.duplicated(["kind", "layer", "token"]).any()
    prefix = table[table["token"].isin(["bos", "prefix"])]
    assert (prefix["indirect_effect"] == 0).all()  # the noise cannot reach positions before the subject
    # restoring END's residual after the last layer restores the clean output exactly
    end = table[(table["kind"] == "resid") & (table["layer"] == 2) & (table["token"] == "last_token")].iloc[0]
    assert end["indirect_effect"] == pytest.approx(end["p_clean"] - end["p_corrupted"], abs=1e-6)
    peaks = trace_peaks(table)
    assert len(peaks) == table.groupby(["kind", "token"]).ngroups
    # every peak carries bootstrap intervals of its layer and its effect, the same on every run (seeded)
    live = peaks[peaks["token"] == "last_subject"]
    assert (live["peak_layer_low"] <= live["peak_layer_high"]).all() and (live["peak_effect_low"] <= live["peak_effect_high"]).all()
    assert live["peak_layer_low"].between(0, 2).all() and live["peak_layer_high"].between(0, 2).all()
    again = trace_peaks(trace_table(trace_effects(model, encoded, seeds=(0, 1))))
    assert again.equals(peaks)


def test_noise_covers_a_subject_at_position_zero(model_dirs):
    """Without BOS a subject that starts the prompt has its first token in the `first` group (the sink); tracing
    still corrupts it, as ROME corrupts every subject token."""
    model, encoded = tiny(model_dirs, "llama")
    first = next(item for item in encoded if item.fact.prompt.removeprefix("Fact: ").startswith(item.fact.subject))
    item = encode(replace(first.fact, prompt=first.fact.prompt.removeprefix("Fact: ")), model.tokenizer, prepend_bos=False)
    assert item.groups[0] == "first" and item.subject_positions[0] == 0
    batch = make_batch(model, [item])
    noise = subject_noise(batch, 1.0, 0, model.cfg.d_model)
    assert noise[0, 0].abs().sum() > 0 and noise[0, item.end].abs().sum() == 0
    labels = trace_labels(batch)
    assert labels["first_subject"][1][0, 0] and labels["first"][1][0, 0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "neox", "qwen2"])
def test_cached_restorations_equal_full_width_ones(model_dirs, family):
    """Starting each pass at the restored position, with the corrupted run's keys and values before it, changes
    nothing (≤ 1e-5 in p) on every family, window clipping and chunking included."""
    model, encoded = tiny(model_dirs, family)
    options = dict(noise=3.0, seeds=(2,), window=2, max_rows=7)
    fast = trace_effects(model, encoded, **options)
    slow = trace_effects(model, encoded, kv_cache=False, **options)
    assert torch.equal(fast.p_corrupted, slow.p_corrupted)
    difference, largest = float((fast.effects - slow.effects).abs().max()), float(slow.effects.abs().max())
    # a tiny model's p(a) is about 1/vocabulary, so the effects are small: also check against their own size
    assert difference <= 1e-5 and difference <= 1e-3 * largest and largest > 0


def test_cached_restorations_keep_each_layers_attention_type_and_sliding_window(tmp_path, monkeypatch):
    """Gemma-3 with layer types that differ between neighbours and a sliding window shorter than the prompts: rows
    of different restored positions share a pass through a cache padded on the left, and a pass resumed at block l
    keeps block l's own mask and rotary embedding; the trace still equals the full-width one."""
    import tiny_models
    from causal_helpers import _tiny

    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    monkeypatch.setitem(tiny_models.FAMILIES, "gemma3", dict(tiny_models.FAMILIES["gemma3"], layer_types=layer_types, sliding_window=3))
    model, encoded = _tiny(str(tiny_models.build_model_dir("gemma3", tmp_path / "gemma3-mixed")))
    config = model.bridge.original_model.config
    assert list(config.layer_types) == layer_types and min(len(item.token_ids) for item in encoded) > 2 * config.sliding_window
    options = dict(noise=3.0, seeds=(0,), window=2)
    fast = trace_effects(model, encoded, **options)
    slow = trace_effects(model, encoded, kv_cache=False, **options)
    difference, largest = float((fast.effects - slow.effects).abs().max()), float(slow.effects.abs().max())
    assert difference <= 1e-5 and difference <= 1e-3 * largest and largest > 0


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_mlp_windows_resume_after_their_first_block_where_the_blocks_are_sequential(model_dirs, family):
    """An MLP window's rows skip its first block where attention runs before the MLP (the restored position enters
    the next block as the corrupted resid_mid plus the clean MLP output); parallel blocks (NeoX) have no resid_mid,
    and there the rows start at the window's first block. Either way the trace equals the full-width one
    (`test_cached_restorations_equal_full_width_ones`)."""
    from factscope.causal.restorations import restored_blocks, resumed_block
    from factscope.causal.trace import sequential

    model, _ = tiny(model_dirs, family)
    n_layers = model.cfg.n_layers
    assert sequential(model) == (family == "llama")
    for kind in ("resid", "attn", "mlp"):
        for layer in range(n_layers):
            first = restored_blocks(kind, layer, 2, n_layers)[0]
            skips = kind == "mlp" and sequential(model) and first < n_layers - 1
            assert resumed_block(kind, layer, 2, n_layers, sequential(model)) == first + skips
    assert resumed_block("mlp", n_layers - 1, 1, n_layers, True) == n_layers - 1  # no block after it to resume at


@pytest.mark.parametrize("max_rows", [1, 5, 1024])
def test_passes_cover_every_row_once(max_rows):
    """Every restoration is in exactly one pass, no pass holds more than `max_rows` rows, rows that run fewer blocks
    come first within a pass's tail group, and rows of one tail length are never split without need (a cut costs a
    pass)."""
    tails = torch.tensor([0, 7, 3, 3, 7, 1, 0, 2, 7, 3, 5, 5, 0])
    blocks = torch.tensor([4, 1, 4, 2, 3, 4, 1, 2, 4, 4, 3, 1, 2])
    passes = shared_passes(tails, blocks, max_rows)
    assert sorted(torch.cat(passes).tolist()) == list(range(len(tails)))
    assert all(0 < len(chunk) <= max_rows for chunk in passes)
    assert all(bool((blocks[chunk].diff() >= 0).all()) for chunk in passes)
    if max_rows == 1024:
        for length in tails.unique().tolist():
            assert sum(bool((tails[chunk] == length).any()) for chunk in passes) == 1


def _synthetic(effects: torch.Tensor, batch) -> TraceEffects:
    return TraceEffects(effects, torch.ones(len(batch)), torch.zeros(effects.shape[0], len(batch)), 1.0, ("resid",), 1, batch)


def test_table_pools_tokens_and_counts_end_as_first_subsequent(model_dirs):
    """A row is the mean over every (prompt, token) of its kind (ROME's Avg.add_all), its sem the cluster standard
    error over prompts; END right after the subject is a first subsequent token too."""
    model, encoded = tiny(model_dirs, "llama")
    item = encoded[0]
    last = max(pos for pos, group in enumerate(item.groups) if group == "subject")
    short = replace(item, token_ids=item.token_ids[: last + 2], groups=item.groups[: last + 2])  # END right after the subject
    labels = trace_labels(make_batch(model, [short]))
    assert labels["first_subsequent"][1][0, last + 1] and labels["last_token"][1][0, last + 1]
    batch = make_batch(model, encoded[:3])
    labels = trace_labels(batch)
    effects = torch.rand((2, 1, 1, *batch.tokens.shape), generator=torch.Generator().manual_seed(0))
    table = trace_table(_synthetic(effects, batch)).set_index("token")
    mask = labels["subject"][1]
    per_prompt = (effects.mean(0)[0, 0] * mask).sum(-1)
    counts = mask.sum(-1).double()
    pooled = float(per_prompt.sum() / counts.sum())
    assert table.loc["subject", "indirect_effect"] == pytest.approx(pooled, abs=1e-6)
    residual = per_prompt.double() - pooled * counts
    sem = float((residual.pow(2).sum() * 3 / 2).sqrt() / counts.sum())
    assert table.loc["subject", "sem"] == pytest.approx(sem, rel=1e-6)
    assert int(table.loc["subject", "n_tokens"]) == int(counts.sum())
    # with one token per prompt the cluster sem is the usual std / √N
    end = (effects.mean(0)[0, 0] * labels["last_token"][1]).sum(-1).double()
    assert table.loc["last_token", "sem"] == pytest.approx(float(end.std() / 3**0.5), rel=1e-6)


def test_noise_draws_only_add_within_prompt_variance(model_dirs):
    """Identical draws have no draw part; at the run's own number of draws sem_at_draws gives sem back, and more
    draws never widen it."""
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded[:4])
    same = torch.rand((1, 1, 1, *batch.tokens.shape), generator=torch.Generator().manual_seed(1)).repeat(3, 1, 1, 1, 1)
    table = trace_table(_synthetic(same, batch))
    assert (table["sem_draws"].abs() < 1e-9).all()
    generator = torch.Generator().manual_seed(2)
    per_prompt = torch.rand((1, 1, 1, len(batch), 1), generator=generator) * 10  # prompts differ far more than draws
    varied = per_prompt + torch.rand((3, 1, 1, *batch.tokens.shape), generator=generator)
    table = trace_table(_synthetic(varied, batch))
    assert sem_at_draws(table, 3).to_numpy() == pytest.approx(table["sem"].to_numpy(), rel=1e-9)
    assert (sem_at_draws(table, 10) <= table["sem"] + 1e-12).all() and (sem_at_draws(table, 1) >= table["sem"] - 1e-12).all()
    draws = trace_summary(table, trace_peaks(table))["draws"]
    assert draws["n_draws"] == 3 and draws["median_sem_at_10_draws"] <= draws["median_sem"] <= draws["median_sem_at_1_draw"]
