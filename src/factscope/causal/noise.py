"""Noise robustness, as a test of the additive story: with Gaussian noise on one mechanism's paths at END, does
the full model keep the attribute first far more often than that mechanism alone would under the same noise?

If the prediction is a sum of independent parts, noise on one part reaches the logits through that part only,
and the other parts' contributions still carry a: the full model should keep a first among R_r much more often
than the noisy part alone does. (Noise on every path at once says nothing for or against additivity: it adds up
under any story.) The mechanism alone is its own paths' DLA sum with the noise added, read off the same pass and
projected with the final norm's clean scale, like DLA.

The noise is in one unit for every mechanism: in all `scale` × the norm of the prompt's clean END residual
(after the last block), spread evenly over the mechanism's paths (see `edits.Noise`). A unit of each path's own
norm would let the late MLPs, whose outputs are twenty times larger than the early ones', dominate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from .. import bootstrap
from ..data import Encoded, relation_targets
from ..errors import FactscopeError
from ..forward import Batch, act_name, capture, make_batch, target_ids
from ..models import LoadedModel
from .check import CausalCheck
from .edits import Noise, edit_hooks
from .scores import Progress, finite_mean, scores, tick
from .sites import PathSet, PathSpec, parse, union

NOISE_SCALES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # × the norm of END's clean final residual
SEEDS = (0, 1, 2)
UNIT = "end_resid_norm"


class Clean:
    """What every noisy pass of a batch is read against: END's clean final residual norm (the noise unit), the
    final norm's clean scale at END, and each prompt's R_r as token ids (a first, padding repeating it)."""

    def __init__(self, model: LoadedModel, batch: Batch, targets: dict[str, dict[int, str]]):
        store: dict = {}
        last = act_name("resid_post", model.cfg.n_layers - 1)
        batch.logits(model, [capture(store, last, at_end=batch.ends), capture(store, act_name("final_scale"), at_end=batch.ends)])
        self.unit = store[last].float().norm(dim=-1)  # [batch]
        self.scale = store[act_name("final_scale")].float()  # [batch, 1]
        ids, valid = target_ids(batch.items, targets, with_answer=True)
        self.ids, self.valid = ids.to(batch.tokens.device), valid.to(batch.tokens.device)


def noisy_pass(model: LoadedModel, batch: Batch, paths: PathSet, scale: float, seed: int, clean: Clean
               ) -> tuple[Float[torch.Tensor, "batch vocab"], Float[torch.Tensor, "batch target"]]:
    """One pass with noise on `paths`: the model's END logits, and the logits the noisy paths alone give R_r
    (`clean.ids`): their summed vectors plus noise through the final norm at its clean scale, without biases."""
    editor = Noise(scale, seed, clean.unit, paths.n_paths)
    logits = batch.logits(model, edit_hooks(model, batch, paths, editor))
    alone = editor.alone + torch.zeros((len(batch), model.cfg.d_model), device=clean.scale.device)
    if model.centres:
        alone = alone - alone.mean(-1, keepdim=True)
    gain, _ = model.final_norm
    columns = model.W_U[:, clean.ids].float()  # [d_model, batch, target]
    return logits, torch.einsum("bd,dbt->bt", alone * gain / clean.scale, columns)


def first_among_targets(logits: Float[torch.Tensor, "batch target"], valid: Float[torch.Tensor, "batch target"]) -> np.ndarray:
    """Per prompt: 1 where a (column 0) beats every other attribute of R_r, NaN where R_r has no other."""
    beaten = (logits[:, 1:] < logits[:, :1]) | (valid[:, 1:] == 0)
    first = beaten.all(1).float()
    return torch.where(valid[:, 1:].sum(1) > 0, first, torch.full_like(first, float("nan"))).cpu().numpy()


def noise_robustness(
    model: LoadedModel,
    encoded: list[Encoded],
    mechanisms: dict[str, list[PathSpec]],
    scales: Sequence[float] = NOISE_SCALES,
    seeds: Sequence[int] = SEEDS,
    targets: dict[str, dict[int, str]] | None = None,
    progress: Progress = None,
) -> pd.DataFrame:
    """Gaussian noise on each mechanism's paths at END, and on all of them at once ("all"), at each scale (in
    units of END's clean final residual norm, spread over the mechanism's paths; `edits.Noise`).

    One row per (mechanism, noise_scale): `accuracy` (top-1; mean over seeds), `accuracy_std` (over seeds),
    `mean_prob`, `mean_logit`, `first_among_r` (the full model ranks a first among R_r; R_r from `targets`, by
    default `relation_targets(encoded)`; prompts whose R_r has no other attribute are left out), `alone_first_among_r`
    (the mechanism alone under the same noise does), `margin` (the first minus the second, paired per prompt) with
    its bootstrap interval `margin_low`/`margin_high` (`bootstrap.mean_interval`), `noise_unit`, `n_paths`, `n_prompts`, `n_seeds`. One clean
    pass, then one per (mechanism, scale, seed): `noise_passes`.
    """
    if not mechanisms:
        raise FactscopeError("no mechanisms to add noise to")
    batch = make_batch(model, encoded)
    clean = Clean(model, batch, targets if targets is not None else relation_targets(encoded))
    tick(progress)
    conditions = {**mechanisms, "all": union(*mechanisms.values())}
    records = []
    for name, paths in conditions.items():
        path_set = parse(model, paths)
        for scale in scales:
            runs, model_first, alone_first = [], [], []
            for seed in seeds:
                logits, alone = noisy_pass(model, batch, path_set, scale, seed, clean)
                runs.append(scores(logits, batch))
                model_first.append(first_among_targets(logits.gather(1, clean.ids), clean.valid))
                alone_first.append(first_among_targets(alone, clean.valid))
                tick(progress)
            accuracy = np.array([finite_mean(run["correct"]) for run in runs])
            # per prompt, over the seeds: how much more often the full model keeps a first than the part alone
            margin = np.mean(model_first, axis=0) - np.mean(alone_first, axis=0)
            low, high = bootstrap.mean_interval(margin)
            records.append(
                {
                    "mechanism": name, "noise_scale": float(scale), "accuracy": float(accuracy.mean()),
                    "accuracy_std": float(accuracy.std()), "mean_prob": float(np.mean([finite_mean(r["prob"]) for r in runs])),
                    "mean_logit": float(np.mean([finite_mean(r["logit"]) for r in runs])),
                    "first_among_r": finite_mean(np.mean(model_first, axis=0)),
                    "alone_first_among_r": finite_mean(np.mean(alone_first, axis=0)),
                    "margin": finite_mean(margin), "margin_low": np.nan if low is None else low,
                    "margin_high": np.nan if high is None else high,
                    "noise_unit": UNIT, "n_paths": path_set.n_paths, "n_prompts": len(batch), "n_seeds": len(seeds),
                }
            )
    return pd.DataFrame.from_records(records)


def noise_passes(n_mechanisms: int, scales: Sequence[float] = NOISE_SCALES, seeds: Sequence[int] = SEEDS) -> int:
    """How many times `noise_robustness` calls `progress(1)` for this many mechanisms (plus "all")."""
    return 1 + (n_mechanisms + 1) * len(scales) * len(seeds)


def noise_summary(table: pd.DataFrame) -> dict:
    """Per condition, at the largest noise scale and as the area under its curve over the scales (normalised by
    the scale range): the top-1 accuracy (`accuracy_at_max_scale`, `mean_accuracy_over_scales`) and, where the
    table has them, how often the full model (`first_among_r_*`) and the noisy mechanism alone
    (`alone_first_among_r_*`) rank a first among R_r. The additive story predicts the first far above the second
    for each single mechanism; "all" is no test of it."""
    out = {}
    for mechanism, rows in table.groupby("mechanism", sort=False):
        rows = rows.sort_values("noise_scale")
        entry = {}
        for column in ("accuracy", "first_among_r", "alone_first_among_r"):
            if column in rows:
                at_max, area = _curve(rows["noise_scale"].to_numpy(), rows[column].to_numpy())
                entry[f"{column}_at_max_scale"], entry[f"mean_{column}_over_scales"] = at_max, area
        if "margin_low" in rows:  # a table from before the intervals has none
            last = rows.iloc[-1]
            entry["margin_at_max_scale"] = None if pd.isna(last["margin"]) else float(last["margin"])
            entry["margin_at_max_scale_ci"] = [None if pd.isna(last[k]) else float(last[k]) for k in ("margin_low", "margin_high")]
        out[mechanism] = entry
    return out


def _curve(scales: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    span = scales[-1] - scales[0]
    area = float(np.trapezoid(values, scales) / span) if span > 0 else float(values[0])
    return float(values[-1]), area


def _run(model: LoadedModel, known: list[Encoded], *, mechanisms: dict, noise_scales: Sequence[float], seeds: Sequence[int],
         targets: dict | None, progress: Progress) -> dict[str, pd.DataFrame]:
    return {"noise_robustness": noise_robustness(model, known, mechanisms, noise_scales, seeds, targets, progress=progress)}


def _passes(n_layers: int, *, mechanisms: dict, noise_scales: Sequence[float], seeds: Sequence[int], targets: dict | None) -> int:
    return noise_passes(len(mechanisms), noise_scales, seeds)


CHECK = CausalCheck(
    "noise_robustness", "ablate", ("noise_robustness",), ("mechanisms", "noise_scales", "seeds", "targets"), _passes, _run,
    lambda tables: noise_summary(tables["noise_robustness"]),
)
