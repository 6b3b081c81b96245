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

Where it is read: the grid (`NOISE_SCALES`) is dense where the model still ranks a above chance; by 0.5× the
shipped models' accuracy is near zero whatever the mechanism, and there the full model and the mechanism alone
are both at chance, so a margin read there says nothing. Each mechanism's margin is summarised at a scale chosen
by a rule stated in advance (`HALVING_RULE`): the first grid scale at which the full model's top-1 accuracy, with
noise on that mechanism, is at most half its clean (scale 0) accuracy — the grid point itself, not an
interpolation. Beside it, the area between the two curves (full model minus mechanism alone, a first among R_r)
over the informative range, 0 to that scale, divided by the scale: a mean margin over it. Both carry bootstrap
intervals over prompts in which the scale is re-picked in every resample (`halving_columns`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from .. import bootstrap
from ..causal_readings import HALVING_COLUMNS, HALVING_RULE, halved_reading
from ..data import Encoded, relation_targets
from ..errors import FactscopeError
from ..end_maths import alone_logits, noise_scores
from ..forward import Batch, act_name, capture, make_batch, target_ids
from ..models import LoadedModel
from ..remote import NOISE_SCORE_BYTES
from ..taxonomy import GROUPS
from .check import CausalCheck
from .edits import Noise, edit_hooks, noise_draws
from .scores import Progress, as_numpy, finite_mean, tick
from .sites import HeadPath, MlpPath, PathSet, PathSpec, parse, union

NOISE_SCALES = (0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0)  # × the norm of END's clean final residual

SEEDS = (0, 1, 2)
UNIT = "end_resid_norm"


class Clean:
    """What every noisy pass of a batch is read against: END's clean final residual norm (the noise unit) and the
    final norm's clean scale at END."""

    def __init__(self, model: LoadedModel, batch: Batch):
        store: dict = {}
        last = act_name("resid_post", model.cfg.n_layers - 1)
        batch.logits(model, [capture(store, last, at_end=batch.ends), capture(store, act_name("final_scale"), at_end=batch.ends)])
        self.unit = store[last].float().norm(dim=-1)  # [batch]
        self.scale = store[act_name("final_scale")].float()  # [batch, 1]


def noisy_pass(model: LoadedModel, batch: Batch, paths: PathSet, scale: float, draws: list[torch.Tensor], clean: Clean,
               ids: Int[torch.Tensor, "batch target"]) -> tuple[Float[torch.Tensor, "batch vocab"], Float[torch.Tensor, "batch target"]]:
    """One pass with noise on `paths` (unit Gaussians `draws`, `edits.noise_draws`): the model's END logits, and the
    logits the noisy paths alone give the targets `ids` (`end_maths.alone_logits`)."""
    editor = Noise(scale, draws, clean.unit, paths.n_paths)
    logits = batch.logits(model, edit_hooks(model, batch, paths, editor))
    gain, _ = model.final_norm
    return logits, alone_logits(editor.alone, len(batch), gain, clean.scale, model.W_U, ids, model.centres)


def noise_robustness(
    model: LoadedModel,
    encoded: list[Encoded],
    mechanisms: dict[str, list[PathSpec]],
    scales: Sequence[float] = NOISE_SCALES,
    seeds: Sequence[int] = SEEDS,
    targets: dict[str, dict[int, str]] | None = None,
    progress: Progress = None,
    engine=None,
) -> pd.DataFrame:
    """Gaussian noise on each mechanism's paths at END, and on all of them at once ("all"), at each scale (in
    units of END's clean final residual norm, spread over the mechanism's paths; `edits.Noise`).

    One row per (mechanism, noise_scale): `accuracy` (top-1; mean over seeds), `accuracy_std` (over seeds),
    `mean_prob`, `mean_logit`, `first_among_r` (the full model ranks a first among R_r; R_r from `targets`, by
    default `relation_targets(encoded)`; prompts whose R_r has no other attribute are left out), `alone_first_among_r`
    (the mechanism alone under the same noise does), `margin` (the first minus the second, paired per prompt) with
    its bootstrap interval `margin_low`/`margin_high` (`bootstrap.mean_interval`), `noise_unit`, `n_paths`, `n_prompts`, `n_seeds`;
    and per mechanism (the same on each of its rows) the summary at the scale `HALVING_RULE` picks and the area
    between the curves up to it, with their re-picked intervals (`halving_columns`), and
    `chance_first_among_r`, the rate at which a is first among R_r by chance (mean 1/|R_r|). One clean
    pass, then one per (mechanism, scale, seed): `noise_passes`. `engine`: an nnsight engine runs the passes in one
    session (`NnsightEngine.noise_robustness`, on NDIF with `ablate --remote`), sent the local draws, and only
    the scores per prompt come back.
    """
    if not mechanisms:
        raise FactscopeError("no mechanisms to add noise to")
    batch = make_batch(model, encoded)
    ids, valid = (t.to(batch.tokens.device) for t in target_ids(
        batch.items, targets if targets is not None else relation_targets(encoded), with_answer=True))
    conditions = {name: parse(model, paths) for name, paths in {**mechanisms, "all": union(*mechanisms.values())}.items()}
    # per condition and seed, the same unit Gaussians at every scale (`edits.noise_draws`, seeded)
    if engine is None:
        clean = Clean(model, batch)
        tick(progress)
        per_pass = []
        for paths in conditions.values():
            for scale in scales:
                for seed in seeds:
                    # drawn for this pass only: every condition's draws at once would hold them all (a head
                    # layer's are [batch, head, group, d_head]); a remote session needs them all, to send them
                    draws = noise_draws(model, batch, paths, seed)
                    logits, alone = noisy_pass(model, batch, paths, scale, draws, clean, ids)
                    per_pass.append(as_numpy(noise_scores(logits, alone, batch.answers, ids, valid)))
                    tick(progress)
    else:
        draws = [[noise_draws(model, batch, paths, seed) for seed in seeds] for paths in conditions.values()]
        got = as_numpy(engine.noise_robustness(model, batch, list(conditions.values()), scales, draws, ids, valid))
        per_pass = [{key: values[i] for key, values in got.items()} for i in range(len(got["prob"]))]
        for _ in range(noise_passes(len(mechanisms), scales, seeds)):
            tick(progress)
    sizes = valid.sum(1).cpu().numpy()
    chance = float(np.mean(1.0 / sizes[sizes > 1])) if (sizes > 1).any() else float("nan")
    records = []
    for c, (name, path_set) in enumerate(conditions.items()):
        per_scale = [per_pass[(c * len(scales) + k) * len(seeds):(c * len(scales) + k + 1) * len(seeds)]
                     for k in range(len(scales))]
        # per scale and prompt, over the seeds
        curves = {key: np.stack([np.mean([run[key] for run in runs], axis=0) for runs in per_scale]).astype(float)
                  for key in ("correct", "model_first", "alone_first")}
        rule = halving_columns(np.asarray(scales, dtype=float), curves["correct"], curves["model_first"], curves["alone_first"],
                               batch.relations)
        for k, scale in enumerate(scales):
            runs = per_scale[k]
            accuracy = np.array([finite_mean(run["correct"]) for run in runs])
            model_first, alone_first = [run["model_first"] for run in runs], [run["alone_first"] for run in runs]
            # per prompt, over the seeds: how much more often the full model keeps a first than the part alone
            margin = np.mean(model_first, axis=0) - np.mean(alone_first, axis=0)
            low, high = bootstrap.mean_interval(margin, relations=batch.relations)
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
                    **rule, "chance_first_among_r": chance,
                }
            )
    return pd.DataFrame.from_records(records)


