"""WHAT an intervention does to the paths it acts on, at END: record them, remove them, or add noise to them.

Head paths are edited in the residual stream (at `hook_attn_out`, END only) by exactly the vector DLA
attributes to them, computed in the same pass from that pass's own pattern and values: for architectures
without an attention post-norm this equals editing `hook_z` at END by `Σ_{k∈group} pattern·v_k` (checked in
the tests); for Gemma's post-norm it also keeps the norm from rescaling the heads that are not removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from ..forward import (
    Batch, Hook, act_name, capture, frozen_post_norm, head_group_z, head_values, heads_to_resid,
)
from ..models import LoadedModel
from .sites import PathSet


@dataclass
class HeadMap:
    """From a head's z-space to the residual stream at END, as this pass computes it."""

    to_resid: Callable[[torch.Tensor], torch.Tensor]  # [batch, head, group, d_head] → [batch, head, group, d_model]
    norm: Float[torch.Tensor, "batch head"]  # Frobenius norm of each head's map (for noise of a given size)
    d_head: int


class Editor:
    """What happens to the edited paths at END. `head` gets every head path's residual-stream vector; `vector`
    an MLP's or embedding's END vector, keyed by its hook name."""

    def head(self, layer: int, out_end: Float[torch.Tensor, "batch d_model"], paths: Float[torch.Tensor, "batch head group d_model"],
             weights: Float[torch.Tensor, "head group"], head_map: HeadMap) -> Float[torch.Tensor, "batch d_model"]:
        raise NotImplementedError

    def vector(self, key: str, x_end: Float[torch.Tensor, "batch d_model"]) -> Float[torch.Tensor, "batch d_model"]:
        raise NotImplementedError


class Record(Editor):
    """Leaves everything as it is and keeps the dataset mean of every path's END vector (for mean ablation)."""

    def __init__(self):
        self.heads: dict[int, torch.Tensor] = {}
        self.vectors: dict[str, torch.Tensor] = {}

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
        hooks += [capture(store, act_name("pattern", layer)), capture(store, act_name("v", layer))]
        if model.has_attn_post_norm:
            hooks.append(capture(store, act_name("post_norm_scale", layer), at_end=ends))
        hooks.append((act_name("attn_out", layer), _head_edit(model, batch, layer, paths.heads[layer], store, editor)))
    vectors = [act_name("mlp_out", layer) for layer in paths.mlps]
    if paths.embed:
        vectors.append(act_name("embed"))
        if cfg.positional_embedding_type == "standard":
            vectors.append(act_name("pos_embed"))
    return hooks + [(name, _vector_edit(rows, ends, name, editor)) for name in vectors]


def _head_edit(model: LoadedModel, batch: Batch, layer: int, weights: Float[torch.Tensor, "head group"], store: dict, editor: Editor):
    rows, ends = batch.rows, batch.ends
    w_o = model.W_O(layer).float()  # [head, d_head, d_model]
    gain = model.post_norm_gain(layer) if model.has_attn_post_norm else None
    w_o_norm = (w_o if gain is None else w_o * gain).flatten(1).norm(dim=-1)  # [head]

    def hook(out: Float[torch.Tensor, "batch pos d_model"], hook):
        values = head_values(model, layer, store[act_name("v", layer)])
        z_paths = head_group_z(store[act_name("pattern", layer)].float(), values, batch.onehot, rows, ends, groups_first=True)
        # the attention post-norm (Gemma), where there is one, as a linear map with this pass's scale at END
        scale = store[act_name("post_norm_scale", layer)].float() if gain is not None else None  # [batch, 1]
        post_norm = frozen_post_norm(gain, scale) if gain is not None else None

        def to_resid(z: Float[torch.Tensor, "batch head group d_head"]) -> Float[torch.Tensor, "batch head group d_model"]:
            resid = heads_to_resid(z, w_o)
            return resid if post_norm is None else post_norm(resid)

        norm = w_o_norm.expand(len(rows), -1) if gain is None else w_o_norm / scale
        head_map = HeadMap(to_resid, norm, w_o.shape[1])
        out = out.clone()  # edited in fp32, written back in the model's dtype
        out[rows, ends] = editor.head(layer, out[rows, ends].float(), to_resid(z_paths), weights, head_map).to(out.dtype)
        return out

    return hook


def _vector_edit(rows: Int[torch.Tensor, " batch"], ends: Int[torch.Tensor, " batch"], key: str, editor: Editor):
    def hook(x: Float[torch.Tensor, "batch pos d_model"], hook):
        x = x.clone()
        x[rows, ends] = editor.vector(key, x[rows, ends].float()).to(x.dtype)
        return x

    return hook


def freeze_final_scale_hook(model: LoadedModel, batch: Batch) -> Hook:
    """Pin the final norm's scale to its clean value: the map from END's residual to logits becomes linear,
    the setting in which DLA is exact."""
    store: dict = {}
    name = act_name("final_scale")
    batch.logits(model, [capture(store, name)])
    clean = store[name]
    return (name, lambda scale, hook: clean.clone())
