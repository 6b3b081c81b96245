"""Speed of the decomposition against baselines run side by side on the same prompts.

    python benchmarks/bench_analyze.py [--model smollm2-135m] [--prompts 96] [--batch-size 16] [--scaling]

Baselines: a bare batched Hugging Face forward pass (the floor), and the naive TransformerLens loop
(per-prompt `run_with_cache` of every hook, then the per-source DLA of that prompt). The last line is
`analyze/forward=X.XX tl_loop/analyze=Y.YY`.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time

import psutil

import torch

from factscope.data import GROUPS, encode_all, load_facts
from factscope.decompose import decompose
from factscope.models import load_model, pad_batch, pad_id
from factscope.recall import chunks


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` wall times: the least disturbed by other processes on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def prompts(model, n: int):
    """n encoded prompts, cycling the shipped dataset with fresh ids when n exceeds it."""
    facts = load_facts()
    cycled = [dataclasses.replace(facts[i % len(facts)], prompt_id=f"{i}") for i in range(n)]
    return encode_all(cycled, model.tokenizer, model.prepend_bos)


class PeakRSS:
    """Peak resident memory while the block runs, sampled every 5 ms (ru_maxrss would include the model load)."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.baseline = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @property
    def above_baseline_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def bare_forward(model, encoded, batch_size: int) -> None:
    hf = model.bridge.original_model
    with torch.inference_mode():
        for batch in chunks(encoded, batch_size):
            tokens, mask, _ = pad_batch([item.token_ids for item in batch], pad_id(model.tokenizer))
            hf(input_ids=tokens, attention_mask=mask)


def tl_loop(model, encoded) -> None:
    """What a user writes without factscope: cache everything per prompt, then split each head by source."""
    bridge = model.bridge
    with torch.inference_mode():
        for item in encoded:
            _, cache = bridge.run_with_cache(torch.tensor([item.token_ids]))
            u = bridge.W_U[:, item.attribute_token] / cache["ln_final.hook_scale"][0, -1]
            groups = torch.nn.functional.one_hot(
                torch.tensor([GROUPS.index(g) for g in item.groups]), len(GROUPS)
            ).float()
            for layer in range(model.cfg.n_layers):
                pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1]  # [head, key]
                values = cache[f"blocks.{layer}.attn.hook_v"][0]
                values = values.repeat_interleave(model.cfg.n_heads // values.shape[1], dim=1)
                per_key = torch.einsum("hk,khd,hdm,m->hk", pattern, values, bridge.W_O[layer], u)
                (per_key @ groups).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--scaling", action="store_true", help="also time 16 → 512 prompts")
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_model(args.model)
    load_seconds = time.perf_counter() - start
    encoded = prompts(model, args.prompts)

    def analyze(known_only: bool = True):
        return decompose(model, encoded, batch_size=args.batch_size, known_only=known_only)

    with PeakRSS() as memory:
        analyze()  # also the warm-up: first-call allocations and lazy imports are not what we time
    t_forward = timed(lambda: bare_forward(model, encoded, args.batch_size))
    t_analyze = timed(analyze)
    t_analyze_all = timed(lambda: analyze(known_only=False))
    t_loop = timed(lambda: tl_loop(model, encoded), repeats=1)

    print(f"model {args.model} · {args.prompts} prompts · batch {args.batch_size} · threads {torch.get_num_threads()}")
    print(f"model load from cache      {load_seconds:7.2f} s")
    print(f"bare batched HF forward    {t_forward:7.2f} s")
    print(f"factscope decompose        {t_analyze:7.2f} s  (known facts, the default)")
    print(f"  … with --all-prompts     {t_analyze_all:7.2f} s  ({t_analyze_all / t_forward:.2f}× forward)")
    print(f"naive TransformerLens loop {t_loop:7.2f} s")
    print(f"peak RSS above loaded model {memory.above_baseline_mb:6.0f} MB")
    if args.scaling:
        for n in (16, 64, 128, 256, 512):
            subset = prompts(model, n)
            seconds = timed(lambda: decompose(model, subset, batch_size=args.batch_size), repeats=1)
            print(f"scaling {n:4d} prompts {seconds:7.2f} s  {1000 * seconds / n:6.1f} ms/prompt")
    print(f"analyze/forward={t_analyze / t_forward:.2f} tl_loop/analyze={t_loop / t_analyze:.2f}")


if __name__ == "__main__":
    main()
