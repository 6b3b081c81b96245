"""Attribution patching for `ablate`'s path ablations: the effect of removing every head path (END←group, per
head and source group) and every MLP at END, from one forward and one backward pass per chunk of prompts, with
its error against exact path ablation beside it.

The metric is the one the exact ablations measure (`ablation.ablation_grid`): a − mean(R∖a) on the run's R_r, per
prompt. Removing a path replaces its END vector p by the dataset mean p̄ (`mode="mean"`, `ablation.path_means`'s
convention: the mean over every prompt checked) or by zero; to first order the metric moves by

    (p̄ − p) · ∂metric/∂x,

with x where the edit is written and the gradient taken in the clean run. The exact edits (`edits.Ablate`) add
p̄ − p to `hook_attn_out` (a head path, already in residual space, Gemma's post-norm frozen) or replace
`hook_mlp_out` at END, so x is that activation at END: one gradient per layer serves every head and group of it.
The gradient comes from a zero leaf added there (`_Probe`), so the pass and its path vectors are exactly
`edit_hooks`'s.

- `total`: the gradient through the whole model (the layers above react, the final norm's scale too) — a
  first-order estimate of the exact total effect, whose error is measured (`agreement`), not assumed small.
- `direct`: the gradient of the metric with respect to END's final residual with the final norm's scale frozen
  at its clean value. That map is linear, so this AtP *is* the exact direct effect (tested to 1e-5); it is kept
  as a check of the bookkeeping, not as evidence for AtP.

Where both methods ran (`--method both`) every path of every prompt is compared; where only AtP ran, the
`N_TOP` paths with the largest AtP effect of each kind and `N_RANDOM` seeded random others are ablated exactly.
The statistics are `atp.agreement`'s, on the drop of a − mean(R∖a) (clean − ablated: positive where the path
helps a), with a threshold in logits (`THRESHOLD`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from ..data import Encoded, relation_targets
from ..errors import FactscopeError
from ..forward import Batch, act_name, capture, make_batch
from ..models import LoadedModel
from ..taxonomy import GROUPS, groups_present
from .atp import SAMPLE_SEED, agreement, agreement_summary, sample_cells
from .ablation import MODE, ablated_logits
from .check import CausalCheck
from .edits import Editor, Record, edit_hooks
from .scores import Progress, other_targets, scores, tick
from .trace import _corrupted_states, _corrupted_tails, _resume
from .sites import HeadPath, MlpPath, PathSpec, parse

THRESHOLD = 0.25  # a drop of a − mean(R∖a) (logits) on one prompt that a false negative misses
N_TOP, N_RANDOM = 8, 12  # paths per kind ablated exactly when only AtP ran
METHODS = ("exact", "atp", "both")


@dataclass
class PathEffects:
    """Per path and prompt, the change of a − mean(R∖a) when the path is removed (ablated − clean; NaN for a
    prompt whose R_r has no other attribute). Kinds are the source groups of head paths, then "mlp" (head 0)."""

    effects: Float[torch.Tensor, "kind layer head batch"]
    present: Bool[torch.Tensor, "kind layer head"]  # paths that exist: the group occurs in some prompt; MLPs at head 0
    kinds: tuple[str, ...]
    mode: str


def path_kinds(model: LoadedModel) -> tuple[str, ...]:
    return (*groups_present(model.prepend_bos), "mlp")


def kind_path(kind: str, layer: int, head: int) -> PathSpec:
    return MlpPath(layer) if kind == "mlp" else HeadPath(layer, head, kind)


def present_paths(model: LoadedModel, batch: Batch) -> Bool[torch.Tensor, "kind layer head"]:
    """Head paths from groups that occur in at least one prompt (the others are zero in every prompt, so
    removing them changes nothing, exactly), and one MLP per layer."""
    kinds, cfg = path_kinds(model), model.cfg
    occurs = batch.onehot.sum((0, 1)).cpu() > 0
    present = torch.zeros((len(kinds), cfg.n_layers, cfg.n_heads), dtype=torch.bool)
    for k, kind in enumerate(kinds):
        if kind == "mlp":
            present[k, :, 0] = True
        elif occurs[GROUPS.index(kind)]:
            present[k] = True
    return present


# ---------------------------------------------------------------------------------------------------------------
# AtP


class _Probe(Editor):
    """Keeps every path's END vector and adds a zero leaf where `edits.Ablate` would write, so that the gradient
    of the metric with respect to the leaf is its gradient at the edited activation; changes nothing."""

    def __init__(self, leaves: bool = True):
        self.heads: dict[int, torch.Tensor] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        self.leaves: dict[str, torch.Tensor] = {}
        self.with_leaves = leaves  # False: only keep the vectors (a pass without autograd)

    def head(self, layer, out_end, paths, weights, head_map):
        self.heads[layer] = paths.detach()
        return self._leaf(act_name("attn_out", layer), out_end)

    def vector(self, key, x_end):
        self.vectors[key] = x_end.detach()
        return self._leaf(key, x_end)

    def _leaf(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if not self.with_leaves:
            return x
        self.leaves[key] = torch.zeros_like(x, requires_grad=True)
        return x + self.leaves[key]


def atp_path_effects(
    model: LoadedModel,
    encoded: list[Encoded],
    mode: str = MODE,
    targets: dict[str, dict[int, str]] | None = None,
    chunk: int = 16,
) -> tuple[PathEffects, PathEffects]:
    """The total and the direct effect of removing every path, estimated by attribution patching: one forward
    and one backward pass per chunk of `chunk` prompts."""
    if mode not in ("zero", "mean"):
        raise FactscopeError(f"ablation mode {mode!r}: use 'mean' or 'zero'")
    targets = targets if targets is not None else relation_targets(encoded)
    kinds, n_layers = path_kinds(model), model.cfg.n_layers
    group_index = [GROUPS.index(kind) for kind in kinds[:-1]]
    everything = parse(model, [*(HeadPath(layer, head, "all") for layer in range(n_layers) for head in range(model.cfg.n_heads)),
                               *(MlpPath(layer) for layer in range(n_layers))])
    mlp_keys = [act_name("mlp_out", layer) for layer in range(n_layers)]
    attn_keys = [act_name("attn_out", layer) for layer in range(n_layers)]
    # per prompt: p · g for every path, and the gradients themselves (for p̄ · g once p̄ is known)
    dots = {"total": [], "direct": []}
    grads = {"total": [], "direct": []}
    sums, valid = None, []
    for start in range(0, len(encoded), chunk):
        batch = make_batch(model, encoded[start : start + chunk])
        probe, g_direct, has_others = _clean_gradients(model, batch, everything, targets)
        valid.append(has_others)
        # on the CPU from here: per-prompt dot products and END gradients are small, whatever the model's device
        heads = torch.stack([probe.heads[layer][:, :, group_index] for layer in range(n_layers)], 1).float().cpu()  # [b, l, h, k, m]
        mlps = torch.stack([probe.vectors[key] for key in mlp_keys], 1).float().cpu()  # [b, l, m]
        for effect, g_heads, g_mlps in (
            ("total", torch.stack([probe.leaves[key].grad for key in attn_keys], 1).float().cpu(),
             torch.stack([probe.leaves[key].grad for key in mlp_keys], 1).float().cpu()),
            ("direct", g_direct[:, None].expand(-1, n_layers, -1), g_direct[:, None].expand(-1, n_layers, -1)),
        ):
            dots[effect].append(_stack_kinds(torch.einsum("blhkm,blm->blhk", heads, g_heads), torch.einsum("blm,blm->bl", mlps, g_mlps)))
            grads[effect].append((g_heads, g_mlps))
        part = (heads.sum(0), mlps.sum(0))
        sums = part if sums is None else (sums[0] + part[0], sums[1] + part[1])
    n = len(encoded)
    means = (sums[0] / n, sums[1] / n) if mode == "mean" else (torch.zeros_like(sums[0]), torch.zeros_like(sums[1]))
    has_others = torch.cat(valid)
    batch = make_batch(model, encoded)
    present = present_paths(model, batch)
    out = []
    for effect in ("total", "direct"):
        g_heads = torch.cat([g for g, _ in grads[effect]])
        g_mlps = torch.cat([g for _, g in grads[effect]])
        mean_dot = _stack_kinds(torch.einsum("lhkm,blm->blhk", means[0], g_heads), torch.einsum("lm,blm->bl", means[1], g_mlps))
        change = (mean_dot - torch.cat(dots[effect])).permute(3, 1, 2, 0)  # [kind, layer, head, batch]
        change = torch.where(has_others, change, torch.full_like(change, float("nan")))
        out.append(PathEffects(change * present[..., None], present, kinds, mode))
    return out[0], out[1]


def _stack_kinds(heads: Float[torch.Tensor, "batch layer head kind"], mlps: Float[torch.Tensor, "batch layer"]) -> Float[torch.Tensor, "batch layer head kind"]:
    """Head kinds, then the MLP as one more kind at head 0 (zero at the other heads)."""
    mlp = torch.zeros(heads.shape[:3], dtype=heads.dtype)
    mlp[:, :, 0] = mlps
    return torch.cat([heads, mlp[..., None]], -1)


def _clean_gradients(model: LoadedModel, batch: Batch, everything, targets) -> tuple[_Probe, Float[torch.Tensor, "batch d_model"], Bool[torch.Tensor, " batch"]]:
    """One clean pass with every path probed; backward from Σ a − mean(R∖a). Returns the probe (vectors, leaves
    with their gradients), the frozen-scale gradient at END's final residual, and which prompts have R∖a."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    rows, ends = batch.rows, batch.ends
    ids, valid = other_targets(batch, targets)
    count = valid.sum(1)
    probe, store = _Probe(), {}
    last = act_name("resid_post", model.cfg.n_layers - 1)

    def stop(normed, hook):
        raise StopAtLayerException(normed[rows, ends])

    hooks = [*edit_hooks(model, batch, everything, probe), capture(store, last, at_end=ends),
             capture(store, act_name("final_scale"), at_end=ends), (act_name("final_out"), stop)]
    with torch.enable_grad():
        normed = model.bridge.run_with_hooks(batch.tokens, attention_mask=batch.mask, fwd_hooks=hooks)
        metric = _metric(normed.float(), model, batch.answers, ids, valid, count)
        leaves = list(probe.leaves.values())
        for leaf, grad in zip(leaves, torch.autograd.grad(metric, leaves)):
            leaf.grad = grad
        # the direct effect: END's final residual through the final norm with its clean scale frozen (linear)
        x = store[last].detach().float().requires_grad_(True)
        gain, bias = (part.clone() for part in model.final_norm)  # made in inference mode: autograd refuses them
        centred = x - x.mean(-1, keepdim=True) if model.centres else x
        frozen = centred / store[act_name("final_scale")].detach().float() * gain + bias
        (g_direct,) = torch.autograd.grad(_metric(frozen, model, batch.answers, ids, valid, count), [x])
    return probe, g_direct.detach().cpu(), (count > 0).cpu()


