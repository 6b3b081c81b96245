"""Mechanism taxonomy over the attribution table: head classes, what each class extracts, and additivity.

Everything here is a pure function of `attributions.parquet` (see `decompose`): pandas only, no model, no torch
(the subject swap, which reruns the model, is in `swap`). Conventions:

- a head's *subject / relation / end / other DLA* is its centred DLA (`centred`: against the vocabulary's average
  token, as with TransformerLens's centred unembedding; a shift of every logit alike boosts nothing) to the
  correct attribute `a` from the SUBJECT tokens, from the RELATION tokens (END excluded), from END itself, and from
  BOS + the first token + prefix (`taxonomy.GROUPS`); the classes read S and R, and the paper's RELATION (END
  included) is R + END, kept beside them as `paper_class`;
  breadth, `to_a`/`to_others`, top targets and MLP boosting are centred too; shares of "centred_logit" are of
  the model's logit of `a` less its mean logit over the vocabulary (`centred`: what raises every logit alike
  changes no probability, so it is no share of recall), those of "logit" of its own logit (`value`, kept for
  reference only), and shares of a − mean(R∖a) are the same either way;
- *specificity* of a part is its mean `logit_diff` on `a`, i.e. DLA(a) − mean DLA(R_r \\ a);
  *breadth* is its mean DLA over every attribute of R_r (a included): a relation head is broad, a subject
  head specific;
- a *mechanism* is a set of parts of the residual stream at END; the eight mechanisms partition all parts,
  so their contributions add up exactly to the model's logit (and to its `logit_diff`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from . import bootstrap
from .breadth import BROAD, PART_KEYS, fraction_estimate, halves, mlp_relation_boost, to_a_and_others
from .errors import FactscopeError
from .rundir import table_path, write_table
from .taxonomy import CLASS_SOURCES, CLASSES, GROUPS, HEAD_MECHANISM, MECHANISMS, TOLERANCE

DLA_COLUMNS = ("subject_dla", "relation_dla", "end_dla", "other_dla")
K_SWEEP = (1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
Z_SWEEP = (2.0, 3.0, 5.0)
DOMINANCE = 0.8  # the seed's break condition: one mechanism carrying more than this share of a − mean(R \ a)
TOP_N = 5
MAD_TO_SIGMA = 1.4826  # MAD × this estimates the standard deviation of a normal bulk
MEASURES = ("specificity", "breadth", "to_a", "to_others")
KEYS = ["prompt_id", "relation", "target", "is_correct_target"]
ATTN_COLUMNS = [*KEYS, "layer", "head", "source", "value", "centred", "logit_diff"]
REST_COLUMNS = [*KEYS, "component", "layer", "value", "centred", "logit_diff"]
PART_VALUES = ("value", "centred", "logit_diff")  # what a mechanism sums over its parts: one metric of shares each


@dataclass(frozen=True)
class ClassRule:
    """How a head's (subject DLA S, relation DLA R) becomes a class.

    Significance, on ONE scale for both sources: S and R are logits of the same token, so a head is significant
    where S or R exceeds τ = max(floor, median + z · 1.4826 · MAD) of all heads' S and R values pooled. Most heads
    write almost nothing to `a`, so the bulk of the distribution is the noise floor; median and MAD describe that
    bulk without being pulled up by the few large heads we are looking for. 1.4826 · MAD estimates a normal bulk's
    standard deviation, so z = 3 reads as "three sigma above the typical head". The floor (default: the
    decomposition's accepted error, `taxonomy.TOLERANCE`) keeps a head that lowers `a` from ever being significant,
    and a head writing numerically nothing from counting when nearly all heads write exactly zero (MAD = 0).

    Why one scale: with a threshold per source, R's wider bulk raised its bar fivefold on SmolLM2 (0.043 against
    0.0086 for S), so a head with R > S was called a subject head whenever R missed its own bar (4 such heads).
    With one τ, a head's larger side is always the one that can be significant first.

    Classes, by dominance: a significant head (S or R above τ) is a subject head if S ≥ k·R, a relation head if
    R ≥ k·S, else mixed; a head with neither above τ is negligible. The ratio applies whichever side crossed τ:
    applying it only when both did made a head with S barely above τ and R/S = 0.94 a subject head (its R below
    τ) on one set and mixed on another — the class followed which side crossed the threshold, not which source
    dominates (on SmolLM2's shipped set 23/36/7 subject/relation/mixed heads under the old rule, 18/22/26 under
    this one). The rule is symmetric: exchanging S and R exchanges subject and relation, and a head with R ≥ S is
    never a subject head.
    """

    k: float = 10.0
    z: float = 3.0
    floor: float = TOLERANCE

    def __post_init__(self) -> None:
        if self.k < 1:  # below 1 "S ≥ kR" and "R ≥ kS" could both hold
            raise FactscopeError(f"class rule: the dominance ratio k must be at least 1, got {self.k}")
        if self.z < 0:
            raise FactscopeError(f"class rule: the significance z must be non-negative, got {self.z}")
        if self.floor < 0:
            raise FactscopeError(f"class rule: the significance floor must be non-negative, got {self.floor}")

    def threshold(self, subject, relation) -> float:
        """τ from all heads' mean S and R."""
        pooled = np.concatenate([np.asarray(subject, dtype=float), np.asarray(relation, dtype=float)])
        return max(self.floor, robust_threshold(pd.Series(pooled), self.z))

    def classify(self, subject, relation, threshold: float) -> np.ndarray:
        s, r = np.asarray(subject, dtype=float), np.asarray(relation, dtype=float)
        significant = np.maximum(s, r) > threshold
        s_dominates, r_dominates = s >= self.k * r, r >= self.k * s  # both only for S = R at k = 1: mixed
        conditions = [significant & s_dominates & ~r_dominates, significant & r_dominates & ~s_dominates, significant]
        return np.select(conditions, ["subject", "relation", "mixed"], default="negligible")


