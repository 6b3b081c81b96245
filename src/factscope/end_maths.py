"""The decomposition's weight-dependent maths at END, as plain torch functions that run wherever the weights are.

The local engine calls them in this process; a remote run (`nnsight_engine.NnsightEngine.project`) calls them
*inside* the nnsight trace, on the machine that holds the model, and only their small results come back: per head
and source group the logit contribution to each target, not the weights or the residual stream. Both paths run the
same functions in the same order, so on the same hardware they give the same bits.

Constraints that come from running on a server which has torch and nnsight but not factscope:
- this module imports torch only (jaxtyping under TYPE_CHECKING: with postponed annotations they stay strings), and
  calls nothing of factscope's, because nnsight ships these functions by source (the engine registers the module
  with cloudpickle to be pickled by value) and the server resolves their globals itself;
- every index or mask made on the client is moved to the activation's device before use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable

    from jaxtyping import Bool, Float, Int

RECALL_TOP_K = 5
LENS_CHUNK = 1024  # vocabulary entries per step: 1024 × (batch · layers) logits stay in cache while they are reduced


def to_logit(
    vectors: Float[torch.Tensor, "batch *parts d_model"],
    scale: Float[torch.Tensor, "batch 1"],
    unembed: Float[torch.Tensor, "batch d_model target"],
) -> Float[torch.Tensor, "batch *parts target"]:
    """Residual-stream vectors at END → their logit contribution to each target, the final norm's scale frozen."""
    extra = vectors.dim() - 2
    return torch.einsum("b...d,bdt->b...t", vectors / scale.reshape(-1, *([1] * (extra + 1))), unembed)


def unembed_columns(
    w_u: Float[torch.Tensor, "d_model vocab"],
    w_u_mean: Float[torch.Tensor, " d_model"],
    targets: Int[torch.Tensor, "batch target"],
    gain: Float[torch.Tensor, " d_model"],
) -> tuple[Float[torch.Tensor, "d_model batch target_and_mean"], Float[torch.Tensor, "batch d_model target_and_mean"]]:
    """The targets' unembedding columns and, last, the vocabulary's average column (fp32), and the same with the final
    norm's gain folded into these few columns only (`unembed`, laid out for `to_logit`)."""
    columns = torch.cat([w_u[:, targets].float(), w_u_mean[:, None, None].expand(-1, targets.shape[0], 1)], dim=2)
    return columns, (columns * gain[:, None, None]).permute(1, 0, 2)


def _llama_rms_norm(x: Float[torch.Tensor, "*rows d_model"], weight: Float[torch.Tensor, " d_model"],
                    eps: float) -> Float[torch.Tensor, "*rows d_model"]:
    """Llama, Mistral and Qwen2's RMSNorm: fp32 inside, cast back to the input's dtype before the weight."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def _gemma_rms_norm(x: Float[torch.Tensor, "*rows d_model"], weight: Float[torch.Tensor, " d_model"],
                    eps: float) -> Float[torch.Tensor, "*rows d_model"]:
    """Gemma 3's RMSNorm: the gain is `1 + weight`, applied in fp32, and only the product is cast back."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (hidden * (1.0 + weight.float())).type_as(x)


# an RMSNorm's arithmetic by the name `nnsight_engine.ModulePaths.norm` gives it: the server reads the weight, and
# the gain must come out of the same operations, in the same dtypes, as the module the local engine probes
RMS_NORMS = {"llama": _llama_rms_norm, "gemma": _gemma_rms_norm}


def rms_gain(weight: Float[torch.Tensor, " d_model"], eps: float, norm: str = "llama") -> Float[torch.Tensor, " d_model"]:
    """An RMSNorm's gain in fp32, read the way `models._norm_affine` reads it: a constant probe, whose RMS is the
    constant itself, through the norm's own arithmetic (`RMS_NORMS[norm]`)."""
    probe = torch.full((1, 1, weight.shape[0]), 1e3, dtype=weight.dtype, device=weight.device)
    return RMS_NORMS[norm](probe, weight, eps).reshape(-1).float()


def lens_norm(
    resid: Float[torch.Tensor, "*rows d_model"], gain: Float[torch.Tensor, " d_model"], bias: Float[torch.Tensor, " d_model"],
    eps: float, centres: bool = False,
) -> Float[torch.Tensor, "*rows d_model"]:
    """A residual-stream vector through the final norm with its OWN scale, not a frozen one, in fp32: what the
    logit lens unembeds (`centres`: a LayerNorm's mean is removed first)."""
    resid = resid.float()
    if centres:
        resid = resid - resid.mean(-1, keepdim=True)
    return resid / (resid.pow(2).mean(-1, keepdim=True) + eps).sqrt() * gain + bias


