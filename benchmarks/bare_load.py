"""The baseline of BENCHMARKS.md's memory table: a bare Hugging Face load of a cached model and one 8-token forward
(which pages in every memory-mapped weight), no tokenizer, no factscope. Run it and `factscope analyze` each in its
own process and compare their peak RSS:

    FACTSCOPE_CACHE=... /usr/bin/time -v python benchmarks/bare_load.py smollm2-135m float32
    FACTSCOPE_CACHE=... /usr/bin/time -v factscope analyze --model smollm2-135m --dtype float32 --out run --threads 1

("Maximum resident set size" in each). Prints the process's resident memory (anonymous / file-backed) after the
imports, the load and the forward, the split that tells a library's heap from weights paged in from the file.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM

from factscope.models import cache_root


def status() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in MB."""
    with open("/proc/self/status") as lines:
        return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in lines
                if line.startswith(("VmRSS", "RssAnon", "RssFile"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a cached model's name (its folder under FACTSCOPE_CACHE/models)")
    parser.add_argument("dtype", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("imported", status(), file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(cache_root() / "models" / args.model, dtype=getattr(torch, args.dtype))
    print("loaded", status(), file=sys.stderr)
    with torch.inference_mode():
        model(torch.arange(1, 9)[None])
    print("forward", status(), file=sys.stderr)


if __name__ == "__main__":
    main()
