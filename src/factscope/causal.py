"""Causal checks of the additive story: does what DLA reads off the model also move its output?

DLA is correlational. Here we intervene at END (and, for causal tracing, at every position) and measure
what happens to the attribute's probability, logit and top-1 accuracy:

- `knockout`            attention knockout (Geva et al. 2023): END may not attend to a token group;
- `ablation_grid`       remove paths (a head's END←group contribution, an MLP at END) alone, in pairs, together;
- `trace_effects`       causal tracing (Meng et al. 2022): noise on the subject, restore one clean state;
- `extraction_rate`     attribute extraction rate (Geva et al. 2023) of every attention / MLP sublayer;
- `subject_enrichment`  logit lens at the last subject token: from which layer is `a` decodable there;
- `noise_robustness`    accuracy as Gaussian noise on each mechanism's contribution grows.

Every condition is ONE batched forward pass over all prompts (causal tracing stacks its restorations into
the batch dimension). Passes stop at the final norm and unembed END only, so the vocabulary-sized logits of
every position are never materialised. `progress(1)` is called after each pass; `n_passes` says how many.

A path is `("attn", layer, head, group)` (group in data.GROUPS, or "all"), `("mlp", layer)` or `("embed",)`.
Head paths are edited in the residual stream (at `hook_attn_out`, END only) by exactly the vector DLA
attributes to them, computed in the same pass from that pass's own pattern and values: for architectures
without an attention post-norm this equals editing `hook_z` at END by `Σ_{k∈group} pattern·v_k` (checked in
the tests); for Gemma's post-norm it also keeps the norm from rescaling the heads that are not removed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from .data import GROUPS, Encoded, relation_targets
from .decompose import check_supported, group_onehot, has_attn_post_norm, post_norm_gain
from .errors import FactscopeError
from . import models
from .models import LoadedModel, pad_batch, pad_id
from .recall import recall

Progress = Callable[[int], None] | None
GroupSpec = str | tuple[str, ...]
PathSpec = tuple  # ("attn", layer, head, group) | ("mlp", layer) | ("embed",)
Hook = tuple[str, Callable]

TRACE_KINDS = ("resid", "attn", "mlp")
NOISE_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Batches and passes


@dataclass
class Batch:
    """All prompts right-padded into one batch; END is each prompt's own last real position."""

    items: list[Encoded]
    tokens: Int[torch.Tensor, "batch pos"]
    mask: Int[torch.Tensor, "batch pos"]
    ends: Int[torch.Tensor, " batch"]
    onehot: Float[torch.Tensor, "batch pos group"]  # token group of every position (GROUPS order), 0 on padding
    answers: Int[torch.Tensor, " batch"]  # the attribute's first token

    @property
    def rows(self) -> Int[torch.Tensor, " batch"]:
        return torch.arange(len(self.items), device=self.tokens.device)

    def __len__(self) -> int:
        return len(self.items)


def make_batch(model: LoadedModel, encoded: list[Encoded]) -> Batch:
    if not encoded:
        raise FactscopeError("no prompts to analyse (is the list of known facts empty?)")
    check_supported(model)
    tokens, mask, ends = pad_batch([item.token_ids for item in encoded], pad_id(model.tokenizer))
    onehot = group_onehot(encoded, tokens.shape[1])
    answers = torch.tensor([item.attribute_token for item in encoded])
    device = model.device
    return Batch(encoded, tokens.to(device), mask.to(device), ends.to(device), onehot.to(device), answers.to(device))


def end_logits(model: LoadedModel, batch: Batch, hooks: Sequence[Hook] = ()) -> Float[torch.Tensor, "batch vocab"]:
    """One forward pass of the whole batch with `hooks` → logits at END (see models.end_logits)."""
    return models.end_logits(model, batch.tokens, batch.mask, batch.ends, hooks)


def capture(store: dict, name: str, at_end: Int[torch.Tensor, " batch"] | None = None) -> Hook:
    """A hook that keeps a copy of an activation (only the END rows when `at_end` is given)."""

    def hook(x: torch.Tensor, hook) -> None:
        store[name] = (x[torch.arange(len(at_end), device=x.device), at_end] if at_end is not None else x).clone()

    return (name, hook)


def known_facts(model: LoadedModel, encoded: list[Encoded], batch_size: int = 32) -> list[Encoded]:
    """The prompts whose attribute is the model's top-1 next token: causal checks are about known facts."""
    table = recall(model, encoded, batch_size=batch_size)
    return [item for item, correct in zip(encoded, table["correct"]) if correct]


# ---------------------------------------------------------------------------------------------------------------
# Scores


def scores(logits: Float[torch.Tensor, "batch vocab"], batch: Batch, others: tuple | None = None) -> dict[str, np.ndarray]:
    """Per prompt: p(a), logit of a, top-1 correct, and (with `others`) logit of a − mean logit of R_r \\ a."""
    rows = batch.rows
    logit = logits[rows, batch.answers]
    out = {
        "prob": logits.softmax(-1)[rows, batch.answers],
        "logit": logit,
        "correct": (logits.argmax(-1) == batch.answers).float(),
    }
    if others is not None:
        ids, valid = others  # [batch, n_others]
        count = valid.sum(1)
        mean_others = (logits.gather(1, ids) * valid).sum(1) / count.clamp(min=1)
        out["logit_diff"] = torch.where(count > 0, logit - mean_others, torch.full_like(logit, float("nan")))
    return {key: value.float().cpu().numpy() for key, value in out.items()}


def other_targets(batch: Batch, targets: dict[str, dict[int, str]]) -> tuple[Int[torch.Tensor, "batch n"], Float[torch.Tensor, "batch n"]]:
    """R_r \\ a for every prompt as padded token ids with a validity mask."""
    lists = [[t for t in targets[item.fact.relation] if t != item.attribute_token] for item in batch.items]
    width = max(1, max(len(ids) for ids in lists))
    ids = torch.zeros((len(lists), width), dtype=torch.long)
    valid = torch.zeros((len(lists), width))
    for row, tokens in enumerate(lists):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        valid[row, : len(tokens)] = 1.0
    return ids.to(batch.tokens.device), valid.to(batch.tokens.device)


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# 1. Attention knockout


def layer_window(center: int, window: int, n_layers: int) -> tuple[int, int]:
    """`window` layers around `center` (Meng's convention: center − w//2 … center − w//2 + w − 1), clipped."""
    first = center - window // 2
    return max(0, first), min(n_layers - 1, first + window - 1)


