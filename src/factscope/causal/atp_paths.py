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
from jaxtyping import Bool, Float

from ..data import Encoded, relation_targets
from ..end_maths import ATP_EFFECTS, frozen_norm_at_end, path_changes, path_dots, target_metric
from ..errors import FactscopeError
from ..forward import Batch, act_name, capture, make_batch
from ..models import LoadedModel
from ..remote import SCORE_DIFF_BYTES
from ..taxonomy import GROUPS, groups_present
from .atp import SAMPLE_SEED, agreement, agreement_summary, sample_cells
from .ablation import MODE, ablated_logits
from .check import CausalCheck
from .edits import Editor, Record, edit_hooks
from .scores import Progress, as_numpy, other_targets, scores, tick
from .resume import corrupted_tails, resume
from .trace import _corrupted_states
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


def present_paths(model: LoadedModel, encoded: list[Encoded]) -> Bool[torch.Tensor, "kind layer head"]:
    """Head paths from groups that occur in at least one prompt (the others are zero in every prompt, so
    removing them changes nothing, exactly), and one MLP per layer."""
    kinds, cfg = path_kinds(model), model.cfg
    occurs = {group for item in encoded for group in item.groups}
    present = torch.zeros((len(kinds), cfg.n_layers, cfg.n_heads), dtype=torch.bool)
    for k, kind in enumerate(kinds):
        if kind == "mlp":
            present[k, :, 0] = True
        elif kind in occurs:
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
    engine=None,
) -> tuple[PathEffects, PathEffects]:
    """The total and the direct effect of removing every path, estimated by attribution patching: one forward
    and one backward pass per chunk of `chunk` prompts. `engine`: an nnsight engine runs every chunk's passes in
    one session (`NnsightEngine.path_atp`, on NDIF with `ablate --remote`), and only the estimates come back."""
    if mode not in ("zero", "mean"):
        raise FactscopeError(f"ablation mode {mode!r}: use 'mean' or 'zero'")
    targets = targets if targets is not None else relation_targets(encoded)
    kinds = path_kinds(model)
    group_index = [GROUPS.index(kind) for kind in kinds[:-1]]
    batches = [make_batch(model, encoded[start : start + chunk]) for start in range(0, len(encoded), chunk)]
    others = [other_targets(batch, targets) for batch in batches]
    if engine is None:
        changes = _local_changes(model, batches, others, group_index, mode)
    else:
        changes = engine.path_atp(model, batches, others, mode, group_index)
    has_others = torch.cat([valid.sum(1) > 0 for _, valid in others]).cpu()
    present = present_paths(model, encoded)
    out = []
    for effect in ATP_EFFECTS:
        change = _stack_kinds(changes[f"{effect}_heads"], changes[f"{effect}_mlps"]).permute(3, 1, 2, 0)  # [kind, layer, head, batch]
        change = torch.where(has_others, change, torch.full_like(change, float("nan")))
        out.append(PathEffects(change * present[..., None], present, kinds, mode))
    return out[0], out[1]


def _local_changes(model: LoadedModel, batches: list[Batch], others: list, group_index: list[int], mode: str) -> dict[str, torch.Tensor]:
    """`atp_path_effects`' estimates from this process's passes: per chunk the clean gradients (`_clean_gradients`),
    then `end_maths.path_changes` over all of them."""
    everything = parse(model, [*(HeadPath(layer, head, "all") for layer in range(model.cfg.n_layers)
                                 for head in range(model.cfg.n_heads)),
                               *(MlpPath(layer) for layer in range(model.cfg.n_layers))])
    dots, grads, sums = [], [], [None] * model.cfg.n_layers
    for batch, chunk_others in zip(batches, others):
        probe, g_direct = _clean_gradients(model, batch, everything, chunk_others)
        dots.append([]), grads.append([])
        for layer in range(model.cfg.n_layers):
            # on the CPU from here: END vectors and gradients are small, whatever the model's device
            attn, mlp = act_name("attn_out", layer), act_name("mlp_out", layer)
            vectors = (probe.heads[layer][:, :, group_index].float().cpu(), probe.vectors[mlp].float().cpu())
            layer_grads = {"total": (probe.leaves[attn].grad.float().cpu(), probe.leaves[mlp].grad.float().cpu()),
                           "direct": (g_direct, g_direct)}
            dots[-1].append(path_dots(vectors, layer_grads))
            grads[-1].append(layer_grads)
            part = tuple(vector.sum(0) for vector in vectors)
            sums[layer] = part if sums[layer] is None else (sums[layer][0] + part[0], sums[layer][1] + part[1])
    return path_changes(dots, grads, sums, sum(len(batch) for batch in batches), mode == "mean")


