"""Attention knockout (Geva et al. 2023): END may not attend to a token group, in a window of layers slid over
the model or in a named set of heads; how much do p(a), a's logit and accuracy fall?

What can be blocked: any token group of `taxonomy.GROUPS` (or several at once), or `non_subject`, Geva et al.'s
"non-subject positions": every position but the subject's own and END. The subject group leaves out position 0
(the `first` group, the attention sink) even when the subject starts the prompt, so END↛subject measures the
subject's tokens and END↛first the sink; `non_subject` follows Geva and spares every subject position."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float

from .. import bootstrap
from ..data import Encoded
from ..end_maths import end_block
from ..errors import FactscopeError
from ..forward import Batch, Hook, act_name, make_batch
from ..models import LoadedModel
from ..remote import SCORE_BYTES
from ..taxonomy import GROUPS
from .check import CausalCheck
from .edits import freeze_final_scale_hook
from .scores import Progress, as_numpy, finite_mean, scores, tick
from .sites import head_mask, layer_window

GroupSpec = str | tuple[str, ...]
NON_SUBJECT = "non_subject"
WINDOW = 9
BLOCKED = ("subject", "relation")  # `knockout`'s default; `ablate` blocks `blocked_groups(...)`


def blocked_groups(prepend_bos: bool) -> tuple[str, ...]:
    """What `ablate` knocks out: the subject, the sink (when the model has one at position 0), the relation, END
    itself and Geva's non-subject positions."""
    sink = () if prepend_bos else ("first",)
    return ("subject", *sink, "relation", "end", NON_SUBJECT)


def blocked_keys(batch: Batch, blocked: GroupSpec) -> Bool[torch.Tensor, "batch pos"]:
    """Key positions END may not attend to. END→END is blocked only when `end` is named; a knockout that would
    leave END no key at all is refused (the softmax would be 0/0)."""
    if blocked == NON_SUBJECT:
        keys = (batch.mask > 0) & ~batch.subject
        keys[batch.rows, batch.ends] = False
    else:
        names = (blocked,) if isinstance(blocked, str) else tuple(blocked)
        unknown = [name for name in names if name not in GROUPS]
        if unknown:
            raise FactscopeError(f"unknown token group {unknown[0]!r} (use {', '.join(GROUPS)} or {NON_SUBJECT})")
        keys = batch.onehot[..., [GROUPS.index(name) for name in names]].sum(-1) > 0
    if (keys | (batch.mask == 0)).all(1).any():
        raise FactscopeError(f"knockout of {_group_name(blocked)!r} leaves END nothing to attend to")
    return keys


def knockout_hooks(model: LoadedModel, batch: Batch, blocked: GroupSpec, heads: Bool[torch.Tensor, "layer head"]) -> list[Hook]:
    """−inf on the scores END→blocked keys of the chosen heads, before the softmax. Every layer gets a hook
    (a no-op where no head is chosen), so an empty head set exercises the same code path."""
    keys = blocked_keys(batch, blocked)  # [batch, key]
    query_is_end = end_queries(batch)

    def make(layer_heads: Bool[torch.Tensor, " head"]):
        def hook(scores: Float[torch.Tensor, "batch head query key"], hook):
            return scores.masked_fill(end_block(layer_heads, query_is_end, keys), float("-inf"))

        return hook

    return [(act_name("attn_scores", layer), make(heads[layer])) for layer in range(model.cfg.n_layers)]


def end_queries(batch: Batch) -> Bool[torch.Tensor, "batch query"]:
    """True at each prompt's END: the one query a knockout edits."""
    query_is_end = torch.zeros(batch.tokens.shape, dtype=torch.bool, device=batch.tokens.device)
    query_is_end[batch.rows, batch.ends] = True
    return query_is_end


def knockout_logits(
    model: LoadedModel,
    encoded: list[Encoded] | Batch,
    blocked: GroupSpec,
    heads: Iterable[tuple[int, int]],
    freeze_final_scale: bool = False,
) -> Float[torch.Tensor, "batch vocab"]:
    """END logits with END→`blocked` attention cut for the given (layer, head) pairs (optionally with the
    final norm's scale pinned to its clean value, to compare with DLA)."""
    batch = encoded if isinstance(encoded, Batch) else make_batch(model, encoded)
    hooks = knockout_hooks(model, batch, blocked, head_mask(model, heads))
    if freeze_final_scale:
        hooks.append(freeze_final_scale_hook(model, batch))
    return batch.logits(model, hooks)


