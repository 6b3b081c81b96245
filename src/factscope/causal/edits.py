"""WHAT an intervention does to the paths it acts on, at END: record them, remove them (where they are, or only
their direct contribution to the final residual: `DirectAblate`), or add noise to them.

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

from ..end_maths import head_change, head_norms, noise_sigma, noisy_heads, noisy_vector
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
        return out_end + self.head_change(layer, paths, weights)

    def vector(self, key, x_end):
        if self.means is None:
            return torch.zeros_like(x_end)
        return self.means.vectors[key].expand_as(x_end).clone()

    def head_change(self, layer: int, paths: Float[torch.Tensor, "batch head group d_model"],
                    weights: Float[torch.Tensor, "head group"]) -> Float[torch.Tensor, "batch d_model"]:
        return head_change(paths, weights, None if self.means is None else self.means.heads[layer])


class DirectAblate(Ablate):
    """Leave every path in place and sum, per prompt, the change `Ablate` would make to it (−vector, or
    mean − vector): `direct_hook` adds that sum to END's final residual, so only the removed paths' own
    contributions into the END residual are replaced and nothing downstream reacts (the direct effect)."""

    def __init__(self, means: Record | None):
        super().__init__(means)
        self.change: torch.Tensor | float = 0.0

    def head(self, layer, out_end, paths, weights, head_map):
        self.change = self.change + self.head_change(layer, paths, weights)
        return out_end

    def vector(self, key, x_end):
        self.change = self.change + (super().vector(key, x_end) - x_end)
        return x_end


class Noise(Editor):
    """Add Gaussian noise to the edited paths at END: `scale` × `unit` (one norm per prompt, the same unit for
    every mechanism) in all, spread evenly over the `n_paths` paths, so each gets squared norm
    (scale·unit)² / n_paths in expectation whatever its own size (`end_maths.noise_sigma`).

    A head's noise lives in the subspace the head can write to (z-space noise through its output map,
    `end_maths.noisy_heads`), an MLP's or the embedding's in the whole residual stream (`end_maths.noisy_vector`).
    `alone` sums, per prompt, the edited paths' own vectors plus their noise: what the mechanism alone would
    write into END's residual under this noise. The unit Gaussians are `draws` (`noise_draws`), taken in the
    order the hooks run, so the same seed gives the same noise, and growing scales reuse the same directions.
    """

    def __init__(self, scale: float, draws: list[torch.Tensor], unit: Float[torch.Tensor, " batch"], n_paths: int):
        self.path_sigma = noise_sigma(scale, unit, n_paths)  # [batch]
        self.draws = iter(draws)
        self.alone: torch.Tensor | float = 0.0

    def head(self, layer, out_end, paths, weights, head_map):
        noise, self.alone = noisy_heads(paths, weights, next(self.draws), head_map.to_resid, head_map.norm,
                                        self.path_sigma, self.alone)
        return out_end + noise

    def vector(self, key, x_end):
        noisy, self.alone = noisy_vector(x_end, next(self.draws), self.path_sigma, self.alone)
        return noisy


def noise_draws(model: LoadedModel, batch: Batch, paths: PathSet, seed: int) -> list[torch.Tensor]:
    """`Noise`'s unit Gaussians for `paths` on `batch`, from one CPU generator seeded with `seed`, in the order
    `edit_hooks` hands the paths over in a pass: the embedding (and the positional one), then layer by layer the
    heads (z-space, [batch, head, group, d_head]) and the MLP ([batch, d_model]). A remote pass is sent these."""
    cfg, generator, vector = model.cfg, torch.Generator().manual_seed(seed), (len(batch), model.cfg.d_model)
    shapes = [vector] * ((1 + (cfg.positional_embedding_type == "standard")) if paths.embed else 0)
    head_layers, mlps = set(paths.head_layers()), set(paths.mlps)
    for layer in range(cfg.n_layers):
        if layer in head_layers:
            shapes.append((len(batch), cfg.n_heads, batch.onehot.shape[-1], cfg.d_head))
        if layer in mlps:
            shapes.append(vector)
    return [torch.randn(shape, generator=generator) for shape in shapes]


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
    # cloned: the gain is read in inference mode, and AtP (`atp_paths`) runs these hooks with autograd on
    gain = model.post_norm_gain(layer).clone() if model.has_attn_post_norm else None
    w_o_norm = head_norms(w_o, gain)

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
        head_map = HeadMap(to_resid, norm)
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


def final_scale(model: LoadedModel, batch: Batch) -> Float[torch.Tensor, "batch pos 1"]:
    """The final norm's scale in a clean pass (every position)."""
    store: dict = {}
    batch.logits(model, [capture(store, act_name("final_scale"))])
    return store[act_name("final_scale")]


def freeze_final_scale_hook(model: LoadedModel, batch: Batch, clean: torch.Tensor | None = None) -> Hook:
    """Pin the final norm's scale to its clean value (`clean`, from `final_scale`; by default one more clean
    pass): the map from END's residual to logits becomes linear, the setting in which DLA is exact."""
    clean = final_scale(model, batch) if clean is None else clean
    return (act_name("final_scale"), lambda scale, hook: clean.clone())


def direct_hook(model: LoadedModel, batch: Batch, editor: DirectAblate) -> Hook:
    """Add `editor`'s summed change to END's residual after the last block, where only the final norm reads it."""
    rows, ends = batch.rows, batch.ends

    def hook(resid: Float[torch.Tensor, "batch pos d_model"], hook):
        resid = resid.clone()
        resid[rows, ends] = (resid[rows, ends].float() + editor.change).to(resid.dtype)
        return resid

    return (act_name("resid_post", model.cfg.n_layers - 1), hook)
