"""Speed of causal tracing, side by side in one process on the same prompts and seeds.

    python benchmarks/bench_trace.py [--model smollm2-135m] [--prompts 12] [--seeds 0] [--threads 1]
                                     [--repeats 1] [--skip-baseline | --skip-exact]

- exact, new: `trace_effects` (key/value cache, restorations that resume at the same block in shared passes)
  against the former full-width implementation (`kv_cache=False`), with the largest difference of their effects;
- AtP: `atp.atp_trace` (one forward and one backward per seed) against `decompose` (what `analyze` runs) on the
  same prompts, and against the exact trace.

The prompts are the model's known facts of the shipped dataset, spread over relations (`--prompts`), as `trace
--limit` takes them (`--prompts 0`: every known fact, as `trace` does by default). `--skip-exact` times AtP and
`decompose` only: the exact trace of the whole dataset at 3 draws takes tens of minutes on a CPU. Times are the best of `--repeats`. The last line is
`exact_old/exact_new=X.XX atp/decompose=Y.YY exact_new/atp=Z.ZZ max_abs_diff=D`.
"""

from __future__ import annotations

import argparse
import time

import torch

from factscope.causal.atp import atp_trace
from factscope.causal.scores import known_facts, spread
from factscope.causal.trace import trace_effects
from factscope.data import encode_all, load_facts
from factscope.decompose import decompose
from factscope.models import load_model


def timed(fn, repeats: int):
    """(best wall time, the last result): the best is the least disturbed by other processes on a shared machine."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--seeds", default="0", help="comma-separated noise seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the former implementation")
    parser.add_argument("--skip-exact", action="store_true", help="run neither exact implementation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    model = load_model(args.model)
    known = known_facts(model, encode_all(load_facts(), model.tokenizer, model.prepend_bos))
    encoded = spread(known, args.prompts) if args.prompts else known
    print(f"{model.name}: {len(encoded)} known prompts, seeds {seeds}, {torch.get_num_threads()} threads")

    new_s, ratio, difference = float("nan"), float("nan"), float("nan")
    if not args.skip_exact:
        new_s, new = timed(lambda: trace_effects(model, encoded, seeds=seeds), args.repeats)
        print(f"exact trace, key/value cache: {new_s:.2f} s")
    if not (args.skip_baseline or args.skip_exact):
        old_s, old = timed(lambda: trace_effects(model, encoded, seeds=seeds, kv_cache=False), args.repeats)
        difference = float((new.effects - old.effects).abs().max())
        ratio = old_s / new_s
        print(f"exact trace, full width (former): {old_s:.2f} s; max |Δ effect| {difference:.2e}")
    atp_s, _ = timed(lambda: atp_trace(model, encoded, seeds=seeds), args.repeats)
    decompose_s, _ = timed(lambda: decompose(model, encoded, known_only=False), args.repeats)
    print(f"AtP trace: {atp_s:.2f} s; decompose (analyze) of the same prompts: {decompose_s:.2f} s")
    print(f"exact_old/exact_new={ratio:.2f} atp/decompose={atp_s / decompose_s:.2f} exact_new/atp={new_s / atp_s:.2f} "
          f"max_abs_diff={difference:.2e}")


if __name__ == "__main__":
    main()
