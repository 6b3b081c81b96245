"""WHERE an intervention acts: paths into the residual stream at END, heads, and windows of layers.

A path is a `HeadPath` (a head's END←group contribution; group in GROUPS, or "all"), an `MlpPath` (an MLP's
output at END) or `Embed` (the token and position embeddings at END). `parse` turns a list of them into the
masks the edits apply (`PathSet`), after checking them against the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float

from ..errors import FactscopeError
from ..models import LoadedModel
from ..taxonomy import GROUPS


@dataclass(frozen=True)
class HeadPath:
    layer: int
    head: int
    group: str  # a token group, or "all"


@dataclass(frozen=True)
class MlpPath:
    layer: int


@dataclass(frozen=True)
class Embed:
    pass


PathSpec = HeadPath | MlpPath | Embed


@dataclass
class PathSet:
    """Paths as masks: `heads[l, h, g]` = 1 where head h of layer l is edited for source group g."""

    heads: Float[torch.Tensor, "layer head group"]
    mlps: list[int]
    embed: bool
    n_paths: int

    def head_layers(self) -> list[int]:
        return [int(layer) for layer in torch.nonzero(self.heads.sum((1, 2)) > 0).flatten()]


def head_mask(model: LoadedModel, heads: Iterable[tuple[int, int]]) -> Bool[torch.Tensor, "layer head"]:
    cfg = model.cfg
    mask = torch.zeros((cfg.n_layers, cfg.n_heads), dtype=torch.bool, device=model.device)
    for layer, head in heads:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise FactscopeError(f"head L{layer}H{head} does not exist ({cfg.n_layers} layers × {cfg.n_heads} heads)")
        mask[layer, head] = True
    return mask


def parse(model: LoadedModel, paths: Iterable[PathSpec]) -> PathSet:
    cfg = model.cfg
    heads = torch.zeros((cfg.n_layers, cfg.n_heads, len(GROUPS)), device=model.device)
    mlps, embed = set(), False
    for path in paths:
        if isinstance(path, HeadPath):
            head_mask(model, [(path.layer, path.head)])  # validates the indices
            if path.group != "all" and path.group not in GROUPS:
                raise FactscopeError(f"path {path}: unknown source group {path.group!r} (use {', '.join(GROUPS)} or 'all')")
            heads[path.layer, path.head, [GROUPS.index(path.group)] if path.group != "all" else slice(None)] = 1.0
        elif isinstance(path, MlpPath):
            if not 0 <= path.layer < cfg.n_layers:
                raise FactscopeError(f"path {path}: layer out of range (the model has {cfg.n_layers} layers)")
            mlps.add(int(path.layer))
        elif isinstance(path, Embed):
            embed = True
        else:
            raise FactscopeError(f"path {path!r}: expected HeadPath(layer, head, group), MlpPath(layer) or Embed()")
    # duplicates (a path listed by two mechanisms) are removed once
    return PathSet(heads, sorted(mlps), embed, int(heads.sum()) + len(mlps) + int(embed))


def union(*path_lists: Iterable[PathSpec]) -> list[PathSpec]:
    return list(dict.fromkeys(itertools.chain(*path_lists)))


def taxonomy_paths(heads: pd.DataFrame, n_layers: int) -> dict[str, list[PathSpec]]:
    """The paper's mechanisms as path lists, from a head table with columns layer, head, class (subject |
    relation | mixed | negligible; e.g. mechanisms.classify_heads): subject heads' END←SUBJECT paths,
    relation heads' END←RELATION paths, the mixed heads' two paths separately, every head's END←END path
    (`end_heads`, as `taxonomy.HEAD_MECHANISM` files them), and the MLPs at END."""

    def paths(cls: str, source: str) -> list[PathSpec]:
        chosen = heads[heads["class"] == cls]
        return [HeadPath(int(layer), int(head), source) for layer, head in zip(chosen["layer"], chosen["head"])]

    mechanisms = {
        "subject_heads": paths("subject", "subject"),
        "relation_heads": paths("relation", "relation"),
        "mixed_subject": paths("mixed", "subject"),
        "mixed_relation": paths("mixed", "relation"),
        "end_heads": [HeadPath(int(layer), int(head), "end") for layer, head in zip(heads["layer"], heads["head"])],
        "mlps": [MlpPath(layer) for layer in range(n_layers)],
    }
    return {name: path_list for name, path_list in mechanisms.items() if path_list}


def layer_window(center: int, window: int, n_layers: int) -> tuple[int, int]:
    """`window` layers around `center` (Meng's convention: center − w//2 … center − w//2 + w − 1), clipped."""
    first = center - window // 2
    return max(0, first), min(n_layers - 1, first + window - 1)
