"""Attribute extraction rate (Geva et al. 2023): which attention / MLP sublayer's END output, projected to the
vocabulary, already names the model's prediction?

As Geva et al.'s dissection notebook does, the output is projected with the raw unembedding matrix (no final norm,
no bias). Through the final norm (the logit lens with the vector's own scale) is kept as a second reading: the
norm's gain reweights the directions of the residual stream, so the two can rank tokens differently.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float

from ..data import Encoded
from ..forward import act_name, capture, make_batch
from ..models import LoadedModel
from .check import CausalCheck
from .scores import Progress, logit_lens, tick

SUBLAYERS = {"attn": "attn_out", "mlp": "mlp_out"}  # sublayer → the activation read


def raw_projection(model: LoadedModel, vectors: Float[torch.Tensor, "batch d_model"]) -> Float[torch.Tensor, "batch vocab"]:
    """Residual-stream vectors times the unembedding matrix, nothing else (Geva et al.'s projection)."""
    return (vectors.to(model.W_U.dtype) @ model.W_U).float()


def extraction_rate(model: LoadedModel, encoded: list[Encoded], top_k: int = 10, progress: Progress = None) -> pd.DataFrame:
    """Per layer and sublayer (attn, mlp): the fraction of prompts whose END output, projected with the raw
    unembedding, has the model's own top-1 prediction at top-1 (`extraction_rate`, Geva et al.'s event), the
    attribute a at top-1 (`attribute_rate`), and the prediction among its `top_k` tokens
    (`extraction_rate_top_k`: small models often rank it a few places down); the same through the final norm
    (`*_normed`). One pass."""
    batch = make_batch(model, encoded)
    store: dict = {}
    names = [act_name(hook, layer) for layer in range(model.cfg.n_layers) for hook in SUBLAYERS.values()]
    logits = batch.logits(model, [capture(store, name, at_end=batch.ends) for name in names])
    tick(progress)
    predicted = logits.argmax(-1)
    records = []
    with torch.inference_mode():
        for layer in range(model.cfg.n_layers):
            for sublayer, hook in SUBLAYERS.items():
                output = store[act_name(hook, layer)]
                record = {"layer": layer, "sublayer": sublayer, "n_prompts": len(batch)}
                for suffix, project in (("", raw_projection), ("_normed", logit_lens)):
                    top = project(model, output).topk(top_k, dim=-1).indices  # [batch, k]
                    record[f"extraction_rate{suffix}"] = float((top[:, 0] == predicted).float().mean())
                    record[f"attribute_rate{suffix}"] = float((top[:, 0] == batch.answers).float().mean())
                    record[f"extraction_rate_top_k{suffix}"] = float((top == predicted[:, None]).any(1).float().mean())
                records.append({**record, "top_k": top_k})
    return pd.DataFrame.from_records(records)


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
    lambda model, known, progress: {"extraction_rate": extraction_rate(model, known, progress=progress)},
    lambda tables: extraction_summary(tables["extraction_rate"]),
)