def blocked_keys(batch: Batch, blocked: GroupSpec) -> Bool[torch.Tensor, "batch pos"]:
    """Key positions of the blocked groups. END itself is never blocked, so END always keeps a key to attend to."""
    names = (blocked,) if isinstance(blocked, str) else tuple(blocked)
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise FactscopeError(f"unknown token group {unknown[0]!r} (use {', '.join(GROUPS)})")
    keys = batch.onehot[..., [GROUPS.index(name) for name in names]].sum(-1) > 0
    keys[batch.rows, batch.ends] = False
    return keys


def head_mask(model: LoadedModel, heads: Iterable[tuple[int, int]]) -> Bool[torch.Tensor, "layer head"]:
    cfg = model.cfg
    mask = torch.zeros((cfg.n_layers, cfg.n_heads), dtype=torch.bool, device=model.device)
    for layer, head in heads:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise FactscopeError(f"head L{layer}H{head} does not exist ({cfg.n_layers} layers × {cfg.n_heads} heads)")
        mask[layer, head] = True
    return mask


def knockout_hooks(model: LoadedModel, batch: Batch, blocked: GroupSpec, heads: Bool[torch.Tensor, "layer head"]) -> list[Hook]:
    """−inf on the scores END→blocked keys of the chosen heads, before the softmax. Every layer gets a hook
    (a no-op where no head is chosen), so an empty head set exercises the same code path."""
    keys = blocked_keys(batch, blocked)  # [batch, key]
    query_is_end = torch.zeros_like(keys)
    query_is_end[batch.rows, batch.ends] = True

    def make(layer_heads: Bool[torch.Tensor, " head"]):
        def hook(scores: Float[torch.Tensor, "batch head query key"], hook):
            block = layer_heads[None, :, None, None] & query_is_end[:, None, :, None] & keys[:, None, None, :]
            return scores.masked_fill(block, float("-inf"))

        return hook

    return [(f"blocks.{layer}.attn.hook_attn_scores", make(heads[layer])) for layer in range(model.cfg.n_layers)]


def knockout_logits(
    model: LoadedModel,
    encoded: list[Encoded] | Batch,
    blocked: GroupSpec,
    heads: Iterable[tuple[int, int]],
    freeze_final_scale: bool = False,
) -> Float[torch.Tensor, "batch vocab"]:
    """END logits with END→`blocked` attention cut for the given (layer, head) pairs (optionally with the
    final norm's scale pinned to its clean value, to compare with DLA)."""
    batch = encoded if isinstance(encoded, Batch) else make_batch(model, encoded)
    hooks = knockout_hooks(model, batch, blocked, head_mask(model, heads))
    if freeze_final_scale:
        hooks.append(freeze_final_scale_hook(model, batch))
    return end_logits(model, batch, hooks)


def knockout(
    model: LoadedModel,
    encoded: list[Encoded],
    blocked: Sequence[GroupSpec] = ("subject", "relation"),
    window: int = 9,
    heads: dict[str, Iterable[tuple[int, int]]] | None = None,
    progress: Progress = None,
) -> pd.DataFrame:
    """Knock out END→group attention for a window of layers slid over the model, or for named sets of heads
    (`heads={"subject_heads": [(23, 4), ...]}`, instead of the windows).

    One row per (blocked group, window or head set): `condition` ("window" | "heads"), `head_set` (the set's
    name; "window" for windows), `layer` (window centre; −1 for a head set), `first_layer`, `last_layer`,
    `n_heads`, `blocked`, `n_prompts`, mean `p_before`/`p_after`, `rel_change_p` (mean of
    (p_after − p_before)/p_before), `delta_logit` (mean change in a's logit), `accuracy_before`/`accuracy_after`.
    "relation" means the relation tokens other than END itself.
    Passes: 1 + len(blocked) × (n_layers, or the number of head sets).
    """
    batch = make_batch(model, encoded)
    cfg = model.cfg
    before = scores(end_logits(model, batch), batch)
    _tick(progress)
    if heads is not None:
        conditions = []
        for name, pairs in heads.items():
            pairs = list(pairs)
            layers = [layer for layer, _ in pairs] or [-1]
            conditions.append(("heads", name, -1, min(layers), max(layers), pairs))
    else:
        conditions = []
        for center in range(cfg.n_layers):
            first, last = layer_window(center, window, cfg.n_layers)
            pairs = [(layer, head) for layer in range(first, last + 1) for head in range(cfg.n_heads)]
            conditions.append(("window", "window", center, first, last, pairs))
    records = []
    for spec in blocked:
        for condition, name, center, first, last, pairs in conditions:
            after = scores(knockout_logits(model, batch, spec, pairs), batch)
            _tick(progress)
            records.append(
                {
                    "condition": condition, "head_set": name, "layer": center, "first_layer": first,
                    "last_layer": last, "n_heads": len(pairs), "blocked": _group_name(spec), "n_prompts": len(batch),
                    **_before_after(before, after),
                }
            )
    return pd.DataFrame.from_records(records)


def _group_name(spec: GroupSpec) -> str:
    return spec if isinstance(spec, str) else "+".join(spec)


def _before_after(before: dict, after: dict) -> dict:
    return {
        "p_before": _mean(before["prob"]),
        "p_after": _mean(after["prob"]),
        "rel_change_p": _mean((after["prob"] - before["prob"]) / before["prob"]),
        "delta_logit": _mean(after["logit"] - before["logit"]),
        "accuracy_before": _mean(before["correct"]),
        "accuracy_after": _mean(after["correct"]),
    }


def _tick(progress: Progress) -> None:
    if progress:
        progress(1)


# ---------------------------------------------------------------------------------------------------------------
# 2. Paths, and editing them at END


@dataclass
class PathSet:
    """Paths as masks: `heads[l, h, g]` = 1 where head h of layer l is edited for source group g."""

    heads: Float[torch.Tensor, "layer head group"]
    mlps: list[int]
    embed: bool
    n_paths: int

    def head_layers(self) -> list[int]:
        return [int(layer) for layer in torch.nonzero(self.heads.sum((1, 2)) > 0).flatten()]


