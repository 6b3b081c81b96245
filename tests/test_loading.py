"""The load path as users meet it: a first load from an empty cache in a fresh process (a GGUF dequantized while
the libraries import in the background), and device="auto" (accelerate's device_map) changing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import build_tokenizer

from factscope.data import encode_all, load_facts
from factscope.decompose import decompose
from factscope.models import load_model


def write_tiny_gguf(path: Path) -> Path:
    """A two-layer llama in GGUF (fp32 tensors, the tiny models' BPE vocabulary), as llama.cpp lays it out."""
    import gguf

    tokenizer = build_tokenizer([f.prompt + " " + f.attribute for f in load_facts()])
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    d_model, d_mlp, layers, heads, kv_heads = 32, 64, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(d_model)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(d_mlp)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token.startswith("<") else 1 for token in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    rng = np.random.default_rng(0)

    def tensor(*shape, mean=0.0):
        return (mean + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    kv = d_model * kv_heads // heads
    writer.add_tensor("token_embd.weight", tensor(len(tokens), d_model))
    writer.add_tensor("output_norm.weight", tensor(d_model, mean=1.0))
    writer.add_tensor("output.weight", tensor(len(tokens), d_model))
    for layer in range(layers):
        shapes = {"attn_norm": (d_model,), "attn_q": (d_model, d_model), "attn_k": (kv, d_model), "attn_v": (kv, d_model),
                  "attn_output": (d_model, d_model), "ffn_norm": (d_model,), "ffn_gate": (d_mlp, d_model),
                  "ffn_up": (d_mlp, d_model), "ffn_down": (d_model, d_mlp)}
        for name, shape in shapes.items():
            writer.add_tensor(f"blk.{layer}.{name}.weight", tensor(*shape, mean=float(name.endswith("norm"))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_first_load_of_a_gguf_in_a_fresh_process(tmp_path):
    """The GGUF is dequantized while the background thread imports transformers: the loader's own import of
    transformers must wait for it (it raced it: "cannot import name 'AutoModelForCausalLM'"). pytest has imported
    transformers already, so only a fresh process with an empty cache meets this path."""
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    env = {**os.environ, "FACTSCOPE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "factscope", "recall", "--model", str(gguf_file), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "recall.csv").is_file()
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1


def test_device_map_auto_decomposes_like_one_device(model_dirs):
    """Without GPUs accelerate puts every layer on the CPU: the device_map path must give the same tables."""
    path = str(model_dirs["llama"])
    auto, plain = load_model(path, device="auto", prepend_bos=True), load_model(path, prepend_bos=True)
    encoded = encode_all(load_facts()[::12], plain.tokenizer, plain.prepend_bos)
    ours, theirs = decompose(auto, encoded, known_only=False), decompose(plain, encoded, known_only=False)
    pd.testing.assert_frame_equal(ours.attributions, theirs.attributions)
    pd.testing.assert_frame_equal(ours.logit_lens, theirs.logit_lens)


def test_offloaded_layers_are_refused_because_their_weights_cannot_be_read(tiny_llama_dir, tmp_path):
    """accelerate leaves an offloaded layer's weights on the meta device; TransformerLens still cannot read them.
    A CPU-only machine can offload only to disk, which accelerate handles as it handles CPU offload beside a GPU.
    If this starts to decompose, lift the refusal in `models._check_placement`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factscope.errors import FactscopeError
    from factscope.models import _check_placement, wrap_model

    layers = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    placement = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                 **{f"model.layers.{layer}": "disk" if layer % 2 else "cpu" for layer in range(layers)}}
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, device_map=placement, offload_folder=tmp_path)
    model = wrap_model(hf_model, AutoTokenizer.from_pretrained(tiny_llama_dir), "offloaded", prepend_bos=True)
    with pytest.raises(NotImplementedError, match="meta device"):
        decompose(model, encode_all(load_facts()[:4], model.tokenizer, model.prepend_bos), known_only=False)
    with pytest.raises(FactscopeError, match=r"\['cpu', 'disk'\] layers off them"):
        _check_placement(hf_model, "offloaded")


def test_a_tokenizer_that_prepends_bos_is_shared_with_the_bridge(tiny_llama_dir, tmp_path):
    """TransformerLens reloads a tokenizer whose add_bos_token is off (a second Gemma-3 tokenizer: 236 MB); one that
    prepends BOS itself is flagged instead, which must change none of its tokenizations."""
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factscope.models import wrap_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    texts = [fact.prompt for fact in load_facts()[::10]]
    before = [tokenizer(text, return_offsets_mapping=True).data for text in texts]
    assert all(ids["input_ids"][0] == tokenizer.bos_token_id for ids in before)
    model = wrap_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tokenizer, "bos-tokenizer")
    assert model.bridge.tokenizer is tokenizer
    assert [tokenizer(text, return_offsets_mapping=True).data for text in texts] == before
