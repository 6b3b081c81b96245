"""How much work each exact trace implementation does, counted rather than timed, for one noise draw, from the
prompts' lengths and subject positions alone (no forward pass is run): token-blocks (one token through one
transformer block) and block reads (one pass through one block, which reads that block's weights once whatever its
rows: on a CPU ~3 ms for SmolLM2, the cost of ~32 tokens, `resume.PASS_COST`).

    python benchmarks/trace_work.py [--model smollm2-135m] [--prompts 12,24,108]

- former: `trace_effects(kv_cache=False)` — per (kind, layer) the rows in chunks (`restoration_chunks`), each row
  at its chunk's width, from the first block the restoration changes (`restored_blocks`);
- new: the default — the rows of every (kind, layer) in shared passes (`resume.shared_passes`), each row from its restored
  position to END, padded to its pass's longest, joining the pass at its own first block (`resumed_block`: an MLP
  window one block after its first); the last block's MLP runs at END alone, so its other tokens there run
  attention only (counted apart: `end_only`, the tokens whose last-block MLP is skipped).
Both unembed every row once (the same in both, not counted). The ratios former/new bound what the new
implementation can gain at equal speed per token-block and per block read.
"""

from __future__ import annotations

import argparse

import torch

from factscope.causal.restorations import restoration_chunks, restored_blocks, resumed_block, trace_rows, trace_sites
from factscope.causal.scores import known_facts, spread
from factscope.causal.resume import shared_passes
from factscope.causal.trace import EXACT_KINDS, TRACE_KINDS, WINDOW, sequential
from factscope.data import encode_all, load_facts
from factscope.forward import make_batch
from factscope.models import load_model


def work(model, encoded, max_rows: int = 1024, kinds=EXACT_KINDS) -> dict[str, int]:
    """One draw's restoration passes: token-blocks and block reads of each implementation, and the rows restored,
    for the distinct restorations of `kinds` (`restorations.trace_sites`; by default the windows and MLP0 apart)."""
    n_layers = model.cfg.n_layers
    batch = make_batch(model, encoded)
    rows = trace_rows(batch)
    tails = batch.ends[rows.prompts] - rows.positions
    counts = dict.fromkeys(("former_tokens", "former_reads", "new_tokens", "new_reads", "end_only"), 0)
    starts = []
    for kind, layer in trace_sites(kinds, WINDOW, n_layers)[0]:
        if kind == "resid" and layer == n_layers - 1:  # no pass (`last_resid`)
            continue
        first = restored_blocks(kind, layer, WINDOW, n_layers)[0]
        starts.append(resumed_block(kind, layer, WINDOW, n_layers, sequential(model)))
        for chunk in restoration_chunks(batch, rows, max_rows):
            counts["former_tokens"] += len(chunk) * (int(batch.ends[rows.prompts[chunk]].max()) + 1) * (n_layers - first)
            counts["former_reads"] += n_layers - first
    blocks = n_layers - torch.tensor(starts).repeat_interleave(len(tails))
    shared = tails.repeat(len(starts))
    for chunk in shared_passes(shared, blocks, max_rows):
        counts["new_tokens"] += (int(shared[chunk].max()) + 1) * int(blocks[chunk].sum())
        counts["new_reads"] += int(blocks[chunk].max())
        counts["end_only"] += int(shared[chunk].max()) * len(chunk)
    return {**counts, "rows": len(shared), "restorations": len(starts)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", default="12,24,108", help="comma-separated prompt counts (spread over relations)")
    args = parser.parse_args()
    model = load_model(args.model)
    known = known_facts(model, encode_all(load_facts(), model.tokenizer, model.prepend_bos))
    for count in (int(n) for n in args.prompts.split(",")):
        encoded = spread(known, count)
        windows_only = work(model, encoded, kinds=TRACE_KINDS)
        counted = work(model, encoded)
        print(f"{len(encoded)} prompts, {counted['restorations']} restorations per position ({windows_only['restorations']} "
              f"without MLP0 apart: new token-blocks {windows_only['new_tokens']:,}), {counted['rows']:,} rows: "
              f"token-blocks former {counted['former_tokens']:,}, "
              f"new {counted['new_tokens']:,} (former/new={counted['former_tokens'] / counted['new_tokens']:.2f}), of which "
              f"{counted['end_only']:,} skip the last block's MLP; block reads former {counted['former_reads']:,}, "
              f"new {counted['new_reads']:,}")


if __name__ == "__main__":
    main()
