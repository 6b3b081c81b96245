"""Causal tracing (Meng et al. 2022, ROME's `causal_trace`): corrupt the subject's token embeddings with Gaussian
noise, restore one clean state at (layer, position), and record how much of p(a) comes back.

Conventions, as in ROME: the noise is `noise` × the std of the subjects' token embeddings over the dataset,
added at `hook_embed` on subject positions only; a restored `resid` state is the residual stream after that
layer at one position, a restored `attn` / `mlp` state is that sublayer's output at one position for a window
of layers around it; the indirect effect is p_restored(a) − p_corrupted(a).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from ..data import Encoded
from ..errors import FactscopeError
from ..forward import Batch, act_name, capture, end_logits, make_batch
from ..models import LoadedModel
from ..taxonomy import GROUPS
from .check import CausalCheck
from .scores import Progress, tick
from .sites import layer_window

TRACE_KINDS = ("resid", "attn", "mlp")
SEEDS = (0, 1, 2)
NOISE = 3.0
WINDOW = 10
_RESTORED = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}  # kind → the activation restored


def subject_noise(
    batch: Batch, std: float, seed: int, d_model: int
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Gaussian noise of standard deviation `std` on subject positions, zero elsewhere; seeded, deterministic."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((*batch.tokens.shape, d_model), generator=generator).to(batch.tokens.device)
    return eps * std * batch.onehot[..., GROUPS.index("subject"), None]


@dataclass
class Restorations:
    """(prompt, position) pairs to restore, one per row of the stacked passes."""

    prompts: Int[torch.Tensor, " rows"]
    positions: Int[torch.Tensor, " rows"]


def _trace_rows(batch: Batch) -> Restorations:
    """The first subject token to END of every prompt. Earlier positions cannot see the noise (causal
    attention), so restoring them changes nothing; they are recorded as exact zeros."""
    prompts, positions = [], []
    for row, item in enumerate(batch.items):
        first = item.groups.index("subject")
        for pos in range(first, len(item.token_ids)):
            prompts.append(row)
            positions.append(pos)
    device = batch.tokens.device
    return Restorations(torch.tensor(prompts, device=device), torch.tensor(positions, device=device))


def trace_labels(batch: Batch) -> dict[str, tuple[str, Bool[torch.Tensor, "batch pos"]]]:
    """Position kinds of Meng et al. (first/middle/last subject token, first subsequent token, further
    tokens, last token) and the token groups, as masks; a one-token subject is both first and last."""
    shape = batch.tokens.shape
    masks = {name: torch.zeros(shape, dtype=torch.bool) for name in
             ("first_subject", "mid_subject", "last_subject", "first_subsequent", "further_tokens", "last_token")}
    for row, item in enumerate(batch.items):
        subject = [pos for pos, group in enumerate(item.groups) if group == "subject"]
        first, last, end = subject[0], subject[-1], item.end
        masks["first_subject"][row, first] = True
        masks["last_subject"][row, last] = True
        masks["mid_subject"][row, first + 1 : last] = True
        if last + 1 < end:
            masks["first_subsequent"][row, last + 1] = True
        masks["further_tokens"][row, last + 2 : end] = True
        masks["last_token"][row, end] = True
    labels = {name: ("position", mask) for name, mask in masks.items()}
    for index, group in enumerate(GROUPS):
        labels[group] = ("group", batch.onehot[..., index].cpu() > 0)
    return labels


@dataclass
class TraceEffects:
    """Per-prompt causal-tracing results; `effects[seed, kind, layer, prompt, pos]` is p_restored − p_corrupted
    (exact zeros at positions before the subject and on padding)."""

    effects: Float[torch.Tensor, "seed kind layer batch pos"]
    p_clean: Float[torch.Tensor, " batch"]
    p_corrupted: Float[torch.Tensor, "seed batch"]
    noise_std: float
    kinds: tuple[str, ...]
    window: int
    batch: Batch


@dataclass
class States:
    """What one seed's restorations start from and put back."""

    clean: dict[str, torch.Tensor]  # hook name → the clean run's activation, and "p" → the clean p(a)
    corrupt_pre: list[Float[torch.Tensor, "batch pos d_model"]]  # the corrupted residual stream entering each block
    p_corrupt: Float[torch.Tensor, " batch"]


