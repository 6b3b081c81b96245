"""Noise robustness: accuracy as Gaussian noise on each mechanism's contribution at END grows, and on all of
them at once. The additive story predicts that "all" degrades no faster than one mechanism."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..data import Encoded
from ..errors import FactscopeError
from ..forward import make_batch
from ..models import LoadedModel
from .check import CausalCheck
from .edits import Noise, edit_hooks
from .scores import Progress, finite_mean, scores, tick
from .sites import PathSpec, parse, union

NOISE_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
SEEDS = (0, 1, 2)


def noise_robustness(
    model: LoadedModel,
    encoded: list[Encoded],
    mechanisms: dict[str, list[PathSpec]],
    scales: Sequence[float] = NOISE_SCALES,
    seeds: Sequence[int] = SEEDS,
    progress: Progress = None,
) -> pd.DataFrame:
    """Accuracy as Gaussian noise grows on each mechanism's contribution at END, and on all of them at once
    ("all"). The noise on each path has norm `noise_scale` × that path's own vector norm (see `edits.Noise`).

    One row per (mechanism, noise_scale): `accuracy` (mean over seeds), `accuracy_std` (over seeds),
    `mean_prob`, `mean_logit`, `n_paths`, `n_prompts`, `n_seeds`. Passes: `noise_passes`.
    """
    if not mechanisms:
        raise FactscopeError("no mechanisms to add noise to")
    batch = make_batch(model, encoded)
    conditions = {**mechanisms, "all": union(*mechanisms.values())}
    records = []
    for name, paths in conditions.items():
        path_set = parse(model, paths)
        for scale in scales:
            runs = []
            for seed in seeds:
                runs.append(scores(batch.logits(model, edit_hooks(model, batch, path_set, Noise(scale, seed))), batch))
                tick(progress)
            accuracy = np.array([finite_mean(run["correct"]) for run in runs])
            records.append(
                {
                    "mechanism": name, "noise_scale": float(scale), "accuracy": float(accuracy.mean()),
                    "accuracy_std": float(accuracy.std()), "mean_prob": float(np.mean([finite_mean(r["prob"]) for r in runs])),
                    "mean_logit": float(np.mean([finite_mean(r["logit"]) for r in runs])), "n_paths": path_set.n_paths,
                    "n_prompts": len(batch), "n_seeds": len(seeds),
                }
            )
    return pd.DataFrame.from_records(records)


def noise_passes(n_mechanisms: int, scales: Sequence[float] = NOISE_SCALES, seeds: Sequence[int] = SEEDS) -> int:
    """How many times `noise_robustness` calls `progress(1)` for this many mechanisms (plus "all")."""
    return (n_mechanisms + 1) * len(scales) * len(seeds)


def noise_summary(table: pd.DataFrame) -> dict:
    """Accuracy of each condition at the largest noise scale, and the area under its accuracy-vs-scale curve
    (normalised by the scale range): the additive story predicts "all" degrades no faster than one mechanism."""
    out = {}
    for mechanism, rows in table.groupby("mechanism", sort=False):
        rows = rows.sort_values("noise_scale")
        scales, accuracy = rows["noise_scale"].to_numpy(), rows["accuracy"].to_numpy()
        span = scales[-1] - scales[0]
        area = float(np.trapezoid(accuracy, scales) / span) if span > 0 else float(accuracy[0])
        out[mechanism] = {"accuracy_at_max_scale": float(accuracy[-1]), "mean_accuracy_over_scales": area}
    return out


def _run(model: LoadedModel, known: list[Encoded], *, mechanisms: dict, noise_scales: Sequence[float], seeds: Sequence[int],
         progress: Progress) -> dict[str, pd.DataFrame]:
    return {"noise_robustness": noise_robustness(model, known, mechanisms, noise_scales, seeds, progress=progress)}


def _passes(n_layers: int, *, mechanisms: dict, noise_scales: Sequence[float], seeds: Sequence[int]) -> int:
    return noise_passes(len(mechanisms), noise_scales, seeds)


CHECK = CausalCheck(
    "noise_robustness", "ablate", ("noise_robustness",), ("mechanisms", "noise_scales", "seeds"), _passes, _run,
    lambda tables: noise_summary(tables["noise_robustness"]),
)
