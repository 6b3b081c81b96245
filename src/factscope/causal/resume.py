"""Resuming a corrupted run where a restoration first changes it: the exact trace's passes (`trace`), the
key-side keys and values of attribution patching (`atp`) and the path checks (`atp_paths`) all start here.

A restoration at (block b, position i) cannot change anything below block b or at positions before i (causal
attention), so a row is computed from block b and from position i to END only: the run's keys and values of
positions < i, at every layer, go in as a key/value cache. Rows share passes whatever their position and first
block: each row's cache is padded on the left to the longest prefix (the padding masked, its attention weight
exactly zero) so that every row's position i is the pass's first, each row has its own position ids
(`left_padded_cache`), and a row joins the pass at its own first block (`resume`): a block runs only the rows that
have joined, so a pass reads each block's weights once for all its rows — on a CPU that read, not the rows' tokens,
is most of a small pass's cost. `shared_passes` groups rows by how many positions they run, cut where padding would
cost more than a pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int

from ..forward import Batch, act_name, end_logits
from ..models import LoadedModel


@dataclass
class States:
    """What one seed's restorations start from and put back."""

    clean: dict[str, torch.Tensor]  # hook name → the clean run's activation, and "p" → the clean p(a)
    corrupt_pre: list[Float[torch.Tensor, "batch pos d_model"]]  # the corrupted residual stream entering each block
    p_corrupt: Float[torch.Tensor, " batch"]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # the corrupted run's keys and values per layer [batch, kv_head, pos, d_head]
    corrupt_mid: list[Float[torch.Tensor, "batch pos d_model"]] | None = None  # the corrupted run's resid_mid per layer


