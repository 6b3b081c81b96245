"""Attribute extraction rate (Geva et al. 2023): which attention / MLP sublayer's END output, read through the
logit lens, already names the model's prediction?"""

from __future__ import annotations

import pandas as pd
import torch

from ..data import Encoded
from ..forward import act_name, capture, make_batch
from ..models import LoadedModel
from .check import CausalCheck
from .scores import Progress, logit_lens, tick

SUBLAYERS = {"attn": "attn_out", "mlp": "mlp_out"}  # sublayer → the activation read


def extraction_rate(model: LoadedModel, encoded: list[Encoded], top_k: int = 10, progress: Progress = None) -> pd.DataFrame:
    """Per layer and sublayer (attn, mlp): the fraction of prompts whose END output, read through the logit
    lens, has the model's own top-1 prediction at top-1 (`extraction_rate`, Geva et al.'s event), the
    attribute a at top-1 (`attribute_rate`), and the prediction among its `top_k` tokens
    (`extraction_rate_top_k`: small models often rank it a few places down). One pass."""
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
                top = logit_lens(model, store[act_name(hook, layer)]).topk(top_k, dim=-1).indices  # [batch, k]
                records.append(
                    {
                        "layer": layer, "sublayer": sublayer, "n_prompts": len(batch),
                        "extraction_rate": float((top[:, 0] == predicted).float().mean()),
                        "attribute_rate": float((top[:, 0] == batch.answers).float().mean()),
                        "extraction_rate_top_k": float((top == predicted[:, None]).any(1).float().mean()),
                        "top_k": top_k,
                    }
                )
    return pd.DataFrame.from_records(records)


def extraction_summary(table: pd.DataFrame) -> dict:
    """The sublayer with the highest extraction rate, per sublayer kind."""
    out = {}
    for sublayer, rows in table.groupby("sublayer"):
        best = rows.loc[rows["extraction_rate"].idxmax()]
        out[sublayer] = {"layer": int(best["layer"]), "extraction_rate": float(best["extraction_rate"]),
                         "attribute_rate": float(best["attribute_rate"])}
    return out


CHECK = CausalCheck(
    "extraction_rate", "ablate", ("extraction_rate",), (), lambda n_layers: 1,
    lambda model, known, progress: {"extraction_rate": extraction_rate(model, known, progress=progress)},
    lambda tables: extraction_summary(tables["extraction_rate"]),
)