def knockout(
    model: LoadedModel,
    encoded: list[Encoded],
    blocked: Sequence[GroupSpec] = BLOCKED,
    window: int = WINDOW,
    heads: dict[str, Iterable[tuple[int, int]]] | None = None,
    progress: Progress = None,
    engine=None,
) -> pd.DataFrame:
    """Knock out END→group attention for a window of layers slid over the model, or for named sets of heads
    (`heads={"subject_heads": [(23, 4), ...]}`, instead of the windows). `engine`: an nnsight engine
    (`NnsightEngine.knockout`, on NDIF with `ablate --remote`) runs each pass and sends back only the scores.

    One row per (blocked group, window or head set): `condition` ("window" | "heads"), `head_set` (the set's
    name; "window" for windows), `layer` (window centre; −1 for a head set), `first_layer`, `last_layer`,
    `n_heads`, `blocked`, `n_prompts`, mean `p_before`/`p_after`, `rel_change_p` (mean of
    (p_after − p_before)/p_before), `delta_logit` (mean change in a's logit), `accuracy_before`/`accuracy_after`.
    "relation" means the relation tokens other than END itself; `blocked` names are as `blocked_keys` takes them.
    On the window rows, per blocked group, `worst_layer_low`..`worst_rel_change_p_high`: the intervals of the worst
    window's centre and size, re-picked in every resample (`worst_window_intervals`).
    Passes: `knockout_passes`.
    """
    batch = make_batch(model, encoded)
    cfg = model.cfg
    before = _knockout_scores(model, batch, None, [], engine)
    tick(progress)
    if heads is not None:
        conditions = []
        for name, pairs in heads.items():
            pairs = list(pairs)
            layers = [layer for layer, _ in pairs] or [-1]
            conditions.append(("heads", name, -1, min(layers), max(layers), pairs))
    else:
        conditions = []
        for center in range(cfg.n_layers):
            first, last = layer_window(center, window, cfg.n_layers)
            pairs = [(layer, head) for layer in range(first, last + 1) for head in range(cfg.n_heads)]
            conditions.append(("window", "window", center, first, last, pairs))
    records = []
    for spec in blocked:
        changes = []
        for condition, name, center, first, last, pairs in conditions:
            after = _knockout_scores(model, batch, spec, pairs, engine)
            tick(progress)
            changes.append((after["prob"] - before["prob"]) / before["prob"])
            records.append(
                {
                    "condition": condition, "head_set": name, "layer": center, "first_layer": first,
                    "last_layer": last, "n_heads": len(pairs), "blocked": _group_name(spec), "n_prompts": len(batch),
                    "n_relations": bootstrap.count_relations(batch.relations), **_before_after(before, after, batch.relations),
                }
            )
        if heads is None:  # the windows of this group: the worst one is picked from them
            picked = worst_window_intervals(np.stack(changes), np.array([c[2] for c in conditions]), batch.relations)
            for record in records[-len(conditions):]:
                record.update(picked)
    return pd.DataFrame.from_records(records)


WORST_INTERVALS = ("worst_layer_low", "worst_layer_high", "worst_rel_change_p_low", "worst_rel_change_p_high")


def worst_window_intervals(changes: np.ndarray, centres: np.ndarray, relations: list[str] | None = None) -> dict[str, float]:
    """The worst window (the most negative mean relative change of p(a)) re-picked in every bootstrap resample of
    the prompts (`bootstrap.resample_weights`: relations, then prompts, given enough `relations`): the percentile
    intervals of its centre layer and of its size.
    changes: [window, prompt] each prompt's (p_after − p_before)/p_before (NaN where p_before is 0: left out)."""
    finite = np.isfinite(changes)
    weights = bootstrap.resample_weights(changes.shape[1], relations=relations)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = (weights @ np.where(finite, changes, 0).T) / (weights @ finite.T)  # [resample, window]
    means = np.where(np.isfinite(means), means, np.inf)  # a window no resampled prompt has is never the worst
    pick = means.argmin(1)
    (layer_low, layer_high), (size_low, size_high) = (bootstrap.interval(centres[pick].astype(float)),
                                                      bootstrap.interval(means[np.arange(len(pick)), pick]))
    return dict(zip(WORST_INTERVALS, map(float, (layer_low, layer_high, size_low, size_high))))


def _knockout_scores(model: LoadedModel, batch: Batch, blocked: GroupSpec | None, pairs: list[tuple[int, int]],
                     engine) -> dict:
    """`scores` of one pass with END→`blocked` cut for `pairs` (a clean pass: `blocked` None), here or through
    `engine`, which applies the same cut (`end_maths.end_block`) where the model runs."""
    if engine is None:
        return scores(batch.logits(model) if blocked is None else knockout_logits(model, batch, blocked, pairs), batch)
    keys = torch.zeros_like(batch.subject) if blocked is None else blocked_keys(batch, blocked)
    return as_numpy(engine.knockout(model, batch, end_queries(batch), keys, head_mask(model, pairs)))


def knockout_passes(n_layers: int, blocked: Sequence[GroupSpec] = BLOCKED, heads: dict | None = None) -> int:
    """How many times `knockout` calls `progress(1)` with these arguments."""
    return 1 + len(blocked) * (len(heads) if heads is not None else n_layers)