@contextmanager
def bridge_reads_cache(bridge, active: bool = True):
    """TransformerLens 4.3's attention looks for the cache under `past_key_values` or `layer_past`; transformers 5
    hands it to the attention as `cache`, so the bridge would neither fill nor read it. For the duration of a call,
    each block's attention is given the cache under the name it reads."""
    import warnings

    if not active:
        yield
        return
    for block in bridge.blocks:
        update = block.attn._update_kv_cache

        def renamed(k, v, _update=update, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _update(k, v, **kwargs)

        block.attn._update_kv_cache = renamed
    try:
        with warnings.catch_warnings():
            # the bridge hands transformers the cache under its deprecated name, on every pass
            warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
            yield
    finally:
        for block in bridge.blocks:
            del block.attn._update_kv_cache

# A pass's own cost per block it runs, in token-blocks: the block's weights are read once per pass whatever its
# rows, which on SmolLM2 on a CPU costs about 3 ms, and a token about 0.09 ms, so ~32 tokens (profiled at bc3d5b3).
PASS_COST = 32
# A pass's rows × positions at most: a block's activations beyond the CPU's cache make each elementwise op wait on
# memory (2,048 tokens × SmolLM2's 1,536 MLP features is 12.6 MB in fp32); on 24 SmolLM2 prompts a trace at this
# budget took 58 s against 62 s with no budget but `max_rows` (measured at a38db5a's successor, quiet, 1 thread).
MAX_TOKENS = 2048


def shared_passes(tails: Int[torch.Tensor, " rows"], blocks: Int[torch.Tensor, " rows"], max_rows: int
            ) -> list[Int[torch.Tensor, " rows"]]:
    """Rows (their number of positions after the restored one, and how many blocks they run) grouped into passes.
    A pass costs `PASS_COST` per block it runs (its rows' most) plus each row's blocks × the pass's longest tail
    (the shorter ones are padded): the rows, longest tail first, are cut between tails where that is cheapest (a
    small dynamic programme over the distinct tails), then into chunks of `max_rows` rows and `MAX_TOKENS` tokens
    at most, rows that run fewer blocks together."""
    def per_pass(tail: int) -> int:
        return max(1, min(max_rows, MAX_TOKENS // (tail + 1)))

    order = torch.argsort(tails * (int(blocks.max()) + 1) + blocks, descending=True, stable=True)
    ordered, depth = tails[order].tolist(), blocks[order]
    bounds = [k for k in range(len(ordered)) if k == 0 or ordered[k] != ordered[k - 1]] + [len(ordered)]
    best, cut = [0.0] + [float("inf")] * (len(bounds) - 1), [0] * len(bounds)
    for m in range(1, len(bounds)):
        for k in range(m):
            segment = depth[bounds[k] : bounds[m]]
            cost = (best[k] + PASS_COST * int(segment.max()) * -(-len(segment) // per_pass(ordered[bounds[k]]))
                    + int(segment.sum()) * (ordered[bounds[k]] + 1))
            if cost < best[m]:
                best[m], cut[m] = cost, k
    segments, m = [], len(bounds) - 1
    while m:
        segment = order[bounds[cut[m]] : bounds[m]]
        segments.append(segment[torch.argsort(blocks[segment], stable=True)].split(per_pass(ordered[bounds[cut[m]]])))
        m = cut[m]
    return [chunk for segment in reversed(segments) for chunk in segment]


def corrupted_tails(
    states: States, start: int | Int[torch.Tensor, " rows"], batch: Batch, prompts: Int[torch.Tensor, " rows"],
    positions: Int[torch.Tensor, " rows"],
) -> Float[torch.Tensor, "rows pos d_model"]:
    """The corrupted residual stream entering block `start` (or each row's own `start[row]`) of each row's prompt,
    from its position on to its END (then padding, to the longest)."""
    at = tail_positions(batch, prompts, positions)
    if isinstance(start, int):
        return states.corrupt_pre[start][prompts[:, None], at]
    tails = states.corrupt_pre[0].new_empty((*at.shape, states.corrupt_pre[0].shape[-1]))
    for block in start.unique().tolist():
        rows = torch.nonzero(start == block).flatten().to(prompts.device)
        tails[rows] = states.corrupt_pre[block][prompts[rows, None], at[rows]]
    return tails


def tail_positions(batch: Batch, prompts: Int[torch.Tensor, " rows"], positions: Int[torch.Tensor, " rows"]) -> Int[torch.Tensor, "rows pos"]:
    """Each row's positions from `positions[row]` to its END, padded to the longest with positions of the batch (the
    padding is masked: any position will do)."""
    width = int((batch.ends[prompts] - positions).max()) + 1
    return (positions[:, None] + torch.arange(width, device=positions.device)).clamp(max=batch.tokens.shape[1] - 1)


def resume(
    model: LoadedModel, batch: Batch, states: States, prompts: Int[torch.Tensor, " rows"], positions: Int[torch.Tensor, " rows"],
    resid: Float[torch.Tensor, "rows pos d_model"], start: int | Int[torch.Tensor, " rows"], hooks: Sequence,
) -> Float[torch.Tensor, "rows vocab"]:
    """END logits of a pass that resumes `states`' run at block `start` (or each row at its own block `start[row]`,
    the rows in that order) and, on each row, at `positions[row]` of its prompt: `resid` is what enters the row's
    first block at its positions from there to END, the earlier positions are the run's keys and values
    (`left_padded_cache`), every row with its own position ids.

    A row joins the pass at its own block: each block runs only the rows that have joined (`_joined_rows`), so rows
    that resume at different blocks share each block's weight reads — on a CPU the cost of a pass's block beyond
    its tokens (`PASS_COST`) — and no row runs a block below its own. Every row runs the last block, whose MLP runs
    at END alone (`_end_only_mlp`): a hook on that MLP's output sees END as position 0."""
    at = tail_positions(batch, prompts, positions)
    computed = torch.arange(at.shape[1], device=at.device) <= (batch.ends[prompts] - positions)[:, None]
    starts = torch.as_tensor(start).expand(len(prompts)).cpu()
    first = int(starts.min())
    joined = [int((starts <= block).sum()) for block in range(model.cfg.n_layers)]  # the first joined[b] rows run block b
    cache, cached = left_padded_cache(states.kv, prompts, positions, joined)
    mask = torch.cat([cached, computed], 1).long()
    joins = [(act_name("resid_pre", block), _join(resid, joined[block - 1] if block > first else 0, joined[block]))
             for block in range(first, model.cfg.n_layers)
             if (joined[block] < len(prompts) if block == first else joined[block] > joined[block - 1])]
    ends = batch.ends[prompts] - positions
    last_mlp = (act_name("mlp_in", model.cfg.n_layers - 1), _end_only_mlp(ends))
    with bridge_reads_cache(model.bridge), _joined_rows(model.bridge, joined):
        return end_logits(model, None, mask, ends, [*joins, last_mlp, *hooks], resid=resid, start=first,
                          past_key_values=cache, position_ids=at)


def _end_only_mlp(ends: Int[torch.Tensor, " rows"]):
    """At the last block's MLP input: END's position alone. Nothing after the last block reads another position
    of the residual stream, and the block adds its MLP's [rows, 1, d_model] output to every position by
    broadcasting, so END's is exact and the MLP (three quarters of a SmolLM2 block's weights) runs on one token
    per row instead of the row's whole tail (on the default SmolLM2 trace, 171,236 of 4,062,255 token-blocks
    skip it: `benchmarks/trace_work.py`)."""
    return lambda x, hook: x[torch.arange(len(x), device=x.device), ends, None]


def _join(resid: Float[torch.Tensor, "rows pos d_model"], running: int, joined: int):
    """At a block's input: the rows already running (the first `running`; at the pass's first block, `resid` itself
    comes in), then those that join here, as they enter."""
    return lambda x, hook: torch.cat([x[:running], resid[running:joined]])


@contextmanager
def _joined_rows(bridge, joined: Sequence[int]):
    """Each block b runs the first `joined[b]` rows of the pass only: the model computes its per-row inputs to every
    block (attention mask, rotary position embeddings, position ids) for all the pass's rows at once, so they are
    cut to the rows that have joined on the way into each block that runs fewer."""
    rows = joined[-1]

    def cut(n: int):
        def take(value):
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == rows:
                return value[:n]
            if isinstance(value, tuple):
                return tuple(take(v) for v in value)
            return value

        def pre(module, args, kwargs):  # args[0], the block's hidden states, come already cut (`_join`)
            return (args[0], *(take(a) for a in args[1:])), {name: take(value) for name, value in kwargs.items()}

        return pre

    handles = [block.register_forward_pre_hook(cut(n), with_kwargs=True)
               for block, n in zip(bridge.blocks, joined) if 0 < n < rows]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def left_padded_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], prompts: Int[torch.Tensor, " rows"],
                       positions: Int[torch.Tensor, " rows"], joined: Sequence[int] | None = None
                       ) -> tuple[object, Bool[torch.Tensor, "rows prefix"]]:
    """The run's keys and values of each row's positions < `positions[row]`, as one fresh cache (a pass extends the
    cache it is given; None for an empty one) of the longest such prefix: shorter ones are padded on the left, so
    that every row's next position is the cache's next index and the distances between real positions are kept
    (sliding-window masks count them by index). With `joined`, layer b holds the first `joined[b]` rows only (those
    that run it, `resume`). Also which entries are real: the padding is masked, its attention weight exactly zero."""
    from transformers import DynamicCache

    length = int(positions.max())
    source = torch.arange(length, device=positions.device) - (length - positions[:, None])  # position each entry holds
    real = source >= 0
    if length == 0:
        return None, real
    cache = DynamicCache()
    index = source.clamp(min=0)
    for layer, (keys, values) in enumerate(kv):
        # a layer no row runs holds one row: the model's masks read the prefix's length off the first layer's
        # keys, and an empty tensor reads as no prefix
        n = len(prompts) if joined is None else max(joined[layer], 1)
        # [rows, prefix, kv_head, d_head] (the advanced indices come first) → [rows, kv_head, prefix, d_head]
        cache.update(keys[prompts[:n, None], :, index[:n]].transpose(1, 2),
                     values[prompts[:n, None], :, index[:n]].transpose(1, 2), layer)
    return cache, real
