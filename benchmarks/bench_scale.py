"""The decomposition at the scale researchers study: time, peak memory and exactness on 2.8B-8B architectures.

    python benchmarks/bench_scale.py [--small] [--configs pythia-2.8b llama-3.1-8b qwen2.5-7b]
                                     [--dtypes float32 bfloat16] [--prompts 128] [--batch-size 16]
                                     [--device cuda|cuda:N|cpu] [--threads N] [--json PATH]

Each model is built in place from its published configuration (written out below, with the config.json it comes
from) with random weights: nothing is downloaded, and an 8B model is initialised directly on the GPU instead of
being saved and reloaded. `factscope.models.wrap_model` turns it into a `LoadedModel`, the same last step
`load_model` takes for a local Hugging Face directory, and the prompts run through `write_batches` / `finish_batches` as
`factscope analyze --all-prompts` runs them (every prompt decomposed, known or not, batches streamed to parquet).

Every (configuration, dtype) runs in its own subprocess, so that its peak memory is its own: on a GPU
`torch.cuda.max_memory_allocated` during the decomposition (weights included), on the CPU the process's peak RSS
(`ru_maxrss`, imports and model build included). Reported per row: build time, one warm-up batch excluded from
the timed decomposition of all prompts, a bare forward pass of the same batches through the wrapped Hugging Face
module (eager attention, every position unembedded: what `model(**batch)` costs), factscope's own exactness
figures (parts against the model's final residual unembedded in fp32, and that reference against the logits the
model computed in its dtype), and the direct one: max |sum of the answer's parts − the model's own logit|.

`--small` keeps each family and its features (GQA and its group size, llama3 rope scaling, qkv biases, parallel
residual, partial rotary, untied embeddings) at tiny widths, so the same code runs on a CPU in seconds and is
tested (tests/test_bench_scale.py). Without a GPU the full configurations are refused: Llama-3.1-8B needs 32 GB
in fp32 for its weights alone.

Random weights are not trained weights: a trained model's activations have outlier features that random ones
lack, so the bf16 errors here are a floor for what a trained model of the same shape gives, not a forecast.
Prompts are the shipped dataset (cycled with fresh ids past its 144 facts), tokenized by a byte-level BPE trained on
it (the tiny-model tests' tokenizer): 400 token ids of a vocabulary of the published size, so the unembedding and
the logit lens run over the full vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# the tests' byte-level BPE (trained on the prompts: real character offsets for the token groups, a BOS token, no
# download) is the benchmark's tokenizer too: one recipe, in tests/tiny_models.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import build_tokenizer  # noqa: E402

# Published hyper-parameters, in transformers 5's names (rope_theta / rope_scaling / rotary_pct of the
# config.json files became `rope_parameters`). Special-token ids are not listed: they are the benchmark
# tokenizer's, since its ids are the ones the prompts use.
PUBLISHED = {
    # https://huggingface.co/EleutherAI/pythia-2.8b/blob/main/config.json (the paper's model)
    "pythia-2.8b": dict(
        config="GPTNeoXConfig", vocab_size=50304, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, hidden_act="gelu", max_position_embeddings=2048, layer_norm_eps=1e-5,
        initializer_range=0.02, use_parallel_residual=True, attention_bias=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
    ),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama-3.1-8b": dict(
        config="LlamaConfig", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, initializer_range=0.02, attention_bias=False,
        mlp_bias=False, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json (Qwen2 puts biases on q, k, v, not on o)
    "qwen2.5-7b": dict(
        config="Qwen2Config", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1e-6, initializer_range=0.02, use_sliding_window=False, sliding_window=131072,
        max_window_layers=28, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}
# Parameter counts of the released checkpoints, which the configurations above must reproduce (tested on the meta
# device): Pythia's from its paper's table, the others from their model cards (8.03B, 7.61B).
PUBLISHED_PARAMETERS = {"pythia-2.8b": 2_775_208_960, "llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}
# Whether the model's own tokenizer prepends BOS (Llama 3's does, Pythia's and Qwen's do not): the BOS token group
# exists only then, so the head split covers what it covers on the real model.
PREPENDS_BOS = {"pythia-2.8b": False, "llama-3.1-8b": True, "qwen2.5-7b": False}

# --small: tiny widths and depth; everything that makes a family what it is stays as published. The query/KV group
# sizes are kept (Llama 4:1, Qwen 7:1), Pythia's rotary covers a quarter of each head, and llama3 rope scaling keeps
# its factors over a short original context.
SMALL = {
    "pythia-2.8b": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=256),
    "llama-3.1-8b": dict(vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         rope_parameters=dict(PUBLISHED["llama-3.1-8b"]["rope_parameters"],
                                              original_max_position_embeddings=64)),
    "qwen2.5-7b": dict(vocab_size=512, hidden_size=56, intermediate_size=192, num_hidden_layers=3,
                       num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=512,
                       sliding_window=512, max_window_layers=3),
}
DTYPES = ("float32", "bfloat16")


def hf_config(name: str, small: bool, tokenizer=None):
    """The transformers config of a published model (or its --small twin), special tokens the tokenizer's."""
    import transformers

    spec = dict(PUBLISHED[name])
    if small:
        spec.update(SMALL[name])
    tokens = {}
    if tokenizer is not None:
        if len(tokenizer) > spec["vocab_size"]:
            raise ValueError(f"{name}: tokenizer has {len(tokenizer)} tokens, the model {spec['vocab_size']}")
        tokens = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return getattr(transformers, spec.pop("config"))(**spec, **tokens)


