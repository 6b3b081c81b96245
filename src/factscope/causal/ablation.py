"""Path ablation: remove mechanisms (sets of paths at END) alone, in pairs and all together, and check whether
their effects add up (interaction terms) and whether the model survives losing any one of them."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from ..data import Encoded, relation_targets
from ..errors import FactscopeError
from ..forward import Batch, make_batch
from ..models import LoadedModel
from .check import CausalCheck
from .edits import Ablate, Record, edit_hooks, freeze_final_scale_hook
from .scores import Progress, finite_mean, other_targets, scores, tick
from .sites import PathSpec, parse, union

MODE = "mean"


def path_means(model: LoadedModel, batch: Batch, paths: Iterable[PathSpec]) -> Record:
    """One clean pass recording the dataset mean of every path's END vector."""
    record = Record()
    batch.logits(model, edit_hooks(model, batch, parse(model, paths), record))
    return record


def ablated_logits(
    model: LoadedModel,
    encoded: list[Encoded] | Batch,
    paths: Iterable[PathSpec],
    mode: str = MODE,
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
    hooks = edit_hooks(model, batch, parse(model, paths), Ablate(means if mode == "mean" else None))
    if freeze_final_scale:
        hooks.append(freeze_final_scale_hook(model, batch))
    return batch.logits(model, hooks)


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
    mode: str = MODE,
    targets: dict[str, dict[int, str]] | None = None,
    progress: Progress = None,
) -> pd.DataFrame:
    """Remove each mechanism alone, every pair, and all together; one pass per set (plus one recording the
    means in mean mode; `ablation_passes`).

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
        tick(progress)
    records, sets = [], mechanism_sets(list(mechanisms))
    for names in sets:
        paths = union(*(mechanisms[name] for name in names))
        logits = ablated_logits(model, batch, paths, mode, means) if paths else batch.logits(model)
        tick(progress)
        result = scores(logits, batch, others)
        records.append(
            {
                "mechanism_set": " + ".join(names) or "none", "n_mechanisms": len(names),
                "n_removed": parse(model, paths).n_paths, "mode": mode, "n_prompts": len(batch),
                "mean_logit": finite_mean(result["logit"]), "mean_logit_diff": finite_mean(result["logit_diff"]),
                "accuracy": finite_mean(result["correct"]), "mean_prob": finite_mean(result["prob"]),
            }
        )
    return _with_interactions(pd.DataFrame.from_records(records), sets)


def ablation_passes(n_mechanisms: int, mode: str = MODE) -> int:
    """How many times `ablation_grid` calls `progress(1)` for this many mechanisms."""
    return len(mechanism_sets(list(range(n_mechanisms)))) + (mode == "mean")


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


def _run(model: LoadedModel, known: list[Encoded], *, mechanisms: dict, mode: str, targets: dict | None,
         progress: Progress) -> dict[str, pd.DataFrame]:
    return {"ablations": ablation_grid(model, known, mechanisms, mode, targets, progress=progress)}


def _passes(n_layers: int, *, mechanisms: dict, mode: str, targets: dict | None) -> int:
    return ablation_passes(len(mechanisms), mode)


CHECK = CausalCheck(
    "ablations", "ablate", ("ablations",), ("mechanisms", "mode", "targets"), _passes, _run,
    lambda tables: robustness_summary(tables["ablations"]),
)
