"""The baselines of BENCHMARKS.md's memory table: a bare Hugging Face load of a cached model and one forward (which
pages in every memory-mapped weight), no factscope; with `--tokenizer`, the model's tokenizer is loaded too (after
the model, as factscope loads them) and the forward runs on a tokenized prompt. Run it and `factscope analyze` each
in its own process and compare their peak RSS:

    FACTSCOPE_CACHE=... /usr/bin/time -v python benchmarks/bare_load.py smollm2-135m float32 --tokenizer
    FACTSCOPE_CACHE=... /usr/bin/time -v factscope analyze --model smollm2-135m --dtype float32 --out run --threads 1

and for a first run (`FACTSCOPE_CACHE` empty: the GGUF fetched, dequantized and cached, then `recall`), transformers'
own load of the same GGUF file:

    /usr/bin/time -v python benchmarks/bare_load.py CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf float32 --gguf
    FACTSCOPE_CACHE=$(mktemp -d) /usr/bin/time -v factscope recall --model smollm2-135m --out run --threads 1

("Maximum resident set size" in each). Prints the process's resident memory (anonymous / file-backed) after the
imports, the load and the forward, the split that tells a library's heap from weights paged in from the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from factscope.models import cache_root


def status() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in MB."""
    with open("/proc/self/status") as lines:
        return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in lines
                if line.startswith(("VmRSS", "RssAnon", "RssFile"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a cached model's name (its folder under FACTSCOPE_CACHE/models), or with --gguf "
                        "a .gguf file")
    parser.add_argument("dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer", action="store_true",
                        help="load the model's tokenizer too, after the model (as factscope does), and tokenize the input")
    parser.add_argument("--gguf", action="store_true",
                        help="`model` is a .gguf file, loaded (dequantized) by transformers itself: the first run's baseline")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("imported", status(), file=sys.stderr)
    folder, gguf = (Path(args.model).parent, {"gguf_file": Path(args.model).name}) if args.gguf else \
        (cache_root() / "models" / args.model, {})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype), **gguf)
    tokens = torch.arange(1, 9)[None]
    if args.tokenizer:
        tokens = AutoTokenizer.from_pretrained(folder, **gguf)("Fact: The Colosseum is in the country of", return_tensors="pt")["input_ids"]
    print("loaded", status(), file=sys.stderr)
    with torch.inference_mode():
        model(tokens)
    print("forward", status(), file=sys.stderr)


if __name__ == "__main__":
    main()