def unembed(vectors: Float[torch.Tensor, "batch d_model"], w_u: Float[torch.Tensor, "d_model vocab"],
            b_u: Float[torch.Tensor, " vocab"] | None = None) -> Float[torch.Tensor, "batch vocab"]:
    """Vectors times W_U (plus b_U), returned in fp32 but multiplied in the unembedding's dtype: a vocabulary-sized
    fp32 copy of W_U would be the largest tensor of the analysis."""
    logits = vectors.to(w_u.dtype) @ w_u
    return (logits if b_u is None else logits + b_u).float()


def lens_logits(vectors: Float[torch.Tensor, "batch d_model"], lens: dict) -> Float[torch.Tensor, "batch vocab"]:
    """The logit lens of residual-stream vectors: `lens_norm`, then `unembed`. `lens` holds the model's "w_u"
    [d_model, vocab] and "b_u" (None: no bias, a zero one is added as the local model adds its zeros), the final
    norm's fp32 "gain" and "bias", its "eps" and whether it "centres"."""
    w_u, b_u = lens["w_u"], lens["b_u"]
    if b_u is None:
        b_u = torch.zeros(w_u.shape[1], device=w_u.device, dtype=w_u.dtype)
    device = w_u.device
    normed = lens_norm(vectors.to(device), lens["gain"].to(device), lens["bias"].to(device), lens["eps"], lens["centres"])
    return unembed(normed, w_u, b_u)


def answer_ranks(logits: Float[torch.Tensor, "batch vocab"], ids: Int[torch.Tensor, "batch n"]) -> Int[torch.Tensor, "batch n"]:
    """The rank (1 = top) of each of `ids` in its prompt's logits."""
    # one column at a time: a [batch, n, vocab] comparison would not fit for Gemma's 262k vocabulary
    chosen = logits.gather(1, ids.to(logits.device))
    return torch.stack([(logits > chosen[:, [j]]).sum(-1) + 1 for j in range(ids.shape[1])], dim=1)


# Attribute extraction (`causal.extraction`): what is read at END per layer, how it is projected to the vocabulary,
# and the events counted per prompt, in the order of `extraction_events`' axes
SUBLAYER_OUTPUTS = ("attn", "mlp")  # what the attention and the MLP add to the residual stream (attn_out, mlp_out)
PROJECTIONS = ("raw", "normed")  # W_U alone (Geva et al.), and the logit lens (`lens_logits`)
EXTRACTION_EVENTS = ("extraction_rate", "attribute_rate", "extraction_rate_top_k")


def extraction_events(reads: dict, lens: dict, answers: Int[torch.Tensor, " batch"],
                      top_k: int) -> dict[str, torch.Tensor]:
    """Geva et al.'s extraction events of every sublayer's END output: `reads` holds, per name of
    `SUBLAYER_OUTPUTS`, one [batch, d_model] tensor per layer, and "logits", the model's END logits. Per prompt,
    for each projection (`PROJECTIONS`): the top-1 token is the model's own top-1 prediction, it is the attribute,
    the prediction is among the `top_k` tokens. → {"events": [layer, sublayer, projection, event, batch] bool}, a
    few bytes per prompt where the projections are vocabulary-sized."""
    with torch.no_grad():  # the weights are parameters and the pass may run with autograd on
        device = lens["w_u"].device
        predicted, answers = reads["logits"].to(device).argmax(-1), answers.to(device)
        layers = []
        for layer in range(len(reads[SUBLAYER_OUTPUTS[0]])):
            sublayers = []
            for sublayer in SUBLAYER_OUTPUTS:
                output = reads[sublayer][layer].to(device)
                projected = (unembed(output, lens["w_u"]), lens_logits(output, lens))  # in the order of PROJECTIONS
                events = []
                for logits in projected:
                    top = logits.topk(top_k, dim=-1).indices  # [batch, k]
                    events.append(torch.stack([top[:, 0] == predicted, top[:, 0] == answers,
                                               (top == predicted[:, None]).any(1)]))
                sublayers.append(torch.stack(events))
            layers.append(torch.stack(sublayers))
        return {"events": torch.stack(layers)}


def lens_ranks(reads: dict, lens: dict, ids: Int[torch.Tensor, "batch n"]) -> dict[str, torch.Tensor]:
    """The logit lens of the residual stream after every layer (`reads["resid"]`, one [batch, d_model] tensor per
    layer): the rank of each of `ids` → {"ranks": [layer, batch, n]}, never the vocabulary-sized logits."""
    with torch.no_grad():
        return {"ranks": torch.stack([answer_ranks(lens_logits(resid, lens), ids) for resid in reads["resid"]])}


