"""A one-layer GPT-2 whose weights are set by hand, so the mechanism taxonomy has a known right answer.

Prompts read `Fact: <subject> <relation words> of`; at END (`of`):
- head 0 attends to the subject and writes the subject's own attribute: a subject head;
- head 1 attends to the relation's keyword and writes every attribute of the relation equally: a relation head;
- head 2 attends to the label `Fact:` (position 0: the `first` group) and writes every attribute of every
  relation: a large DLA to the correct attribute, but from neither SUBJECT nor RELATION, so negligible as a class;
- head 3 attends to END itself and writes every attribute of every relation: counted under `end`, so negligible
  as a class, but a relation head had END been counted in RELATION as the paper counts it (`paper_class`).
MLPs, position embeddings and all biases are zero; norm weights are 1.

Token t's embedding is e_{2t} − e_{2t+1}: zero-mean, so LayerNorm's centring leaves it alone and LayerNorm
only multiplies it by `1 / sqrt(2 / d_model + eps)`; and orthogonal to every other token's, so with tied
embeddings writing the embedding of `a` raises the logit of `a` alone. A WordLevel tokenizer makes every word
one token.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from factscope.data import Fact

# relation → (the words after the subject, the keyword the relation head reads, subject → attribute)
RELATIONS = {
    "city_country": (
        "is a city in the country of", "country",
        {"Paris": "France", "Rome": "Italy", "Tokyo": "Japan", "Cairo": "Egypt"},
    ),
    "fruit_colour": (
        "is a fruit with the colour of", "colour",
        {"banana": "yellow", "cherry": "red", "lime": "green", "plum": "purple"},
    ),
    "animal_sound": (
        "is an animal that makes the sound of", "sound",
        {"dog": "bark", "cat": "meow", "cow": "moo", "duck": "quack"},
    ),
}
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
N_HEADS = 4
SUBJECT_HEAD, RELATION_HEAD, PREFIX_HEAD, END_HEAD = range(N_HEADS)
WRITE = {SUBJECT_HEAD: 4.0, RELATION_HEAD: 2.0, PREFIX_HEAD: 1.0, END_HEAD: 1.0}  # size of each head's write
SCORE = 30.0  # attention score on the attended token (0 elsewhere): softmax leaves e^-30 for the rest
LN_EPS = 1e-5


def facts() -> list[Fact]:
    rows = []
    for relation, (words, _, attributes) in RELATIONS.items():
        for subject, attribute in attributes.items():
            prompt = f"Fact: {subject} {words}"
            rows.append(Fact(f"{relation}_{subject}", relation, subject, prompt, attribute, "handbuilt", len(rows) + 1))
    return rows


def vocabulary() -> list[str]:
    words = []
    for fact in facts():
        words += [w for w in f"{fact.prompt} {fact.attribute}".split() if w not in words]
    return SPECIALS + words


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def build_model_dir(folder: Path) -> Path:
    """Save the hand-set GPT-2 and its tokenizer as a local Hugging Face directory."""
    import transformers

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    n_subjects = sum(len(attributes) for *_, attributes in RELATIONS.values())
    d_head = max(math.ceil(len(vocab) / 2), n_subjects)  # room for pair embeddings and one value dim per subject
    d_model = N_HEADS * d_head
    config = transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=d_model, n_layer=1, n_head=N_HEADS, n_inner=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=LN_EPS, tie_word_embeddings=True,
        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
        _set_weights(model.transformer, vocab, d_model, d_head)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _set_weights(gpt2, vocab: dict[str, int], d_model: int, d_head: int) -> None:
    def direction(word: str) -> torch.Tensor:  # [d_model]: the word's embedding, = its unembedding (tied)
        vector = torch.zeros(d_model)
        vector[2 * vocab[word]], vector[2 * vocab[word] + 1] = 1.0, -1.0
        return vector

    for word, index in vocab.items():
        gpt2.wte.weight[index] = direction(word)
    attn = gpt2.h[0].attn
    qkv = attn.c_attn.weight  # [d_model, 3 d_model]: x @ qkv = (q | k | v), each split into heads of d_head
    out = attn.c_proj.weight  # [d_model, d_model]: z @ out, z = the heads' outputs side by side
    ln = 1.0 / math.sqrt(2.0 / d_model + LN_EPS)  # what ln_1 multiplies a pair embedding by
    gain = math.sqrt(SCORE * math.sqrt(d_head)) / ln  # q·k / sqrt(d_head) = SCORE between matching tokens

    def attend(head: int, keys: list[str]) -> None:
        qkv[2 * vocab["of"], head * d_head] = gain
        for word in keys:
            qkv[2 * vocab[word], d_model + head * d_head] = gain

    def write(head: int, slot: int, reads: str, vector: torch.Tensor) -> None:
        qkv[2 * vocab[reads], 2 * d_model + head * d_head + slot] = 1.0 / ln
        out[head * d_head + slot] = WRITE[head] * vector

    subjects = [pair for *_, attributes in RELATIONS.values() for pair in attributes.items()]
    attend(SUBJECT_HEAD, [subject for subject, _ in subjects])
    for slot, (subject, attribute) in enumerate(subjects):
        write(SUBJECT_HEAD, slot, subject, direction(attribute))
    attend(RELATION_HEAD, [keyword for _, keyword, _ in RELATIONS.values()])
    for slot, (_, keyword, attributes) in enumerate(RELATIONS.values()):
        write(RELATION_HEAD, slot, keyword, sum(direction(a) for a in attributes.values()))
    attend(PREFIX_HEAD, ["Fact:"])
    every_attribute = [a for *_, attributes in RELATIONS.values() for a in attributes.values()]
    write(PREFIX_HEAD, 0, "Fact:", sum(direction(a) for a in every_attribute))
    attend(END_HEAD, ["of"])
    write(END_HEAD, 0, "of", sum(direction(a) for a in every_attribute))
