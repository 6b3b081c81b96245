"""Exact direct logit attribution at END, by component and, for attention heads, by source token group.

The residual stream at END is a sum of parts (embeddings, every head's output, attention output and value biases,
MLP outputs). With the final norm's scale frozen at its clean value the map to a logit is linear, so
each part's logit contribution is `centre(part) / scale · (gain ⊙ u_t)` and the parts, with the constant
`bias · u_t + b_U[t]` (the final norm's bias and the unembedding's), add up to the model's logit. The norm's gain is
applied to the few target columns of W_U only; the model's weights are never folded or copied. Parts accumulate in
fp32 whatever the model's dtype; the reference they must add up to is the model's own final residual at END through
that same map in fp32, so the check holds at every dtype (`taxonomy.TOLERANCES`).
A head's output at END is `Σ_k pattern[h, END, k] · v_k W_O[h]`, so it splits further over source
positions k, which we sum within each token group (bos / prefix / subject / relation).

Two columns per part and target: `value`, its share of the model's own logit (these add up to it), and `centred`,
its DLA to the target minus its DLA to the vocabulary's average unembedding column — the part of a contribution that
raises every logit alike changes no probability, so `centred` is what the paper's (TransformerLens's centred
unembedding) DLA measures and what head classes are read from. Its sum, the model's logit minus its mean logit over
the vocabulary, is checked like the logits themselves.

Architectures whose attention output passes a post-norm (Gemma 3) have that norm's scale frozen too;
its gain is read off the norm module itself, so the head split stays exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from .data import Encoded, relation_targets, token_table
from .errors import FactscopeError
from .memory import release_free_memory
from .forward import (
    Engine, act_name, attn_bias, check_supported, frozen_post_norm, group_onehot, head_group_z_at_end, head_values,
    heads_to_resid, lens_normalise, local_end_activations, pad_batch, pad_id, target_ids, value_bias_per_head,
)
from .end_maths import lens_stats, recall_stats, to_logit, unembed_columns
from .models import LoadedModel
from .rundir import RunDir, write_csv, write_parquet
from .recall import chunks, recall_rows_from_stats
from .taxonomy import GROUPS, TOLERANCES, groups_present

ATTRIBUTION_COLUMNS = {
    "prompt_id": "str", "relation": "str", "target": "str", "is_correct_target": "bool", "component": "str",
    "layer": "int64", "head": "int64", "source": "str", "value": "float32", "centred": "float32", "logit_diff": "float32",
}


@dataclass
class Decomposition:
    """The tables of one analysis; `attributions` is tidy-long (one value per row)."""

    attributions: pd.DataFrame
    logit_lens: pd.DataFrame
    recall: pd.DataFrame
    max_abs_reconstruction_error: float
    max_abs_head_error: float
    max_abs_model_logit_error: float


@dataclass
class BatchResult:
    attributions: pd.DataFrame
    logit_lens: pd.DataFrame
    recall: pd.DataFrame
    reconstruction_error: float
    head_error: float
    model_logit_error: float  # the fp32 reference against the logits the model computed in its own dtype
    prompt_ids: list[str] = field(default_factory=list)


def decompose(
    model: LoadedModel,
    encoded: list[Encoded],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    known_only: bool = True,
    engine: Engine = local_end_activations,
) -> Decomposition:
    """Decompose every prompt's END logits for its correct attribute and all of R_r; keep known facts by default.
    `engine` runs the passes (`forward.Engine`): TransformerLens here, or nnsight (`nnsight_engine`)."""
    results = [result for _, result in iter_decompose(model, encoded, batch_size, progress, known_only, engine=engine)]
    return Decomposition(
        attributions=pd.concat([r.attributions for r in results], ignore_index=True),
        logit_lens=pd.concat([r.logit_lens for r in results], ignore_index=True),
        recall=pd.concat([r.recall for r in results], ignore_index=True),
        max_abs_reconstruction_error=max(r.reconstruction_error for r in results),
        max_abs_head_error=max(r.head_error for r in results),
        max_abs_model_logit_error=max(r.model_logit_error for r in results),
    )


def write_batches(
    run: RunDir,
    model: LoadedModel,
    encoded: list[Encoded],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    known_only: bool = True,
    engine: Engine = local_end_activations,
) -> dict:
    """Decompose batch by batch into a run directory, skipping batches a previous (killed) run finished: each
    batch's tables into run.batches. Returns what `finish_batches` needs of the model, so that the model can be freed
    before it merges them (`analyze` does: the merge beside the weights' pages was its peak)."""
    done = run.done_batches()
    if progress:
        progress(sum(len(batch) for index, batch in enumerate(chunks(encoded, batch_size)) if index in done))
    for index, result in iter_decompose(model, encoded, batch_size, progress, known_only, skip=set(done), engine=engine):
        tables = {"attributions": result.attributions, "logit_lens": result.logit_lens, "recall": result.recall}
        errors = {"reconstruction_error": result.reconstruction_error, "head_error": result.head_error,
                  "model_logit_error": result.model_logit_error}
        run.write_batch(index, tables, errors)
        release_free_memory()  # what the batch freed, before the next one allocates elsewhere (see `memory`)
    return {"prepend_bos": model.prepend_bos, "known_only": known_only, "dtype": model.dtype}


def finish_batches(run: RunDir, encoded: list[Encoded], written: dict) -> dict:
    """The batches `write_batches` wrote (and returned `written` of), merged into attributions.parquet,
    logit_lens.parquet, recall.csv and tokens.parquet; returns the summary entries. Runs no model."""
    run.merge("attributions")
    run.merge("logit_lens")
    recall = run.read_parts("recall")
    write_csv(recall, run.staging / "recall.csv")
    write_parquet(pd.DataFrame(token_table(encoded)), run.staging / "tokens.parquet")
    errors = run.done_batches().values()
    return {
        "prepend_bos": written["prepend_bos"],
        "known_only": written["known_only"],
        "n_prompts": len(recall),
        "n_analysed": int(recall["correct"].sum()) if written["known_only"] else len(recall),
        "accuracy": float(recall["correct"].mean()),
        "max_abs_reconstruction_error": max(meta["reconstruction_error"] for meta in errors),
        "max_abs_head_error": max(meta["head_error"] for meta in errors),
        "max_abs_model_logit_error": max(meta.get("model_logit_error", float("nan")) for meta in errors),
        "dtype": written["dtype"],
        "tolerance": TOLERANCES[written["dtype"]],
    }


def iter_decompose(
    model: LoadedModel,
    encoded: list[Encoded],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    known_only: bool = True,
    skip: set[int] = frozenset(),
    engine: Engine = local_end_activations,
) -> Iterator[tuple[int, BatchResult]]:
    """One batched forward pass per batch of prompts; yields (batch index, tables) so callers can stream them."""
    check_supported(model)
    tolerance = TOLERANCES[model.dtype]
    targets = relation_targets(encoded)
    for index, batch in enumerate(chunks(encoded, batch_size)):
        if index in skip:
            continue
        result = decompose_batch(model, batch, targets, known_only, engine)
        if result.reconstruction_error > tolerance or result.head_error > tolerance:
            raise FactscopeError(
                f"decomposition is not exact on prompts {result.prompt_ids[0]}…{result.prompt_ids[-1]}: "
                f"reconstruction error {result.reconstruction_error:.2e}, head error {result.head_error:.2e} "
                f"(tolerance {tolerance} in {model.dtype}); this architecture needs a term factscope does not model"
            )
        if progress:
            progress(len(batch))
        yield index, result


def hook_names(model: LoadedModel) -> list[str]:
    names = [act_name("embed"), act_name("final_scale")]
    if model.cfg.positional_embedding_type == "standard":
        names.append(act_name("pos_embed"))
    for layer in range(model.cfg.n_layers):
        names += [act_name(kind, layer) for kind in ("v", "pattern", "z", "mlp_out", "resid_post")]
        if model.has_attn_post_norm:
            names.append(act_name("post_norm_scale", layer))
    return names


def decompose_batch(
    model: LoadedModel, batch: list[Encoded], targets: dict[str, dict[int, str]], known_only: bool,
    engine: Engine = local_end_activations,
) -> BatchResult:
    """One batch's tables. The weight-dependent maths run where the weights are: here for an engine that returns
    END activations (`forward.Engine`), or inside the pass for one that has a `project` method (`ProjectingEngine`:
    nnsight on NDIF, which sends back only the small tensors of `EndParts`, so no local copy of the weights exists)."""
    device = model.device
    tokens, mask, ends = pad_batch([item.token_ids for item in batch], pad_id(model.tokenizer))
    target_tokens, target_valid = target_ids(batch, targets, with_answer=True)
    groups = group_onehot(batch, tokens.shape[1])
    answers = torch.tensor([item.attribute_token for item in batch], dtype=torch.long)
    project = getattr(engine, "project", None)
    if project is not None:
        parts = {name: value.to(device) for name, value in
                 project(model, tokens, mask, ends, groups, target_tokens, answers, known_only).items()}
    else:
        parts = _local_parts(model, tokens, mask, ends, groups.to(device), target_tokens.to(device),
                             answers.to(device), known_only, engine)
    with torch.inference_mode():
        heads_t, biases_t, mlps_t = parts["heads"], parts["biases"], parts["mlps"]
        unembed_bias, embed = parts["unembed_bias"], parts["embed"]
        total = embed + heads_t.sum((1, 2, 3)) + biases_t.sum(1) + mlps_t.sum(1) + unembed_bias
        if "pos_embed" in parts:
            total = total + parts["pos_embed"]
        reference = parts["reference"]
        valid = torch.cat([target_valid, torch.ones(len(batch), 1)], dim=1).to(device)  # the average column is checked too
        reconstruction_error = float(((total - reference).abs() * valid).max())
        model_logit_error = float(((reference - parts["model_logits"]).abs() * valid).max())
        head_error = float(((heads_t.sum(3) - parts["head_check"]).abs() * valid[:, None, None]).max())
    recall = pd.DataFrame(recall_rows_from_stats(
        model.tokenizer, batch, {name: parts[f"recall_{name}"].cpu() for name in ("rank", "prob", "logit", "top")}))
    keep = parts["keep"].cpu().numpy()
    lens = _lens_table(model, [item for item, k in zip(batch, keep) if k],
                       [parts[f"lens_{name}"] for name in ("rank", "log_prob", "logit", "top")])

    named = {"embed": embed, "unembed_bias": unembed_bias}
    if "pos_embed" in parts:
        named["pos_embed"] = parts["pos_embed"]
    sources = list(groups_present(model.prepend_bos))
    heads_t = heads_t[:, :, :, [GROUPS.index(group) for group in sources]]
    attributions = _attribution_table(
        batch, targets, target_tokens, target_valid, keep, sources, heads_t.cpu(), biases_t.cpu(), mlps_t.cpu(),
        {name: value.cpu() for name, value in named.items()},
    )
    return BatchResult(
        attributions=attributions,
        logit_lens=lens,
        recall=recall,
        reconstruction_error=reconstruction_error,
        head_error=head_error,
        model_logit_error=model_logit_error,
        prompt_ids=[item.fact.prompt_id for item in batch],
    )


# What a batch's pass is reduced to before any table is built (`end_maths.project_end` computes the same keys where
# the weights are): per part its logit contribution to each target and, last, to the vocabulary's average column
# ("embed", "pos_embed" where there is one, "heads" [batch, layer, head, group, target], "head_check" (the per-head
# totals from hook_z), "biases", "mlps", "unembed_bias", "reference" (the final residual through the same map),
# "model_logits"); the recall statistics ("recall_rank/prob/logit/top"), "keep", and the logit lens of the kept
# prompts ("lens_rank/log_prob/logit/top", [kept · layer]).
EndParts = dict[str, torch.Tensor]


class ProjectingEngine(Protocol):
    def project(
        self, model, tokens: Int[torch.Tensor, "batch pos"], mask: Int[torch.Tensor, "batch pos"],
        ends: Int[torch.Tensor, " batch"], groups: Float[torch.Tensor, "batch pos group"],
        targets: Int[torch.Tensor, "batch target"], answers: Int[torch.Tensor, " batch"], known_only: bool,
    ) -> EndParts: ...


def _local_parts(
    model: LoadedModel,
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Int[torch.Tensor, "batch pos"],
    ends: Int[torch.Tensor, " batch"],
    groups: Float[torch.Tensor, "batch pos group"],
    target_tokens: Int[torch.Tensor, "batch target"],
    answers: Int[torch.Tensor, " batch"],
    known_only: bool,
    engine: Engine,
) -> EndParts:
    """`EndParts` from an engine's END activations and this process's copy of the weights (every architecture
    factscope loads: LayerNorm centring, positional embeddings, attention post-norms)."""
    cfg, device = model.cfg, model.device
    n = len(ends)
    # the engine's tensors are at END already (`forward.Engine`), in fp32 on the unembedding's device
    logits_end, cache = engine(model, tokens, mask, ends.to(device), hook_names(model))
    with torch.inference_mode():
        scale = cache[act_name("final_scale")]  # [batch, 1]
        gain, norm_bias = model.final_norm
        # [d_model, batch, target + 1]: the targets' columns only, and last the vocabulary's average column, whose
        # DLA is the part of each contribution that raises every logit alike ("centred" = value − that)
        columns, unembed = unembed_columns(model.W_U, model.W_U_mean, target_tokens, gain)
        to_logit = _LogitMap(unembed, scale, model.centres)
        parts = {"embed": to_logit(cache[act_name("embed")])}
        if act_name("pos_embed") in cache:
            parts["pos_embed"] = to_logit(cache[act_name("pos_embed")])
        heads, head_check, biases, mlps = [], [], [], []
        for layer in range(cfg.n_layers):
            post_norm = _frozen_post_norm(model, cache, layer)
            by_source, whole = _head_dla(model, cache, layer, groups, to_logit, post_norm)
            heads.append(by_source)
            head_check.append(whole)
            biases.append(_attn_bias_dla(model, layer, n, to_logit, post_norm))
            mlps.append(to_logit(cache[act_name("mlp_out", layer)]))
        # [batch, target]: the final norm's bias and the unembedding's, the same for every input
        b_u = torch.cat([model.b_U[target_tokens].float(), model.b_U.mean(dtype=torch.float32).expand(n, 1)], dim=1)
        unembed_bias = b_u + torch.einsum("d,dbt->bt", norm_bias, columns)
        parts |= {
            "heads": torch.stack(heads, dim=1), "head_check": torch.stack(head_check, dim=1),
            "biases": torch.stack(biases, dim=1), "mlps": torch.stack(mlps, dim=1), "unembed_bias": unembed_bias,
            "reference": to_logit(cache[act_name("resid_post", cfg.n_layers - 1)]) + unembed_bias,
            "model_logits": torch.cat([logits_end.gather(1, target_tokens), logits_end.mean(1, keepdim=True)], dim=1),
        }
        recall = recall_stats(logits_end.cpu(), answers.cpu())
        parts |= {f"recall_{name}": value for name, value in recall.items()}
        keep = recall["top"][:, 0] == answers.cpu() if known_only else torch.ones(n, dtype=torch.bool)
        parts["keep"] = keep
        kept = torch.arange(n, device=device)[keep.to(device)]
        resid = torch.stack([cache[act_name("resid_post", layer)][kept] for layer in range(cfg.n_layers)], dim=1)
        resid = lens_normalise(model, resid)  # [kept, layer, d_model]
        lens = lens_stats(resid.reshape(-1, cfg.d_model), answers[kept].repeat_interleave(cfg.n_layers), model.W_U,
                          model.b_U)
        parts |= {f"lens_{name}": value for name, value in zip(("rank", "log_prob", "logit", "top"), lens)}
    return parts


class _LogitMap:
    """Residual-stream vector at END → its logit contribution to each target, final norm scale frozen."""

    def __init__(self, unembed: Float[torch.Tensor, "batch d_model target"], scale: Float[torch.Tensor, "batch 1"], centre: bool):
        self.unembed, self.scale, self.centre = unembed, scale, centre

    def __call__(self, vectors: Float[torch.Tensor, "batch *parts d_model"]) -> Float[torch.Tensor, "batch *parts target"]:
        if self.centre:  # LayerNorm subtracts the mean; a linear map, so it distributes over the parts
            vectors = vectors - vectors.mean(-1, keepdim=True)
        return to_logit(vectors, self.scale, self.unembed)


def _head_dla(
    model: LoadedModel,
    cache: dict[str, torch.Tensor],
    layer: int,
    groups: Float[torch.Tensor, "batch pos group"],
    to_logit: _LogitMap,
    post_norm: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[Float[torch.Tensor, "batch head group target"], Float[torch.Tensor, "batch head target"]]:
    """Per head and source group DLA, and per head DLA from hook_z (an independent path) for the exactness check."""
    values = head_values(model, layer, cache[act_name("v", layer)])
    z_by_group = head_group_z_at_end(cache[act_name("pattern", layer)], values, groups)
    w_o = model.W_O(layer).float().to(z_by_group.device)  # [head, d_head, d_model]
    out_by_group = heads_to_resid(z_by_group, w_o)
    z_whole = cache[act_name("z", layer)]
    b_v = value_bias_per_head(model, layer)
    if b_v is not None:
        z_whole = z_whole - b_v.to(z_whole.device)
    out_whole = torch.einsum("bhd,hdm->bhm", z_whole, w_o)
    return to_logit(post_norm(out_by_group)), to_logit(post_norm(out_whole))


def _attn_bias_dla(
    model: LoadedModel, layer: int, n_prompts: int, to_logit: _LogitMap, post_norm: Callable[[torch.Tensor], torch.Tensor]
) -> Float[torch.Tensor, "batch target"]:
    bias = attn_bias(model, layer)
    if bias is None:
        return torch.zeros(n_prompts, to_logit.unembed.shape[-1], device=to_logit.unembed.device)
    return to_logit(post_norm(bias.to(to_logit.unembed.device).expand(n_prompts, -1)))


def _frozen_post_norm(
    model: LoadedModel, cache: dict[str, torch.Tensor], layer: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The attention post-norm (Gemma) with its clean scale at END (`forward.frozen_post_norm`); the identity
    where there is none."""
    if not model.has_attn_post_norm:
        return lambda vectors: vectors
    return frozen_post_norm(model.post_norm_gain(layer), cache[act_name("post_norm_scale", layer)])


def _lens_table(model: LoadedModel, batch: list[Encoded], stats: list[torch.Tensor]) -> pd.DataFrame:
    """The logit lens of the kept prompts (`batch`) from `end_maths.lens_stats` over the accumulated residual after
    each layer, normalised by its own scale (not frozen), at END: rank, log-probability, logit, top token."""
    rank, log_prob, logit, top = (value.cpu() for value in stats)
    n_layers = model.cfg.n_layers
    table = pd.DataFrame(
        {
            "prompt_id": np.repeat([item.fact.prompt_id for item in batch], n_layers).astype(object),
            "layer": np.tile(np.arange(n_layers), len(batch)),
            "rank": rank.numpy(),
            "prob": log_prob.exp().numpy(),
            "logit": logit.numpy(),
        }
    )
    table["top_token"] = [model.tokenizer.decode([t]) for t in top.tolist()]
    return table.astype({"prompt_id": "str", "top_token": "str"})  # typed even when no prompt of the batch is kept


_lens_stats = lens_stats  # its former name here

def _attribution_table(
    batch: list[Encoded],
    targets: dict[str, dict[int, str]],
    target_ids: Int[torch.Tensor, "batch target"],
    target_valid: Float[torch.Tensor, "batch target"],
    keep: np.ndarray,
    sources: list[str],
    heads: Float[torch.Tensor, "batch layer head source target_and_mean"],
    biases: Float[torch.Tensor, "batch layer target_and_mean"],
    mlps: Float[torch.Tensor, "batch layer target_and_mean"],
    parts: dict[str, Float[torch.Tensor, "batch target_and_mean"]],
) -> pd.DataFrame:
    """Dense per-batch arrays → the tidy long table, one row per (prompt, target, component, layer, head, source).
    Each array's last target column is the vocabulary's average column: it becomes every row's `centred`.

    Rows are grouped by prompt in batch order, so the table does not depend on how prompts were batched.
    """
    valid = target_valid.numpy().astype(bool) & np.asarray(keep, dtype=bool)[:, None]  # [batch, target]
    if not valid.any():
        return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in ATTRIBUTION_COLUMNS.items()})
    components = ["attn", "bias", "mlp", *parts]
    labels = [*sources, "all"]
    blocks = [
        _block(0, heads, ("layer", "head", "source"), target_valid),
        _block(1, biases, ("layer",), target_valid),
        _block(2, mlps, ("layer",), target_valid),
        *(_block(3 + i, value[:, None], ("",), target_valid) for i, value in enumerate(parts.values())),
    ]
    columns = {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}
    rows, target_index = columns.pop("row"), columns.pop("target_index")
    kept = valid[rows, target_index]
    pick = np.flatnonzero(kept)[np.argsort(rows[kept], kind="stable")]
    rows, target_index = rows[pick], target_index[pick]
    # The correct target comes first and carries the fact's own spelling, even when another attribute of the
    # relation shares its first token (" yen" / " yuan") and so names that token elsewhere.
    names = [
        name
        for item, ids in zip(batch, target_ids.tolist())
        for name in [item.fact.attribute, *(targets[item.fact.relation].get(t, "") for t in ids[1:])]
    ]
    data = {
        "prompt_id": _strings([item.fact.prompt_id for item in batch], rows),
        "relation": _strings([item.fact.relation for item in batch], rows),
        "target": _strings(names, rows * target_ids.shape[1] + target_index),
        "is_correct_target": target_index == 0,
        "component": _strings(components, columns.pop("component")[pick]),
        "source": _strings(labels, columns.pop("source")[pick]),
        **{key: value[pick] for key, value in columns.items()},
    }
    # built in the table's column order: reordering a built frame would copy every column once more
    return pd.DataFrame({name: data.pop(name) for name in ATTRIBUTION_COLUMNS})


def _strings(values: list[str], index: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """values[index] as a pandas string column, gathered by Arrow: far faster than building it from Python objects."""
    return pd.array(values, dtype="str").take(index)


def _block(
    component: int, with_mean: Float[torch.Tensor, "batch *axes target_and_mean"], axes: tuple[str, ...],
    target_valid: Float[torch.Tensor, "batch target"],
) -> dict:
    """values: [batch, *axes, target (+ the vocabulary's average last)] → flat columns; layer/head are −1 and source
    is "all" (code −1) where absent."""
    values, uniform = with_mean[..., :-1], with_mean[..., -1:]
    valid = target_valid.reshape(target_valid.shape[0], *([1] * len(axes)), -1)  # broadcast over the axes
    n_targets = target_valid.sum(-1).reshape(valid.shape[0], *([1] * (len(axes) + 1)))
    # each target's value against the mean of the relation's other attributes (a − mean(R \ a) for the correct one)
    others = ((values * valid).sum(-1, keepdim=True) - values) / (n_targets - 1)
    logit_diff = torch.where(n_targets > 1, values - others, torch.full_like(values, float("nan")))
    index = np.indices(values.shape).reshape(values.dim(), -1)
    named = dict(zip(axes, index[1:-1]))
    size = index.shape[1]
    return {
        "row": index[0],
        "target_index": index[-1],
        "component": np.full(size, component),
        "layer": named.get("layer", np.full(size, -1)),
        "head": named.get("head", np.full(size, -1)),
        "source": named.get("source", np.full(size, -1)),
        "value": values.reshape(-1).numpy().astype(np.float32),
        "centred": (values - uniform).reshape(-1).numpy().astype(np.float32),
        "logit_diff": logit_diff.reshape(-1).numpy().astype(np.float32),
    }
