"""Tiny randomly initialised models of each supported family, saved as local Hugging Face directories so that
tests go through exactly the loading path users take."""

from __future__ import annotations

from pathlib import Path

import torch

from factscope.data import load_facts

FAMILIES = {
    "llama": dict(
        config="LlamaConfig",
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=False,
    ),
    "gpt2": dict(config="GPT2Config", n_embd=32, n_layer=3, n_head=4, n_positions=128),
    "gemma3": dict(
        config="Gemma3TextConfig",
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        head_dim=8, max_position_embeddings=128, sliding_window=16, query_pre_attn_scalar=8,
    ),
    # Pythia: attention and MLP both read the block's input (parallel residual), rotary on a quarter of each head
    "neox": dict(
        config="GPTNeoXConfig",
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, use_parallel_residual=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
        max_position_embeddings=128, tie_word_embeddings=False,
    ),
    # Qwen2: GQA, and biases on q, k and v but not on the attention output
    "qwen2": dict(
        config="Qwen2Config",
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=False,
    ),
}


def build_tokenizer(texts: list[str]):
    """A byte-level BPE trained on the given texts: real offsets, a BOS token, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build_model_dir(family: str, folder: Path, seed: int = 0) -> Path:
    import transformers

    facts = load_facts()
    tokenizer = build_tokenizer([f.prompt + " " + f.attribute for f in facts])
    spec = dict(FAMILIES[family])
    config = getattr(transformers, spec.pop("config"))(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **spec,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init of norms is all-ones and of biases zero: perturb them so folding is tested
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