def _metric(normed: Float[torch.Tensor, "batch d_model"], model: LoadedModel, answers: Int[torch.Tensor, " batch"],
            ids: Int[torch.Tensor, "batch n"], valid: Float[torch.Tensor, "batch n"], count: Float[torch.Tensor, " batch"]) -> torch.Tensor:
    """Σ over prompts with R∖a of a − mean(R∖a), unembedding only the target columns."""
    w_u, b_u = model.W_U, model.b_U
    logit = torch.einsum("bm,mb->b", normed, w_u[:, answers].float()) + (b_u[answers].float() if b_u is not None else 0.0)
    others = torch.einsum("bm,mbn->bn", normed, w_u[:, ids].float()) + (b_u[ids].float() if b_u is not None else 0.0)
    diff = logit - (others * valid).sum(1) / count.clamp(min=1)
    return (diff * (count > 0)).sum()


# ---------------------------------------------------------------------------------------------------------------
# Exact path ablation, for the paths asked


def exact_path_effects(
    model: LoadedModel,
    encoded: list[Encoded],
    chosen: Bool[torch.Tensor, "kind layer head"],
    mode: str = MODE,
    targets: dict[str, dict[int, str]] | None = None,
    effect: str = "total",
    progress: Progress = None,
    kv_cache: bool = True,
    max_rows: int = 512,
) -> PathEffects:
    """Each chosen path removed alone, exactly: its change of a − mean(R∖a) per prompt; zero for paths not chosen.
    Progress ticks once per chosen path.

    `kv_cache=False` is `ablation.ablated_logits` of each path (one full pass each; the means recorded once over
    every path). With `kv_cache` (total effects only) the same edit is computed from where it acts: removing a
    path of layer l at END adds the constant p̄ − p (from the clean pass: nothing below l changes, so its pattern
    and values are the clean ones) to layer l's output at END, and nothing at earlier positions changes (causal
    attention). So each pass is END alone from block l up, earlier positions' keys and values from the clean
    run's cache (`trace`'s machinery), and every path of a layer × every prompt of one END position is one batch."""
    batch = make_batch(model, encoded)
    kinds = path_kinds(model)
    others = other_targets(batch, targets if targets is not None else relation_targets(encoded))
    store: dict = {}
    keep = _Probe(leaves=False)
    everything = [kind_path(kinds[k], layer, head) for k, layer, head in torch.nonzero(present_paths(model, batch)).tolist()]
    hooks = [capture(store, act_name("final_scale")), *edit_hooks(model, batch, parse(model, everything), keep)]
    clean = torch.from_numpy(scores(batch.logits(model, hooks), batch, others)["logit_diff"])
    means = Record()
    means.heads = {layer: paths.mean(0) for layer, paths in keep.heads.items()}
    means.vectors = {key: vectors.mean(0) for key, vectors in keep.vectors.items()}
    out = torch.zeros((*chosen.shape, len(batch)))
    if not (kv_cache and effect == "total"):
        for k, layer, head in torch.nonzero(chosen).tolist():
            logits = ablated_logits(model, batch, [kind_path(kinds[k], layer, head)], mode, means if mode == "mean" else None,
                                    effect=effect, clean_scale=store[act_name("final_scale")])
            out[k, layer, head] = torch.from_numpy(scores(logits, batch, others)["logit_diff"]) - clean
            tick(progress)
        return PathEffects(out, chosen, kinds, mode)
    states = _corrupted_states(model, batch, torch.zeros((), device=batch.tokens.device), {}, kv_cache=True)
    for layer in range(model.cfg.n_layers):
        paths = torch.nonzero(chosen[:, layer]).tolist()  # [(kind, head)]
        if not paths:
            continue
        change = torch.stack([_removal(keep, kinds[k], layer, head, mode) for k, head in paths])  # [path, batch, d_model]
        is_mlp = torch.tensor([kinds[k] == "mlp" for k, _ in paths])
        diff = _ablated_at_end(model, batch, states, layer, change, is_mlp, others, max_rows)  # [path, batch]
        for (k, head), row in zip(paths, diff):
            out[k, layer, head] = row - clean
            tick(progress)
    return PathEffects(out, chosen, kinds, mode)