def trace_effects(
    model: LoadedModel,
    encoded: list[Encoded],
    noise: float = NOISE,
    seeds: Sequence[int] = SEEDS,
    window: int = WINDOW,
    kinds: Sequence[str] = TRACE_KINDS,
    max_rows: int = 1024,
    progress: Progress = None,
) -> TraceEffects:
    """Causal tracing, per prompt and position: corrupt the subject's token embeddings with Gaussian noise
    (`noise` × the std of the subjects' token embeddings over the dataset; one seeded draw per seed), then
    restore one clean state at (layer, position) — the residual stream after that layer (`resid`), or the
    attention / MLP outputs of a `window` of layers around it — and record p_restored(a) − p_corrupted(a).

    All restorations of one (seed, kind, layer) are stacked into the batch dimension (in chunks of
    `max_rows` rows, sorted by length so padding stays short) and run from the first block they change.
    Passes: `trace_passes`.
    """
    unknown = [kind for kind in kinds if kind not in TRACE_KINDS]
    if unknown:
        raise FactscopeError(f"unknown trace kind {unknown[0]!r} (use {', '.join(TRACE_KINDS)})")
    batch = make_batch(model, encoded)
    n_layers = model.cfg.n_layers
    clean, std = _clean_states(model, batch, kinds)
    tick(progress)
    rows = _trace_rows(batch)
    prompts, positions = rows.prompts, rows.positions
    effects = torch.zeros((len(seeds), len(kinds), n_layers, *batch.tokens.shape))  # zero where not restored
    p_corrupted = []
    for s, seed in enumerate(seeds):
        corrupt_pre, p_corrupt = _corrupted_states(model, batch, subject_noise(batch, noise * std, seed, model.cfg.d_model))
        tick(progress)
        p_corrupted.append(p_corrupt.cpu())
        states = States(clean, corrupt_pre, p_corrupt)
        for k, kind in enumerate(kinds):
            for layer in range(n_layers):
                restored = _restored_probs(model, batch, rows, states, kind, layer, window, max_rows)
                effects[s, k, layer, prompts.cpu(), positions.cpu()] = (restored - p_corrupt[prompts]).cpu()
                tick(progress)
    return TraceEffects(effects, clean["p"].cpu(), torch.stack(p_corrupted), noise * std, tuple(kinds), window, batch)


def trace_passes(n_layers: int, seeds: Sequence[int] = SEEDS, kinds: Sequence[str] = TRACE_KINDS) -> int:
    """How many times `trace_effects` calls `progress(1)`."""
    return 1 + len(seeds) * (1 + len(kinds) * n_layers)


def trace_table(trace: TraceEffects) -> pd.DataFrame:
    """Causal tracing results as a tidy table (causal_trace.parquet).

    One row per (kind, layer, token): `token` is a position kind (`level="position"`: first_subject,
    mid_subject, last_subject, first_subsequent, further_tokens, last_token, after Meng et al.) or a token
    group (`level="group"`: bos, prefix, subject, relation); `indirect_effect` is the mean over prompts of
    the seed-averaged effect averaged over the prompt's positions of that kind, `sem` its standard error
    over prompts; `first_layer`..`last_layer` is the restored window; `p_clean` and `p_corrupted` are means.
    """
    n_layers = trace.effects.shape[2]
    table = _trace_table(trace.effects, trace_labels(trace.batch), trace.kinds, trace.window, n_layers)
    table["p_clean"] = float(trace.p_clean.mean())
    table["p_corrupted"] = float(trace.p_corrupted.mean())
    table["noise_std"] = trace.noise_std
    table["n_seeds"] = trace.effects.shape[0]
    return table


def _clean_states(model: LoadedModel, batch: Batch, kinds: Sequence[str]) -> tuple[dict, float]:
    """Clean activations to restore from, p(a), and the std of the subjects' token embeddings."""
    store: dict = {}
    hooks = [capture(store, act_name("embed"))]
    for layer in range(model.cfg.n_layers):
        hooks += [capture(store, act_name(_RESTORED[kind], layer)) for kind in TRACE_KINDS if kind in kinds]
    logits = batch.logits(model, hooks)
    store["p"] = logits.softmax(-1)[batch.rows, batch.answers]
    subject = batch.onehot[..., GROUPS.index("subject")] > 0
    return store, float(store.pop(act_name("embed"))[subject].std())


