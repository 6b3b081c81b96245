"""Path ablation: remove mechanisms (sets of paths at END) alone, in pairs and all together, and check whether
their effects add up (interaction terms) and whether the model survives losing any one of them.

Every removal is measured twice. The TOTAL effect edits the paths at their own layers and lets everything
downstream recompute (later heads and MLPs react to the change). The DIRECT effect leaves the pass alone and
replaces only the removed paths' own contributions into END's final residual, with the final norm's scale frozen
at its clean value: the quantity DLA measures, so that a zero-ablated path moves the logit by exactly minus its
DLA, and a mean-ablated one by minus its DLA against the dataset mean (tested). Direct effects of disjoint paths
add up on logits by construction; the total effects' interaction measures what downstream reactions add.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from .. import bootstrap
from ..data import Encoded, relation_targets
from ..errors import FactscopeError
from ..forward import Batch, act_name, capture, make_batch
from ..models import LoadedModel
from ..remote import SCORE_DIFF_BYTES
from .check import CausalCheck
from .edits import Ablate, DirectAblate, Record, direct_hook, edit_hooks, freeze_final_scale_hook
from .scores import Progress, as_numpy, finite_mean, other_targets, scores, tick
from .sites import PathSpec, parse, union

MODE = "mean"
EFFECTS = ("total", "direct")


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
    effect: str = "total",
    clean_scale: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch vocab"]:
    """END logits with the paths removed: `mode="zero"` (subtract them) or `"mean"` (replace each by its
    dataset mean; pass `means` from `path_means` to reuse one recording pass across many conditions).

    `effect="total"` edits each path where it is written and lets the layers above react; `"direct"` replaces
    only its contribution to END's final residual and always freezes the final norm's scale. `clean_scale`
    (`edits.final_scale`) spares the clean pass that freezing it otherwise costs."""
    if mode not in ("zero", "mean"):
        raise FactscopeError(f"ablation mode {mode!r}: use 'mean' or 'zero'")
    if effect not in EFFECTS:
        raise FactscopeError(f"ablation effect {effect!r}: use {' or '.join(map(repr, EFFECTS))}")
    batch = encoded if isinstance(encoded, Batch) else make_batch(model, encoded)
    paths = list(paths)
    if mode == "mean" and means is None:
        means = path_means(model, batch, paths)
    means = means if mode == "mean" else None
    if effect == "direct":
        editor = DirectAblate(means)
        hooks = [*edit_hooks(model, batch, parse(model, paths), editor), direct_hook(model, batch, editor)]
    else:
        hooks = edit_hooks(model, batch, parse(model, paths), Ablate(means))
    if freeze_final_scale or effect == "direct":
        hooks.append(freeze_final_scale_hook(model, batch, clean_scale))
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
    engine=None,
) -> pd.DataFrame:
    """Remove each mechanism alone, every pair, and all together, as a total and as a direct effect: one clean
    pass (which also records the means in mean mode), then one pass per set and effect (`ablation_passes`).
    `engine`: an nnsight engine runs the passes in one session (`NnsightEngine.ablation_grid`, on NDIF with
    `ablate --remote`), and only the scores per prompt come back.

    One row per (effect, set), total first: `effect` ("total" | "direct"), `mechanism_set` (names joined by
    " + "; "none" is the clean model), `n_mechanisms`, `n_removed` (paths), `mean_logit`, `mean_logit_diff`
    (a − mean(R_r \\ a); R_r from `targets`, by default `relation_targets(encoded)`), `accuracy`, `mean_prob`,
    their changes from the clean model (`delta_*`, `accuracy_drop`), and for sets of two or more the additivity
    check `interaction_logit` (and `interaction_logit_diff`) = effect(together) − Σ effect(alone).
    `accuracy_low/high`, `delta_logit_diff_low/high` and `interaction_logit_diff_low/high` are bootstrap
    intervals (`bootstrap.mean_interval`, its default seed: relations then prompts where the prompts have at
    least `bootstrap.MIN_RELATIONS` relations, `n_relations`; prompts alone otherwise). Robustness is the `accuracy` of the
    single sets against the set of all: see `robustness_summary`.
    """
    if not mechanisms:
        raise FactscopeError("no mechanisms to ablate")
    if mode not in ("zero", "mean"):
        raise FactscopeError(f"ablation mode {mode!r}: use 'mean' or 'zero'")
    batch = make_batch(model, encoded)
    others = other_targets(batch, targets if targets is not None else relation_targets(encoded))
    sets = mechanism_sets(list(mechanisms))
    if engine is None:
        clean, ablated = _local_grid(model, batch, mechanisms, sets, mode, others, progress)
    else:
        clean, ablated = _engine_grid(model, batch, mechanisms, sets, mode, others, engine)
        for _ in range(ablation_passes(len(mechanisms))):
            tick(progress)
    tables = []
    for effect in EFFECTS:
        per_set = [clean, *ablated[effect]]
        records = [
            {
                "effect": effect, "mechanism_set": " + ".join(names) or "none", "n_mechanisms": len(names),
                "n_removed": parse(model, union(*(mechanisms[name] for name in names))).n_paths, "mode": mode,
                "n_prompts": len(batch), "n_relations": bootstrap.count_relations([e.fact.relation for e in encoded]),
                "mean_logit": finite_mean(result["logit"]),
                "mean_logit_diff": finite_mean(result["logit_diff"]), "accuracy": finite_mean(result["correct"]),
                "mean_prob": finite_mean(result["prob"]),
            }
            for names, result in zip(sets, per_set)
        ]
        table = _with_interactions(pd.DataFrame.from_records(records), sets)
        tables.append(_with_intervals(table, sets, per_set, [e.fact.relation for e in encoded]))
    return pd.concat(tables, ignore_index=True)


def _local_grid(model: LoadedModel, batch: Batch, mechanisms: dict[str, list[PathSpec]], sets: list[tuple[str, ...]],
                mode: str, others, progress: Progress) -> tuple[dict, dict[str, list[dict]]]:
    store: dict = {}
    hooks = [capture(store, act_name("final_scale"))]
    means = None
    if mode == "mean":
        means = Record()
        hooks += edit_hooks(model, batch, parse(model, union(*mechanisms.values())), means)
    clean = scores(batch.logits(model, hooks), batch, others)
    tick(progress)
    ablated: dict[str, list[dict]] = {}
    for effect in EFFECTS:
        ablated[effect] = []
        for names in sets[1:]:
            paths = union(*(mechanisms[name] for name in names))
            logits = ablated_logits(model, batch, paths, mode, means, effect=effect, clean_scale=store[act_name("final_scale")])
            ablated[effect].append(scores(logits, batch, others))
            tick(progress)
    return clean, ablated


def _engine_grid(model, batch: Batch, mechanisms: dict[str, list[PathSpec]], sets: list[tuple[str, ...]], mode: str,
                 others, engine) -> tuple[dict, dict[str, list[dict]]]:
    path_sets = [parse(model, union(*(mechanisms[name] for name in names))) for names in sets]
    got = as_numpy(engine.ablation_grid(model, batch, path_sets, mode, *others, effects=EFFECTS))
    per_pass = [{name: values[i] for name, values in got.items()} for i in range(1 + len(EFFECTS) * (len(sets) - 1))]
    return per_pass[0], {effect: per_pass[1 + e * (len(sets) - 1): 1 + (e + 1) * (len(sets) - 1)]
                         for e, effect in enumerate(EFFECTS)}


def ablation_passes(n_mechanisms: int) -> int:
    """How many times `ablation_grid` calls `progress(1)` for this many mechanisms."""
    return 1 + len(EFFECTS) * (len(mechanism_sets(list(range(n_mechanisms)))) - 1)


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


def _with_intervals(table: pd.DataFrame, sets: list[tuple[str, ...]], per_set: list[dict[str, np.ndarray]],
                    relations: list[str]) -> pd.DataFrame:
    """Bootstrap intervals (relations, then prompts, where there are enough relations: `bootstrap`) of the
    accuracy, the change of a − mean(R∖a) and its interaction term, from the per-prompt values (paired: a
    prompt's change is against its own clean value)."""
    clean = per_set[0]["logit_diff"]
    delta = {names: result["logit_diff"] - clean for names, result in zip(sets, per_set)}
    columns: dict[str, list] = {name: [] for name in ("accuracy", "delta_logit_diff", "interaction_logit_diff")}
    for names, result in zip(sets, per_set):
        columns["accuracy"].append(bootstrap.mean_interval(result["correct"], relations=relations))
        columns["delta_logit_diff"].append(bootstrap.mean_interval(delta[names], relations=relations) if names else [0.0, 0.0])
        if len(names) > 1:
            interaction = delta[names] - sum(delta[(name,)] for name in names)
            columns["interaction_logit_diff"].append(bootstrap.mean_interval(interaction, relations=relations))
        else:
            columns["interaction_logit_diff"].append([None, None])
    for name, intervals in columns.items():
        table[f"{name}_low"] = [np.nan if low is None else low for low, _ in intervals]
        table[f"{name}_high"] = [np.nan if high is None else high for _, high in intervals]
    return table


def robustness_summary(grid: pd.DataFrame) -> dict:
    """Accuracy with each single mechanism removed against all of them removed, and the interaction of removing
    all, as total effects (top-level keys, with 95% bootstrap intervals as `*_ci`) and, where the grid has them,
    as direct effects (the same keys under "direct")."""
    effects = grid["effect"] if "effect" in grid else pd.Series("total", index=grid.index)
    out = _effect_summary(grid[effects == "total"])
    if (effects == "direct").any():
        out["direct"] = _effect_summary(grid[effects == "direct"])
    if "accuracy_low" in grid:
        out["bootstrap"] = bootstrap.record(int(grid["n_relations"].iloc[0]) if "n_relations" in grid else None)
    return out


def _effect_summary(grid: pd.DataFrame) -> dict:
    singles = grid[grid["n_mechanisms"] == 1]
    everything = grid[grid["n_mechanisms"] == grid["n_mechanisms"].max()].iloc[0]
    out = {
        "accuracy_clean": float(grid.iloc[0]["accuracy"]),
        "accuracy_single_removed": dict(zip(singles["mechanism_set"], singles["accuracy"].astype(float))),
        "accuracy_all_removed": float(everything["accuracy"]),
        "all_removed_set": str(everything["mechanism_set"]),
        "interaction_logit_all": float(everything["interaction_logit"]),
        "interaction_logit_diff_all": float(everything["interaction_logit_diff"]),
    }
    for key, column in (("accuracy_all_removed_ci", "accuracy"), ("interaction_logit_diff_all_ci", "interaction_logit_diff")):
        if f"{column}_low" in grid:
            out[key] = [_json_number(everything[f"{column}_low"]), _json_number(everything[f"{column}_high"])]
    return out


def _json_number(value) -> float | None:
    return float(value) if np.isfinite(value) else None


def _run(model: LoadedModel, known: list[Encoded], *, mechanisms: dict, mode: str, targets: dict | None,
         progress: Progress, engine=None) -> dict[str, pd.DataFrame]:
    return {"ablations": ablation_grid(model, known, mechanisms, mode, targets, progress=progress, engine=engine)}


def _passes(n_layers: int, *, mechanisms: dict, mode: str, targets: dict | None) -> int:
    return ablation_passes(len(mechanisms))


def _remote_cost(n_layers: int, known: list[Encoded], *, mechanisms: dict, mode: str,
                 targets: dict | None) -> tuple[int, int, int]:
    """Through an engine, one session (`NnsightEngine.ablation_grid`) bringing back `end_maths.answer_scores`
    with a − mean(R∖a) per pass and prompt; nothing sent but the prompts and R_r."""
    return 1, ablation_passes(len(mechanisms)) * len(known) * SCORE_DIFF_BYTES, 0


CHECK = CausalCheck(
    "ablations", "ablate", ("ablations",), ("mechanisms", "mode", "targets"), _passes, _run,
    lambda tables: robustness_summary(tables["ablations"]), remote=True, remote_cost=_remote_cost,
)