def _removal(keep: "_Probe", kind: str, layer: int, head: int, mode: str) -> Float[torch.Tensor, "batch d_model"]:
    """What removing the path adds at END (per prompt): p̄ − p in mean mode, −p in zero mode (`edits.Ablate`)."""
    vectors = keep.vectors[act_name("mlp_out", layer)] if kind == "mlp" else keep.heads[layer][:, head, GROUPS.index(kind)]
    return (vectors.mean(0) - vectors) if mode == "mean" else -vectors


def _ablated_at_end(model: LoadedModel, batch: Batch, states, layer: int, change: Float[torch.Tensor, "path batch d_model"],
                    is_mlp: Bool[torch.Tensor, " path"], others, max_rows: int) -> Float[torch.Tensor, "path batch"]:
    """a − mean(R∖a) with `change[path]` added at END to layer `layer`'s attention output (head paths) or MLP
    output (MLPs), one row per (path, prompt), END alone from block `layer` on (`trace._resume`)."""
    n_paths, n = change.shape[:2]
    path_index, prompt = torch.meshgrid(torch.arange(n_paths), torch.arange(n), indexing="ij")
    path_index, prompt = path_index.flatten(), prompt.flatten()
    device = batch.tokens.device
    ids, valid = others
    out = torch.empty(n_paths * n)
    for chunk in torch.arange(n_paths * n).split(max_rows):
        p, q = prompt[chunk].to(device), path_index[chunk]
        delta = change[q, prompt[chunk]].to(device)
        mlp = is_mlp[q].to(device)[:, None]
        hooks = [(act_name("attn_out", layer), _add_first(torch.where(mlp, 0.0, delta))),
                 (act_name("mlp_out", layer), _add_first(torch.where(mlp, delta, 0.0)))]
        ends = batch.ends[p]
        logits = _resume(model, batch, states, p, ends, _corrupted_tails(states, layer, batch, p, ends), layer, hooks)
        rows = torch.arange(len(p), device=device)
        mean_others = (logits.gather(1, ids[p]) * valid[p]).sum(1) / valid[p].sum(1).clamp(min=1)
        diff = logits[rows, batch.answers[p]] - mean_others
        out[chunk] = torch.where(valid[p].sum(1) > 0, diff, torch.full_like(diff, float("nan"))).cpu()
    return out.view(n_paths, n)


