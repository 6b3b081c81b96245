"""Bootstrap intervals over prompts: every headline number of a run carries one.

Prompts are the unit of resampling (the dataset is a sample of facts; heads, layers and targets are not). Each
statistic is recomputed on `N_RESAMPLES` resamples of the prompts drawn with replacement from one seeded
generator, and the interval is the percentile interval at `LEVEL`. The seed and the count are recorded beside
every interval in summary.json, so an interval is reproducible from them.
"""

from __future__ import annotations

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


def resample_weights(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[n_resamples, n]: how often each of n prompts is drawn in each resample, divided by n — so that
    `weights @ values` is the resampled mean of every column of `values` at once."""
    generator = np.random.default_rng(seed)
    return generator.multinomial(n, np.full(n, 1.0 / n), size=n_resamples) / n


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0 of resampled statistics (NaN resamples ignored)."""
    tail = 100 * (1 - level) / 2
    return np.nanpercentile(samples, tail, axis=0), np.nanpercentile(samples, 100 - tail, axis=0)


def mean_interval(values, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> list[float | None]:
    """[low, high] of the mean of `values` (one per prompt; NaN dropped); [None, None] — valid JSON, unlike NaN —
    for fewer than two values."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return [None, None]
    low, high = interval(resample_weights(len(values), n_resamples, seed) @ values)
    return [float(low), float(high)]


def record(n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """How the intervals of a run were drawn, for summary.json."""
    return {"unit": "prompt", "n_resamples": n_resamples, "level": LEVEL, "seed": seed, "method": "percentile"}
