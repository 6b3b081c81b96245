"""The load path's shortcuts change nothing: the folded-weights cache, and device="auto" (accelerate's device_map)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from tiny_models import FAMILIES

from factscope.data import encode_all, load_facts
from factscope.decompose import decompose
from factscope.models import load_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_folded_weights_read_back_give_the_same_model(family, model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    folded = load_model(str(model_dirs[family]))  # folds the weights and writes them to the cache
    assert len(list((tmp_path / "folded").glob("*.safetensors"))) == 1
    read_back = load_model(str(model_dirs[family]))
    assert len(list((tmp_path / "folded").glob("*.safetensors"))) == 1  # the same key: read, not folded again
    tokens = torch.tensor([folded.tokenizer("Fact: The Colosseum is in the country of")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(folded.bridge(tokens), read_back.bridge(tokens))


def test_device_map_auto_decomposes_like_one_device(model_dirs):
    """Without GPUs accelerate puts every layer on the CPU: the device_map path must give the same tables."""
    path = str(model_dirs["llama"])
    auto, plain = load_model(path, device="auto", prepend_bos=True), load_model(path, prepend_bos=True)
    encoded = encode_all(load_facts()[::12], plain.tokenizer, plain.prepend_bos)
    ours, theirs = decompose(auto, encoded, known_only=False), decompose(plain, encoded, known_only=False)
    pd.testing.assert_frame_equal(ours.attributions, theirs.attributions)
    pd.testing.assert_frame_equal(ours.logit_lens, theirs.logit_lens)


def test_an_unreadable_folded_file_is_folded_again(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    reference = load_model(str(model_dirs["llama"]))
    [folded_file] = (tmp_path / "folded").glob("*.safetensors")
    size = folded_file.stat().st_size
    folded_file.write_bytes(folded_file.read_bytes()[: size // 2])  # truncated (a damaged disk, a careless copy)
    rebuilt = load_model(str(model_dirs["llama"]))
    assert folded_file.stat().st_size == size
    tokens = torch.tensor([reference.tokenizer("Fact: Paris is the capital of")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(reference.bridge(tokens), rebuilt.bridge(tokens))
