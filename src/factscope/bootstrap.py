"""Bootstrap intervals: every headline number of a run carries one, and it respects how the prompts cluster.

The prompts of a dataset are not independent draws: they come in relations (one template each, a few attributes
each), and what a mechanism supplies varies by relation far more than by prompt within one. Resampling prompts
alone treats 108 prompts of 8 relations as 108 independent facts and understates the uncertainty (relation
heads' share on the shipped set: [6.0, 9.7]% over prompts, [3.7, 12.6]% over relations then prompts). So where the
prompts come with their relations, and there are at least `MIN_RELATIONS` of them, each resample is two-stage:
draw the relations with replacement, then, within each relation drawn, its prompts with replacement (a relation
drawn twice contributes two independent draws of its prompts). The statistic is the prompt-weighted mean over the
drawn prompts, so its centre is the same pooled mean as without clustering. With fewer relations a
between-relation spread cannot be estimated at all: the intervals fall back to prompts and every record of them
says "too few relations", which the report repeats beside the numbers.

Each statistic is recomputed on `N_RESAMPLES` resamples drawn from one seeded generator, and the interval is the
percentile interval at `LEVEL`. The unit, seed and count are recorded beside every interval in summary.json, so
an interval is reproducible from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
MIN_RELATIONS = 5  # fewer relations than this: no between-relation spread to estimate; intervals over prompts
TOO_FEW = "too few relations"


def count_relations(relations: Sequence | np.ndarray | None) -> int | None:
    """How many distinct relations the prompts have (None: not given)."""
    return None if relations is None else len(np.unique(np.asarray(relations, dtype=object).astype(str)))


def clustered(relations: Sequence | np.ndarray | None) -> bool:
    """Whether intervals over these prompts' relations are two-stage (enough relations to resample them)."""
    return (count_relations(relations) or 0) >= MIN_RELATIONS


def resample_weights(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                     relations: Sequence | np.ndarray | None = None) -> np.ndarray:
    """[n_resamples, n]: the weight of each of n prompts in each resample (rows sum to 1), so that
    `weights @ values` is the resampled mean of every column of `values` at once.

    relations: each prompt's relation; with at least `MIN_RELATIONS` of them the resamples are two-stage
    (relations, then prompts within each relation drawn), else prompts are drawn alone."""
    generator = np.random.default_rng(seed)
    if not clustered(relations):
        return generator.multinomial(n, np.full(n, 1.0 / n), size=n_resamples) / n
    labels = np.asarray(relations, dtype=object).astype(str)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} relations for {n} prompts")
    names = np.unique(labels)
    drawn = generator.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=n_resamples)  # [r, K]
    counts = np.zeros((n_resamples, n))
    for k, name in enumerate(names):
        members = np.flatnonzero(labels == name)
        # a relation drawn c times: c draws of its m prompts, i.e. c·m draws from them, uniformly
        counts[:, members] = generator.multinomial(drawn[:, k] * len(members), np.full(len(members), 1.0 / len(members)))
    return counts / counts.sum(1, keepdims=True)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0 of resampled statistics (NaN resamples ignored)."""
    tail = 100 * (1 - level) / 2
    return np.nanpercentile(samples, tail, axis=0), np.nanpercentile(samples, 100 - tail, axis=0)


def mean_interval(values, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                  relations: Sequence | np.ndarray | None = None) -> list[float | None]:
    """[low, high] of the mean of `values` (one per prompt; NaN dropped, with their relations); [None, None] —
    valid JSON, unlike NaN — for fewer than two values."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    kept = None if relations is None else np.asarray(relations, dtype=object)[finite]
    values = values[finite]
    if len(values) < 2:
        return [None, None]
    low, high = interval(resample_weights(len(values), n_resamples, seed, kept) @ values)
    return [float(low), float(high)]


def record(n_relations: int | None = None, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """How the intervals over prompts of `n_relations` relations (`count_relations`) were drawn, for
    summary.json: over relations then prompts, or over prompts with the reason (relations unknown, or too few)."""
    out = {"n_resamples": n_resamples, "level": LEVEL, "seed": seed, "method": "percentile"}
    if (n_relations or 0) >= MIN_RELATIONS:
        return {"unit": "relation, then prompt", "n_relations": n_relations, **out}
    if n_relations is None:
        return {"unit": "prompt", **out}
    return {"unit": "prompt", "n_relations": n_relations,
            "note": f"{TOO_FEW} ({n_relations} < {MIN_RELATIONS}) to resample them: intervals over prompts "
                    "understate the uncertainty between relations", **out}


def unit_text(record: dict | None) -> str:
    """How a summary's intervals were drawn, in words, for captions and findings."""
    if not record:
        return "95% bootstrap intervals over prompts"
    level = f"{record.get('level', LEVEL):.0%}"
    if record.get("unit") == "relation, then prompt":
        return f"{level} bootstrap intervals over relations, then prompts ({record['n_relations']} relations)"
    if "note" in record:
        return f"{level} bootstrap intervals over prompts — {TOO_FEW} ({record['n_relations']}) to resample them"
    return f"{level} bootstrap intervals over prompts"