def rms_scale(resid: Float[torch.Tensor, "batch d_model"], eps: float) -> Float[torch.Tensor, "batch 1"]:
    """The final norm's scale at END, in the order TransformerLens's normalisation bridge computes hook_scale."""
    return (resid.float().pow(2).mean(-1, keepdim=True) + eps).sqrt()


def head_group_z_at_end(
    pattern: Float[torch.Tensor, "batch head key"],
    values: Float[torch.Tensor, "batch key kv_head d_head"],
    onehot: Float[torch.Tensor, "batch key group"],
    groups_first: bool = False,
) -> Float[torch.Tensor, "batch head group d_head"]:
    """Each head's z at END split by source group, `Σ_{k∈group} pattern[h, END, k] · v_k`, from END's row of the
    pattern only. torch contracts an einsum's operands left to right, so the two operand orders round differently;
    the causal edits multiply by the groups first (`groups_first`), the decomposition by the values first."""
    values = values.repeat_interleave(pattern.shape[1] // values.shape[2], dim=2)  # GQA: query head h reads kv head h // group
    if groups_first:
        return torch.einsum("bhk,bkg,bkhd->bhgd", pattern, onehot, values)
    return torch.einsum("bhk,bkhd,bkg->bhgd", pattern, values, onehot)


def heads_to_resid(
    z: Float[torch.Tensor, "batch head group d_head"], w_o: Float[torch.Tensor, "head d_head d_model"]
) -> Float[torch.Tensor, "batch head group d_model"]:
    """Per-head, per-group z through each head's own W_O, into the residual stream."""
    return torch.einsum("bhgd,hdm->bhgm", z, w_o)


def head_norms(w_o: Float[torch.Tensor, "head d_head d_model"],
               gain: Float[torch.Tensor, " d_model"] | None = None) -> Float[torch.Tensor, " head"]:
    """The Frobenius norm of each head's map from z to the residual stream (times the attention post-norm's gain
    where there is one; a frozen post-norm scale divides it): what a head's noise is measured against."""
    return (w_o if gain is None else w_o * gain).flatten(1).norm(dim=-1)


def head_out_map(
    o_weight: Float[torch.Tensor, "d_model head_d_head"], d_head: int, post_norm: tuple | None = None,
) -> tuple[Callable, Float[torch.Tensor, "*batch head"]]:
    """A layer's heads' map from z at END to the residual stream, from Hugging Face tensors as `causal.edits` builds
    it from TransformerLens's: o_proj's weight as W_O per head, then, with `post_norm` = (its input at END, its
    weight, eps, the norm's kind), the attention post-norm with that END scale frozen (Gemma). → the map and its
    norm per head (`head_norms`; [batch, head] with a post-norm)."""
    w_o = o_weight.detach().T.reshape(-1, d_head, o_weight.shape[0]).float()
    if post_norm is None:
        return (lambda z: heads_to_resid(z, w_o.to(z.device))), head_norms(w_o)
    post_in, weight, eps, norm = post_norm
    gain = rms_gain(weight.detach(), eps, norm).to(w_o.device)
    scale = rms_scale(post_in, eps).to(w_o.device)
    frozen = frozen_post_norm(gain, scale)
    return (lambda z: frozen(heads_to_resid(z, w_o.to(z.device)))), head_norms(w_o, gain) / scale


def head_paths_at_end(
    v: Float[torch.Tensor, "batch key kv_head_d_head"], v_bias: Float[torch.Tensor, " kv_head_d_head"] | None,
    pattern: Float[torch.Tensor, "batch head key"], onehot: Float[torch.Tensor, "batch key group"], d_head: int,
    to_resid: Callable,
) -> Float[torch.Tensor, "batch head group d_model"]:
    """Every head path's vector at END, from a pass's Hugging Face tensors (v_proj's output and bias, END's row of
    the pattern) as `causal.edits` builds it from TransformerLens's: the value bias left out, the groups multiplied
    first (`head_paths_z`), then the heads' map to the residual stream (`head_out_map`)."""
    return to_resid(head_paths_z(v, v_bias, pattern, onehot, d_head))


def head_paths_z(
    v: Float[torch.Tensor, "batch key kv_head_d_head"], v_bias: Float[torch.Tensor, " kv_head_d_head"] | None,
    pattern: Float[torch.Tensor, "batch head key"], onehot: Float[torch.Tensor, "batch key group"], d_head: int,
) -> Float[torch.Tensor, "batch head group d_head"]:
    """`head_paths_at_end` before the heads' map: each head's z at END by source group, d_head wide where the
    vectors are d_model wide, so a session can keep every layer's until after its backward pass."""
    values = v.detach().view(v.shape[0], v.shape[1], -1, d_head).float()
    if v_bias is not None:  # counted with the attention bias, not with a source group
        values = values - v_bias.detach().float().view(-1, d_head).to(values.device)
    return head_group_z_at_end(pattern.detach().float(), values, onehot.to(values.device), groups_first=True)


def add_at_end(x, rows: Int[torch.Tensor, " batch"], ends: Int[torch.Tensor, " batch"],
               delta: Float[torch.Tensor, "batch d_model"]):
    """A module's output with `delta` added at each prompt's END (in fp32, cast back); where the output is a tuple
    (Llama's attention module: its output, then its pattern), to its first element."""
    if isinstance(x, tuple):
        return (add_at_end(x[0], rows, ends, delta), *x[1:])
    return write_at_end(x, rows, ends, x[rows, ends].float() + delta.to(x.device))


def write_at_end(x: Float[torch.Tensor, "batch pos d_model"], rows: Int[torch.Tensor, " batch"],
                 ends: Int[torch.Tensor, " batch"], value: Float[torch.Tensor, "batch d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
    """A copy of `x` with each prompt's END row replaced by `value`, cast to `x`'s dtype (an edit is made in fp32)."""
    x = x.clone()
    x[rows, ends] = value.to(x.dtype)
    return x


def head_change(
    paths: Float[torch.Tensor, "batch head group d_model"], weights: Float[torch.Tensor, "head group"],
    mean: Float[torch.Tensor, "head group d_model"] | None = None,
) -> Float[torch.Tensor, "batch d_model"]:
    """What removing the head paths `weights` selects does to END's residual: minus their vectors, plus their
    dataset mean in mean mode (`causal.edits.Ablate`; `NnsightEngine.ablation_grid` on the server)."""
    change = -torch.einsum("bhgm,hg->bm", paths, weights)
    if mean is not None:
        change = change + torch.einsum("hgm,hg->m", mean, weights)
    return change


# Attribution patching of `ablate`'s paths (`causal.atp_paths`): the metric, the frozen final norm of the direct
# effect, and the estimate from the path vectors and the gradients, for the local pass and the nnsight session alike
ATP_EFFECTS = ("total", "direct")


def target_metric(
    normed: Float[torch.Tensor, "batch d_model"], w_u: Float[torch.Tensor, "d_model vocab"],
    b_u: Float[torch.Tensor, " vocab"] | None, answers: Int[torch.Tensor, " batch"], ids: Int[torch.Tensor, "batch n"],
    valid: Float[torch.Tensor, "batch n"],
) -> Float[torch.Tensor, ""]:
    """Σ over prompts with R∖a of a − mean(R∖a), from END's final-norm output, unembedding only the target columns
    (fp32): what path AtP differentiates."""
    device = normed.device
    answers, ids, valid = answers.to(device), ids.to(device), valid.to(device)
    count = valid.sum(1)
    w_u = w_u.to(device)
    logit = torch.einsum("bm,mb->b", normed, w_u[:, answers].float())
    others = torch.einsum("bm,mbn->bn", normed, w_u[:, ids].float())
    if b_u is not None:
        logit, others = logit + b_u.to(device)[answers].float(), others + b_u.to(device)[ids].float()
    diff = logit - (others * valid).sum(1) / count.clamp(min=1)
    return (diff * (count > 0)).sum()


def frozen_norm_at_end(
    x: Float[torch.Tensor, "batch d_model"], scale: Float[torch.Tensor, "batch 1"], gain: Float[torch.Tensor, " d_model"],
    bias: Float[torch.Tensor, " d_model"], centres: bool = False,
) -> Float[torch.Tensor, "batch d_model"]:
    """The final norm at END with its clean `scale` frozen: linear in `x`, so the direct effect's gradient through
    it is exact."""
    centred = x - x.mean(-1, keepdim=True) if centres else x
    return centred / scale.to(x.device) * gain.to(x.device) + bias.to(x.device)


def path_dots(
    vectors: tuple[Float[torch.Tensor, "batch head kind d_model"], Float[torch.Tensor, "batch d_model"]],
    grads: dict[str, tuple[Float[torch.Tensor, "batch d_model"], Float[torch.Tensor, "batch d_model"]]],
) -> dict[str, tuple[Float[torch.Tensor, "batch head kind"], Float[torch.Tensor, " batch"]]]:
    """One layer of one chunk: p · ∂metric/∂x per prompt for its head paths (x: what the attention adds at END)
    and its MLP (x: the MLP's output at END), per effect of `grads` (effect → the two gradients)."""
    heads, mlp = vectors
    return {effect: (torch.einsum("bhkm,bm->bhk", heads, g_heads.to(heads.device)),
                     torch.einsum("bm,bm->b", mlp, g_mlp.to(mlp.device)))
            for effect, (g_heads, g_mlp) in grads.items()}


def path_changes(
    dots: list[list[dict]], grads: list[list[dict]], sums: list[tuple[torch.Tensor, torch.Tensor]], n: int, mean: bool,
) -> dict[str, torch.Tensor]:
    """AtP's change of the metric when each path is replaced by its mean over the `n` prompts (`mean`) or by zero:
    (p̄ − p) · g, from every chunk's per-layer `path_dots` and gradients and every layer's sum of the vectors over
    all prompts. → per effect "{effect}_heads" [batch, layer, head, kind] and "{effect}_mlps" [batch, layer], fp32."""
    means = [(heads / n, mlp / n) if mean else (torch.zeros_like(heads), torch.zeros_like(mlp)) for heads, mlp in sums]
    out = {}
    for effect in dots[0][0]:
        heads, mlps = [], []
        for chunk_dots, chunk_grads in zip(dots, grads):
            layers = []
            for (mean_heads, mean_mlp), layer_dots, layer_grads in zip(means, chunk_dots, chunk_grads):
                g_heads, g_mlp = layer_grads[effect]
                removed = (torch.einsum("hkm,bm->bhk", mean_heads, g_heads.to(mean_heads.device)),
                           torch.einsum("m,bm->b", mean_mlp, g_mlp.to(mean_mlp.device)))
                layers.append([(r - d).cpu() for r, d in zip(removed, layer_dots[effect])])
            heads.append(torch.stack([h for h, _ in layers], 1))
            mlps.append(torch.stack([m for _, m in layers], 1))
        out[f"{effect}_heads"], out[f"{effect}_mlps"] = torch.cat(heads), torch.cat(mlps)
    return out


def noise_sigma(scale: float, unit: Float[torch.Tensor, " batch"], n_paths: int) -> Float[torch.Tensor, " batch"]:
    """The noise check's std per path and prompt: `scale` × `unit` in all, spread evenly over `n_paths` paths."""
    return scale * unit.float() / max(n_paths, 1) ** 0.5


def noisy_heads(
    paths: Float[torch.Tensor, "batch head group d_model"], weights: Float[torch.Tensor, "head group"],
    draws: Float[torch.Tensor, "batch head group d_head"], to_resid: Callable, norm: Float[torch.Tensor, "*batch head"],
    sigma: Float[torch.Tensor, " batch"], alone,
) -> tuple[Float[torch.Tensor, "batch d_model"], Float[torch.Tensor, "batch d_model"]]:
    """Noise on the head paths `weights` selects (`causal.edits.Noise`): unit Gaussian `draws` in each head's z-space
    through its map (`head_out_map`, of norm `norm`), scaled to `sigma` per path. → the noise at END, and `alone`
    (0.0 or what the layers below gave) plus the paths' own vectors plus their noise."""
    direction = to_resid(draws.to(paths.device))  # E|direction|² = norm²
    per_path = (sigma.to(paths.device)[:, None] / norm.to(paths.device))[:, :, None].expand(paths.shape[:3])
    noise = torch.einsum("bhgm,bhg,hg->bm", direction, per_path, weights.to(paths.device))
    return noise, _on(alone, paths.device) + torch.einsum("bhgm,hg->bm", paths, weights.to(paths.device)) + noise


def noisy_vector(
    x_end: Float[torch.Tensor, "batch d_model"], draws: Float[torch.Tensor, "batch d_model"],
    sigma: Float[torch.Tensor, " batch"], alone,
) -> tuple[Float[torch.Tensor, "batch d_model"], Float[torch.Tensor, "batch d_model"]]:
    """Noise on an MLP's (or the embedding's) END vector, isotropic in the residual stream with `sigma` in all. →
    the noisy vector, and `alone` plus it."""
    noise = sigma.to(x_end.device)[:, None] * draws.to(x_end.device) / x_end.shape[-1] ** 0.5
    return x_end + noise, _on(alone, x_end.device) + x_end + noise


def _on(alone, device: torch.device):
    """A running sum (0.0 before its first term) on `device`: on a server the layers may sit on several GPUs."""
    return alone.to(device) if isinstance(alone, torch.Tensor) else alone


def alone_logits(
    alone, batch: int, gain: Float[torch.Tensor, " d_model"], scale: Float[torch.Tensor, "batch 1"],
    w_u: Float[torch.Tensor, "d_model vocab"], ids: Int[torch.Tensor, "batch target"], centres: bool = False,
) -> Float[torch.Tensor, "batch target"]:
    """The logits a mechanism alone gives the targets `ids` under noise: its paths' summed END vectors plus their
    noise (`alone`; 0.0 for no path) through the final norm at the clean `scale`, without biases."""
    alone = _on(alone, scale.device) + torch.zeros((batch, gain.shape[0]), device=scale.device)
    if centres:
        alone = alone - alone.mean(-1, keepdim=True)
    columns = w_u[:, ids.to(w_u.device)].float().to(scale.device)  # [d_model, batch, target]
    return torch.einsum("bd,dbt->bt", alone * gain.to(scale.device) / scale, columns)


def first_among_targets(logits: Float[torch.Tensor, "batch target"], valid: Float[torch.Tensor, "batch target"]
                        ) -> Float[torch.Tensor, " batch"]:
    """Per prompt: 1 where a (column 0) beats every other target, NaN where there is no other."""
    valid = valid.to(logits.device)
    beaten = (logits[:, 1:] < logits[:, :1]) | (valid[:, 1:] == 0)
    first = beaten.all(1).float()
    return torch.where(valid[:, 1:].sum(1) > 0, first, torch.full_like(first, float("nan")))


def frozen_final_norm(
    x: Float[torch.Tensor, "batch pos d_model"], scale: Float[torch.Tensor, "batch pos 1"],
    weight: Float[torch.Tensor, " d_model"], norm: str = "llama",
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The final RMSNorm with its scale pinned to `scale` (a clean pass's): the arithmetic TransformerLens's norm
    bridge falls back to when its hook_scale is edited (fp32 x / scale, times the gain, cast back), so the direct
    effects through nnsight round as the local ones do. Gemma's gain is 1 + weight."""
    gain = 1.0 + weight if norm == "gemma" else weight
    return ((x.float() / scale.to(x.device)) * gain).to(x.dtype)


def frozen_post_norm(
    gain: Float[torch.Tensor, " d_model"], scale: Float[torch.Tensor, "batch 1"]
) -> Callable[[Float[torch.Tensor, "batch *parts d_model"]], Float[torch.Tensor, "batch *parts d_model"]]:
    """The attention post-norm (Gemma) as a linear map, its scale frozen at each prompt's `scale` at END."""
    scale = scale.float()
    return lambda vectors: vectors * gain / scale.reshape(-1, *([1] * (vectors.dim() - 1)))


def end_block(
    heads: Bool[torch.Tensor, " head"],
    query_is_end: Bool[torch.Tensor, "batch query"],
    keys: Bool[torch.Tensor, "batch key"],
) -> Bool[torch.Tensor, "batch head query key"]:
    """Where an attention knockout cuts: the chosen heads' scores from END (the query) to the blocked keys, which
    are set to −inf before the softmax (`causal.knockout` on TransformerLens's scores, `NnsightEngine.knockout`
    on the attention mask the scores are added to)."""
    return heads[None, :, None, None] & query_is_end[:, None, :, None] & keys[:, None, None, :]


def answer_scores(
    logits: Float[torch.Tensor, "batch vocab"], answers: Int[torch.Tensor, " batch"],
    ids: Int[torch.Tensor, "batch n"] | None = None, valid: Float[torch.Tensor, "batch n"] | None = None,
) -> dict[str, torch.Tensor]:
    """What a causal check measures at END (`causal.scores`): the attribute's probability and logit, and whether
    it is the top-1 token; with the other attributes of its relation (`ids`, padded, `valid` marking the real ones)
    also a's logit − their mean logit (NaN where there is none)."""
    answers = answers.to(logits.device)
    rows = torch.arange(len(answers), device=logits.device)
    out = {
        "prob": logits.softmax(-1)[rows, answers],
        "logit": logits[rows, answers],
        "correct": (logits.argmax(-1) == answers).float(),
    }
    if ids is not None:
        ids, valid = ids.to(logits.device), valid.to(logits.device)
        count = valid.sum(1)
        mean_others = (logits.gather(1, ids) * valid).sum(1) / count.clamp(min=1)
        logit = out["logit"]
        out["logit_diff"] = torch.where(count > 0, logit - mean_others, torch.full_like(logit, float("nan")))
    return out


def noise_scores(
    logits: Float[torch.Tensor, "batch vocab"], alone: Float[torch.Tensor, "batch target"],
    answers: Int[torch.Tensor, " batch"], ids: Int[torch.Tensor, "batch target"], valid: Float[torch.Tensor, "batch target"],
) -> dict[str, torch.Tensor]:
    """What one pass of the noise check measures per prompt (`causal.noise`): `answer_scores`, and whether the
    model (`model_first`) and the noisy mechanism alone (`alone_first`, its targets' logits `alone`) rank a first
    among the targets `ids` (a first)."""
    return {**answer_scores(logits, answers),
            "model_first": first_among_targets(logits.gather(1, ids.to(logits.device)), valid),
            "alone_first": first_among_targets(alone, valid)}


def recall_stats(
    logits: Float[torch.Tensor, "batch vocab"], answers: Int[torch.Tensor, " batch"]
) -> dict[str, torch.Tensor]:
    """The attribute's rank, probability and logit at END, and the top tokens: all `recall.recall_rows` reads of the
    END logits (a few numbers per prompt instead of a vocabulary-sized row)."""
    answers = answers.to(logits.device)
    logit = logits.gather(1, answers[:, None])
    return {
        "rank": (logits > logit).sum(-1) + 1,
        "prob": logits.softmax(dim=-1).gather(1, answers[:, None])[:, 0],
        "logit": logit[:, 0],
        "top": logits.topk(RECALL_TOP_K, dim=-1).indices,
    }


def lens_stats(
    resid: Float[torch.Tensor, "row d_model"],
    answer: Int[torch.Tensor, " row"],
    w_u: Float[torch.Tensor, "d_model vocab"],
    b_u: Float[torch.Tensor, " vocab"],
) -> tuple[Int[torch.Tensor, " row"], Float[torch.Tensor, " row"], Float[torch.Tensor, " row"], Int[torch.Tensor, " row"]]:
    """The answer's rank, log-probability and logit, and the top token, in one sweep over the vocabulary.

    The full [row, vocab] logits never exist: each chunk is unembedded, then counted against the answer, max-reduced
    and added to a running logsumexp while it is still in cache. Materialising them and making one pass per
    statistic cost more than the matrix product itself (it is the costliest step of the analysis).
    """
    logit = (resid * w_u[:, answer].T.float()).sum(-1) + b_u[answer].float()
    above = torch.zeros_like(answer)
    top_logit = torch.full_like(logit, -torch.inf)
    top = torch.zeros_like(answer)
    sum_exp = torch.zeros_like(logit)  # Σ exp(logit − top_logit) so far
    for start in range(0, w_u.shape[1], LENS_CHUNK):
        # upcast a chunk at a time: an fp32 copy of the whole unembedding would be the analysis's largest tensor
        chunk = torch.addmm(b_u[start : start + LENS_CHUNK].float(), resid, w_u[:, start : start + LENS_CHUNK].float())
        higher = chunk > logit[:, None]
        # the answer's own entry comes from another summation order than `logit`: it must not count as above itself
        own = (answer - start).clamp(0, chunk.shape[1] - 1)
        is_own = (answer >= start) & (answer < start + chunk.shape[1]) & higher.gather(1, own[:, None]).squeeze(1)
        above += higher.sum(-1) - is_own.long()
        chunk_max, chunk_top = chunk.max(-1)
        top = torch.where(chunk_max > top_logit, chunk_top + start, top)  # strict: the first maximum wins, as in argmax
        new_top = torch.maximum(top_logit, chunk_max)
        sum_exp = sum_exp * (top_logit - new_top).exp() + chunk.sub_(new_top[:, None]).exp_().sum(-1)
        top_logit = new_top
    return above + 1, logit - top_logit - sum_exp.log(), logit, top


def _identity(vectors: torch.Tensor) -> torch.Tensor:
    return vectors


def project_end(
    acts: dict,
    weights: dict,
    groups: Float[torch.Tensor, "batch pos group"],
    targets: Int[torch.Tensor, "batch target"],
    answers: Int[torch.Tensor, " batch"],
    known_only: bool,
) -> dict[str, torch.Tensor]:
    """Everything the decomposition needs from one batch's pass, reduced to the targets' columns, for architectures
    with RMSNorms and no positional embedding (the Llama family, Mistral, Qwen2, Gemma 3).

    `acts` (model dtype, at END unless said): "logits" [batch, vocab], "embed" (what the embedding adds to the
    residual stream, scaled where the model scales it), "final_in" (the final norm's input), and per layer the lists
    "z_by_group" (fp32 [batch, head, group, d_head], the value bias already removed), "z" ([batch, head · d_head],
    o_proj's input), "mlp_out" (what the MLP adds to the residual stream, after its post-norm where there is one),
    "resid_post", and "post_norm_in" (the attention post-norm's input; an empty list where there is none).
    `weights` are the model's own tensors: "w_u" [d_model, vocab] (lm_head.weight.T), "b_u" or None,
    "norm_weight", "eps", "norm" (the RMSNorm arithmetic, a key of `RMS_NORMS`), and per layer "w_o"
    (o_proj.weight), "b_o" and "b_v" (or None), and "post_norm_weight" (empty where there is no post-norm).
    The result is what `decompose.EndParts` holds.
    """
    # the weights are parameters and the pass may run with autograd on: nothing here is differentiated
    with torch.no_grad():
        return _project_end(acts, weights, groups, targets, answers, known_only)


def _project_end(acts: dict, weights: dict, groups: Float[torch.Tensor, "batch pos group"],
                 targets: Int[torch.Tensor, "batch target"], answers: Int[torch.Tensor, " batch"],
                 known_only: bool) -> dict[str, torch.Tensor]:
    w_u, eps = weights["w_u"], weights["eps"]
    device = w_u.device
    targets, answers = targets.to(device), answers.to(device)
    batch, n_layers = targets.shape[0], len(acts["z"])
    logits = acts["logits"].to(device).float()
    b_u = weights["b_u"]
    if b_u is None:
        b_u = torch.zeros(w_u.shape[1], device=device, dtype=w_u.dtype)
    gain = rms_gain(weights["norm_weight"], eps, weights["norm"]).to(device)
    norm_bias = torch.zeros(w_u.shape[0], device=device)  # RMSNorm has none; kept so the sum matches the local one
    columns, unembed = unembed_columns(w_u, w_u.mean(1, dtype=torch.float32), targets, gain)
    scale = rms_scale(acts["final_in"].to(device), eps)

    heads, head_check, biases, mlps = [], [], [], []
    for layer in range(n_layers):
        w_o_2d = weights["w_o"][layer]  # [d_model, head · d_head]
        z_by_group = acts["z_by_group"][layer].to(device)
        n_heads, d_head = z_by_group.shape[1], z_by_group.shape[3]
        w_o = w_o_2d.T.reshape(n_heads, d_head, -1).float().to(device)  # TransformerLens's W_O, the same view
        b_v, b_o = weights["b_v"][layer], weights["b_o"][layer]
        b_v_head = None if b_v is None else b_v.float().view(-1, d_head).repeat_interleave(
            n_heads * d_head // b_v.shape[0], dim=0).to(device)
        if acts["post_norm_in"]:  # Gemma: what a head writes passes the attention post-norm, its END scale frozen
            post_gain = rms_gain(weights["post_norm_weight"][layer], eps, weights["norm"]).to(device)
            post_norm = frozen_post_norm(post_gain, rms_scale(acts["post_norm_in"][layer].to(device), eps))
        else:
            post_norm = _identity
        heads.append(to_logit(post_norm(torch.einsum("bhgd,hdm->bhgm", z_by_group, w_o)), scale, unembed))
        z_whole = acts["z"][layer].to(device).float().view(batch, -1, d_head)
        if b_v_head is not None:
            z_whole = z_whole - b_v_head
        head_check.append(to_logit(post_norm(torch.einsum("bhd,hdm->bhm", z_whole, w_o)), scale, unembed))
        if b_o is None and b_v_head is None:
            biases.append(torch.zeros(batch, unembed.shape[-1], device=device))
        else:
            total = torch.zeros(w_o.shape[-1], device=device) if b_o is None else b_o.float().to(device)
            if b_v_head is not None:
                total = total + torch.einsum("hd,hdm->m", b_v_head, w_o)
            biases.append(to_logit(post_norm(total.expand(batch, -1)), scale, unembed))
        mlps.append(to_logit(acts["mlp_out"][layer].to(device).float(), scale, unembed))

    b_u_cols = torch.cat([b_u[targets].float(), b_u.mean(dtype=torch.float32).expand(batch, 1)], dim=1)
    unembed_bias = b_u_cols + torch.einsum("d,dbt->bt", norm_bias, columns)
    resid = [acts["resid_post"][layer].to(device).float() for layer in range(n_layers)]
    recall = recall_stats(logits, answers)
    keep = recall["top"][:, 0] == answers if known_only else torch.ones(batch, dtype=torch.bool, device=device)
    lens_resid = torch.stack([r[keep] for r in resid], dim=1)  # [kept, layer, d_model]
    lens_resid = lens_norm(lens_resid, gain, norm_bias, eps)
    lens = lens_stats(lens_resid.reshape(-1, lens_resid.shape[-1]), answers[keep].repeat_interleave(n_layers), w_u, b_u)
    return {
        "embed": to_logit(acts["embed"].to(device).float(), scale, unembed),
        "heads": torch.stack(heads, dim=1),  # [batch, layer, head, group, target]
        "head_check": torch.stack(head_check, dim=1),
        "biases": torch.stack(biases, dim=1),
        "mlps": torch.stack(mlps, dim=1),
        "unembed_bias": unembed_bias,
        "reference": to_logit(resid[-1], scale, unembed) + unembed_bias,
        "model_logits": torch.cat([logits.gather(1, targets), logits.mean(1, keepdim=True)], dim=1),
        **{f"recall_{name}": value for name, value in recall.items()},
        "keep": keep,
        **{f"lens_{name}": value for name, value in zip(("rank", "log_prob", "logit", "top"), lens)},
    }