def _stack_kinds(heads: Float[torch.Tensor, "batch layer head kind"], mlps: Float[torch.Tensor, "batch layer"]) -> Float[torch.Tensor, "batch layer head kind"]:
    """Head kinds, then the MLP as one more kind at head 0 (zero at the other heads)."""
    mlp = torch.zeros(heads.shape[:3], dtype=heads.dtype)
    mlp[:, :, 0] = mlps
    return torch.cat([heads, mlp[..., None]], -1)


def _clean_gradients(model: LoadedModel, batch: Batch, everything, others) -> tuple[_Probe, Float[torch.Tensor, "batch d_model"]]:
    """One clean pass with every path probed; backward from Σ a − mean(R∖a) (`end_maths.target_metric`). Returns
    the probe (vectors, leaves with their gradients) and the frozen-scale gradient at END's final residual."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    rows, ends = batch.rows, batch.ends
    ids, valid = others
    probe, store = _Probe(), {}
    last = act_name("resid_post", model.cfg.n_layers - 1)

    def stop(normed, hook):
        raise StopAtLayerException(normed[rows, ends])

    hooks = [*edit_hooks(model, batch, everything, probe), capture(store, last, at_end=ends),
             capture(store, act_name("final_scale"), at_end=ends), (act_name("final_out"), stop)]
    with torch.enable_grad():
        normed = model.bridge.run_with_hooks(batch.tokens, attention_mask=batch.mask, fwd_hooks=hooks)
        metric = target_metric(normed.float(), model.W_U, model.b_U, batch.answers, ids, valid)
        leaves = list(probe.leaves.values())
        for leaf, grad in zip(leaves, torch.autograd.grad(metric, leaves)):
            leaf.grad = grad
        # the direct effect: END's final residual through the final norm with its clean scale frozen (linear)
        x = store[last].detach().float().requires_grad_(True)
        gain, bias = (part.clone() for part in model.final_norm)  # made in inference mode: autograd refuses them
        frozen = frozen_norm_at_end(x, store[act_name("final_scale")].detach().float(), gain, bias, model.centres)
        (g_direct,) = torch.autograd.grad(target_metric(frozen, model.W_U, model.b_U, batch.answers, ids, valid), [x])
    return probe, g_direct.detach().cpu()


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
    engine=None,
) -> PathEffects:
    """Each chosen path removed alone, exactly: its change of a − mean(R∖a) per prompt; zero for paths not chosen.
    Progress ticks once per chosen path.

    `engine` (total effects only): an nnsight engine runs the passes as the mechanism grid's session
    (`NnsightEngine.ablation_grid`, on NDIF with `ablate --remote`), one set per chosen path, full passes as with
    `kv_cache=False`; only a − mean(R∖a) per pass and prompt comes back.

    `kv_cache=False` is `ablation.ablated_logits` of each path (one full pass each; the means recorded once over
    every path). With `kv_cache` (total effects only) the same edit is computed from where it acts: removing a
    path of layer l at END adds the constant p̄ − p (from the clean pass: nothing below l changes, so its pattern
    and values are the clean ones) to layer l's output at END, and nothing at earlier positions changes (causal
    attention). So each pass is END alone from block l up, earlier positions' keys and values from the clean
    run's cache (`trace`'s machinery), and every path of a layer × every prompt of one END position is one batch."""
    batch = make_batch(model, encoded)
    kinds = path_kinds(model)
    others = other_targets(batch, targets if targets is not None else relation_targets(encoded))
    if engine is not None:
        return _engine_exact(model, batch, chosen, mode, others, effect, progress, engine)
    store: dict = {}
    keep = _Probe(leaves=False)
    everything = [kind_path(kinds[k], layer, head) for k, layer, head in torch.nonzero(present_paths(model, encoded)).tolist()]
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


def _engine_exact(model, batch: Batch, chosen: Bool[torch.Tensor, "kind layer head"], mode: str, others, effect: str,
                  progress: Progress, engine) -> PathEffects:
    """`exact_path_effects` through `engine`'s grid session: the empty set (the clean pass, which records the
    means), then each chosen path alone."""
    if effect != "total":
        raise FactscopeError("the nnsight engine ablates paths exactly as total effects only")
    kinds = path_kinds(model)
    cells = torch.nonzero(chosen).tolist()
    sets = [parse(model, []), *(parse(model, [kind_path(kinds[k], layer, head)]) for k, layer, head in cells)]
    diff = torch.from_numpy(as_numpy(engine.ablation_grid(model, batch, sets, mode, *others, effects=("total",)))["logit_diff"])
    out = torch.zeros((*chosen.shape, len(batch)))
    for (k, layer, head), row in zip(cells, diff[1:]):
        out[k, layer, head] = row - diff[0]
        tick(progress)
    return PathEffects(out, chosen, kinds, mode)


def _removal(keep: "_Probe", kind: str, layer: int, head: int, mode: str) -> Float[torch.Tensor, "batch d_model"]:
    """What removing the path adds at END (per prompt): p̄ − p in mean mode, −p in zero mode (`edits.Ablate`)."""
    vectors = keep.vectors[act_name("mlp_out", layer)] if kind == "mlp" else keep.heads[layer][:, head, GROUPS.index(kind)]
    return (vectors.mean(0) - vectors) if mode == "mean" else -vectors


def _ablated_at_end(model: LoadedModel, batch: Batch, states, layer: int, change: Float[torch.Tensor, "path batch d_model"],
                    is_mlp: Bool[torch.Tensor, " path"], others, max_rows: int) -> Float[torch.Tensor, "path batch"]:
    """a − mean(R∖a) with `change[path]` added at END to layer `layer`'s attention output (head paths) or MLP
    output (MLPs), one row per (path, prompt), END alone from block `layer` on (`resume.resume`)."""
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
        logits = resume(model, batch, states, p, ends, corrupted_tails(states, layer, batch, p, ends), layer, hooks)
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
         progress: Progress, engine=None, **_sizes) -> dict[str, pd.DataFrame]:
    """`exact`: nothing (the mechanism grid is `ablation`'s); `atp`: AtP of every path and its error on a sample
    ablated exactly; `both`: every path ablated exactly too, and the error on every cell. `engine`: an nnsight
    engine runs both, one session each (`ablate --remote`)."""
    if method not in METHODS:
        raise FactscopeError(f"unknown ablate method {method!r} (use {', '.join(METHODS)})")
    if method == "exact":
        return {}
    total, direct = atp_path_effects(model, known, mode, targets, engine=engine)
    tick(progress)
    chosen = total.present if method == "both" else sample_paths(total)
    exact = exact_path_effects(model, known, chosen, mode, targets, progress=progress, engine=engine)
    if progress:  # the announced count assumes every group occurs; paths of absent groups are skipped, not run
        progress(max(0, _passes(model.cfg.n_layers, method=method, **path_sizes(model)) - 1 - int(chosen.sum())))
    tables = [path_table(total, "atp", "total"), path_table(direct, "atp", "direct"), path_table(exact, "exact", "total", chosen)]
    return {"path_ablations": pd.concat(tables, ignore_index=True),
            "atp_path_agreement": path_agreement(exact, total, chosen, sampled=method == "atp")}


def _passes(n_layers: int, *, method: str, n_heads: int, n_kinds: int, **_) -> int:
    return 0 if method == "exact" else 1 + _exact_paths(n_layers, method, n_heads, n_kinds - 1)


def _exact_paths(n_layers: int, method: str, n_heads: int, head_kinds: int) -> int:
    """How many paths `_run` ablates exactly with `head_kinds` kinds of head paths present: every one (`both`),
    or per kind the `N_TOP` + `N_RANDOM` of `sample_paths` (`atp`)."""
    if method == "both":
        return head_kinds * n_layers * n_heads + n_layers
    return head_kinds * min(N_TOP + N_RANDOM, n_layers * n_heads) + min(N_TOP + N_RANDOM, n_layers)


def _remote_cost(n_layers: int, known: list[Encoded], *, mode: str, targets: dict | None, method: str, n_heads: int,
                 n_kinds: int) -> tuple[int, int, int]:
    """Through an engine, two sessions: AtP (`NnsightEngine.path_atp`), bringing back per effect, prompt and layer
    every head path's estimate and the MLP's (fp32), then the exact ablations in the grid session
    (`NnsightEngine.ablation_grid`: the clean pass and one per path of a kind that occurs in `known`, each
    bringing back `end_maths.answer_scores` with a − mean(R∖a) per prompt); nothing sent but the prompts and R_r."""
    if method == "exact":
        return 0, 0, 0
    n = len(known)
    atp = len(ATP_EFFECTS) * n * n_layers * (n_heads * (n_kinds - 1) + 1) * 4
    head_kinds = len({group for item in known for group in item.groups})  # every group occurring is a head kind
    exact = (1 + _exact_paths(n_layers, method, n_heads, head_kinds)) * n * SCORE_DIFF_BYTES
    return 2, atp + exact, 0


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
    _passes, _run, _summary, remote=True, remote_cost=_remote_cost,
)