def _add_first(delta: Float[torch.Tensor, "rows d_model"]):
    def hook(x: Float[torch.Tensor, "rows pos d_model"], hook):
        x = x.clone()
        x[:, 0] = (x[:, 0].float() + delta).to(x.dtype)
        return x

    return hook


# ---------------------------------------------------------------------------------------------------------------
# Its error, and the tables


def _cells(effects: PathEffects, chosen: Bool[torch.Tensor, "kind layer head"]) -> Bool[torch.Tensor, "kind layer head batch"]:
    return chosen[..., None] & torch.isfinite(effects.effects)


def path_agreement(exact: PathEffects, estimate: PathEffects, chosen: Bool[torch.Tensor, "kind layer head"], sampled: bool) -> pd.DataFrame:
    """`atp.agreement` on the drops (clean − ablated) of the chosen paths' (path, prompt) cells."""
    cells = _cells(estimate, chosen) & _cells(exact, chosen)
    table = agreement(-exact.effects.nan_to_num(), -estimate.effects.nan_to_num(), cells, estimate.kinds, sampled,
                          threshold=THRESHOLD)
    table.insert(1, "effect", "total")
    return table


def sample_paths(estimate: PathEffects, seed: int = SAMPLE_SEED) -> Bool[torch.Tensor, "kind layer head"]:
    """Per kind the `N_TOP` paths with the largest mean AtP drop and `N_RANDOM` seeded random others."""
    drop = -estimate.effects.nan_to_num().mean(-1)
    return sample_cells(drop, estimate.present, seed, N_TOP, N_RANDOM)


