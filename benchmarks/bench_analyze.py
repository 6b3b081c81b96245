"""Speed and memory of the decomposition against baselines run side by side on the same prompts.

    python benchmarks/bench_analyze.py [--model smollm2-135m] [--prompts 96] [--batch-size 16] [--threads N]
                                       [--device cpu|cuda|auto] [--scaling] [--cli-rss]

Baselines: a bare batched forward pass of a plain Hugging Face model loaded from the same weights (its default
attention, logits at every position: what `model(**batch)` costs), the floor; and the naive TransformerLens loop
(per-prompt `run_with_cache` of every hook, then the per-source DLA of that prompt). The last line is
`analyze/forward=X.XX tl_loop/analyze=Y.YY`.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from factscope.data import GROUPS, encode_all, load_facts
from factscope.decompose import decompose, finish_batches, write_batches
from factscope.forward import act_name, pad_batch, pad_id
from factscope.models import _resolve, load_model
from factscope.rundir import RunDir
from factscope.recall import chunks


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` wall times: the least disturbed by other processes on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU kernels run asynchronously: wait for them inside the timing
        best = min(best, time.perf_counter() - start)
    return best


def prompts(model, n: int):
    """n encoded prompts, cycling the shipped dataset with fresh ids when n exceeds it."""
    facts = load_facts()
    cycled = [dataclasses.replace(facts[i % len(facts)], prompt_id=f"{i}") for i in range(n)]
    return encode_all(cycled, model.tokenizer, model.prepend_bos)


class PeakRSS:
    """Peak resident memory while the block runs, sampled every 5 ms (ru_maxrss would include the model load)."""

    def __init__(self, pid: int | None = None):
        self.process = psutil.Process(pid)

    def __enter__(self):
        self.peak, self.running = 0, True
        self.baseline = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @property
    def above_baseline_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


LOAD = """
import time, torch
{set_threads}
import factscope.cli
{preimport}
start = time.perf_counter()
from factscope.models import load_model
load_model({name!r}, device={device!r})
print(time.perf_counter() - start)
"""


def load_seconds(name: str, device: str, threads: int | None, preimport: bool, repeats: int = 3) -> float:
    """`load_model` in a fresh process after `import factscope.cli`, as the CLI starts; best of 3.

    `preimport=False`: the process's first load, which imports transformers and TransformerLens (about 2 s) while
    it checks the cache entry's sha256. `preimport=True`: those libraries imported beforehand, the load itself.
    """
    code = LOAD.format(
        name=name,
        device=device,
        set_threads=f"torch.set_num_threads({threads})" if threads else "",
        preimport="import transformer_lens.model_bridge, transformers.models.auto.modeling_auto" if preimport else "",
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True) for _ in range(repeats)]
    return min(float(run.stdout) for run in runs)


def plain_hf(name: str, device: str):
    """The same weights as a plain Hugging Face model: no bridge, no hooks, default (SDPA) attention."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": "auto"} if device == "auto" else {}
    hf = AutoModelForCausalLM.from_pretrained(_resolve(name)[0], dtype=torch.float32, **placement)
    return (hf if device == "auto" else hf.to(device)).eval()


def bare_forward(hf, tokenizer, encoded, batch_size: int) -> None:
    with torch.inference_mode():
        for batch in chunks(encoded, batch_size):
            tokens, mask, _ = pad_batch([item.token_ids for item in batch], pad_id(tokenizer))
            hf(input_ids=tokens.to(hf.device), attention_mask=mask.to(hf.device))