def build_model(name: str, small: bool, dtype: str, device: str, seed: int = 0):
    """The model initialised in place on `device` in `dtype`, wrapped as factscope wraps any model; and the
    Hugging Face model's own parameter count and bytes, before the bridge adds anything."""
    import transformers

    from factscope.data import load_facts
    from factscope.models import DTYPES as TORCH_DTYPES
    from factscope.models import wrap_model

    with tempfile.TemporaryDirectory() as folder:
        # TransformerLens reloads the tokenizer from its `name_or_path` (with add_bos_token=True), so it has to come
        # from a directory, as every real model's does; the files are a few kB
        build_tokenizer([fact.prompt + " " + fact.attribute for fact in load_facts()]).save_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        config = hf_config(name, small, tokenizer)
        torch.manual_seed(seed)
        with torch.device(device):  # allocated and initialised where it runs: no CPU copy of 32 GB on the way
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype])
        with torch.no_grad():
            # Initialisation leaves every norm gain at one and every bias at zero; perturbed, the decomposition has
            # to account for them (the final norm's gain on the target columns, value biases with the attention
            # bias), as in tests/tiny_models.py.
            for param_name, param in hf.named_parameters():
                if "norm" in param_name or "ln" in param_name or param_name.endswith("bias"):
                    param.add_(0.1 * torch.randn_like(param))
        label = f"{name}{'-small' if small else ''} (random init, seed {seed})"
        own = {"parameters": sum(p.numel() for p in hf.parameters()), "bytes": parameter_bytes(hf)}
        model = wrap_model(hf, tokenizer, label, prepend_bos=PREPENDS_BOS[name], weights_sha256=f"random-init-seed-{seed}")
        return model, own


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters. Measured before and after wrapping, the
    difference is what the bridge added: GPT-NeoX's fused query_key_value is split into q, k and v copies (found
    by this benchmark: 23% more parameter memory on Pythia-2.8B), where Llama's and Qwen's are only viewed."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