def path_table(effects: PathEffects, method: str, effect: str, chosen: Bool[torch.Tensor, "kind layer head"] | None = None) -> pd.DataFrame:
    """One row per path: the mean change of a − mean(R∖a) over prompts when it is removed, and its sem."""
    chosen = effects.present if chosen is None else chosen
    records = []
    for k, layer, head in torch.nonzero(chosen).tolist():
        values = effects.effects[k, layer, head].double().numpy()
        values = values[np.isfinite(values)]
        mlp = effects.kinds[k] == "mlp"
        records.append({
            "method": method, "effect": effect, "component": "mlp" if mlp else "head", "layer": layer,
            "head": -1 if mlp else head, "group": effects.kinds[k], "mode": effects.mode, "n_prompts": len(values),
            "delta_logit_diff": float(values.mean()) if len(values) else float("nan"),
            "sem": float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan"),
        })
    return pd.DataFrame.from_records(records)


def _run(model: LoadedModel, known: list[Encoded], *, mode: str, targets: dict | None, method: str,
         progress: Progress, **_sizes) -> dict[str, pd.DataFrame]:
    """`exact`: nothing (the mechanism grid is `ablation`'s); `atp`: AtP of every path and its error on a sample
    ablated exactly; `both`: every path ablated exactly too, and the error on every cell."""
    if method not in METHODS:
        raise FactscopeError(f"unknown ablate method {method!r} (use {', '.join(METHODS)})")
    if method == "exact":
        return {}
    total, direct = atp_path_effects(model, known, mode, targets)
    tick(progress)
    chosen = total.present if method == "both" else sample_paths(total)
    exact = exact_path_effects(model, known, chosen, mode, targets, progress=progress)
    if progress:  # the announced count assumes every group occurs; paths of absent groups are skipped, not run
        progress(max(0, _passes(model.cfg.n_layers, method=method, **path_sizes(model)) - 1 - int(chosen.sum())))
    tables = [path_table(total, "atp", "total"), path_table(direct, "atp", "direct"), path_table(exact, "exact", "total", chosen)]
    return {"path_ablations": pd.concat(tables, ignore_index=True),
            "atp_path_agreement": path_agreement(exact, total, chosen, sampled=method == "atp")}


