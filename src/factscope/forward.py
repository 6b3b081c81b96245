"""Running the model at END, in one place: batches, passes that stop at the final norm, hook names, and the maths
that the decomposition and the causal edits both read off a pass (a head's END←group paths, the logit lens's
normalisation, each prompt's relation targets).

A batch is right-padded with an attention mask: with a causal mask real tokens never attend to padding, so every
prompt's END is simply its own last real position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int

from .data import Encoded
# shared with the server-side maths (`end_maths`), re-exported
from .end_maths import frozen_post_norm, head_group_z_at_end, heads_to_resid, lens_norm  # noqa: F401
from .errors import FactscopeError
from .models import LoadedModel
from .taxonomy import GROUPS

Hook = tuple[str, Callable]

# TransformerLens's hook vocabulary, which the bridge gives every architecture
_ACT_NAMES = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "final_scale": "ln_final.hook_scale",
    "final_out": "ln_final.hook_out",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",  # between attention and MLP (a sequential block only)
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_in": "blocks.{layer}.mlp.hook_in",  # what the MLP reads, after its pre-norm where there is one
    "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "v": "blocks.{layer}.attn.hook_v",
    "z": "blocks.{layer}.attn.hook_z",
    "post_norm_scale": "blocks.{layer}.ln1_post.hook_scale",  # the attention post-norm's scale (Gemma)
}


def act_name(name: str, layer: int | None = None) -> str:
    """The hook name of an activation, after TransformerLens's `get_act_name`: `act_name("pattern", 3)` is
    "blocks.3.attn.hook_pattern", `act_name("final_scale")` is "ln_final.hook_scale"."""
    template = _ACT_NAMES.get(name)
    if template is None:
        raise ValueError(f"unknown activation {name!r} (use {', '.join(_ACT_NAMES)})")
    if ("{layer}" in template) != (layer is not None):
        raise ValueError(f"activation {name!r} {'needs' if layer is None else 'takes no'} layer")
    return template.format(layer=layer)


# ---------------------------------------------------------------------------------------------------------------
# Batches and passes


def pad_batch(token_lists: list[list[int]], pad_id: int) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"], Int[torch.Tensor, " batch"]]:
    """Right-padded token ids, attention mask, and END index per prompt."""
    width = max(len(ids) for ids in token_lists)
    tokens = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    ends = torch.tensor([len(ids) - 1 for ids in token_lists])
    return tokens, mask, ends


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def end_logits(
    model: LoadedModel,
    tokens: Int[torch.Tensor, "batch pos"] | None,
    mask: Int[torch.Tensor, "batch pos"],
    ends: Int[torch.Tensor, " batch"],
    hooks: Sequence[Hook] = (),
    resid: Float[torch.Tensor, "batch pos d_model"] | None = None,
    start: int = 0,
    past_key_values=None,
    position_ids: Int[torch.Tensor, "batch pos"] | None = None,
) -> Float[torch.Tensor, "batch vocab"]:
    """One forward pass → the model's own logits at each prompt's END only, in fp32. The pass stops at the final
    norm, so vocabulary-sized logits are never built for other positions.

    `hooks` are TransformerLens (name, function) pairs. With `resid` (and no `tokens`), the pass starts at block
    `start` from that residual stream; the blocks below it are taken out of the model for the call, because
    TransformerBridge's `start_at_layer` would still run them and throw their output away. `past_key_values` (a
    transformers cache) holds the keys and values of positions before the ones passed; `mask` then covers both.
    `position_ids` are the positions of the tokens passed, where they are not simply those after the cache (a cache
    padded on the left).
    """
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    rows = torch.arange(len(ends), device=ends.device)

    def stop(normed: Float[torch.Tensor, "batch pos d_model"], hook) -> None:
        raise StopAtLayerException(normed[rows, ends])

    hooks = [*hooks, (act_name("final_out"), stop)]
    bridge = model.bridge
    extra = {} if past_key_values is None else {"past_key_values": past_key_values}
    if position_ids is not None:
        extra["position_ids"] = position_ids
    with torch.inference_mode(), _quiet_norm_edits():
        if resid is None:
            normed = bridge.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks, **extra)
        else:
            with _without_blocks_below(bridge, start):
                normed = bridge.run_with_hooks(resid, start_at_layer=start, attention_mask=mask, fwd_hooks=hooks, **extra)
        return unembed(model, normed)


def unembed(model: LoadedModel, normed: Float[torch.Tensor, "batch d_model"]) -> Float[torch.Tensor, "batch vocab"]:
    """Logits from the final norm's output, in fp32: one fused multiply-add (a separate bias add is a fifth of
    the unembedding's time on a CPU, every row over the whole vocabulary)."""
    return torch.addmm(model.b_U, normed, model.W_U).float()


