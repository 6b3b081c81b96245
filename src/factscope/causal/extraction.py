"""Attribute extraction rate (Geva et al. 2023): which attention / MLP sublayer's END output, projected to the
vocabulary, already names the model's prediction?

As Geva et al.'s dissection notebook does, the output is projected with the raw unembedding matrix (no final norm,
no bias). Through the final norm (the logit lens with the vector's own scale) is kept as a second reading: the
norm's gain reweights the directions of the residual stream, so the two can rank tokens differently.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool

from .. import bootstrap
from ..data import Encoded
from ..end_maths import (
    EXTRACTION_EVENTS,
    PROJECTIONS,
    SUBLAYER_OUTPUTS,
    extraction_events,
)
from ..forward import Batch, act_name, capture, make_batch
from ..models import LoadedModel
from .check import CausalCheck
from .scores import Progress, model_lens, tick

TOP_K = 10
HOOKS = {"attn": "attn_out", "mlp": "mlp_out"}  # `end_maths.SUBLAYER_OUTPUTS` → the TransformerLens activation
SUFFIXES = {"raw": "", "normed": "_normed"}  # `end_maths.PROJECTIONS` → the table's column suffix


def extraction_rate(model: LoadedModel, encoded: list[Encoded], top_k: int = TOP_K, progress: Progress = None,
                    engine=None) -> pd.DataFrame:
    """Per layer and sublayer (attn, mlp): the fraction of prompts whose END output, projected with the raw
    unembedding, has the model's own top-1 prediction at top-1 (`extraction_rate`, Geva et al.'s event), the
    attribute a at top-1 (`attribute_rate`), and the prediction among its `top_k` tokens
    (`extraction_rate_top_k`: small models often rank it a few places down); the same through the final norm
    (`*_normed`); per sublayer, on each of its rows, Geva et al.'s per-example rate `any_layer_rate` — the fraction
    of prompts on which the sublayer's output names the prediction at some layer — with its interval
    (`any_layer_rate_low/high`, relations then prompts); the same through the final norm
    (`*_normed`); per sublayer, on each of its rows, `best_layer_low`..`best_rate_high`, the intervals of the best
    layer and its rate re-picked in every resample (`best_layer_intervals`). One pass. `engine`: an nnsight engine (`NnsightEngine.read_pass`, on NDIF with
    `ablate --remote`) runs it, and only the events per prompt come back (`end_maths.extraction_events`)."""
    batch = make_batch(model, encoded)
    if engine is None:
        events = _local_events(model, batch, top_k)
    else:
        events = engine.read_pass(model, batch, SUBLAYER_OUTPUTS, batch.ends, extraction_events,
                                  answers=batch.answers, top_k=top_k)["events"]
    tick(progress)
    raw, event = PROJECTIONS.index("raw"), EXTRACTION_EVENTS.index("extraction_rate")
    relations = batch.relations
    picked = [best_layer_intervals(events[:, s, raw, event].float().cpu().numpy(), relations)
              for s in range(len(SUBLAYER_OUTPUTS))]
    any_layer = [_any_layer(events[:, s, raw, event].cpu().numpy(), relations) for s in range(len(SUBLAYER_OUTPUTS))]
    records = []
    for layer in range(model.cfg.n_layers):
        for s, sublayer in enumerate(SUBLAYER_OUTPUTS):
            record = {"layer": layer, "sublayer": sublayer, "n_prompts": len(batch), **picked[s], **any_layer[s]}
            for p, projection in enumerate(PROJECTIONS):
                for e, event in enumerate(EXTRACTION_EVENTS):
                    record[f"{event}{SUFFIXES[projection]}"] = float(events[layer, s, p, e].float().mean())
            records.append({**record, "top_k": top_k})
    return pd.DataFrame.from_records(records)


def _local_events(model: LoadedModel, batch: Batch, top_k: int) -> Bool[torch.Tensor, "layer sublayer projection event batch"]:
    store: dict = {}
    names = {sublayer: [act_name(hook, layer) for layer in range(model.cfg.n_layers)] for sublayer, hook in HOOKS.items()}
    logits = batch.logits(model, [capture(store, name, at_end=batch.ends) for sublayer in SUBLAYER_OUTPUTS
                                  for name in names[sublayer]])
    reads = {sublayer: [store[name] for name in names[sublayer]] for sublayer in SUBLAYER_OUTPUTS}
    with torch.inference_mode():
        return extraction_events({**reads, "logits": logits}, model_lens(model), batch.answers, top_k)["events"]


def _any_layer(events: np.ndarray, relations: list[str]) -> dict[str, float]:
    """events: [layer, prompt]; the fraction of prompts extracted at some layer, and its bootstrap interval."""
    extracted = events.any(axis=0).astype(float)
    low, high = bootstrap.mean_interval(extracted, relations=relations)
    return {"any_layer_rate": float(extracted.mean()), "any_layer_rate_low": np.nan if low is None else low,
            "any_layer_rate_high": np.nan if high is None else high}


BEST_INTERVALS = ("best_layer_low", "best_layer_high", "best_rate_low", "best_rate_high")


def best_layer_intervals(events: np.ndarray, relations: list[str] | None = None) -> dict[str, float]:
    """The layer with the highest extraction rate re-picked in every bootstrap resample of the prompts
    (`bootstrap.resample_weights`): the percentile intervals of that layer and of its rate. A resample in which
    no layer extracts anything has no best layer (its layer is NaN, left out of the layer's interval).
    events: [layer, prompt], 1 where the sublayer's output names the prediction."""
    rates = bootstrap.resample_weights(events.shape[1], relations=relations) @ events.T  # [resample, layer]
    best = rates.max(1)
    layer = np.where(best > 0, rates.argmax(1), np.nan)
    with warnings.catch_warnings():  # no resample with a best layer: its interval is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        (layer_low, layer_high), (rate_low, rate_high) = bootstrap.interval(layer), bootstrap.interval(best)
    return dict(zip(BEST_INTERVALS, map(float, (layer_low, layer_high, rate_low, rate_high))))


def remote_cost(n_layers: int, known: list[Encoded]) -> tuple[int, int, int]:
    """`extraction_rate` through an engine: one request, bringing back one bool per (layer, sublayer, projection,
    event, prompt); nothing sent but the prompts."""
    return 1, n_layers * len(SUBLAYER_OUTPUTS) * len(PROJECTIONS) * len(EXTRACTION_EVENTS) * len(known), 0


def extraction_summary(table: pd.DataFrame) -> dict:
    """The sublayer with the highest extraction rate (raw projection), per sublayer kind, with its rate through the
    final norm where the table has it, and where the table has them the intervals of the best layer and its rate
    re-picked in every resample (`layer_ci`, `extraction_rate_ci`: `best_layer_intervals`). Where no layer
    extracts anything there is no best layer (`layer` None)."""
    out = {}
    for sublayer, rows in table.groupby("sublayer"):
        best = rows.loc[rows["extraction_rate"].idxmax()]
        out[sublayer] = {"layer": int(best["layer"]) if best["extraction_rate"] > 0 else None,
                         "extraction_rate": float(best["extraction_rate"]), "attribute_rate": float(best["attribute_rate"])}
        if "any_layer_rate" in rows:
            out[sublayer]["any_layer_rate"] = float(rows["any_layer_rate"].iloc[0])
            out[sublayer]["any_layer_rate_ci"] = [_none_if_nan(rows["any_layer_rate_low"].iloc[0]),
                                                  _none_if_nan(rows["any_layer_rate_high"].iloc[0])]
        if "best_layer_low" in rows:
            out[sublayer]["layer_ci"] = [_none_if_nan(best["best_layer_low"]), _none_if_nan(best["best_layer_high"])]
            out[sublayer]["extraction_rate_ci"] = [_none_if_nan(best["best_rate_low"]), _none_if_nan(best["best_rate_high"])]
        if "extraction_rate_normed" in rows:
            out[sublayer]["extraction_rate_normed"] = float(best["extraction_rate_normed"])
            out[sublayer]["best_normed"] = {"layer": int(rows.loc[rows["extraction_rate_normed"].idxmax(), "layer"]),
                                            "extraction_rate": float(rows["extraction_rate_normed"].max())}
    return out


def _none_if_nan(value) -> float | None:
    return None if pd.isna(value) else float(value)


CHECK = CausalCheck(
    "extraction_rate", "ablate", ("extraction_rate",), (), lambda n_layers: 1,
    lambda model, known, progress, engine=None: {
        "extraction_rate": extraction_rate(model, known, progress=progress, engine=engine)},
    lambda tables: extraction_summary(tables["extraction_rate"]), remote=True, remote_cost=remote_cost,
)
