"""How much work each exact trace implementation does, counted rather than timed: token-blocks (one token
through one transformer block) of every restoration pass for one noise draw, from the prompts' lengths and subject
positions alone (no forward pass is run).

    python benchmarks/trace_work.py [--model smollm2-135m] [--prompts 12,24,108]

- former: `trace_effects(kv_cache=False)` — per (kind, layer) the rows in chunks (`restoration_chunks`), each row
  at its chunk's width, from the first block the restoration changes (`restored_blocks`);
- new: the default — rows that resume at the same block share passes (`_passes`), each row from its restored
  position to END, padded to its pass's longest.
Both unembed every row once (the same in both, not counted). The ratio former/new bounds what the new
implementation can gain at equal speed per token-block.
"""

from __future__ import annotations

import argparse

from factscope.causal.restorations import restoration_chunks, restored_blocks, trace_rows
from factscope.causal.scores import known_facts, spread
from factscope.causal.trace import TRACE_KINDS, WINDOW, _passes
from factscope.data import encode_all, load_facts
from factscope.forward import make_batch
from factscope.models import load_model


def token_blocks(model, encoded, max_rows: int = 1024) -> tuple[int, int, int]:
    """(former, new, rows): the token-blocks of one draw's restoration passes, and how many rows they restore."""
    n_layers = model.cfg.n_layers
    batch = make_batch(model, encoded)
    rows = trace_rows(batch)
    tails = batch.ends[rows.prompts] - rows.positions
    former, starts = 0, []
    for kind in TRACE_KINDS:
        for layer in range(n_layers):
            if kind == "resid" and layer == n_layers - 1:  # no pass (`last_resid`)
                continue
            first = restored_blocks(kind, layer, WINDOW, n_layers)[0]
            starts.append(first)
            for chunk in restoration_chunks(batch, rows, max_rows):
                former += len(chunk) * (int(batch.ends[rows.prompts[chunk]].max()) + 1) * (n_layers - first)
    new = 0
    for first in sorted(set(starts)):
        shared = tails.repeat(starts.count(first))
        for chunk in _passes(shared, max_rows):
            new += len(chunk) * (int(shared[chunk].max()) + 1) * (n_layers - first)
    return former, new, len(rows.prompts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", default="12,24,108", help="comma-separated prompt counts (spread over relations)")
    args = parser.parse_args()
    model = load_model(args.model)
    known = known_facts(model, encode_all(load_facts(), model.tokenizer, model.prepend_bos))
    for count in (int(n) for n in args.prompts.split(",")):
        encoded = spread(known, count)
        former, new, rows = token_blocks(model, encoded)
        print(f"{len(encoded)} prompts, {rows} rows: former {former:,} token-blocks, new {new:,}, "
              f"former/new={former / new:.2f}")


if __name__ == "__main__":
    main()