def robust_threshold(values: pd.Series, z: float) -> float:
    """median + z · 1.4826 · MAD: z robust standard deviations above the typical value."""
    median = float(values.median())
    mad = float((values - median).abs().median())
    return median + z * MAD_TO_SIGMA * mad


def head_name(layers, indices) -> list[str]:
    return [f"L{layer}H{index}" for layer, index in zip(layers, indices)]


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_parts(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DIR/attributions.parquet as (attention rows, every other row), read with a filter on the component.

    Every row is needed: the classes use only the correct target, but breadth, top targets and whether a
    mechanism alone ranks `a` first need every target of R_r. Splitting by component lets each half skip the
    columns it does not use.
    """
    path = table_path(run_dir, "attributions")
    if not path.is_file():
        raise FactscopeError(f"{path}: not found; run `factscope analyze` first")
    attn = pd.read_parquet(path, columns=ATTN_COLUMNS, filters=[("component", "==", "attn")])
    rest = pd.read_parquet(path, columns=REST_COLUMNS, filters=[("component", "!=", "attn")])
    return _checked(attn, str(path)), _as_float64(rest)


def split_parts(attributions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An in-memory attribution table (`Decomposition.attributions`) split as `read_parts` splits the file."""
    is_attn = attributions["component"] == "attn"
    attn = attributions.loc[is_attn, ATTN_COLUMNS].reset_index(drop=True)
    rest = attributions.loc[~is_attn, REST_COLUMNS].reset_index(drop=True)
    return _checked(attn, "attributions"), _as_float64(rest)


def _checked(attn: pd.DataFrame, where: str) -> pd.DataFrame:
    if attn.empty:
        raise FactscopeError(f"{where}: no analysed prompts (did the model know none of the facts?)")
    return _as_float64(attn)


def _as_float64(table: pd.DataFrame) -> pd.DataFrame:
    # the table stores float32; sums over thousands of parts are taken in float64 so the partition stays exact
    return table.astype({"value": "float64", "centred": "float64", "logit_diff": "float64"})


# ---------------------------------------------------------------------------------------------------------------
# 1. Head classes


def head_dla(attn: pd.DataFrame) -> pd.DataFrame:
    """Per prompt and head: subject_dla, relation_dla (END excluded), end_dla, other_dla (BOS + first + prefix) to
    the correct attribute."""
    correct = attn[attn["is_correct_target"]]
    wide = correct.pivot_table(
        index=["prompt_id", "relation", "layer", "head"], columns="source", values="centred", aggfunc="sum"
    )
    wide = wide.reindex(columns=list(GROUPS)).fillna(0.0)
    table = pd.DataFrame({
        "subject_dla": wide["subject"], "relation_dla": wide["relation"], "end_dla": wide["end"],
        "other_dla": wide["bos"] + wide["first"] + wide["prefix"],
    })
    return table.reset_index()


class HeadClasses(NamedTuple):
    heads: pd.DataFrame  # per head: mean S, R, END, other DLA, class, intervals, agreement, stability
    by_relation: pd.DataFrame  # per relation and head: the same means and the class under the pooled τ
    threshold: float  # the pooled significance threshold τ
    count_intervals: dict  # {class: [low, high]}: the bootstrap interval of how many heads the class has


def classify_heads(
    per_prompt: pd.DataFrame, rule: ClassRule = ClassRule(), n_resamples: int = bootstrap.N_RESAMPLES,
    seed: int = bootstrap.SEED,
) -> HeadClasses:
    """Pooled classes with their uncertainty, the per-relation classes, the pooled significance threshold τ and
    the intervals of the class counts.

    per_prompt: as from `head_dla`.
    Per-prompt and per-relation classes use the pooled τ, so stability asks whether a head lands in the same
    region of the (S, R) plane on each prompt or relation, not whether a re-fitted rule agrees. The bootstrap
    re-fits everything: on each resample (relations, then prompts: `bootstrap.resample_weights`), every head's
    mean S and R, τ, and the classes; `class_agreement` is the fraction of resamples that give the head its class,
    `*_dla_low/high` the percentile interval of its S and R, and `count_intervals` that of each class's count.
    """
    heads = per_prompt.groupby(["layer", "head"])[list(DLA_COLUMNS)].mean().reset_index()
    threshold = rule.threshold(heads["subject_dla"], heads["relation_dla"])
    heads["class"] = rule.classify(heads["subject_dla"], heads["relation_dla"], threshold)
    heads.insert(2, "name", head_name(heads["layer"], heads["head"]))
    uncertainty, count_intervals = _bootstrap_classes(per_prompt, heads, rule, n_resamples, seed)
    heads = heads.join(uncertainty, on=["layer", "head"])
    pooled = heads.set_index(["layer", "head"])["class"]

    def agreement(table: pd.DataFrame) -> pd.Series:
        classes = rule.classify(table["subject_dla"], table["relation_dla"], threshold)
        same = classes == pooled.reindex(pd.MultiIndex.from_frame(table[["layer", "head"]])).to_numpy()
        return pd.Series(same, index=table.index).groupby([table["layer"], table["head"]]).mean()

    by_relation = per_prompt.groupby(["relation", "layer", "head"])[list(DLA_COLUMNS)].mean().reset_index()
    by_relation["class"] = rule.classify(by_relation["subject_dla"], by_relation["relation_dla"], threshold)
    by_relation.insert(3, "name", head_name(by_relation["layer"], by_relation["head"]))
    heads = heads.join(agreement(per_prompt).rename("stability"), on=["layer", "head"])
    heads = heads.join(agreement(by_relation).rename("relation_stability"), on=["layer", "head"])
    return HeadClasses(heads, by_relation, threshold, count_intervals)


def _bootstrap_classes(per_prompt: pd.DataFrame, heads: pd.DataFrame, rule: ClassRule, n_resamples: int,
                       seed: int) -> tuple[pd.DataFrame, dict]:
    """Per head: S and R intervals and the fraction of resamples that reproduce its class; per class: the
    interval of its count."""
    wide = per_prompt.pivot_table(index="prompt_id", columns=["layer", "head"], values=["subject_dla", "relation_dla"])
    relations = per_prompt.groupby("prompt_id")["relation"].first().reindex(wide.index).to_numpy()
    order = pd.MultiIndex.from_frame(heads[["layer", "head"]])
    s = wide["subject_dla"].reindex(columns=order).fillna(0.0).to_numpy()  # [prompt, head]
    r = wide["relation_dla"].reindex(columns=order).fillna(0.0).to_numpy()
    weights = bootstrap.resample_weights(len(wide), n_resamples, seed, relations)  # [resample, prompt]
    s_boot, r_boot = weights @ s, weights @ r  # [resample, head]
    # τ per resample, vectorised: median + z · 1.4826 · MAD over the pooled S and R of all heads
    pooled = np.concatenate([s_boot, r_boot], axis=1)
    median = np.median(pooled, axis=1, keepdims=True)
    mad = np.median(np.abs(pooled - median), axis=1, keepdims=True)
    tau = np.maximum(rule.floor, median + rule.z * MAD_TO_SIGMA * mad)
    classes = rule.classify(s_boot, r_boot, tau)
    agreement = (classes == heads["class"].to_numpy()[None, :]).mean(0)
    (s_low, s_high), (r_low, r_high) = bootstrap.interval(s_boot), bootstrap.interval(r_boot)
    table = pd.DataFrame({"subject_dla_low": s_low, "subject_dla_high": s_high, "relation_dla_low": r_low,
                          "relation_dla_high": r_high, "class_agreement": agreement}, index=order)
    counts = {name: bootstrap.interval((classes == name).sum(1).astype(float)) for name in CLASSES}
    return table, {name: [int(round(low)), int(round(high))] for name, (low, high) in counts.items()}


def paper_classes(heads: pd.DataFrame, rule: ClassRule) -> np.ndarray:
    """The classes with END counted in R as the paper counts it (R + END), τ refitted on those values: how much of
    the taxonomy rests on heads re-reading END's own residual."""
    relation = heads["relation_dla"] + heads["end_dla"]
    return rule.classify(heads["subject_dla"], relation, rule.threshold(heads["subject_dla"], relation))


def class_sweep(
    heads: pd.DataFrame, ks: Sequence[float] = K_SWEEP, zs: Sequence[float] = Z_SWEEP, floor: float = TOLERANCE
) -> pd.DataFrame:
    """Class counts for every (k, z): how much the taxonomy depends on the chosen thresholds.

    heads: per-head pooled means (columns subject_dla, relation_dla), as from `classify_heads`.
    """
    rows = []
    for z in zs:
        threshold = ClassRule(z=z, floor=floor).threshold(heads["subject_dla"], heads["relation_dla"])
        for k in ks:
            rule = ClassRule(k=k, z=z, floor=floor)
            classes = pd.Series(rule.classify(heads["subject_dla"], heads["relation_dla"], threshold))
            counts = classes.value_counts().reindex(CLASSES, fill_value=0)
            rows += [{"k": k, "z": z, "class": name, "count": int(count)} for name, count in counts.items()]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# 2. What each class extracts


def head_extraction(attn: pd.DataFrame) -> pd.DataFrame:
    """Per head, for its SUBJECT part and its RELATION part: specificity and breadth, and the two numbers behind
    them — its mean DLA to `a` (`to_a`) and to the average other attribute of R_r (`to_others`). "Broad" is a
    claim about `to_others` against `to_a` (≈ 1 for a head that boosts every attribute of R_r alike), not only
    about one class against another."""
    parts = attn[attn["source"].isin(["subject", "relation"])]
    keys = ["layer", "head", "source"]
    breadth = parts.groupby(["prompt_id", *keys])["centred"].mean().groupby(level=keys).mean()
    correct = parts[parts["is_correct_target"]]
    specificity = correct.groupby(keys)["logit_diff"].mean()
    to_a = correct.groupby(keys)["centred"].mean()
    to_others = parts[~parts["is_correct_target"]].groupby(["prompt_id", *keys])["centred"].mean().groupby(level=keys).mean()
    table = pd.DataFrame({"specificity": specificity, "breadth": breadth, "to_a": to_a, "to_others": to_others})
    table = table.unstack("source")
    table.columns = [f"{source}_{measure}" for measure, source in table.columns]
    return table[[f"{source}_{measure}" for source in ("subject", "relation") for measure in MEASURES]].reset_index()


def class_extraction(heads: pd.DataFrame) -> dict:
    """Mean specificity and breadth of each class's own parts (a mixed head's two parts separately)."""
    out = {}
    for name, sources in CLASS_SOURCES.items():
        members = heads[heads["class"] == name]
        if not members.empty:
            out[name] = {
                source: {measure: float(members[f"{source}_{measure}"].mean()) for measure in MEASURES}
                for source in sources
            }
    return out


def top_targets(attn: pd.DataFrame, n: int = 3) -> pd.Series:
    """The attributes each head boosts most: mean DLA (all sources) over the prompts whose R_r holds them."""
    per_prompt = attn.groupby(["layer", "head", "prompt_id", "target"])["centred"].sum()
    per_target = per_prompt.groupby(level=["layer", "head", "target"]).mean()
    best = per_target.sort_values(ascending=False).groupby(level=["layer", "head"]).head(n).reset_index()
    return best.groupby(["layer", "head"])["target"].agg(" | ".join).rename("top_targets")


def mlp_boosting(rest: pd.DataFrame) -> pd.DataFrame:
    """Per MLP layer, per relation and pooled ("all"): DLA to a, breadth over R_r, specificity."""
    mlp = rest[rest["component"] == "mlp"]
    breadth = mlp.groupby(["relation", "layer", "prompt_id"])["centred"].mean().rename("breadth")
    correct = mlp[mlp["is_correct_target"]].set_index(["relation", "layer", "prompt_id"])
    per_prompt = correct[["centred", "logit_diff"]].join(breadth).reset_index()
    per_prompt = per_prompt.rename(columns={"centred": "correct_dla", "logit_diff": "specificity"})
    measures = ["correct_dla", "breadth", "specificity"]
    by_relation = per_prompt.groupby(["relation", "layer"])[measures].mean()
    pooled = pd.concat({"all": per_prompt.groupby("layer")[measures].mean()}, names=["relation"])
    return pd.concat([pooled, by_relation]).reset_index()


def held_out_breadth(attn: pd.DataFrame, rule: ClassRule, seed: int = bootstrap.SEED) -> dict:
    """How broad subject and relation heads are, measured on prompts that did not choose them.

    Choosing heads by their DLA to a on the same prompts then measuring how much more they write a than the rest
    of R_r favours a (selection: on SmolLM2's shipped set relation heads' to_a / to_others is 1.48 in-sample and
    1.31 on held-out halves). So the prompts are split in two halves within each relation; heads are classified
    on one half (the run's rule, τ refitted) and their own part's `to_a` and `to_others` summed per prompt on the
    other, and the other way round, so every prompt is measured once by heads it did not choose. Per class:
    `fraction` = mean to_others / mean to_a (1: indifferent among R_r; 0: a alone), its interval over relations
    then prompts, and `fraction_in_sample` with the run's own classes, for the size of the selection effect."""
    parts = attn[attn["source"].isin(["subject", "relation"])]
    values = to_a_and_others(parts, PART_KEYS)
    prompts = attn.drop_duplicates("prompt_id")[["prompt_id", "relation"]]
    relation_of = prompts.set_index("prompt_id")["relation"]
    half = halves(prompts, seed)
    per_prompt = head_dla(attn)
    in_sample = per_prompt.groupby(["layer", "head"])[["subject_dla", "relation_dla"]].mean()

    def classes_on(means: pd.DataFrame) -> pd.Series:
        threshold = rule.threshold(means["subject_dla"], means["relation_dla"])
        return pd.Series(rule.classify(means["subject_dla"], means["relation_dla"], threshold), index=means.index)

    def measured(classes: pd.Series, rows: pd.DataFrame, name: str) -> pd.DataFrame:
        members = classes[classes == name].index
        own = rows[(rows["source"] == name) & pd.MultiIndex.from_frame(rows[["layer", "head"]]).isin(members)]
        return own.groupby("prompt_id")[["to_a", "to_others"]].sum()

    out: dict = {"bar": BROAD, "split": "halves within each relation", "seed": seed}
    for name in ("subject", "relation"):
        held = []
        for chosen in (0, 1):
            chosen_means = per_prompt[per_prompt["prompt_id"].map(half) == chosen].groupby(["layer", "head"])[
                ["subject_dla", "relation_dla"]].mean()
            other_half = values[values["prompt_id"].map(half) != chosen]
            held.append(measured(classes_on(chosen_means), other_half, name))
        held_table = pd.concat(held)
        # a prompt measured by no head of the class (none chosen on its other half) counts as writing 0
        held_table = held_table.reindex(values["prompt_id"].unique(), fill_value=0.0)
        entry = fraction_estimate(held_table, relation_of.reindex(held_table.index).to_numpy())
        sample = measured(classes_on(in_sample), values, name).reindex(values["prompt_id"].unique(), fill_value=0.0)
        entry["fraction_in_sample"] = (float(sample["to_others"].mean() / sample["to_a"].mean())
                                       if len(sample) and sample["to_a"].mean() > 0 else None)
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3. Additivity


def mechanism_parts(attn: pd.DataFrame, rest: pd.DataFrame, heads: pd.DataFrame) -> pd.DataFrame:
    """Per prompt, target and mechanism: summed value, centred and logit_diff; every part lands in exactly one
    mechanism.

    heads: per-head classes (columns layer, head, class). Mechanisms with no parts (no mixed heads, say) get
    explicit zeros so means over prompts are over the same prompts for every mechanism.
    """
    lookup = pd.DataFrame(
        [(*key, name) for key, name in HEAD_MECHANISM.items()], columns=["class", "source", "mechanism"]
    )
    columns = [*KEYS, "mechanism", *PART_VALUES]
    head_parts = attn.merge(heads[["layer", "head", "class"]], on=["layer", "head"], how="left").merge(
        lookup, on=["class", "source"], how="left"
    )
    head_parts = head_parts.fillna({"mechanism": "other_heads"})[columns]
    other_parts = rest.assign(mechanism=np.where(rest["component"] == "mlp", "mlps", "embed_bias"))[columns]
    tagged = pd.concat([head_parts, other_parts], ignore_index=True)
    sums = tagged.groupby([*KEYS, "mechanism"])[list(PART_VALUES)].sum().reset_index()
    full = tagged[KEYS].drop_duplicates().merge(pd.DataFrame({"mechanism": MECHANISMS}), how="cross")
    parts = full.merge(sums, on=[*KEYS, "mechanism"], how="left").fillna(dict.fromkeys(PART_VALUES, 0.0))
    # a prompt whose R_r has one attribute has no a − mean(R∖a): keep it NaN, not the 0 that sum() made of it
    undefined = tagged.loc[tagged["logit_diff"].isna(), "prompt_id"].unique()
    parts.loc[parts["prompt_id"].isin(undefined), "logit_diff"] = np.nan
    return parts


def ranks_first(parts: pd.DataFrame, by: list[str]) -> pd.Series:
    """Per prompt (and `by`): does the summed value put `a` strictly above every other target of R_r?

    NaN where R_r has no other target. `a` must lead by more than the decomposition's accepted error: a tie
    (a mechanism writing nothing, or the same to every target) ranks nothing, whatever float rounding says.
    """
    index = ["prompt_id", "relation", *by]
    totals = parts.groupby([*index, "target", "is_correct_target"])["value"].sum().reset_index()
    correct = totals[totals["is_correct_target"]].set_index(index)["value"]
    best_other = totals[~totals["is_correct_target"]].groupby(index)["value"].max()
    first = (correct > best_other.reindex(correct.index) + TOLERANCE).astype(float)
    return first.where(best_other.reindex(correct.index).notna())


def mechanism_shares(parts: pd.DataFrame) -> pd.DataFrame:
    """mechanisms.csv: per relation and pooled ("all"), per metric, each mechanism's mean contribution and share.

    share = mean contribution / mean total, so the shares of a (relation, metric) sum to 1 exactly; a negative
    share is destructive interference. alone_ranks_first: fraction of prompts where the mechanism alone puts `a`
    first among R_r (the same for every metric: each is an increasing function of the value over R_r).
    negative_fraction: fraction of prompts where its contribution is negative.
    """
    correct = parts[parts["is_correct_target"]]
    long = correct.melt(
        id_vars=["prompt_id", "relation", "mechanism"], value_vars=list(PART_VALUES),
        var_name="metric", value_name="x",
    ).replace({"metric": {"value": "logit", "centred": "centred_logit"}})
    long = long.dropna(subset=["x"])  # logit_diff of prompts whose R_r has one attribute: undefined, not 0
    long["negative"] = (long["x"] < 0).astype(float)
    alone = ranks_first(parts, ["mechanism"]).rename("alone_ranks_first").reset_index()
    long = long.merge(alone, on=["prompt_id", "relation", "mechanism"], how="left")
    long["source_relation"] = long["relation"]  # kept through the pooling: its intervals resample relations
    frames = [long.assign(relation="all"), long]
    stats = pd.concat(frames).groupby(["relation", "metric", "mechanism"], sort=False).agg(
        mean_value=("x", "mean"), alone_ranks_first=("alone_ranks_first", "mean"),
        negative_fraction=("negative", "mean"), n_prompts=("prompt_id", "nunique"),
    )
    stats["share"] = stats["mean_value"] / stats.groupby(level=["relation", "metric"])["mean_value"].transform("sum")
    stats = stats.join(_share_intervals(pd.concat(frames)))
    columns = ["mean_value", "share", "share_low", "share_high", "alone_ranks_first", "negative_fraction", "n_prompts"]
    return stats[columns].reset_index()


def _share_intervals(long: pd.DataFrame) -> pd.DataFrame:
    """Bootstrap interval of every share: resample each (relation, metric)'s prompts — the pooled ones ("all")
    by relation, then prompt (`bootstrap.resample_weights`) — recompute every mechanism's mean and divide by their
    sum, as `mechanism_shares` does. long: `relation` is "all" or the relation; `source_relation` the prompt's."""
    frames = []
    for (relation, metric), rows in long.groupby(["relation", "metric"], sort=False):
        wide = rows.pivot_table(index="prompt_id", columns="mechanism", values="x", aggfunc="sum").fillna(0.0)
        relations = (rows.groupby("prompt_id")["source_relation"].first().reindex(wide.index).to_numpy()
                     if relation == "all" else None)
        means = bootstrap.resample_weights(len(wide), relations=relations) @ wide.to_numpy()  # [resample, mechanism]
        low, high = bootstrap.interval(means / means.sum(1, keepdims=True))
        frames.append(pd.DataFrame({"relation": relation, "metric": metric, "mechanism": wide.columns,
                                    "share_low": low, "share_high": high}))
    return pd.concat(frames).set_index(["relation", "metric", "mechanism"])


def interference(parts: pd.DataFrame, shares: pd.DataFrame) -> dict:
    """Pooled constructive / destructive interference and dominance, on a − mean(R \\ a)."""
    alone = ranks_first(parts, ["mechanism"]).unstack("mechanism")
    total = ranks_first(parts, [])
    ranked = alone.notna().all(axis=1) & total.notna()
    only_sum = (total[ranked] == 1) & ~(alone[ranked] == 1).any(axis=1)
    pooled = shares[(shares["relation"] == "all") & (shares["metric"] == "logit_diff")].set_index("mechanism")
    correct = parts[parts["is_correct_target"]].pivot_table(index="prompt_id", columns="mechanism", values="logit_diff")
    diff_total = correct.sum(axis=1)
    positive = diff_total > 0
    dominated = correct[positive].gt(DOMINANCE * diff_total[positive], axis=0).any(axis=1)
    largest = pooled["share"].idxmax()
    return {
        "metric": "logit_diff",
        "n_prompts": int(len(correct)),
        "sum_ranks_first": _fraction(total),
        "alone_ranks_first": {name: _fraction(alone[name]) for name in MECHANISMS},
        "only_sum_ranks_first": _fraction(only_sum),
        "dominance_threshold": DOMINANCE,
        "largest_share": {"mechanism": largest, "share": float(pooled.loc[largest, "share"])},
        "dominant": [name for name in MECHANISMS if pooled.loc[name, "share"] > DOMINANCE],
        "prompts_dominated": _fraction(dominated),
        "destructive": [name for name in MECHANISMS if pooled.loc[name, "mean_value"] < 0],
    }


def _fraction(flags: pd.Series) -> float | None:
    # None rather than NaN: summary.json must stay valid JSON when no prompt has a second target to rank against
    mean = flags.astype(float).mean()
    return None if pd.isna(mean) else float(mean)


# ---------------------------------------------------------------------------------------------------------------
# 4. Everything, from a run directory


def summarize(run_dir: Path, rule: ClassRule = ClassRule()) -> dict:
    """Write DIR/heads.csv, head_relation_classes.csv, head_class_sweep.csv, mlp_boosting.csv, mechanisms.csv;
    return the entries for summary.json."""
    run_dir = Path(run_dir)
    attn, rest = read_parts(run_dir)
    if attn["logit_diff"].isna().all():
        raise FactscopeError(
            f"{run_dir}: every analysed relation has one attribute, so a − mean(R∖a) is undefined; "
            "the dataset needs relations with at least two different attributes"
        )
    heads, by_relation, threshold, count_intervals = classify_heads(head_dla(attn), rule)
    heads.insert(heads.columns.get_loc("class") + 1, "paper_class", paper_classes(heads, rule))
    heads = heads.merge(head_extraction(attn), on=["layer", "head"]).join(top_targets(attn), on=["layer", "head"])
    parts = mechanism_parts(attn, rest, heads)
    shares = mechanism_shares(parts)
    write_table(heads, run_dir, "heads")
    write_table(by_relation, run_dir, "head_relation_classes")
    sweep = class_sweep(heads, sorted({*K_SWEEP, rule.k}), sorted({*Z_SWEEP, rule.z}), rule.floor)
    write_table(sweep, run_dir, "class_sweep")
    write_table(mlp_boosting(rest), run_dir, "mlp_boosting")
    write_table(shares, run_dir, "mechanisms")
    pooled = shares[shares["relation"] == "all"]
    return {
        "head_classes": class_counts(heads, count_intervals),
        "head_classes_paper": heads["paper_class"].value_counts().reindex(CLASSES, fill_value=0).astype(int).to_dict(),
        "head_class_rule": {
            # one τ for both sources; the per-source keys stay for readers of earlier runs' summaries
            "k": rule.k, "z": rule.z, "floor": rule.floor, "threshold": threshold, "scale": "common",
            "subject_threshold": threshold, "relation_threshold": threshold
        },
        "head_extraction": class_extraction(heads),
        "mechanism_shares": {
            metric: dict(zip(group["mechanism"], group["share"].astype(float)))
            for metric, group in pooled.groupby("metric")
        },
        "mechanism_shares_ci": {
            metric: {name: [float(low), float(high)] for name, low, high in
                     zip(group["mechanism"], group["share_low"], group["share_high"])}
            for metric, group in pooled.groupby("metric")
        },
        "breadth_held_out": held_out_breadth(attn, rule),
        "mlp_relation_boost": mlp_relation_boost(rest),
        "intervals": bootstrap.record(bootstrap.count_relations(attn.drop_duplicates("prompt_id")["relation"])),
        "interference": interference(parts, shares),
    }


TOP_CARRIERS = 3


def class_counts(heads: pd.DataFrame, count_intervals: dict | None = None, n: int = TOP_N) -> dict:
    """{class: {"count": n, "count_ci": [low, high], "top": names}}, the top ranked by the DLA that defines the
    class; for subject and relation heads also `top_carriers_fraction`: the fraction of the class's a − mean(R∖a)
    (its mechanism's mean, the sum of its heads' own-source specificity) that its `TOP_CARRIERS` largest
    contributors supply — a count moves with every head near the threshold, this fraction only with the few that
    carry the class."""
    score = {
        "subject": heads["subject_dla"],
        "relation": heads["relation_dla"],
        "mixed": heads["subject_dla"] + heads["relation_dla"],
        "negligible": heads["subject_dla"] + heads["relation_dla"],
    }
    out = {}
    for name in CLASSES:
        members = heads["class"] == name
        order = score[name][members].sort_values(ascending=False).index[:n]
        out[name] = {"count": int(members.sum()), "top": heads.loc[order, "name"].tolist()}
        if count_intervals is not None:
            out[name]["count_ci"] = count_intervals[name]
        if name in ("subject", "relation") and f"{name}_specificity" in heads:
            carried = heads.loc[members, f"{name}_specificity"].sort_values(ascending=False)
            total = float(carried.sum())
            fraction = float(carried.iloc[:TOP_CARRIERS].sum()) / total if total > 0 and len(carried) else None
            out[name]["top_carriers_fraction"] = fraction
    return out


# ---------------------------------------------------------------------------------------------------------------
# 5. The subject swap's table (`swap.subject_swap`), summarised


def swap_summary(stats: pd.DataFrame) -> dict:
    """Per (class, source), e.g. {"relation/relation": {...}}: rel_change and corr averaged over the class's heads
    weighted by each part's mean |DLA| — the heads that carry the class decide how much it moves, not the many that
    barely cross the threshold — and the unweighted means beside them (`*_unweighted`)."""
    out = {}
    for (name, source), rows in stats.groupby(["class", "source"]):
        weights = rows["mean_abs_dla"] if "mean_abs_dla" in rows else pd.Series(1.0, index=rows.index)
        corr = rows["corr"].notna()
        out[f"{name}/{source}"] = {
            "rel_change": float(np.average(rows["rel_change"], weights=weights)),
            "corr": float(np.average(rows.loc[corr, "corr"], weights=weights[corr])) if corr.any() else float("nan"),
            "rel_change_unweighted": float(rows["rel_change"].mean()), "corr_unweighted": float(rows["corr"].mean()),
            "n_heads": int(len(rows)), "weight": "mean |DLA|",
        }
    return out
