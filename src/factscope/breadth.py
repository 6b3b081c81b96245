"""What a part writes to the correct attribute a against the rest of its relation's attributes R_r ∖ a: the
fraction to_others / to_a (1: indifferent among R_r, 0: a alone) with an interval over relations then prompts.
`mechanisms.held_out_breadth` reads it for the head classes on held-out halves, `mlp_relation_boost` for the MLPs.
Pure pandas/numpy: a function of the attribution table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import bootstrap

BROAD = 0.5  # "broad": the other attributes of R_r get at least this fraction of what a gets (1 = indifferent)
PART_KEYS = ["prompt_id", "layer", "head", "source"]


def to_a_and_others(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per `keys`: centred DLA to a (`to_a`) and its mean over R_r ∖ a (`to_others`); prompts whose R_r has one
    attribute have no `to_others` and are dropped."""
    to_a = rows[rows["is_correct_target"]].groupby(keys)["centred"].sum()
    others = rows[~rows["is_correct_target"]]
    to_others = others.groupby([*keys, "target"])["centred"].sum().groupby(level=keys).mean()
    return pd.DataFrame({"to_a": to_a, "to_others": to_others}).dropna().reset_index()


def fraction_estimate(per_prompt: pd.DataFrame, relations: np.ndarray) -> dict:
    """mean(to_others) / mean(to_a) over prompts, with its bootstrap interval (relations, then prompts)."""
    if len(per_prompt) < 2 or per_prompt["to_a"].mean() <= 0:
        return {"to_a": _mean_or_none(per_prompt["to_a"]), "to_others": _mean_or_none(per_prompt["to_others"]),
                "fraction": None, "fraction_ci": [None, None], "n_prompts": int(len(per_prompt))}
    weights = bootstrap.resample_weights(len(per_prompt), relations=relations)
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = (weights @ per_prompt["to_others"].to_numpy()) / (weights @ per_prompt["to_a"].to_numpy())
    low, high = bootstrap.interval(np.where(np.isfinite(resampled), resampled, np.nan))
    return {"to_a": float(per_prompt["to_a"].mean()), "to_others": float(per_prompt["to_others"].mean()),
            "fraction": float(per_prompt["to_others"].mean() / per_prompt["to_a"].mean()),
            "fraction_ci": [float(low), float(high)], "n_prompts": int(len(per_prompt))}


def _mean_or_none(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None


def halves(prompts: pd.DataFrame, seed: int) -> pd.Series:
    """prompt_id → 0 | 1: each relation's prompts, in a seeded order, dealt alternately to two halves."""
    order = prompts.sample(frac=1.0, random_state=seed)
    return pd.Series((order.groupby("relation").cumcount() % 2).to_numpy(), index=order["prompt_id"].to_numpy())



def mlp_relation_boost(rest: pd.DataFrame) -> dict:
    """What the MLPs at END write, summed over layers, to a and to the average other attribute of R_r (centred
    DLA), per prompt: `fraction` = to_others / to_a with its interval (relations, then prompts). The paper's
    "MLPs boost relation attributes" is a claim that the MLPs raise the attributes of the relation broadly, not
    only the correct one: a fraction near 1 is pure boosting of R_r, near 0 writing a alone."""
    mlp = rest[rest["component"] == "mlp"]
    per_prompt = to_a_and_others(mlp, ["prompt_id"]).set_index("prompt_id")
    relations = mlp.drop_duplicates("prompt_id").set_index("prompt_id")["relation"].reindex(per_prompt.index).to_numpy()
    return {"bar": BROAD, **fraction_estimate(per_prompt, relations)}