def parse_paths(model: LoadedModel, paths: Iterable[PathSpec]) -> PathSet:
    cfg = model.cfg
    heads = torch.zeros((cfg.n_layers, cfg.n_heads, len(GROUPS)), device=model.device)
    mlps, embed = set(), False
    for path in paths:
        kind = path[0] if isinstance(path, tuple) and path else None
        if kind == "attn" and len(path) == 4:
            _, layer, head, group = path
            head_mask(model, [(layer, head)])  # validates the indices
            if group != "all" and group not in GROUPS:
                raise FactscopeError(f"path {path}: unknown source group {group!r} (use {', '.join(GROUPS)} or 'all')")
            heads[layer, head, [GROUPS.index(group)] if group != "all" else slice(None)] = 1.0
        elif kind == "mlp" and len(path) == 2:
            if not 0 <= path[1] < cfg.n_layers:
                raise FactscopeError(f"path {path}: layer out of range (the model has {cfg.n_layers} layers)")
            mlps.add(int(path[1]))
        elif kind == "embed" and len(path) == 1:
            embed = True
        else:
            raise FactscopeError(f"path {path!r}: expected ('attn', layer, head, group), ('mlp', layer) or ('embed',)")
    # duplicates (a path listed by two mechanisms) are removed once
    return PathSet(heads, sorted(mlps), embed, int(heads.sum()) + len(mlps) + int(embed))


def union(*path_lists: Iterable[PathSpec]) -> list[PathSpec]:
    return list(dict.fromkeys(itertools.chain(*path_lists)))


def taxonomy_paths(heads: pd.DataFrame, n_layers: int) -> dict[str, list[PathSpec]]:
    """The paper's mechanisms as path lists, from a head table with columns layer, head, class (subject |
    relation | mixed | negligible; e.g. mechanisms.classify_heads): subject heads' END←SUBJECT paths,
    relation heads' END←RELATION paths, the mixed heads' two paths separately, and the MLPs at END."""

    def paths(cls: str, source: str) -> list[PathSpec]:
        chosen = heads[heads["class"] == cls]
        return [("attn", int(layer), int(head), source) for layer, head in zip(chosen["layer"], chosen["head"])]

    mechanisms = {
        "subject_heads": paths("subject", "subject"),
        "relation_heads": paths("relation", "relation"),
        "mixed_subject": paths("mixed", "subject"),
        "mixed_relation": paths("mixed", "relation"),
        "mlps": [("mlp", layer) for layer in range(n_layers)],
    }
    return {name: path_list for name, path_list in mechanisms.items() if path_list}


@dataclass
class HeadMap:
    """From a head's z-space to the residual stream at END, as this pass computes it."""

    to_resid: Callable[[torch.Tensor], torch.Tensor]  # [batch, head, group, d_head] → [batch, head, group, d_model]
    norm: Float[torch.Tensor, "batch head"]  # Frobenius norm of each head's map (for noise of a given size)
    d_head: int


class Editor:
    """What happens to the edited paths at END. `head` gets every head path's residual-stream vector."""

    def head(self, layer: int, out_end: Float[torch.Tensor, "batch d_model"], paths: Float[torch.Tensor, "batch head group d_model"],
             weights: Float[torch.Tensor, "head group"], head_map: HeadMap) -> Float[torch.Tensor, "batch d_model"]:
        raise NotImplementedError

    def vector(self, key: tuple, x_end: Float[torch.Tensor, "batch d_model"]) -> Float[torch.Tensor, "batch d_model"]:
        raise NotImplementedError


class Record(Editor):
    """Leaves everything as it is and keeps the dataset mean of every path's END vector (for mean ablation)."""

    def __init__(self):
        self.heads: dict[int, torch.Tensor] = {}
        self.vectors: dict[tuple, torch.Tensor] = {}

    def head(self, layer, out_end, paths, weights, head_map):
        self.heads[layer] = paths.mean(0)  # [head, group, d_model]
        return out_end

    def vector(self, key, x_end):
        self.vectors[key] = x_end.mean(0)
        return x_end


class Ablate(Editor):
    """Remove each path's vector; in mean mode add back its dataset mean (from a `Record` pass)."""

    def __init__(self, means: Record | None):
        self.means = means

    def head(self, layer, out_end, paths, weights, head_map):
        out_end = out_end - torch.einsum("bhgm,hg->bm", paths, weights)
        if self.means is not None:
            out_end = out_end + torch.einsum("hgm,hg->m", self.means.heads[layer], weights)
        return out_end

    def vector(self, key, x_end):
        if self.means is None:
            return torch.zeros_like(x_end)
        return self.means.vectors[key].expand_as(x_end).clone()


class Noise(Editor):
    """Add Gaussian noise to each path's vector, of norm `scale` × that vector's norm (in expectation).

    A head's noise lives in the subspace the head can write to (z-space noise through its output map), an
    MLP's or the embedding's in the whole residual stream. The generator is drawn in a fixed order, so the
    same seed gives the same noise, and growing scales reuse the same directions.
    """

    def __init__(self, scale: float, seed: int):
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)

    def head(self, layer, out_end, paths, weights, head_map):
        eps = torch.randn((*paths.shape[:3], head_map.d_head), generator=self.generator)
        direction = head_map.to_resid(eps.to(paths.device))  # E|direction|² = norm²
        sigma = self.scale * paths.norm(dim=-1) / head_map.norm[:, :, None]  # [batch, head, group]
        return out_end + torch.einsum("bhgm,bhg,hg->bm", direction, sigma, weights)

    def vector(self, key, x_end):
        eps = torch.randn(x_end.shape, generator=self.generator).to(x_end.device)
        sigma = self.scale * x_end.norm(dim=-1, keepdim=True) / x_end.shape[-1] ** 0.5
        return x_end + sigma * eps


def edit_hooks(model: LoadedModel, batch: Batch, paths: PathSet, editor: Editor) -> list[Hook]:
    """Hooks that hand every edited path's END vector to `editor` and write its answer back at END.

    A head path's vector is `Σ_{k∈group} pattern[h,END,k] · v_k W_O[h]` (times the attention post-norm's
    gain / scale where there is one), built from this pass's own pattern, values and norm scale: the
    DLA of decompose, so that zero-ablating a path moves a frozen-scale logit by exactly minus its DLA.
    """
    cfg, rows, ends = model.cfg, batch.rows, batch.ends
    hooks: list[Hook] = []
    for layer in paths.head_layers():
        store: dict = {}
        prefix = f"blocks.{layer}"
        hooks += [capture(store, f"{prefix}.attn.hook_pattern"), capture(store, f"{prefix}.attn.hook_v")]
        if has_attn_post_norm(model):
            hooks.append(capture(store, f"{prefix}.ln1_post.hook_scale", at_end=ends))
        hooks.append((f"{prefix}.hook_attn_out", _head_edit(model, batch, layer, paths.heads[layer], store, editor)))
    for layer in paths.mlps:
        hooks.append((f"blocks.{layer}.hook_mlp_out", _vector_edit(rows, ends, ("mlp", layer), editor)))
    if paths.embed:
        hooks.append(("hook_embed", _vector_edit(rows, ends, ("embed",), editor)))
        if cfg.positional_embedding_type == "standard":
            hooks.append(("hook_pos_embed", _vector_edit(rows, ends, ("pos_embed",), editor)))
    return hooks


