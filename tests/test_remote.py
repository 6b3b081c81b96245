"""The nnsight engine (`nnsight_engine`) against the TransformerLens engine, and `--remote`'s planning and errors.

Nothing here reaches NDIF: the engine runs in this process, plainly and through nnsight's serialisation path
(`remote="local"`, what a remote run sends), and the remote errors are produced with the transport (httpx) mocked
at its boundary. The attributions must be *bitwise* equal: both engines read the same fp32 tensors off the same
weights (eager attention's probabilities are TransformerLens's hook_pattern), and the maths are shared.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

pytest.importorskip("nnsight")

from factscope.data import encode_all, load_facts  # noqa: E402
from factscope.decompose import decompose  # noqa: E402
from factscope.errors import FactscopeError  # noqa: E402
from factscope.models import load_model  # noqa: E402
from factscope.nnsight_engine import local_engine  # noqa: E402


def assert_same_decomposition(a, b) -> None:
    for table in ("attributions", "logit_lens", "recall"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table), check_exact=True)
    for error in ("max_abs_reconstruction_error", "max_abs_head_error", "max_abs_model_logit_error"):
        assert getattr(a, error) == getattr(b, error)


@pytest.fixture(scope="module")
def tiny(model_dirs):
    torch.set_num_threads(1)
    model = load_model(str(model_dirs["llama"]))
    encoded = encode_all(load_facts()[:24], model.tokenizer, model.prepend_bos)
    return model_dirs["llama"], model, encoded, decompose(model, encoded, batch_size=8, known_only=False)


@pytest.mark.parametrize("remote", [False, "local"])
def test_nnsight_engine_equals_local_engine_bitwise(tiny, remote):
    folder, model, encoded, expected = tiny
    engine = local_engine(str(folder), remote=remote)
    got = decompose(model, encoded, batch_size=8, known_only=False, engine=engine)
    assert_same_decomposition(expected, got)
    assert engine.requests == 3  # one trace per batch of 8


def test_nnsight_engine_with_value_biases(model_dirs):
    """Qwen2 (GQA, biases on v): the value bias reaches the engine inside v_proj's output, as in hook_v."""
    model = load_model(str(model_dirs["qwen2"]))
    encoded = encode_all(load_facts()[:8], model.tokenizer, model.prepend_bos)
    expected = decompose(model, encoded, known_only=False)
    got = decompose(model, encoded, known_only=False, engine=local_engine(str(model_dirs["qwen2"])))
    assert_same_decomposition(expected, got)


def test_unknown_architecture_is_refused_by_name(model_dirs):
    with pytest.raises(FactscopeError, match="GPT2LMHeadModel"):
        local_engine(str(model_dirs["gpt2"]))


def test_engine_refuses_a_tensor_it_cannot_read(tiny):
    folder, model, encoded, _ = tiny
    engine = local_engine(str(folder))
    tokens = torch.tensor([encoded[0].token_ids])
    with pytest.raises(FactscopeError, match="blocks.0.ln1_post.hook_scale"):
        engine(model, tokens, torch.ones_like(tokens), torch.tensor([tokens.shape[1] - 1]),
               ["blocks.0.ln1_post.hook_scale"])


@pytest.mark.real
def test_nnsight_engine_equals_local_engine_on_smollm2():
    """The real model, fp32, through the serialisation path: every attribution bit for bit."""
    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    encoded = encode_all(load_facts()[:16], model.tokenizer, model.prepend_bos)
    expected = decompose(model, encoded, known_only=False)
    engine = local_engine("smollm2-135m", remote="local")
    assert_same_decomposition(expected, decompose(model, encoded, known_only=False, engine=engine))
