"""Subject enrichment: the logit lens at the LAST SUBJECT token, layer by layer. From which layer is the
attribute decodable there, before END ever reads it?"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

from ..causal_readings import mlp0_split
from ..data import Encoded, relation_targets
from ..end_maths import lens_ranks
from ..forward import Batch, act_name, capture, make_batch, target_ids
from ..models import LoadedModel
from .check import CausalCheck
from .scores import Progress, finite_mean, model_lens, other_targets, tick

RANK_BYTES = 8  # a rank comes back as int64 (`end_maths.answer_ranks`)


def subject_enrichment(
    model: LoadedModel,
    encoded: list[Encoded],
    targets: dict[str, dict[int, str]] | None = None,
    top_k: int = 10,
    progress: Progress = None,
    engine=None,
) -> pd.DataFrame:
    """Logit lens on the residual stream after every layer at the LAST SUBJECT token: the rank of a (1 = top)
    and of the other attributes of its relation R_r \\ a. One pass. `engine`: an nnsight engine
    (`NnsightEngine.read_pass`, on NDIF with `ablate --remote`) runs it, and only the ranks come back
    (`end_maths.lens_ranks`).

    Columns: `layer`, `mean_rank_a`, `median_rank_a`, `frac_a_top_k` (rank ≤ `top_k`), `mean_rank_others`
    (mean over prompts of the mean rank of R_r \\ a), `median_rank_others`, `frac_a_above_others` (a outranks
    every other attribute of R_r), `n_prompts`.
    """
    batch = make_batch(model, encoded)
    last_subject = torch.tensor([item.subject_positions[-1] for item in encoded], device=model.device)
    ids, valid = other_targets(batch, targets if targets is not None else relation_targets(encoded))
    ranked = torch.cat([batch.answers[:, None], ids], dim=1)  # a, then R_r ∖ a
    if engine is None:
        ranks = _local_ranks(model, batch, last_subject, ranked)
    else:
        ranks = engine.read_pass(model, batch, ("resid",), last_subject, lens_ranks, ids=ranked)["ranks"]
    tick(progress)
    ranks = ranks.to(valid.device)
    records = []
    for layer in range(model.cfg.n_layers):
        rank_a, rank_others = ranks[layer, :, 0].float(), ranks[layer, :, 1:].float()
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


def _local_ranks(model: LoadedModel, batch: Batch, last_subject: Int[torch.Tensor, " batch"],
                 ids: Int[torch.Tensor, "batch n"]) -> Int[torch.Tensor, "layer batch n"]:
    store: dict = {}
    names = [act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    batch.logits(model, [capture(store, name, at_end=last_subject) for name in names])
    with torch.inference_mode():
        return lens_ranks({"resid": [store[name] for name in names]}, model_lens(model), ids)["ranks"]


def remote_cost(n_layers: int, known: list[Encoded], targets: dict[str, dict[int, str]] | None) -> tuple[int, int, int]:
    """`subject_enrichment` through an engine: one request, bringing back per layer and prompt the ranks of a and
    of the widest R_r \\ a of the prompts; nothing sent but the prompts and R_r."""
    ids, _ = target_ids(known, targets if targets is not None else relation_targets(known), with_answer=False)
    return 1, n_layers * len(known) * (1 + ids.shape[1]) * RANK_BYTES, 0


def enrichment_summary(enrichment: pd.DataFrame, trace: pd.DataFrame | None = None) -> dict:
    """From which layer a is decodable at the last subject token (median rank ≤ top_k, and a outranking the
    rest of R_r for most prompts), next to the causal-tracing peak of the MLP windows at that token, with the
    intervals of its layer and size re-picked in every resample where the trace has them
    (`trace._peak_intervals`), and MLP0 apart from that window (`mlp0`: `trace.mlp0_split`)."""
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
            for name, column in (("layer", "peak_layer"), ("effect", "peak_effect")):
                if f"{column}_low" in peak:
                    summary[f"mlp_trace_peak_{name}_ci"] = [None if pd.isna(peak[f"{column}_{end}"]) else float(peak[f"{column}_{end}"])
                                                            for end in ("low", "high")]
            split = mlp0_split(trace)
            if split is not None:
                summary["mlp0"] = split
    return summary


CHECK = CausalCheck(
    "enrichment", "ablate", ("enrichment",), ("targets",), lambda n_layers, targets: 1,
    lambda model, known, progress, targets, engine=None: {
        "enrichment": subject_enrichment(model, known, targets, progress=progress, engine=engine)},
    # the causal-tracing peak joins it when the run has been traced
    lambda tables: enrichment_summary(tables["enrichment"], tables.get("causal_trace")),
    remote=True, remote_cost=remote_cost,
)