def _head_edit(model, batch: Batch, layer: int, weights: Float[torch.Tensor, "head group"], store: dict, editor: Editor):
    rows, ends, prefix = batch.rows, batch.ends, f"blocks.{layer}"
    w_o = model.bridge.W_O[layer]  # [head, d_head, d_model]
    gain = post_norm_gain(model, layer) if has_attn_post_norm(model) else None
    w_o_norm = (w_o if gain is None else w_o * gain).flatten(1).norm(dim=-1)  # [head]

    def hook(out: Float[torch.Tensor, "batch pos d_model"], hook):
        pattern = store[f"{prefix}.attn.hook_pattern"][rows, :, ends]  # [batch, head, key]
        values = store[f"{prefix}.attn.hook_v"]  # [batch, key, kv_head, d_head]
        values = values.repeat_interleave(pattern.shape[1] // values.shape[2], dim=2)  # GQA: head h reads kv h // group
        z_paths = torch.einsum("bhk,bkg,bkhd->bhgd", pattern, batch.onehot, values)
        # the attention post-norm (Gemma), where there is one, as a linear map with this pass's scale at END
        scale = store[f"{prefix}.ln1_post.hook_scale"] if gain is not None else None  # [batch, 1]

        def to_resid(z: Float[torch.Tensor, "batch head group d_head"]) -> Float[torch.Tensor, "batch head group d_model"]:
            resid = torch.einsum("bhgd,hdm->bhgm", z, w_o)
            return resid if gain is None else resid * gain / scale[:, :, None, None]

        norm = w_o_norm.expand(len(rows), -1) if gain is None else w_o_norm / scale
        head_map = HeadMap(to_resid, norm, w_o.shape[1])
        out = out.clone()
        out[rows, ends] = editor.head(layer, out[rows, ends], to_resid(z_paths), weights, head_map)
        return out

    return hook


def _vector_edit(rows, ends, key: tuple, editor: Editor):
    def hook(x: Float[torch.Tensor, "batch pos d_model"], hook):
        x = x.clone()
        x[rows, ends] = editor.vector(key, x[rows, ends])
        return x

    return hook


def freeze_final_scale_hook(model: LoadedModel, batch: Batch) -> Hook:
    """Pin the final norm's scale to its clean value: the map from END's residual to logits becomes linear,
    the setting in which DLA is exact."""
    store: dict = {}
    end_logits(model, batch, [capture(store, "ln_final.hook_scale")])
    clean = store["ln_final.hook_scale"]
    return ("ln_final.hook_scale", lambda scale, hook: clean.clone())


# ---------------------------------------------------------------------------------------------------------------
# 2b. Path ablation


def path_means(model: LoadedModel, batch: Batch, paths: Iterable[PathSpec]) -> Record:
    """One clean pass recording the dataset mean of every path's END vector."""
    record = Record()
    end_logits(model, batch, edit_hooks(model, batch, parse_paths(model, paths), record))
    return record


def ablated_logits(
    model: LoadedModel,
    encoded: list[Encoded] | Batch,
    paths: Iterable[PathSpec],
    mode: str = "mean",
    means: Record | None = None,
    freeze_final_scale: bool = False,
) -> Float[torch.Tensor, "batch vocab"]:
    """END logits with the paths removed: `mode="zero"` (subtract them) or `"mean"` (replace each by its
    dataset mean; pass `means` from `path_means` to reuse one recording pass across many conditions)."""
    if mode not in ("zero", "mean"):
        raise FactscopeError(f"ablation mode {mode!r}: use 'mean' or 'zero'")
    batch = encoded if isinstance(encoded, Batch) else make_batch(model, encoded)
    paths = list(paths)
    if mode == "mean" and means is None:
        means = path_means(model, batch, paths)
    hooks = edit_hooks(model, batch, parse_paths(model, paths), Ablate(means if mode == "mean" else None))
    if freeze_final_scale:
        hooks.append(freeze_final_scale_hook(model, batch))
    return end_logits(model, batch, hooks)


def mechanism_sets(names: Sequence[str]) -> list[tuple[str, ...]]:
    """(), each alone, every pair, and all together (when there are more than two)."""
    sets = [(), *((name,) for name in names), *itertools.combinations(names, 2)]
    if len(names) > 2:
        sets.append(tuple(names))
    return sets


def ablation_grid(
    model: LoadedModel,
    encoded: list[Encoded],
    mechanisms: dict[str, list[PathSpec]],
    mode: str = "mean",
    targets: dict[str, dict[int, str]] | None = None,
    progress: Progress = None,
) -> pd.DataFrame:
    """Remove each mechanism alone, every pair, and all together; one pass per set (plus one recording the
    means in mean mode).

    One row per set: `mechanism_set` (names joined by " + "; "none" is the clean model), `n_mechanisms`,
    `n_removed` (paths), `mean_logit`, `mean_logit_diff` (a − mean(R_r \\ a); R_r from `targets`, by default
    `relation_targets(encoded)`), `accuracy`, `mean_prob`, their changes from the clean model (`delta_*`,
    `accuracy_drop`), and for sets of two or more the additivity check `interaction_logit` (and
    `interaction_logit_diff`) = effect(together) − Σ effect(alone). Robustness is the `accuracy` of the
    single sets against the set of all: see `robustness_summary`.
    """
    if not mechanisms:
        raise FactscopeError("no mechanisms to ablate")
    batch = make_batch(model, encoded)
    others = other_targets(batch, targets if targets is not None else relation_targets(encoded))
    means = None
    if mode == "mean":
        means = path_means(model, batch, union(*mechanisms.values()))
        _tick(progress)
    records, sets = [], mechanism_sets(list(mechanisms))
    for names in sets:
        paths = union(*(mechanisms[name] for name in names))
        logits = ablated_logits(model, batch, paths, mode, means) if paths else end_logits(model, batch)
        _tick(progress)
        result = scores(logits, batch, others)
        records.append(
            {
                "mechanism_set": " + ".join(names) or "none", "n_mechanisms": len(names),
                "n_removed": parse_paths(model, paths).n_paths, "mode": mode, "n_prompts": len(batch),
                "mean_logit": _mean(result["logit"]), "mean_logit_diff": _mean(result["logit_diff"]),
                "accuracy": _mean(result["correct"]), "mean_prob": _mean(result["prob"]),
            }
        )
    return _with_interactions(pd.DataFrame.from_records(records), sets)


def _with_interactions(table: pd.DataFrame, sets: list[tuple[str, ...]]) -> pd.DataFrame:
    """Changes from the clean model (row 0), and effect(together) − Σ effect(alone) for sets of two or more."""
    clean = table.iloc[0]
    for column in ("logit", "logit_diff"):
        table[f"delta_{column}"] = table[f"mean_{column}"] - clean[f"mean_{column}"]
    table["accuracy_drop"] = clean["accuracy"] - table["accuracy"]
    alone = {names[0]: row for names, (_, row) in zip(sets, table.iterrows()) if len(names) == 1}
    for column in ("logit", "logit_diff"):
        summed = [sum(alone[n][f"delta_{column}"] for n in names) if len(names) > 1 else np.nan for names in sets]
        table[f"sum_alone_delta_{column}"] = summed
        table[f"interaction_{column}"] = table[f"delta_{column}"] - table[f"sum_alone_delta_{column}"]
    return table


def robustness_summary(grid: pd.DataFrame) -> dict:
    """Accuracy with each single mechanism removed against all of them removed."""
    singles = grid[grid["n_mechanisms"] == 1]
    everything = grid[grid["n_mechanisms"] == grid["n_mechanisms"].max()].iloc[0]
    return {
        "accuracy_clean": float(grid.iloc[0]["accuracy"]),
        "accuracy_single_removed": dict(zip(singles["mechanism_set"], singles["accuracy"].astype(float))),
        "accuracy_all_removed": float(everything["accuracy"]),
        "all_removed_set": str(everything["mechanism_set"]),
        "interaction_logit_all": float(everything["interaction_logit"]),
        "interaction_logit_diff_all": float(everything["interaction_logit_diff"]),
    }


# ---------------------------------------------------------------------------------------------------------------
# 3. Causal tracing


def subject_noise(
    batch: Batch, std: float, seed: int, d_model: int
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Gaussian noise of standard deviation `std` on subject positions, zero elsewhere; seeded, deterministic."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((*batch.tokens.shape, d_model), generator=generator).to(batch.tokens.device)
    return eps * std * batch.onehot[..., GROUPS.index("subject"), None]


def _trace_rows(batch: Batch) -> tuple[Int[torch.Tensor, " rows"], Int[torch.Tensor, " rows"]]:
    """(prompt, position) pairs to restore: the first subject token to END. Earlier positions cannot see the
    noise (causal attention), so restoring them changes nothing; they are recorded as exact zeros."""
    prompts, positions = [], []
    for row, item in enumerate(batch.items):
        first = item.groups.index("subject")
        for pos in range(first, len(item.token_ids)):
            prompts.append(row)
            positions.append(pos)
    device = batch.tokens.device
    return torch.tensor(prompts, device=device), torch.tensor(positions, device=device)


def trace_labels(batch: Batch) -> dict[str, tuple[str, Bool[torch.Tensor, "batch pos"]]]:
    """Position kinds of Meng et al. (first/middle/last subject token, first subsequent token, further
    tokens, last token) and the token groups, as masks; a one-token subject is both first and last."""
    shape = batch.tokens.shape
    masks = {name: torch.zeros(shape, dtype=torch.bool) for name in
             ("first_subject", "mid_subject", "last_subject", "first_subsequent", "further_tokens", "last_token")}
    for row, item in enumerate(batch.items):
        subject = [pos for pos, group in enumerate(item.groups) if group == "subject"]
        first, last, end = subject[0], subject[-1], item.end
        masks["first_subject"][row, first] = True
        masks["last_subject"][row, last] = True
        masks["mid_subject"][row, first + 1 : last] = True
        if last + 1 < end:
            masks["first_subsequent"][row, last + 1] = True
        masks["further_tokens"][row, last + 2 : end] = True
        masks["last_token"][row, end] = True
    labels = {name: ("position", mask) for name, mask in masks.items()}
    for index, group in enumerate(GROUPS):
        labels[group] = ("group", batch.onehot[..., index].cpu() > 0)
    return labels


@dataclass
class TraceEffects:
    """Per-prompt causal-tracing results; `effects[seed, kind, layer, prompt, pos]` is p_restored − p_corrupted
    (exact zeros at positions before the subject and on padding)."""

    effects: Float[torch.Tensor, "seed kind layer batch pos"]
    p_clean: Float[torch.Tensor, " batch"]
    p_corrupted: Float[torch.Tensor, "seed batch"]
    noise_std: float
    kinds: tuple[str, ...]
    window: int
    batch: Batch


def trace_effects(
    model: LoadedModel,
    encoded: list[Encoded],
    noise: float = 3.0,
    seeds: Sequence[int] = SEEDS,
    window: int = 10,
    kinds: Sequence[str] = TRACE_KINDS,
    max_rows: int = 1024,
    progress: Progress = None,
) -> TraceEffects:
    """Causal tracing, per prompt and position: corrupt the subject's token embeddings with Gaussian noise
    (`noise` × the std of the subjects' token embeddings over the dataset; one seeded draw per seed), then
    restore one clean state at (layer, position) — the residual stream after that layer (`resid`), or the
    attention / MLP outputs of a `window` of layers around it — and record p_restored(a) − p_corrupted(a).

    All restorations of one (seed, kind, layer) are stacked into the batch dimension (in chunks of
    `max_rows` rows, sorted by length so padding stays short) and run from the first block they change.
    Passes: 1 + len(seeds) × (1 + len(kinds) × n_layers).
    """
    unknown = [kind for kind in kinds if kind not in TRACE_KINDS]
    if unknown:
        raise FactscopeError(f"unknown trace kind {unknown[0]!r} (use {', '.join(TRACE_KINDS)})")
    batch = make_batch(model, encoded)
    n_layers = model.cfg.n_layers
    clean, std = _clean_states(model, batch, kinds)
    _tick(progress)
    prompts, positions = _trace_rows(batch)
    effects = torch.zeros((len(seeds), len(kinds), n_layers, *batch.tokens.shape))  # zero where not restored
    p_corrupted = []
    for s, seed in enumerate(seeds):
        corrupt_pre, p_corrupt = _corrupted_states(model, batch, subject_noise(batch, noise * std, seed, model.cfg.d_model))
        _tick(progress)
        p_corrupted.append(p_corrupt.cpu())
        for k, kind in enumerate(kinds):
            for layer in range(n_layers):
                restored = _restored_probs(model, batch, kind, layer, window, prompts, positions, clean, corrupt_pre, p_corrupt, max_rows)
                effects[s, k, layer, prompts.cpu(), positions.cpu()] = (restored - p_corrupt[prompts]).cpu()
                _tick(progress)
    return TraceEffects(effects, clean["p"].cpu(), torch.stack(p_corrupted), noise * std, tuple(kinds), window, batch)


def trace_table(trace: TraceEffects) -> pd.DataFrame:
    """Causal tracing results as a tidy table (causal_trace.parquet).

    One row per (kind, layer, token): `token` is a position kind (`level="position"`: first_subject,
    mid_subject, last_subject, first_subsequent, further_tokens, last_token, after Meng et al.) or a token
    group (`level="group"`: bos, prefix, subject, relation); `indirect_effect` is the mean over prompts of
    the seed-averaged effect averaged over the prompt's positions of that kind, `sem` its standard error
    over prompts; `first_layer`..`last_layer` is the restored window; `p_clean` and `p_corrupted` are means.
    """
    n_layers = trace.effects.shape[2]
    table = _trace_table(trace.effects, trace_labels(trace.batch), trace.kinds, trace.window, n_layers)
    table["p_clean"] = float(trace.p_clean.mean())
    table["p_corrupted"] = float(trace.p_corrupted.mean())
    table["noise_std"] = trace.noise_std
    table["n_seeds"] = trace.effects.shape[0]
    return table


def _clean_states(model: LoadedModel, batch: Batch, kinds: Sequence[str]) -> tuple[dict, float]:
    """Clean activations to restore from, p(a), and the std of the subjects' token embeddings."""
    store: dict = {}
    hooks = [capture(store, "hook_embed")]
    for layer in range(model.cfg.n_layers):
        if "resid" in kinds:
            hooks.append(capture(store, f"blocks.{layer}.hook_resid_post"))
        if "attn" in kinds:
            hooks.append(capture(store, f"blocks.{layer}.hook_attn_out"))
        if "mlp" in kinds:
            hooks.append(capture(store, f"blocks.{layer}.hook_mlp_out"))
    logits = end_logits(model, batch, hooks)
    store["p"] = logits.softmax(-1)[batch.rows, batch.answers]
    subject = batch.onehot[..., GROUPS.index("subject")] > 0
    return store, float(store.pop("hook_embed")[subject].std())


def _corrupted_states(model: LoadedModel, batch: Batch, noise: Float[torch.Tensor, "batch pos d_model"]) -> tuple[list, torch.Tensor]:
    """The corrupted run: the residual stream entering every block, and p(a)."""
    store: dict = {}
    hooks = [("hook_embed", lambda x, hook: x + noise)]
    hooks += [capture(store, f"blocks.{layer}.hook_resid_pre") for layer in range(model.cfg.n_layers)]
    logits = end_logits(model, batch, hooks)
    resid_pre = [store[f"blocks.{layer}.hook_resid_pre"] for layer in range(model.cfg.n_layers)]
    return resid_pre, logits.softmax(-1)[batch.rows, batch.answers]


def _restored_probs(model, batch: Batch, kind: str, layer: int, window: int, prompts, positions, clean: dict,
                    corrupt_pre: list, p_corrupt: torch.Tensor, max_rows: int) -> Float[torch.Tensor, " rows"]:
    """p(a) with one clean state restored per row (row = one prompt and one position)."""
    n_layers = model.cfg.n_layers
    if kind == "resid" and layer == n_layers - 1:
        # After the last block only END's own state reaches the logits: restoring it gives the clean p exactly.
        return torch.where(positions == batch.ends[prompts], clean["p"][prompts], p_corrupt[prompts])
    first, last = (layer + 1, layer + 1) if kind == "resid" else layer_window(layer, window, n_layers)
    lengths = batch.ends[prompts] + 1
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.empty(len(prompts), device=batch.tokens.device)
    for chunk in order.split(max_rows):
        p, i = prompts[chunk], positions[chunk]
        width = int(lengths[chunk].max())
        resid = corrupt_pre[first][p, :width].clone()
        local = torch.arange(len(chunk), device=p.device)
        hooks = []
        if kind == "resid":
            resid[local, i] = clean[f"blocks.{layer}.hook_resid_post"][p, i]
        else:
            name = "hook_attn_out" if kind == "attn" else "hook_mlp_out"
            hooks = [(f"blocks.{j}.{name}", _restore(clean[f"blocks.{j}.{name}"], p, i, local)) for j in range(first, last + 1)]
        logits = models.end_logits(model, None, batch.mask[p, :width], batch.ends[p], hooks, resid=resid, start=first)
        out[chunk] = logits.softmax(-1)[local, batch.answers[p]]
    return out


def _restore(clean_out: Float[torch.Tensor, "batch pos d_model"], prompts, positions, local):
    def hook(x: Float[torch.Tensor, "rows pos d_model"], hook):
        x = x.clone()
        x[local, positions] = clean_out[prompts, positions]
        return x

    return hook


def _trace_table(effects: torch.Tensor, labels: dict, kinds: Sequence[str], window: int, n_layers: int) -> pd.DataFrame:
    """effects [seed, kind, layer, batch, pos] → per (kind, layer, label) mean over prompts of the mean over
    the label's positions and the seeds."""
    per_seed = effects.mean(0)  # [kind, layer, batch, pos]
    records = []
    for token, (level, mask) in labels.items():
        has = mask.any(1)  # prompts with at least one such position
        if not has.any():
            continue
        per_prompt = (per_seed * mask).sum(-1)[..., has] / mask.sum(1)[has]  # [kind, layer, prompt]
        mean = per_prompt.mean(-1)
        sem = per_prompt.std(-1) / per_prompt.shape[-1] ** 0.5 if per_prompt.shape[-1] > 1 else torch.full_like(mean, float("nan"))
        for k, kind in enumerate(kinds):
            for layer in range(n_layers):
                first, last = (layer, layer) if kind == "resid" else layer_window(layer, window, n_layers)
                records.append(
                    {
                        "kind": kind, "layer": layer, "first_layer": first, "last_layer": last, "token": token,
                        "level": level, "indirect_effect": float(mean[k, layer]), "sem": float(sem[k, layer]),
                        "n_prompts": int(has.sum()),
                    }
                )
    return pd.DataFrame.from_records(records)


def trace_peaks(trace: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, token) the layer of the largest indirect effect."""
    index = trace.groupby(["kind", "token"])["indirect_effect"].idxmax()
    return trace.loc[index, ["kind", "token", "level", "layer", "indirect_effect"]].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# 4. Attribute extraction rate, 5. subject enrichment


def logit_lens(model: LoadedModel, vectors: Float[torch.Tensor, "batch d_model"]) -> Float[torch.Tensor, "batch vocab"]:
    """A residual-stream vector through the final norm with its OWN scale (the norm's weight is folded into
    W_U by compatibility mode), then the unembedding."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        vectors = vectors - vectors.mean(-1, keepdim=True)
    vectors = vectors / (vectors.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    return vectors @ model.W_U + model.b_U


def extraction_rate(model: LoadedModel, encoded: list[Encoded], top_k: int = 10, progress: Progress = None) -> pd.DataFrame:
    """Per layer and sublayer (attn, mlp): the fraction of prompts whose END output, read through the logit
    lens, has the model's own top-1 prediction at top-1 (`extraction_rate`, Geva et al.'s event), the
    attribute a at top-1 (`attribute_rate`), and the prediction among its `top_k` tokens
    (`extraction_rate_top_k`: small models often rank it a few places down). One pass."""
    batch = make_batch(model, encoded)
    store: dict = {}
    names = [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers) for hook in ("hook_attn_out", "hook_mlp_out")]
    logits = end_logits(model, batch, [capture(store, name, at_end=batch.ends) for name in names])
    _tick(progress)
    predicted = logits.argmax(-1)
    records = []
    with torch.inference_mode():
        for layer in range(model.cfg.n_layers):
            for sublayer, hook in (("attn", "hook_attn_out"), ("mlp", "hook_mlp_out")):
                top = logit_lens(model, store[f"blocks.{layer}.{hook}"]).topk(top_k, dim=-1).indices  # [batch, k]
                records.append(
                    {
                        "layer": layer, "sublayer": sublayer, "n_prompts": len(batch),
                        "extraction_rate": float((top[:, 0] == predicted).float().mean()),
                        "attribute_rate": float((top[:, 0] == batch.answers).float().mean()),
                        "extraction_rate_top_k": float((top == predicted[:, None]).any(1).float().mean()),
                        "top_k": top_k,
                    }
                )
    return pd.DataFrame.from_records(records)


def subject_enrichment(
    model: LoadedModel,
    encoded: list[Encoded],
    targets: dict[str, dict[int, str]] | None = None,
    top_k: int = 10,
    progress: Progress = None,
) -> pd.DataFrame:
    """Logit lens on the residual stream after every layer at the LAST SUBJECT token: the rank of a (1 = top)
    and of the other attributes of its relation R_r \\ a. One pass.

    Columns: `layer`, `mean_rank_a`, `median_rank_a`, `frac_a_top_k` (rank ≤ `top_k`), `mean_rank_others`
    (mean over prompts of the mean rank of R_r \\ a), `median_rank_others`, `frac_a_above_others` (a outranks
    every other attribute of R_r), `n_prompts`.
    """
    batch = make_batch(model, encoded)
    last_subject = torch.tensor([max(p for p, g in enumerate(item.groups) if g == "subject") for item in encoded], device=model.device)
    ids, valid = other_targets(batch, targets if targets is not None else relation_targets(encoded))
    store: dict = {}
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    end_logits(model, batch, [capture(store, name, at_end=last_subject) for name in names])
    _tick(progress)
    records = []
    with torch.inference_mode():
        for layer, name in enumerate(names):
            logits = logit_lens(model, store[name])
            rank_a = _ranks(logits, batch.answers[:, None])[:, 0].float()
            rank_others = _ranks(logits, ids).float()
            count = valid.sum(1)
            mean_others = torch.where(count > 0, (rank_others * valid).sum(1) / count.clamp(min=1), torch.nan)
            best_other = torch.where(valid > 0, rank_others, torch.inf).min(1).values
            records.append(
                {
                    "layer": layer, "mean_rank_a": float(rank_a.mean()), "median_rank_a": float(rank_a.median()),
                    "frac_a_top_k": float((rank_a <= top_k).float().mean()), "top_k": top_k,
                    "mean_rank_others": _mean(mean_others.cpu().numpy()),
                    "median_rank_others": float(np.nanmedian(mean_others.cpu().numpy())) if (count > 0).any() else float("nan"),
                    "frac_a_above_others": float((rank_a < best_other).float().mean()),
                    "n_prompts": len(batch),
                }
            )
    return pd.DataFrame.from_records(records)


def _ranks(logits: Float[torch.Tensor, "batch vocab"], ids: Int[torch.Tensor, "batch n"]) -> Int[torch.Tensor, "batch n"]:
    # one column at a time: a [batch, n, vocab] comparison would not fit for Gemma's 262k vocabulary
    chosen = logits.gather(1, ids)
    return torch.stack([(logits > chosen[:, [j]]).sum(-1) + 1 for j in range(ids.shape[1])], dim=1)


def enrichment_summary(enrichment: pd.DataFrame, trace: pd.DataFrame | None = None) -> dict:
    """From which layer a is decodable at the last subject token (median rank ≤ top_k, and a outranking the
    rest of R_r for most prompts), next to the causal-tracing peak of the MLP windows at that token."""
    top_k = int(enrichment["top_k"].iloc[0])
    decodable = enrichment[enrichment["median_rank_a"] <= top_k]
    above = enrichment[enrichment["frac_a_above_others"] > 0.5]
    summary = {
        "top_k": top_k,
        "a_decodable_from_layer": int(decodable["layer"].min()) if len(decodable) else None,
        "a_above_others_from_layer": int(above["layer"].min()) if len(above) else None,
        "best_layer_median_rank_a": int(enrichment.loc[enrichment["median_rank_a"].idxmin(), "layer"]),
        "min_median_rank_a": float(enrichment["median_rank_a"].min()),
    }
    if trace is not None:
        mlp = trace[(trace["kind"] == "mlp") & (trace["token"] == "last_subject")]
        if len(mlp):
            peak = mlp.loc[mlp["indirect_effect"].idxmax()]
            summary["mlp_trace_peak_layer"] = int(peak["layer"])
            summary["mlp_trace_peak_effect"] = float(peak["indirect_effect"])
    return summary


# ---------------------------------------------------------------------------------------------------------------
# 6. Noise robustness


def noise_robustness(
    model: LoadedModel,
    encoded: list[Encoded],
    mechanisms: dict[str, list[PathSpec]],
    scales: Sequence[float] = NOISE_SCALES,
    seeds: Sequence[int] = SEEDS,
    progress: Progress = None,
) -> pd.DataFrame:
    """Accuracy as Gaussian noise grows on each mechanism's contribution at END, and on all of them at once
    ("all"). The noise on each path has norm `noise_scale` × that path's own vector norm (see `Noise`).

    One row per (mechanism, noise_scale): `accuracy` (mean over seeds), `accuracy_std` (over seeds),
    `mean_prob`, `mean_logit`, `n_paths`, `n_prompts`, `n_seeds`. Passes: (len(mechanisms) + 1) × len(scales)
    × len(seeds).
    """
    if not mechanisms:
        raise FactscopeError("no mechanisms to add noise to")
    batch = make_batch(model, encoded)
    conditions = {**mechanisms, "all": union(*mechanisms.values())}
    records = []
    for name, paths in conditions.items():
        path_set = parse_paths(model, paths)
        for scale in scales:
            runs = []
            for seed in seeds:
                runs.append(scores(end_logits(model, batch, edit_hooks(model, batch, path_set, Noise(scale, seed))), batch))
                _tick(progress)
            accuracy = np.array([_mean(run["correct"]) for run in runs])
            records.append(
                {
                    "mechanism": name, "noise_scale": float(scale), "accuracy": float(accuracy.mean()),
                    "accuracy_std": float(accuracy.std()), "mean_prob": float(np.mean([_mean(r["prob"]) for r in runs])),
                    "mean_logit": float(np.mean([_mean(r["logit"]) for r in runs])), "n_paths": path_set.n_paths,
                    "n_prompts": len(batch), "n_seeds": len(seeds),
                }
            )
    return pd.DataFrame.from_records(records)


# ---------------------------------------------------------------------------------------------------------------
# Choosing prompts and summarising for summary.json


def spread(encoded: list[Encoded], limit: int | None) -> list[Encoded]:
    """At most `limit` prompts, taken in turn from each relation (in dataset order), so a small sample still
    covers every relation."""
    if limit is None or limit >= len(encoded):
        return list(encoded)
    by_relation: dict[str, list[Encoded]] = {}
    for item in encoded:
        by_relation.setdefault(item.fact.relation, []).append(item)
    queues = list(by_relation.values())
    chosen = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)][:limit]
    order = {id(item): index for index, item in enumerate(encoded)}
    return sorted(chosen, key=lambda item: order[id(item)])