def prompts(model, n: int):
    """n encoded prompts: the shipped dataset cycled with fresh ids past its length (as bench_analyze.py does)."""
    from factscope.data import encode_all, load_facts

    facts = load_facts()
    cycled = [dataclasses.replace(facts[i % len(facts)], prompt_id=f"{i}") for i in range(n)]
    return encode_all(cycled, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # kernels run asynchronously: wait for them inside each timing


def bare_forward(model, encoded, batch_size: int) -> None:
    from factscope.forward import pad_batch, pad_id
    from factscope.recall import chunks

    hf = model.bridge.original_model
    with torch.inference_mode():
        for batch in chunks(encoded, batch_size):
            tokens, mask, _ = pad_batch([item.token_ids for item in batch], pad_id(model.tokenizer))
            hf(input_ids=tokens.to(model.device), attention_mask=mask.to(model.device))


def answer_logit_error(staging: Path) -> tuple[float, float]:
    """max |Σ the answer's parts − the model's own logit for it| over prompts, and max |that logit| for scale.

    Straight from the run's tables: `value` over every component of the answer's rows of attributions.parquet,
    against recall.csv's logit, which the model computed in its own dtype.
    """
    import pandas as pd

    parts = pd.read_parquet(staging / "attributions.parquet", columns=["prompt_id", "is_correct_target", "value"])
    sums = parts[parts["is_correct_target"]].groupby("prompt_id")["value"].sum(min_count=1)
    logits = pd.read_csv(staging / "recall.csv", dtype={"prompt_id": str}).set_index("prompt_id")["logit"]
    if set(sums.index) != set(logits.index):
        raise RuntimeError("attributions and recall cover different prompts")
    return float((sums - logits[sums.index]).abs().max()), float(logits.abs().max())


def run_one(name: str, small: bool, dtype: str, device: str, n_prompts: int, batch_size: int) -> dict:
    """One configuration in this process; its peak memory is this process's."""
    import psutil

    from factscope.decompose import decompose, finish_batches, write_batches
    from factscope.rundir import RunDir

    import transformer_lens.model_bridge  # noqa: F401  (its import, ~2 s, is not part of the build)

    cuda = device.startswith("cuda")
    start = time.perf_counter()
    model, own = build_model(name, small, dtype, device)
    synchronize(device)
    build_s = time.perf_counter() - start
    weights_mb, bridge_copies_mb = own["bytes"] / 2**20, (parameter_bytes(model.bridge) - own["bytes"]) / 2**20
    encoded = prompts(model, n_prompts)
    # warm-up: first-call allocations, kernel selection, lazy imports; not part of the timing
    decompose(model, encoded[:batch_size], batch_size=batch_size, known_only=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # what the process holds before the decomposition: on a GPU the weights (and the warm-up's cached tensors), on
    # a CPU also the interpreter and libraries (~0.5 GB), which dwarf a --small model
    before_mb = (torch.cuda.memory_allocated(device) if cuda else psutil.Process().memory_info().rss) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run", Path(tmp) / "staging")
        run.staging.mkdir()
        synchronize(device)
        start = time.perf_counter()
        # what analyze --all-prompts runs
        summary = finish_batches(run, encoded, write_batches(run, model, encoded, batch_size, known_only=False))
        synchronize(device)
        decompose_s = time.perf_counter() - start
        # Linux reports ru_maxrss in KiB; read now, before the bare forward can add to it
        peak_mb = (torch.cuda.max_memory_allocated(device) if cuda
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        answer_error, logit_scale = answer_logit_error(run.staging)
    synchronize(device)
    start = time.perf_counter()
    bare_forward(model, encoded, batch_size)
    synchronize(device)
    forward_s = time.perf_counter() - start
    return {
        "config": name + ("-small" if small else ""), "dtype": dtype, "device": str(model.device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "parameters": own["parameters"],
        "layers": model.cfg.n_layers, "heads": model.cfg.n_heads, "prompts": len(encoded), "batch_size": batch_size,
        "threads": torch.get_num_threads(), "build_s": build_s, "decompose_s": decompose_s, "forward_s": forward_s,
        "weights_mb": weights_mb, "bridge_copies_mb": bridge_copies_mb, "peak_mb": peak_mb, "peak_kind": "cuda max_memory_allocated" if cuda else "peak RSS",
        "before_mb": before_mb,
        "reconstruction_error": summary["max_abs_reconstruction_error"], "head_error": summary["max_abs_head_error"],
        "model_logit_error": summary["max_abs_model_logit_error"], "answer_logit_error": answer_error,
        "max_abs_answer_logit": logit_scale, "tolerance": summary["tolerance"],
    }


def run_child(name: str, small: bool, dtype: str, args: argparse.Namespace) -> dict:
    """`run_one` in a fresh interpreter; its last stdout line is the row as JSON."""
    command = [sys.executable, __file__, "--child", name, dtype, "--device", args.device, "--prompts", str(args.prompts),
               "--batch-size", str(args.batch_size)]
    command += ["--small"] if small else []
    command += ["--threads", str(args.threads)] if args.threads else []
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"config": name + ("-small" if small else ""), "dtype": dtype, "failed": reason}
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    lines = ["| config | dtype | params | build | decompose | bare forward | ratio | weights | + bridge copies "
             "| before | peak "
             "| peak − before | parts − fp32 ref | ref − model logits | answer: parts − model logit | max abs logit "
             "| tolerance |", "|" + "---|" * 17]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['config']} | {row['dtype']} | failed: {row['failed']} |" + " |" * 14)
            continue
        lines.append(
            f"| {row['config']} | {row['dtype']} | {row['parameters'] / 1e6:,.2f} M | {row['build_s']:.2f} s "
            f"| {row['decompose_s']:.2f} s | {row['forward_s']:.2f} s | {row['decompose_s'] / row['forward_s']:.2f}× "
            f"| {row['weights_mb']:,.1f} MB | {row['bridge_copies_mb']:,.1f} MB | {row['before_mb']:,.0f} MB | {row['peak_mb']:,.0f} MB "
            f"| {row['peak_mb'] - row['before_mb']:,.0f} MB "
            f"| {row['reconstruction_error']:.1e} | {row['model_logit_error']:.1e} | {row['answer_logit_error']:.1e} "
            f"| {row['max_abs_answer_logit']:.2f} | {row['tolerance']} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny widths of the same families (CPU, seconds)")
    parser.add_argument("--configs", nargs="+", choices=list(PUBLISHED), default=list(PUBLISHED))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="analyze's default")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if torch sees a GPU, else cpu)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        if not args.small and not args.child and not torch.cuda.is_available():
            sys.exit("bench_scale: torch sees no GPU, and the published configurations need one (Llama-3.1-8B: 32 GB "
                     "of fp32 weights); run --small, or --device cpu on a machine with the memory")
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        name, dtype = args.child
        print(json.dumps(run_one(name, args.small, dtype, args.device, args.prompts, args.batch_size)))
        return
    rows = []
    for name in args.configs:
        for dtype in args.dtypes:
            rows.append(run_child(name, args.small, dtype, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress, and the raw numbers
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    if any("failed" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