def _group_name(spec: GroupSpec) -> str:
    return spec if isinstance(spec, str) else "+".join(spec)


def _before_after(before: dict, after: dict, relations: list[str] | None = None) -> dict:
    """Means over prompts, and a bootstrap interval (`bootstrap.mean_interval`) of each change and of the accuracy
    after: paired, every prompt against its own clean run."""
    changes = {
        "rel_change_p": (after["prob"] - before["prob"]) / before["prob"],
        "delta_logit": after["logit"] - before["logit"],
        "accuracy_after": after["correct"],
    }
    out = {
        "p_before": finite_mean(before["prob"]),
        "p_after": finite_mean(after["prob"]),
        **{name: finite_mean(values) for name, values in changes.items()},
        "accuracy_before": finite_mean(before["correct"]),
    }
    for name, values in changes.items():
        low, high = bootstrap.mean_interval(values, relations=relations)
        out[f"{name}_low"], out[f"{name}_high"] = _nan_if_none(low), _nan_if_none(high)
    return out


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def knockout_summary(table: pd.DataFrame) -> dict:
    """Per blocked group, the window that hurts p(a) most (its centre `layer`, and where the table has them
    `layer_ci` and `picked_rel_change_p_ci`: the intervals of the worst window's centre and size re-picked in every
    resample, `worst_window_intervals`; `rel_change_p_ci` is that one window's own interval, which ignores the
    pick); and each head-set knockout."""
    out = {}
    for (condition, blocked), rows in table.groupby(["condition", "blocked"]):
        worst = rows.loc[rows["rel_change_p"].idxmin()]
        key = f"{blocked}_worst_window" if condition == "window" else f"{worst['head_set']}_to_{blocked}"
        out[key] = {
            "layers": [int(worst["first_layer"]), int(worst["last_layer"])], "n_heads": int(worst["n_heads"]),
            "rel_change_p": float(worst["rel_change_p"]), "delta_logit": float(worst["delta_logit"]),
            "accuracy_after": float(worst["accuracy_after"]),
        }
        if condition == "window" and "layer" in worst:
            out[key]["layer"] = int(worst["layer"])
            if "worst_layer_low" in worst:
                out[key]["layer_ci"] = [_none_if_nan(worst["worst_layer_low"]), _none_if_nan(worst["worst_layer_high"])]
                out[key]["picked_rel_change_p_ci"] = [_none_if_nan(worst["worst_rel_change_p_low"]),
                                                      _none_if_nan(worst["worst_rel_change_p_high"])]
        for name in ("rel_change_p", "accuracy_after"):
            if f"{name}_low" in worst:  # a table from before the intervals has none
                out[key][f"{name}_ci"] = [_none_if_nan(worst[f"{name}_low"]), _none_if_nan(worst[f"{name}_high"])]
    if out:
        out["bootstrap"] = bootstrap.record(int(table["n_relations"].iloc[0]) if "n_relations" in table else None)
    return out


def _none_if_nan(value) -> float | None:
    # None rather than NaN: summary.json must stay valid JSON
    return None if pd.isna(value) else float(value)


# --- as the `ablate` command runs it: every window, then the run's subject and relation heads as sets


def class_head_sets(heads: pd.DataFrame) -> dict[str, list[tuple[int, int]]]:
    """The subject heads and the relation heads of a head table (columns layer, head, class) as two head sets."""
    return {f"{name}_heads": list(zip(rows["layer"], rows["head"]))
            for name, rows in heads.groupby("class") if name in ("subject", "relation")}


def _run(model: LoadedModel, known: list[Encoded], *, window: int, head_sets: dict, blocked: Sequence[GroupSpec],
         progress: Progress, engine=None) -> dict[str, pd.DataFrame]:
    table = pd.concat([knockout(model, known, blocked, window=window, progress=progress, engine=engine),
                       knockout(model, known, blocked, heads=head_sets, progress=progress, engine=engine)],
                      ignore_index=True)
    return {"knockout": table}


def _passes(n_layers: int, *, window: int, head_sets: dict, blocked: Sequence[GroupSpec]) -> int:
    return knockout_passes(n_layers, blocked) + knockout_passes(n_layers, blocked, heads=head_sets)


def _remote_cost(n_layers: int, known: list[Encoded], **options) -> tuple[int, int, int]:
    """Through an engine, one request per pass, each bringing back `end_maths.answer_scores` per prompt; nothing
    sent but the prompts."""
    passes = _passes(n_layers, **options)
    return passes, passes * len(known) * SCORE_BYTES, 0


CHECK = CausalCheck(
    "knockout", "ablate", ("knockout",), ("window", "head_sets", "blocked"), _passes, _run,
    lambda tables: knockout_summary(tables["knockout"]), remote=True, remote_cost=_remote_cost,
)