def tl_loop(model, encoded) -> None:
    """What a user writes without factscope: cache everything per prompt, then split each head by source."""
    bridge, device = model.bridge, model.device
    w_o = bridge.W_O.to(device)  # the bridge stacks it on every access: once, as a careful user would
    gain = model.final_norm[0]
    with torch.inference_mode():
        for item in encoded:
            _, cache = bridge.run_with_cache(torch.tensor([item.token_ids], device=device))
            u = bridge.W_U[:, item.attribute_token] * gain / cache[act_name("final_scale")][0, -1].to(device)
            groups = torch.nn.functional.one_hot(
                torch.tensor([GROUPS.index(g) for g in item.groups], device=device), len(GROUPS)
            ).float()
            for layer in range(model.cfg.n_layers):
                pattern = cache[act_name("pattern", layer)][0, :, -1].to(device)  # [head, key]
                values = cache[act_name("v", layer)][0].to(device)
                values = values.repeat_interleave(model.cfg.n_heads // values.shape[1], dim=1)
                per_key = torch.einsum("hk,khd,hdm,m->hk", pattern, values, w_o[layer], u)
                (per_key @ groups).tolist()


def streamed(model, encoded, batch_size: int) -> None:
    """The default run's decomposition: every batch written to parquet as it finishes, then merged."""
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        run = RunDir(Path(tmp) / "run", staging)
        finish_batches(run, encoded, write_batches(run, model, encoded, batch_size))


LOADED_RSS = """
import factscope.cli, psutil
import torch
from factscope.models import load_model
model = load_model({name!r})
with torch.inference_mode():
    model.bridge(torch.tensor([[1, 2, 3]]))  # the weights are memory-mapped: one forward pages them in
print(psutil.Process().memory_info().rss)
"""


def cli_rss_mb(name: str) -> tuple[float, float]:
    """Peak RSS of a whole default `factscope analyze` run (report included), and of a process that only loads."""
    loaded = subprocess.run([sys.executable, "-c", LOADED_RSS.format(name=name)], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "factscope", "analyze", "--model", name, "--out", str(Path(tmp) / "run")]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with PeakRSS(child.pid) as memory:
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"factscope analyze exited with {child.returncode}")
    return memory.peak / 2**20, int(loaded.stdout) / 2**20


def scaling(model, batch_size: int) -> None:
    for n in (16, 64, 128, 256, 512):
        subset = prompts(model, n)
        seconds = timed(lambda subset=subset: decompose(model, subset, batch_size=batch_size), repeats=2)
        print(f"scaling {n:4d} prompts {seconds:7.2f} s  {1000 * seconds / n:6.1f} ms/prompt")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (accelerate's device_map)")
    parser.add_argument("--scaling", action="store_true", help="also time 16 → 512 prompts")
    parser.add_argument("--cli-rss", action="store_true", help="also measure a whole `factscope analyze` run's peak RSS")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    first_load = load_seconds(args.model, args.device, args.threads, preimport=False)
    load = load_seconds(args.model, args.device, args.threads, preimport=True)
    model = load_model(args.model, device=args.device)
    encoded = prompts(model, args.prompts)
    with torch.inference_mode():  # the weights are memory-mapped: one forward pages them in before the baseline
        model.bridge(torch.tensor([encoded[0].token_ids], device=model.device))
    with PeakRSS() as memory:
        streamed(model, encoded, args.batch_size)  # also the warm-up: first-call allocations and lazy imports
    hf = plain_hf(args.model, args.device)

    def analyze(known_only: bool = True):
        return decompose(model, encoded, batch_size=args.batch_size, known_only=known_only)

    t_forward = timed(lambda: bare_forward(hf, model.tokenizer, encoded, args.batch_size))
    t_wrapped = timed(lambda: bare_forward(model.bridge.original_model, model.tokenizer, encoded, args.batch_size))
    t_analyze = timed(analyze)
    t_analyze_all = timed(lambda: analyze(known_only=False))
    t_loop = timed(lambda: tl_loop(model, encoded), repeats=1)

    print(f"model {args.model} · {args.prompts} prompts · batch {args.batch_size} · threads {torch.get_num_threads()}"
          f" · device {args.device}")
    print(f"model load from cache      {load:7.2f} s  (transformers + TransformerLens imported; best of 3 processes)")
    print(f"  … a process's first load {first_load:7.2f} s  (importing those libraries too, as the CLI does)")
    print(f"bare batched HF forward    {t_forward:7.2f} s")
    print(f"  … the bridge's HF module {t_wrapped:7.2f} s  (eager attention, bridge wrappers, hooks idle)")
    print(f"factscope decompose        {t_analyze:7.2f} s  (known facts, the default)")
    print(f"  … with --all-prompts     {t_analyze_all:7.2f} s  ({t_analyze_all / t_forward:.2f}× forward)")
    print(f"naive TransformerLens loop {t_loop:7.2f} s")
    print(f"peak RSS above loaded model {memory.above_baseline_mb:6.0f} MB  (streamed decomposition to parquet)")
    if args.cli_rss:
        peak, loaded = cli_rss_mb(args.model)
        print(f"factscope analyze (whole default run) peak RSS {peak:.0f} MB, {peak - loaded:.0f} MB above a loaded model")
    if args.scaling:
        scaling(model, args.batch_size)
    print(f"analyze/forward={t_analyze / t_forward:.2f} tl_loop/analyze={t_loop / t_analyze:.2f}")


if __name__ == "__main__":
    main()