def halving_columns(scales: np.ndarray, correct: np.ndarray, model_first: np.ndarray, alone_first: np.ndarray,
                    relations: list[str] | None = None) -> dict:
    """One mechanism's summary by `HALVING_RULE`, from [scale, prompt] arrays (each prompt's mean over the seeds:
    top-1 correct, the full model's and the mechanism alone's a first among R_r; NaN where a prompt's R_r has no
    other attribute): `halved_scale` (the scale the rule picks), `accuracy_halved` (whether the accuracy halves on
    the grid at all), `margin_at_halved` (the mean of model_first − alone_first there) and `margin_area` (the area
    between the curves from 0 to that scale, by the trapezoid rule, divided by the scale: the mean margin over the
    informative range), each with `_low`/`_high`: the bootstrap interval (`bootstrap.resample_weights`: relations,
    then prompts, given enough `relations`; the same resamples for all three), the scale re-picked in every resample. All NaN where the grid has no scale 0
    (no clean accuracy to halve)."""
    order = np.argsort(scales, kind="stable")
    scales, correct, model_first, alone_first = scales[order], correct[order], model_first[order], alone_first[order]
    if not len(scales) or scales[0] != 0:
        return {"accuracy_halved": False, **{f"{name}{end}": float("nan") for name in HALVING_COLUMNS
                                              for end in ("", "_low", "_high")}}
    margin = model_first - alone_first  # [scale, prompt]
    finite = np.isfinite(margin)
    # a prompt counts towards the margin where its R_r has a second attribute (at every scale alike)
    weights = np.vstack([np.full((1, correct.shape[1]), 1.0 / correct.shape[1]), bootstrap.resample_weights(correct.shape[1], relations=relations)])
    accuracy = weights @ correct.T  # [1 + resample, scale]: the sample itself first
    with np.errstate(divide="ignore", invalid="ignore"):
        margins = (weights @ np.where(finite, margin, 0).T) / (weights @ finite.T)
    # a clean accuracy of zero has no half to fall to: the rule then takes the largest scale
    halved = (scales > 0) & (accuracy <= accuracy[:, :1] / 2) & (accuracy[:, :1] > 0)
    pick = np.where(halved.any(1), halved.argmax(1), len(scales) - 1)
    rows = np.arange(len(weights))
    at_pick = margins[rows, pick]
    # ∫ from 0 to each scale of the margin (trapezoids), then divided by the scale picked
    cumulative = np.concatenate([np.zeros((len(weights), 1)),
                                 np.cumsum(np.diff(scales) * (margins[:, 1:] + margins[:, :-1]) / 2, axis=1)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        area = np.where(scales[pick] > 0, cumulative[rows, pick] / scales[pick], at_pick)
    out = {"accuracy_halved": bool(halved[0].any())}
    for name, values in (("halved_scale", scales[pick]), ("margin_at_halved", at_pick), ("margin_area", area)):
        with warnings.catch_warnings():  # no prompt with a second attribute in R_r: no margin, a NaN interval
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = bootstrap.interval(values[1:])
        out[name], out[f"{name}_low"], out[f"{name}_high"] = float(values[0]), float(low), float(high)
    return out


def noise_passes(n_mechanisms: int, scales: Sequence[float] = NOISE_SCALES, seeds: Sequence[int] = SEEDS) -> int:
    """How many times `noise_robustness` calls `progress(1)` for this many mechanisms (plus "all")."""
    return 1 + (n_mechanisms + 1) * len(scales) * len(seeds)


def noise_summary(table: pd.DataFrame) -> dict:
    """Per condition, at the largest noise scale and as the area under its curve over the scales (normalised by
    the scale range): the top-1 accuracy (`accuracy_at_max_scale`, `mean_accuracy_over_scales`) and, where the
    table has them, how often the full model (`first_among_r_*`) and the noisy mechanism alone
    (`alone_first_among_r_*`) rank a first among R_r. The additive story predicts the first far above the second
    for each single mechanism; "all" is no test of it. Where the table has them, `at_halved`: the reading at the
    scale `HALVING_RULE` picks (the rule, the scale and its interval, the two rates there, the margin and the
    area between the curves up to it with their re-picked intervals, the chance rate, and whether the full model
    is above chance at any noisy scale) — the reading the report judges; the largest scale is where everything
    is at chance."""
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
        if "halved_scale" in rows:  # a table from before the rule has none
            entry["at_halved"] = halved_reading(rows)
        out[mechanism] = entry
    return out


def _curve(scales: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    span = scales[-1] - scales[0]
    area = float(np.trapezoid(values, scales) / span) if span > 0 else float(values[0])
    return float(values[-1]), area


def draw_sizes(model) -> dict:
    """The ablate options the noise check's remote cost needs beyond the command's own (the draws' sizes)."""
    return {"d_head": model.cfg.d_head, "d_model": model.cfg.d_model}


def _run(model: LoadedModel, known: list[Encoded], *, mechanisms: dict, noise_scales: Sequence[float], seeds: Sequence[int],
         targets: dict | None, progress: Progress, engine=None, **sizes) -> dict[str, pd.DataFrame]:
    return {"noise_robustness": noise_robustness(model, known, mechanisms, noise_scales, seeds, targets, progress=progress,
                                                 engine=engine)}


def _passes(n_layers: int, *, mechanisms: dict, noise_scales: Sequence[float], seeds: Sequence[int], targets: dict | None,
            **sizes) -> int:
    return noise_passes(len(mechanisms), noise_scales, seeds)


def _remote_cost(n_layers: int, known: list[Encoded], *, mechanisms: dict, noise_scales: Sequence[float],
                 seeds: Sequence[int], targets: dict | None, d_head: int, d_model: int) -> tuple[int, int, int]:
    """Through an engine, one session (`NnsightEngine.noise_robustness`) bringing back `end_maths.noise_scores` per
    noisy pass and prompt, and sent every (condition, seed)'s draws in fp32: d_head per edited (head, group) pair,
    d_model per MLP, per prompt (no embedding)."""
    sent = 0
    for paths in [*mechanisms.values(), union(*mechanisms.values())]:
        pairs = {(path.layer, path.head, group) for path in paths if isinstance(path, HeadPath)
                 for group in (GROUPS if path.group == "all" else (path.group,))}
        mlps = {path.layer for path in paths if isinstance(path, MlpPath)}
        sent += len(seeds) * len(known) * 4 * (len(pairs) * d_head + len(mlps) * d_model)
    passes = noise_passes(len(mechanisms), noise_scales, seeds) - 1  # the clean pass brings nothing back
    return 1, passes * len(known) * NOISE_SCORE_BYTES, sent


CHECK = CausalCheck(
    "noise_robustness", "ablate", ("noise_robustness",),
    ("mechanisms", "noise_scales", "seeds", "targets", "d_head", "d_model"), _passes, _run,
    lambda tables: noise_summary(tables["noise_robustness"]), remote=True, remote_cost=_remote_cost,
)
