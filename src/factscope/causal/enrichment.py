"""Subject enrichment: the logit lens at the LAST SUBJECT token, layer by layer. From which layer is the
attribute decodable there, before END ever reads it?"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from ..data import Encoded, relation_targets
from ..forward import act_name, capture, make_batch
from ..models import LoadedModel
from .check import CausalCheck
from .scores import Progress, finite_mean, logit_lens, other_targets, tick


def subject_enrichment(
    model: LoadedModel,
    encoded: list[Encoded],
    targets: dict[str, dict[int, str]] | None = None,
    top_k: int = 10,
    progress: Progress = None,
) -> pd.DataFrame:
    """Logit lens on the residual stream after every layer at the LAST SUBJECT token: the rank of a (1 = top)
    and of the other attributes of its relation R_r \\ a. One pass.

    Columns: `layer`, `mean_rank_a`, `median_rank_a`, `frac_a_top_k` (rank ≤ `top_k`), `mean_rank_others`
    (mean over prompts of the mean rank of R_r \\ a), `median_rank_others`, `frac_a_above_others` (a outranks
    every other attribute of R_r), `n_prompts`.
    """
    batch = make_batch(model, encoded)
    last_subject = torch.tensor([item.subject_positions[-1] for item in encoded], device=model.device)
    ids, valid = other_targets(batch, targets if targets is not None else relation_targets(encoded))
    store: dict = {}
    names = [act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    batch.logits(model, [capture(store, name, at_end=last_subject) for name in names])
    tick(progress)
    records = []
    with torch.inference_mode():
        for layer, name in enumerate(names):
            logits = logit_lens(model, store[name])
            rank_a = _ranks(logits, batch.answers[:, None])[:, 0].float()
            rank_others = _ranks(logits, ids).float()
            count = valid.sum(1)
            mean_others = torch.where(count > 0, (rank_others * valid).sum(1) / count.clamp(min=1), torch.nan)
            best_other = torch.where(valid > 0, rank_others, torch.inf).min(1).values
            records.append(
                {
                    "layer": layer, "mean_rank_a": float(rank_a.mean()), "median_rank_a": float(rank_a.median()),
                    "frac_a_top_k": float((rank_a <= top_k).float().mean()), "top_k": top_k,
                    "mean_rank_others": finite_mean(mean_others.cpu().numpy()),
                    "median_rank_others": float(np.nanmedian(mean_others.cpu().numpy())) if (count > 0).any() else float("nan"),
                    "frac_a_above_others": float((rank_a < best_other).float().mean()),
                    "n_prompts": len(batch),
                }
            )
    return pd.DataFrame.from_records(records)


def _ranks(logits: Float[torch.Tensor, "batch vocab"], ids: Int[torch.Tensor, "batch n"]) -> Int[torch.Tensor, "batch n"]:
    # one column at a time: a [batch, n, vocab] comparison would not fit for Gemma's 262k vocabulary
    chosen = logits.gather(1, ids)
    return torch.stack([(logits > chosen[:, [j]]).sum(-1) + 1 for j in range(ids.shape[1])], dim=1)


def enrichment_summary(enrichment: pd.DataFrame, trace: pd.DataFrame | None = None) -> dict:
    """From which layer a is decodable at the last subject token (median rank ≤ top_k, and a outranking the
    rest of R_r for most prompts), next to the causal-tracing peak of the MLP windows at that token."""
    top_k = int(enrichment["top_k"].iloc[0])
    decodable = enrichment[enrichment["median_rank_a"] <= top_k]
    above = enrichment[enrichment["frac_a_above_others"] > 0.5]
    summary = {
        "top_k": top_k,
        "a_decodable_from_layer": int(decodable["layer"].min()) if len(decodable) else None,
        "a_above_others_from_layer": int(above["layer"].min()) if len(above) else None,
        "best_layer_median_rank_a": int(enrichment.loc[enrichment["median_rank_a"].idxmin(), "layer"]),
        "min_median_rank_a": float(enrichment["median_rank_a"].min()),
    }
    if trace is not None:
        mlp = trace[(trace["kind"] == "mlp") & (trace["token"] == "last_subject")]
        if len(mlp):
            peak = mlp.loc[mlp["indirect_effect"].idxmax()]
            summary["mlp_trace_peak_layer"] = int(peak["layer"])
            summary["mlp_trace_peak_effect"] = float(peak["indirect_effect"])
    return summary


CHECK = CausalCheck(
    "enrichment", "ablate", ("enrichment",), ("targets",), lambda n_layers, targets: 1,
    lambda model, known, progress, targets: {"enrichment": subject_enrichment(model, known, targets, progress=progress)},
    # the causal-tracing peak joins it when the run has been traced
    lambda tables: enrichment_summary(tables["enrichment"], tables.get("causal_trace")),
)
