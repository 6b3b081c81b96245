"""Attribute extraction rate (Geva et al. 2023): which attention / MLP sublayer's END output, projected to the
vocabulary, already names the model's prediction?

As Geva et al.'s dissection notebook does, the output is projected with the raw unembedding matrix (no final norm,
no bias). Through the final norm (the logit lens with the vector's own scale) is kept as a second reading: the
norm's gain reweights the directions of the residual stream, so the two can rank tokens differently.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Bool

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
    (`*_normed`). One pass. `engine`: an nnsight engine (`NnsightEngine.read_pass`, on NDIF with
    `ablate --remote`) runs it, and only the events per prompt come back (`end_maths.extraction_events`)."""
    batch = make_batch(model, encoded)
    if engine is None:
        events = _local_events(model, batch, top_k)
    else:
        events = engine.read_pass(model, batch, SUBLAYER_OUTPUTS, batch.ends, extraction_events,
                                  answers=batch.answers, top_k=top_k)["events"]
    tick(progress)
    records = []
    for layer in range(model.cfg.n_layers):
        for s, sublayer in enumerate(SUBLAYER_OUTPUTS):
            record = {"layer": layer, "sublayer": sublayer, "n_prompts": len(batch)}
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


def remote_cost(n_layers: int, known: list[Encoded]) -> tuple[int, int, int]:
    """`extraction_rate` through an engine: one request, bringing back one bool per (layer, sublayer, projection,
    event, prompt); nothing sent but the prompts."""
    return 1, n_layers * len(SUBLAYER_OUTPUTS) * len(PROJECTIONS) * len(EXTRACTION_EVENTS) * len(known), 0


def extraction_summary(table: pd.DataFrame) -> dict:
    """The sublayer with the highest extraction rate (raw projection), per sublayer kind, with its rate through the
    final norm where the table has it."""
    out = {}
    for sublayer, rows in table.groupby("sublayer"):
        best = rows.loc[rows["extraction_rate"].idxmax()]
        out[sublayer] = {"layer": int(best["layer"]), "extraction_rate": float(best["extraction_rate"]),
                         "attribute_rate": float(best["attribute_rate"])}
        if "extraction_rate_normed" in rows:
            out[sublayer]["extraction_rate_normed"] = float(best["extraction_rate_normed"])
            out[sublayer]["best_normed"] = {"layer": int(rows.loc[rows["extraction_rate_normed"].idxmax(), "layer"]),
                                            "extraction_rate": float(rows["extraction_rate_normed"].max())}
    return out


CHECK = CausalCheck(
    "extraction_rate", "ablate", ("extraction_rate",), (), lambda n_layers: 1,
    lambda model, known, progress, engine=None: {
        "extraction_rate": extraction_rate(model, known, progress=progress, engine=engine)},
    lambda tables: extraction_summary(tables["extraction_rate"]), remote=True, remote_cost=remote_cost,
)