def _passes(n_layers: int, *, method: str, n_heads: int, n_kinds: int, **_) -> int:
    if method == "exact":
        return 0
    per_kind = min(N_TOP + N_RANDOM, n_layers * n_heads)
    heads = (n_kinds - 1) * (n_layers * n_heads if method == "both" else per_kind)
    return 1 + heads + (n_layers if method == "both" else min(N_TOP + N_RANDOM, n_layers))


def _summary(tables) -> dict:
    if "atp_path_agreement" not in tables:
        return {}
    paths = tables["path_ablations"]
    atp_total = paths[(paths["method"] == "atp") & (paths["effect"] == "total")]
    top = atp_total.nsmallest(5, "delta_logit_diff")
    return {
        "method": "both" if not bool(tables["atp_path_agreement"]["sampled"].any()) else "atp",
        "n_paths": int(len(atp_total)), "n_exact_paths": int((paths["method"] == "exact").sum()),
        "atp_agreement": agreement_summary(tables["atp_path_agreement"]),
        "atp_top_paths": [f"{_label(row)} {row.delta_logit_diff:+.2f}" for row in top.itertuples()],
    }


def _label(row) -> str:
    return f"MLP{row.layer}" if row.component == "mlp" else f"L{row.layer}H{row.head}←{row.group}"


def path_sizes(model: LoadedModel) -> dict:
    """The ablate options this check's pass count needs beyond the command's own."""
    return {"n_heads": model.cfg.n_heads, "n_kinds": len(path_kinds(model))}


CHECK = CausalCheck(
    "path_ablations", "ablate", ("path_ablations", "atp_path_agreement"), ("mode", "targets", "method", "n_heads", "n_kinds"),
    _passes, _run, _summary,
)
