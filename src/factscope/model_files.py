"""What factscope checks in a model's files before any library reads them.

A model directory is data from somewhere else: its config can name Python for transformers to import (`auto_map`),
its config can describe layers its weights do not hold (transformers initialises them at random, without a word,
and a config claiming 10^6 layers builds modules for ever), and a cache folder others can write to can hold weights
planted under a trusted name. Each check here reads only JSON and safetensors headers, so it answers in one line
before transformers, or the allocation of a single weight.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from .errors import FactscopeError

# where a block's index sits in a weight's name: Llama/Gemma/Qwen `model.layers.3.`, GPT-2 `h.3.`, GPT-NeoX
# `layers.3.`, BLOOM/Falcon `h.3.`, OPT/BERT-like `layer.3.`, TransformerLens-style `blocks.3.`
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
CONFIG_FILES = ("config.json", "tokenizer_config.json")
# the config may describe at most this many times the parameters the weights hold (tied embeddings, buffers and
# the lower bound's own slack stay far inside it; a config written for a model 10x larger does not)
PARAMETER_SLACK = 1.5


def read_json_object(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FactscopeError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(record, dict):
        raise FactscopeError(f"{path}: a JSON object expected, found {type(record).__name__}")
    return record


def refuse_custom_code(model_dir: Path) -> None:
    """Refuse a directory that ships Python for transformers to run: `auto_map` in its config or tokenizer config
    (the key `trust_remote_code=True` would act on), or any `*.py` beside the weights. Loading passes
    `trust_remote_code=False` as well; this check makes the refusal one line, before any prompt could be shown."""
    for name in CONFIG_FILES:
        path = model_dir / name
        if path.is_file() and "auto_map" in read_json_object(path):
            raise FactscopeError(
                f"{path}: names custom code (auto_map); factscope never runs a model directory's code — use a model "
                "that transformers supports natively"
            )
    code = sorted(file.name for file in model_dir.glob("*.py"))
    if code:
        raise FactscopeError(
            f"{model_dir / code[0]}: a model directory holding Python; factscope never runs a model directory's code"
        )


def weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Every weight's shape, from the safetensors headers alone (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as weights:
                for key in weights.keys():
                    shapes[key] = list(weights.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own SafetensorError, and OSError/ValueError by case
            raise FactscopeError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    return shapes


def _text_config(config: dict) -> dict:
    """The language model's part of a config: multimodal configs nest it as `text_config`."""
    nested = config.get("text_config")
    if "num_hidden_layers" not in config and "n_layer" not in config and isinstance(nested, dict):
        return nested
    return config


def _count(config: dict, path: Path, *keys: str, required: bool = False) -> int | None:
    for key in keys:
        if key in config and config[key] is not None:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FactscopeError(f"{path}: {key} must be a positive integer, found {value!r}")
            return value
    if required:
        raise FactscopeError(f"{path}: no {' or '.join(keys)}")
    return None


def check_weights_match_config(model_dir: Path) -> None:
    """The config's layers are the weights' layers, and the config's sizes fit the weights, or one line says which.

    Layers: the block indices in the weights' names must be exactly 0..num_hidden_layers-1; a config declaring more
    would get the extra layers initialised at random. Sizes: a lower bound on the parameters the config describes
    (attention's query and output projections, a two-matrix MLP, the embedding; every architecture holds at least
    these) may not exceed PARAMETER_SLACK times what the weights hold.
    """
    path = model_dir / "config.json"
    config = _text_config(read_json_object(path))
    layers = _count(config, path, "num_hidden_layers", "n_layer", "num_layers", required=True)
    shapes = weight_shapes(model_dir)
    held = sorted({int(match.group(1)) for name in shapes if (match := LAYER_INDEX.search(name))})
    if held and held != list(range(layers)):
        described = f"layers 0-{held[-1]}" if held == list(range(len(held))) else f"layer indices {held[:5]}…"
        raise FactscopeError(
            f"{path}: declares {layers} layers but the weights hold {len(held)} ({described}); factscope refuses a "
            "model whose missing layers transformers would fill with random weights"
        )
    width = _count(config, path, "hidden_size", "n_embd", "d_model") or 0
    mlp = _count(config, path, "intermediate_size", "n_inner", "ffn_dim") or 4 * width
    vocab = _count(config, path, "vocab_size") or 0
    described = layers * (width * width + 2 * width * mlp) + vocab * width
    holds = sum(_product(shape) for shape in shapes.values())
    if described > PARAMETER_SLACK * holds:
        raise FactscopeError(
            f"{path}: describes at least {described:,} parameters but the weights hold {holds:,}; the config does not "
            "belong to these weights"
        )


def _product(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def untrusted_cache_path(path: Path) -> str | None:
    """Why factscope may not use `path` in its cache, or None: anything there could have been planted by whoever
    owns it or can write to its folder, so only the current user's own files in folders only they can write count.
    A symbolic link is refused outright: the cache never reads or writes through one."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not by you (uid {os.getuid()})"
    if stat.S_ISDIR(info.st_mode) and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"a folder others can write to (mode {stat.S_IMODE(info.st_mode):o})"
    if not stat.S_ISDIR(info.st_mode) and not stat.S_ISREG(info.st_mode):
        return "neither a file nor a folder"
    return None


def refuse_untrusted_cache(*paths: Path) -> None:
    for path in paths:
        problem = untrusted_cache_path(path)
        if problem:
            raise FactscopeError(
                f"{path}: {problem}; factscope does not trust a cache entry others could have planted — remove it "
                "yourself, or point FACTSCOPE_CACHE at a folder only you can write"
            )