# An engine runs one pass and returns what the decomposition reads (`END_TENSORS`): the model's logits at END in
# fp32, and the activations named by `act_name`, in fp32, at END only ([batch, ...]), except `v` (every key
# position, [batch, key, kv_head, d_head]) and `pattern` (END's query row, [batch, head, key]). The local engine
# is TransformerLens (`local_end_activations`); `nnsight_engine` runs the same pass through nnsight, locally or on
# NDIF, and sends back only these tensors.
Engine = Callable[
    [LoadedModel, Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"], Int[torch.Tensor, " batch"], Sequence[str]],
    tuple[Float[torch.Tensor, "batch vocab"], dict[str, torch.Tensor]],
]
FULL_POSITIONS = ("v",)  # the kinds an engine returns at every position (a head reads every key's value)


def local_end_activations(
    model: LoadedModel,
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Int[torch.Tensor, "batch pos"],
    ends: Int[torch.Tensor, " batch"],
    names: Sequence[str],
) -> tuple[Float[torch.Tensor, "batch vocab"], dict[str, torch.Tensor]]:
    """The TransformerLens engine: one pass whose hooks keep each named activation at END only (see `Engine`).

    Hooks rather than `run_with_cache`: a cache holds every position of every hook until the pass ends (~75 MB for
    SmolLM2 on 16 prompts), the largest allocation of a batch after the weights."""
    device = model.device
    ends = ends.to(device)
    rows = torch.arange(len(ends), device=device)
    full = {act_name(kind, layer) for kind in FULL_POSITIONS for layer in range(model.cfg.n_layers)}
    end = {}

    def keeper(name: str) -> Hook:
        # stored under the name asked for: the hook's own `name` is the bridge's, not its TransformerLens alias
        def keep(activation: torch.Tensor, hook) -> None:
            # with device_map="auto" each layer's activations stay on the GPU that ran it; the einsums need one
            # device, and the parts accumulate in fp32 whatever the model's dtype
            activation = activation.to(device)
            if name in full:
                end[name] = activation.float()
            elif name.endswith("hook_pattern"):
                end[name] = activation[rows, :, ends].float()
            else:
                end[name] = activation[rows, ends].float()
        return name, keep

    with torch.inference_mode():
        # logits_to_keep: the model unembeds END only; every position over the whole vocabulary is wasted work
        logits = model.bridge.run_with_hooks(
            tokens.to(device), attention_mask=mask.to(device), fwd_hooks=[keeper(name) for name in names],
            logits_to_keep=ends[:, None],
        )
        return logits[:, 0].float(), end


def prompt_end_logits(model: LoadedModel, token_lists: list[list[int]]) -> Float[torch.Tensor, "batch vocab"]:
    """END logits of prompts given as token ids: right-padded into one batch, returned on the CPU."""
    tokens, mask, ends = (t.to(model.device) for t in pad_batch(token_lists, pad_id(model.tokenizer)))
    return end_logits(model, tokens, mask, ends).float().cpu()


@contextmanager
def _without_blocks_below(bridge, start: int):
    """Drop blocks 0..start-1 from the HF model's layer list for one call (their output would be discarded)."""
    if start == 0:
        yield
        return
    hf_model = bridge.original_model
    name = next(
        (n for n, mod in hf_model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod) and mod[0] is bridge.blocks[0]),
        None,
    )
    if name is None:
        raise FactscopeError("cannot find the model's list of blocks to start a pass in the middle")
    parent_name, _, attr = name.rpartition(".")
    parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
    full = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList(list(full)[start:]))
    # Models with per-layer attention types (Gemma-3: five sliding-window layers, then a global one) pick each
    # layer's mask and rotary embedding by its index in the list (`config.layer_types[i]`): without the shift,
    # block `start` would get layer 0's type, and a pass started mid-model used local rotary on global layers.
    config = getattr(parent, "config", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = list(types)[start:]
    try:
        yield
    finally:
        setattr(parent, attr, full)
        if types is not None:
            config.layer_types = types


@contextmanager
def _quiet_norm_edits():
    # Freezing ln_final's scale makes TransformerLens rebuild the norm from the hooked values and say so.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        yield


def check_supported(model: LoadedModel) -> None:
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        raise FactscopeError(f"model {model.name!r}: soft-capped logits are not a linear function of the residual")


def group_onehot(batch: list[Encoded], width: int) -> Float[torch.Tensor, "batch pos group"]:
    onehot = torch.zeros((len(batch), width, len(GROUPS)))
    for row, item in enumerate(batch):
        for pos, group in enumerate(item.groups):
            onehot[row, pos, GROUPS.index(group)] = 1.0
    return onehot


@dataclass
class Batch:
    """All prompts right-padded into one batch; END is each prompt's own last real position."""

    items: list[Encoded]
    tokens: Int[torch.Tensor, "batch pos"]
    mask: Int[torch.Tensor, "batch pos"]
    ends: Int[torch.Tensor, " batch"]
    onehot: Float[torch.Tensor, "batch pos group"]  # token group of every position (GROUPS order), 0 on padding
    answers: Int[torch.Tensor, " batch"]  # the attribute's first token
    subject: Bool[torch.Tensor, "batch pos"]  # the subject's own positions (`Encoded.subject_positions`)

    @property
    def rows(self) -> Int[torch.Tensor, " batch"]:
        return torch.arange(len(self.items), device=self.tokens.device)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def relations(self) -> list[str]:
        """Each prompt's relation: what intervals over these prompts resample first (`bootstrap`)."""
        return [item.fact.relation for item in self.items]

    def logits(self, model: LoadedModel, hooks: Sequence[Hook] = ()) -> Float[torch.Tensor, "batch vocab"]:
        """One pass of the whole batch with `hooks` → logits at END (see `end_logits`)."""
        return end_logits(model, self.tokens, self.mask, self.ends, hooks)


def make_batch(model: LoadedModel, encoded: list[Encoded]) -> Batch:
    if not encoded:
        raise FactscopeError("no prompts to analyse (is the list of known facts empty?)")
    check_supported(model)
    tokens, mask, ends = pad_batch([item.token_ids for item in encoded], pad_id(model.tokenizer))
    onehot = group_onehot(encoded, tokens.shape[1])
    answers = torch.tensor([item.attribute_token for item in encoded])
    subject = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, item in enumerate(encoded):
        subject[row, item.subject_positions] = True
    device = model.device
    return Batch(encoded, tokens.to(device), mask.to(device), ends.to(device), onehot.to(device), answers.to(device),
                 subject.to(device))


def capture(store: dict, name: str, at_end: Int[torch.Tensor, " batch"] | None = None) -> Hook:
    """A hook that keeps a copy of an activation (only the END rows when `at_end` is given)."""

    def hook(x: torch.Tensor, hook) -> None:
        store[name] = (x[torch.arange(len(at_end), device=x.device), at_end] if at_end is not None else x).clone()

    return (name, hook)


# ---------------------------------------------------------------------------------------------------------------
# What the decomposition and the causal edits both compute from a pass


def head_group_z(
    pattern: Float[torch.Tensor, "batch head query key"],
    values: Float[torch.Tensor, "batch key kv_head d_head"],
    onehot: Float[torch.Tensor, "batch key group"],
    rows: Int[torch.Tensor, " batch"],
    ends: Int[torch.Tensor, " batch"],
    groups_first: bool = False,
) -> Float[torch.Tensor, "batch head group d_head"]:
    """Each head's z at END split by source group: `Σ_{k∈group} pattern[h, END, k] · v_k`.

    torch contracts an einsum's operands left to right, so the two operand orders round differently; the causal
    edits multiply the pattern by the groups first (`groups_first`), the decomposition by the values first, and
    each keeps its own so that its tables stay bit-identical.
    """
    return head_group_z_at_end(pattern[rows, :, ends], values, onehot, groups_first)


def head_values(model: LoadedModel, layer: int, v: Float[torch.Tensor, "batch key kv_head d_head"]) -> Float[torch.Tensor, "batch key kv_head d_head"]:
    """hook_v without the value bias, in fp32: the bias reaches END whatever a head attends to (its pattern sums to
    1), so it is counted with the attention output bias (`attn_bias`), not with any source group."""
    bias = model.b_V(layer)
    return v.float() if bias is None else v.float() - bias.float().to(v.device)


def value_bias_per_head(model: LoadedModel, layer: int) -> Float[torch.Tensor, "head d_head"] | None:
    """The value bias of the KV head each query head reads (GQA), in fp32."""
    bias = model.b_V(layer)
    return None if bias is None else bias.float().repeat_interleave(model.cfg.n_heads // bias.shape[0], dim=0)


def attn_bias(model: LoadedModel, layer: int) -> Float[torch.Tensor, " d_model"] | None:
    """What a layer's attention writes regardless of its inputs, in fp32: b_O, plus every head's value bias through
    its W_O; None for a bias-free layer."""
    b_o, b_v = model.b_O(layer), value_bias_per_head(model, layer)
    if b_o is None and b_v is None:
        return None
    total = torch.zeros(model.cfg.d_model, device=model.device) if b_o is None else b_o.float().to(model.device)
    if b_v is not None:
        total = total + torch.einsum("hd,hdm->m", b_v.to(model.device), model.W_O(layer).float().to(model.device))
    return total


def lens_normalise(model: LoadedModel, resid: Float[torch.Tensor, "*rows d_model"]) -> Float[torch.Tensor, "*rows d_model"]:
    """A residual-stream vector through the final norm with its OWN scale, not a frozen one, in fp32: what the
    logit lens unembeds (`end_maths.lens_norm`, which the nnsight engine runs on the server)."""
    gain, bias = model.final_norm
    return lens_norm(resid, gain, bias, model.cfg.eps, model.centres)


def target_ids(
    items: list[Encoded], targets: dict[str, dict[int, str]], with_answer: bool
) -> tuple[Int[torch.Tensor, "batch target"], Float[torch.Tensor, "batch target"]]:
    """Each prompt's R_r ∖ a (after a itself, `with_answer`) as token ids padded to the longest, and a validity mask.

    With the answer, padding repeats it, so every id is one of the prompt's own targets; without, padding is 0.
    """
    lists = [[item.attribute_token] * with_answer + [t for t in targets[item.fact.relation] if t != item.attribute_token]
             for item in items]
    width = max(1, max(len(ids) for ids in lists))
    ids = torch.zeros((len(lists), width), dtype=torch.long)
    valid = torch.zeros((len(lists), width))
    for row, tokens in enumerate(lists):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        if with_answer:
            ids[row, len(tokens) :] = tokens[0]
        valid[row, : len(tokens)] = 1.0
    return ids, valid
