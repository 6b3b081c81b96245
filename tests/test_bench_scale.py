"""benchmarks/bench_scale.py stays runnable and honest: its published configurations are the released models' (their
parameter counts, on the meta device), its --small twins keep each family's features, and a --small run decomposes
exactly within factscope's tolerance at both dtypes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factscope.taxonomy import TOLERANCES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["pythia-2.8b", "llama-3.1-8b", "qwen2.5-7b"])
def test_published_configs_have_the_released_parameter_count(name):
    import transformers

    module = bench()
    with torch.device("meta"):  # shapes only: 8B parameters, no memory
        model = transformers.AutoModelForCausalLM.from_config(module.hf_config(name, small=False))
    assert sum(p.numel() for p in model.parameters()) == module.PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", ["pythia-2.8b", "llama-3.1-8b", "qwen2.5-7b"])
def test_small_configs_keep_the_family_features(name):
    import transformers

    module = bench()
    full, small = module.hf_config(name, small=False), module.hf_config(name, small=True)
    assert type(full) is type(small)
    assert small.hidden_size < full.hidden_size / 20 and small.num_hidden_layers < full.num_hidden_layers
    for feature in ("use_parallel_residual", "attention_bias", "tie_word_embeddings", "hidden_act"):
        assert getattr(small, feature, None) == getattr(full, feature, None), feature
    for key in ("rope_type", "partial_rotary_factor", "factor", "low_freq_factor", "high_freq_factor"):
        assert small.rope_parameters.get(key) == full.rope_parameters.get(key), key
    group = lambda c: c.num_attention_heads // getattr(c, "num_key_value_heads", c.num_attention_heads)  # noqa: E731
    assert group(small) == group(full)  # GQA with the same number of query heads per KV head (1: none)
    with torch.device("meta"):
        built = transformers.AutoModelForCausalLM.from_config(small)
    attention = built.model.layers[0].self_attn if hasattr(built, "model") else built.gpt_neox.layers[0].attention
    if name == "qwen2.5-7b":  # biases on q, k, v and none on o: the value bias factscope counts with the attention bias
        assert all(getattr(attention, proj).bias is not None for proj in ("q_proj", "k_proj", "v_proj"))
        assert attention.o_proj.bias is None


def test_small_run_is_exact_at_both_dtypes(tmp_path):
    """The --small benchmark end to end (subprocesses, as users run it) on Qwen2.5's twin: GQA 7:1 and qkv biases."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--configs", "qwen2.5-7b", "--prompts", "48", "--threads", "1",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["config"], row["dtype"]) for row in rows] == [("qwen2.5-7b-small", "float32"), ("qwen2.5-7b-small", "bfloat16")]
    for row in rows:
        tolerance = TOLERANCES[row["dtype"]]
        assert row["tolerance"] == tolerance and row["prompts"] == 48
        assert row["reconstruction_error"] <= tolerance and row["head_error"] <= tolerance
        # the direct check: the answer's parts, read back from the run's tables, against the model's own logit; it
        # cannot exceed the two errors factscope reports (parts → fp32 reference → the model's logit) but by rounding
        assert row["answer_logit_error"] <= tolerance
        assert row["answer_logit_error"] <= row["reconstruction_error"] + row["model_logit_error"] + 1e-5
        assert row["peak_mb"] > 0 and row["decompose_s"] > 0 and row["max_abs_answer_logit"] > 0
        assert row["bridge_copies_mb"] == 0  # Qwen2's q, k, v are separate projections: the bridge only views them
    fp32 = rows[0]
    assert fp32["answer_logit_error"] < 1e-4  # fp32 is exact far inside its tolerance
    assert "| qwen2.5-7b-small | bfloat16 |" in result.stdout


def test_wrap_model_refuses_what_it_cannot_analyse(tmp_path):
    """An in-memory tokenizer (TransformerLens reloads it from its directory) and a dtype factscope does not run are
    refused in one line before any wrapping."""
    import transformers

    from factscope.errors import FactscopeError
    from factscope.models import wrap_model

    module = bench()
    in_memory = module.build_tokenizer(["The Colosseum is in Italy"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(module.hf_config("llama-3.1-8b", small=True))
    with pytest.raises(FactscopeError, match="loaded from a directory"):
        wrap_model(model, in_memory, "tiny")
    in_memory.save_pretrained(tmp_path)
    with pytest.raises(FactscopeError, match="float64"):
        wrap_model(model.to(torch.float64), transformers.AutoTokenizer.from_pretrained(tmp_path), "tiny")