def knockout_summary(table: pd.DataFrame) -> dict:
    """Per blocked group, the window that hurts p(a) most; and each head-set knockout."""
    out = {}
    for (condition, blocked), rows in table.groupby(["condition", "blocked"]):
        worst = rows.loc[rows["rel_change_p"].idxmin()]
        key = f"{blocked}_worst_window" if condition == "window" else f"{worst['head_set']}_to_{blocked}"
        out[key] = {
            "layers": [int(worst["first_layer"]), int(worst["last_layer"])], "n_heads": int(worst["n_heads"]),
            "rel_change_p": float(worst["rel_change_p"]), "delta_logit": float(worst["delta_logit"]),
            "accuracy_after": float(worst["accuracy_after"]),
        }
    return out


def extraction_summary(table: pd.DataFrame) -> dict:
    """The sublayer with the highest extraction rate, per sublayer kind."""
    out = {}
    for sublayer, rows in table.groupby("sublayer"):
        best = rows.loc[rows["extraction_rate"].idxmax()]
        out[sublayer] = {"layer": int(best["layer"]), "extraction_rate": float(best["extraction_rate"]),
                         "attribute_rate": float(best["attribute_rate"])}
    return out


def noise_summary(table: pd.DataFrame) -> dict:
    """Accuracy of each condition at the largest noise scale, and the area under its accuracy-vs-scale curve
    (normalised by the scale range): the additive story predicts "all" degrades no faster than one mechanism."""
    out = {}
    for mechanism, rows in table.groupby("mechanism", sort=False):
        rows = rows.sort_values("noise_scale")
        scales, accuracy = rows["noise_scale"].to_numpy(), rows["accuracy"].to_numpy()
        span = scales[-1] - scales[0]
        area = float(np.trapezoid(accuracy, scales) / span) if span > 0 else float(accuracy[0])
        out[mechanism] = {"accuracy_at_max_scale": float(accuracy[-1]), "mean_accuracy_over_scales": area}
    return out


# ---------------------------------------------------------------------------------------------------------------


def n_passes(analysis: str, n_layers: int, **options) -> int:
    """How many times an analysis calls `progress(1)` with these options (defaults as in its signature)."""
    if analysis == "knockout":
        blocked = options.get("blocked", ("subject", "relation"))
        heads = options.get("heads")
        return 1 + len(blocked) * (len(heads) if heads is not None else n_layers)
    if analysis == "ablation_grid":
        n = len(options["mechanisms"])
        return len(mechanism_sets(list(range(n)))) + (options.get("mode", "mean") == "mean")
    if analysis == "trace_effects":
        seeds, kinds = options.get("seeds", SEEDS), options.get("kinds", TRACE_KINDS)
        return 1 + len(seeds) * (1 + len(kinds) * n_layers)
    if analysis in ("extraction_rate", "subject_enrichment"):
        return 1
    if analysis == "noise_robustness":
        n = len(options["mechanisms"]) + 1
        return n * len(options.get("scales", NOISE_SCALES)) * len(options.get("seeds", SEEDS))
    raise FactscopeError(f"unknown analysis {analysis!r}")