def _corrupted_states(
    model: LoadedModel, batch: Batch, noise: Float[torch.Tensor, "batch pos d_model"]
) -> tuple[list[Float[torch.Tensor, "batch pos d_model"]], Float[torch.Tensor, " batch"]]:
    """The corrupted run: the residual stream entering every block, and p(a)."""
    store: dict = {}
    names = [act_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    hooks = [(act_name("embed"), lambda x, hook: x + noise), *(capture(store, name) for name in names)]
    logits = batch.logits(model, hooks)
    return [store[name] for name in names], logits.softmax(-1)[batch.rows, batch.answers]


def _restored_probs(
    model: LoadedModel, batch: Batch, rows: Restorations, states: States, kind: str, layer: int, window: int, max_rows: int
) -> Float[torch.Tensor, " rows"]:
    """p(a) with one clean state restored per row (row = one prompt and one position)."""
    n_layers = model.cfg.n_layers
    prompts, positions, clean, p_corrupt = rows.prompts, rows.positions, states.clean, states.p_corrupt
    if kind == "resid" and layer == n_layers - 1:
        # After the last block only END's own state reaches the logits: restoring it gives the clean p exactly.
        return torch.where(positions == batch.ends[prompts], clean["p"][prompts], p_corrupt[prompts])
    first, last = (layer + 1, layer + 1) if kind == "resid" else layer_window(layer, window, n_layers)
    lengths = batch.ends[prompts] + 1
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.empty(len(prompts), device=batch.tokens.device)
    for chunk in order.split(max_rows):
        p, i = prompts[chunk], positions[chunk]
        width = int(lengths[chunk].max())
        resid = states.corrupt_pre[first][p, :width].clone()
        local = torch.arange(len(chunk), device=p.device)
        hooks = []
        if kind == "resid":
            resid[local, i] = clean[act_name("resid_post", layer)][p, i]
        else:
            names = [act_name(_RESTORED[kind], j) for j in range(first, last + 1)]
            hooks = [(name, _restore(clean[name], p, i, local)) for name in names]
        logits = end_logits(model, None, batch.mask[p, :width], batch.ends[p], hooks, resid=resid, start=first)
        out[chunk] = logits.softmax(-1)[local, batch.answers[p]]
    return out


def _restore(
    clean_out: Float[torch.Tensor, "batch pos d_model"],
    prompts: Int[torch.Tensor, " rows"],
    positions: Int[torch.Tensor, " rows"],
    local: Int[torch.Tensor, " rows"],
):
    def hook(x: Float[torch.Tensor, "rows pos d_model"], hook):
        x = x.clone()
        x[local, positions] = clean_out[prompts, positions]
        return x

    return hook


def _trace_table(
    effects: Float[torch.Tensor, "seed kind layer batch pos"],
    labels: dict[str, tuple[str, Bool[torch.Tensor, "batch pos"]]],
    kinds: Sequence[str],
    window: int,
    n_layers: int,
) -> pd.DataFrame:
    """Per (kind, layer, label) the mean over prompts of the mean over the label's positions and the seeds."""
    per_seed = effects.mean(0)  # [kind, layer, batch, pos]
    records = []
    for token, (level, mask) in labels.items():
        has = mask.any(1)  # prompts with at least one such position
        if not has.any():
            continue
        per_prompt = (per_seed * mask).sum(-1)[..., has] / mask.sum(1)[has]  # [kind, layer, prompt]
        mean = per_prompt.mean(-1)
        sem = per_prompt.std(-1) / per_prompt.shape[-1] ** 0.5 if per_prompt.shape[-1] > 1 else torch.full_like(mean, float("nan"))
        for k, kind in enumerate(kinds):
            for layer in range(n_layers):
                first, last = (layer, layer) if kind == "resid" else layer_window(layer, window, n_layers)
                records.append(
                    {
                        "kind": kind, "layer": layer, "first_layer": first, "last_layer": last, "token": token,
                        "level": level, "indirect_effect": float(mean[k, layer]), "sem": float(sem[k, layer]),
                        "n_prompts": int(has.sum()),
                    }
                )
    return pd.DataFrame.from_records(records)


def trace_peaks(trace: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, token) the layer of the largest indirect effect."""
    index = trace.groupby(["kind", "token"])["indirect_effect"].idxmax()
    return trace.loc[index, ["kind", "token", "level", "layer", "indirect_effect"]].reset_index(drop=True)


def trace_summary(table: pd.DataFrame, peaks: pd.DataFrame) -> dict:
    """p(a) clean and corrupted (means over prompts and seeds), and the peak of every (kind, token)."""
    return {"p_clean": float(table["p_clean"].iloc[0]), "p_corrupted": float(table["p_corrupted"].iloc[0]),
            "peaks": peaks.to_dict(orient="records")}


def _run(model: LoadedModel, known: list[Encoded], *, noise: float, window: int, seeds: Sequence[int],
         progress: Progress) -> dict[str, pd.DataFrame]:
    table = trace_table(trace_effects(model, known, noise, seeds, window, progress=progress))
    return {"causal_trace": table, "trace_peaks": trace_peaks(table)}


CHECK = CausalCheck(
    "trace", "trace", ("causal_trace", "trace_peaks"), ("noise", "window", "seeds"),
    lambda n_layers, noise, window, seeds: trace_passes(n_layers, seeds), _run,
    lambda tables: trace_summary(tables["causal_trace"], tables["trace_peaks"]),
)
