"""What the causal tables say where a pick or a rule decides it, read with pandas alone (no torch): the checks'
summaries and the report read the same numbers through the same functions.

- the noise check (`causal.noise`) read at the scale a rule stated in advance picks (`HALVING_RULE`,
  `halved_reading`);
- causal tracing's MLP0 apart from the peak MLP window (`causal.trace`, `mlp0_split`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

HALVING_RULE = ("the first noise scale of the grid at which the full model's top-1 accuracy is at most half its "
                "clean (scale 0) accuracy (a grid point, not interpolated; the largest scale where it never halves)")
HALVING_COLUMNS = ("halved_scale", "margin_at_halved", "margin_area")
MLP0_COLUMNS = ("mlp0_alone", "peak_without_mlp0", "peak_kept_without_mlp0")
MLP0_KINDS = ("mlp_single", "mlp_without_mlp0")  # the trace kinds that tell MLP0 from the MLPs above it


def halved_reading(rows: pd.DataFrame) -> dict:
    """One mechanism's rows (noise_robustness.csv) read at the scale `HALVING_RULE` picked (summary.json's
    `at_halved`); intervals [low, high], None where there is none."""
    def number(value) -> float | None:
        return None if pd.isna(value) else float(value)

    first = rows.iloc[0]
    chance = number(first.get("chance_first_among_r"))
    at = rows[np.isclose(rows["noise_scale"], first["halved_scale"])] if pd.notna(first["halved_scale"]) else rows.iloc[:0]
    noisy = rows[rows["noise_scale"] > 0]
    out = {"rule": HALVING_RULE, "accuracy_halved": bool(first["accuracy_halved"]), "chance_first_among_r": chance,
           # informative: the full model ranks a first among R_r above chance at some noisy scale of the grid
           "informative": bool(chance is not None and (noisy["first_among_r"] > chance).any())}
    for name in HALVING_COLUMNS:
        out[name] = number(first[name])
        out[f"{name}_ci"] = [number(first[f"{name}_low"]), number(first[f"{name}_high"])]
    if len(at):
        row = at.iloc[0]
        out.update(accuracy=number(row["accuracy"]), clean_accuracy=number(rows.loc[rows["noise_scale"].idxmin(), "accuracy"]),
                   first_among_r=number(row["first_among_r"]), alone_first_among_r=number(row["alone_first_among_r"]))
    return out


def mlp0_split(table: pd.DataFrame, token: str = "last_subject") -> dict | None:
    """At `token`, the MLP window that peaks against MLP0 alone and that window without MLP0 (summary.json's
    trace["mlp0"]; None where the table has no such rows): the window's layers and effect (with the peak's
    re-picked intervals), MLP0 alone, the window without MLP0 (its layers, effect, and the share of the window's
    effect it keeps), and the single MLP layer whose restoration recovers most; intervals as [low, high] (None
    where there is none)."""
    rows = table[table["token"] == token]
    if not len(rows) or "mlp0_alone" not in rows or not {"mlp", *MLP0_KINDS} <= set(rows["kind"]):
        return None

    def ci(row: pd.Series, name: str) -> list[float | None]:
        return [None if pd.isna(row.get(f"{name}_{end}")) else float(row[f"{name}_{end}"]) for end in ("low", "high")]

    by_kind = {kind: rows[rows["kind"] == kind] for kind in ("mlp", *MLP0_KINDS)}
    peak = by_kind["mlp"].loc[by_kind["mlp"]["indirect_effect"].idxmax()]
    layer = int(peak["layer"])
    without = by_kind["mlp_without_mlp0"].set_index("layer").loc[layer]
    single = by_kind["mlp_single"]
    best = single.loc[single["indirect_effect"].idxmax()]
    return {
        "token": token,
        "window": {"layer": layer, "layers": [int(peak["first_layer"]), int(peak["last_layer"])],
                   "layer_ci": ci(peak, "peak_layer"), "effect": float(peak["indirect_effect"]),
                   "effect_ci": ci(peak, "peak_effect")},
        "mlp0_alone": {"effect": float(peak["mlp0_alone"]), "effect_ci": ci(peak, "mlp0_alone")},
        "without_mlp0": {"layers": [int(without["first_layer"]), int(without["last_layer"])],
                         "effect": float(peak["peak_without_mlp0"]), "effect_ci": ci(peak, "peak_without_mlp0"),
                         "kept_share": None if pd.isna(peak["peak_kept_without_mlp0"]) else float(peak["peak_kept_without_mlp0"]),
                         "kept_share_ci": ci(peak, "peak_kept_without_mlp0")},
        "best_single_layer": {"layer": int(best["layer"]), "effect": float(best["indirect_effect"]),
                              "layer_ci": ci(best, "peak_layer"), "effect_ci": ci(best, "peak_effect")},
    }
