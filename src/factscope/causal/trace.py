"""Causal tracing (Meng et al. 2022, ROME's `causal_trace`): corrupt the subject's token embeddings with Gaussian
noise, restore one clean state at (layer, position), and record how much of p(a) comes back.

Conventions, as in ROME: the noise is `noise` × the std of the subjects' token embeddings over the dataset,
added at `hook_embed` on subject positions only; a restored `resid` state is the residual stream after that
layer at one position, a restored `attn` / `mlp` state is that sublayer's output at one position for a window
of layers around it; the indirect effect is p_restored(a) − p_corrupted(a).

Beside the windows, two kinds tell MLP0 from the MLPs above it (restoring MLP0's clean output at a corrupted subject
token largely undoes the embedding noise itself, and every window centred on the first layers holds it):
`mlp_single`, one MLP layer's output restored alone at every layer, and `mlp_without_mlp0`, every MLP window with
MLP0 left out. The table carries, per token, MLP0 alone and the peak MLP window without MLP0 with bootstrap
intervals in which the peak is re-picked in every resample (`mlp0_split`).

Bookkeeping, as ROME's `read_knowlege` (experiments/causal_trace.py):
- position kinds: the first subsequent token is the token after the subject even when it is END (it is then
  counted as both `first_subsequent` and `last_token`, as in ROME); `further_tokens` are the tokens between it and END;
- a row of the table pools its tokens: the mean over every (prompt, token) of that kind, so a prompt with three
  middle-subject tokens weighs three times one with a single one (ROME's `Avg.add_all`). The token groups (`level`
  "group") are pooled the same way. `sem` stays over prompts: it is the cluster (ratio-estimator) standard error
  with the prompt as the cluster, √(N/(N−1) Σ_p (S_p − m·n_p)²) / Σ_p n_p for S_p a prompt's summed effect over its
  n_p tokens; with one token per prompt it is the usual std/√N;
- noise draws: one draw per seed, the same draw for the corrupted run and every restoration (ROME reuses one
  RandomState per call too); the effect is averaged over the draws, which is ROME's averaging of p over its 10
  noised copies. factscope defaults to 3 draws (`SEEDS`) because each draw costs 1 + 3 × n_layers passes. The draws
  only add within-prompt variance: `sem_draws` is the part of `sem` that comes from them (from the spread of S_p
  over seeds), so at n' draws the standard error would be √(sem² − sem_draws² + sem_draws² · n / n'). The summary
  gives both at the run's draws, at 1 and at 10 (BENCHMARKS.md has them on SmolLM2).

Speed: with `kv_cache` (the default) each row is computed only from the first block its restoration changes (an
MLP window one block later: `resumed_block`) and from its restored position to END, and the rows of every (kind,
layer) share passes (the `resume` module says how).
`kv_cache=False` is the former implementation (every row the prompt's full width, one pass per (kind, layer)), kept
as the reference the benchmark and the tests compare against. `benchmarks/trace_work.py` counts both's work.

The `trace` command's check — exact patching, attribution patching or both — is `atp.CHECK`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from .. import bootstrap
from ..data import Encoded
from ..trace_maths import add_noise, restore_rows
from ..causal_readings import MLP0_COLUMNS, MLP0_KINDS, mlp0_split
from ..errors import FactscopeError
from ..forward import Batch, act_name, capture, end_logits, make_batch
from ..models import LoadedModel
from ..taxonomy import GROUPS
from .restorations import (
    SUBLAYER, Restorations, engine_restorations, known_cells, last_resid, restoration_chunks, restoration_session_cost,
    restored_blocks, restored_layers, resumed_block, subject_noise, trace_rows, trace_sites,
)
from .resume import States, bridge_reads_cache, corrupted_tails, resume, shared_passes
from .scores import Progress, tick

TRACE_KINDS = ("resid", "attn", "mlp")  # the sublayers restored (and the kinds attribution patching estimates)
# beside the MLP windows, MLP0_KINDS: every MLP layer alone, and every MLP window with MLP0 left out
EXACT_KINDS = (*TRACE_KINDS, *MLP0_KINDS)  # what exact tracing restores by default
SEEDS = (0, 1, 2)
NOISE = 3.0
WINDOW = 10
_RESTORED = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}  # kind → the activation restored


def trace_labels(batch: Batch) -> dict[str, tuple[str, Bool[torch.Tensor, "batch pos"]]]:
    """Position kinds of Meng et al. (first/middle/last subject token, first subsequent token, further
    tokens, last token) and the token groups, as masks; a one-token subject is both first and last, and a
    relation of one token makes END both the first subsequent and the last token (as in ROME)."""
    shape = batch.tokens.shape
    masks = {name: torch.zeros(shape, dtype=torch.bool) for name in
             ("first_subject", "mid_subject", "last_subject", "first_subsequent", "further_tokens", "last_token")}
    for row, item in enumerate(batch.items):
        subject = item.subject_positions
        first, last, end = subject[0], subject[-1], item.end
        masks["first_subject"][row, first] = True
        masks["last_subject"][row, last] = True
        masks["mid_subject"][row, first + 1 : last] = True
        if last < end:
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


def trace_effects(
    model: LoadedModel,
    encoded: list[Encoded],
    noise: float = NOISE,
    seeds: Sequence[int] = SEEDS,
    window: int = WINDOW,
    kinds: Sequence[str] = EXACT_KINDS,
    max_rows: int = 1024,
    progress: Progress = None,
    kv_cache: bool = True,
    engine=None,
) -> TraceEffects:
    """Causal tracing, per prompt and position: corrupt the subject's token embeddings with Gaussian noise
    (`noise` × the std of the subjects' token embeddings over the dataset; one seeded draw per seed), then
    restore one clean state at (layer, position) — the residual stream after that layer (`resid`), or the
    attention / MLP outputs of a `window` of layers around it, one MLP layer's output alone (`mlp_single`), or the
    MLP window without MLP0 (`mlp_without_mlp0`) — and record p_restored(a) − p_corrupted(a). Kinds that restore
    the same states (`restorations.trace_sites`) are run once and share the result.

    Restorations are stacked into the batch dimension (in chunks of at most `max_rows` rows) and run from the first
    block they change; with `kv_cache`, from the restored position on, the earlier positions read from the corrupted
    run's keys and values, and every (kind, layer) resuming at the same block in the same passes (same results, up
    to float rounding; module docstring). Progress ticks: `trace_passes`, one per distinct restoration once its rows
    are done.

    `engine`: an nnsight engine (`NnsightEngine.causal_trace`, on NDIF with `trace --remote`) runs each seed in
    one session, full-width as with `kv_cache=False`, from the same noise draws, and sends back p(a) only.
    """
    unknown = [kind for kind in kinds if kind not in EXACT_KINDS]
    if unknown:
        raise FactscopeError(f"unknown trace kind {unknown[0]!r} (use {', '.join(EXACT_KINDS)})")
    batch = make_batch(model, encoded)
    if engine is not None:
        return _engine_trace_effects(model, batch, engine, noise, seeds, window, kinds, max_rows, progress)
    n_layers = model.cfg.n_layers
    clean, std = _clean_states(model, batch, kinds)
    tick(progress)
    rows = trace_rows(batch)
    prompts, positions = rows.prompts, rows.positions
    effects = torch.zeros((len(seeds), len(kinds), n_layers, *batch.tokens.shape))  # zero where not restored
    sites, of = trace_sites(kinds, window, n_layers)
    p_corrupted = []
    for s, seed in enumerate(seeds):
        states = _corrupted_states(model, batch, subject_noise(batch, noise * std, seed, model.cfg.d_model), clean, kv_cache,
                                   resid_mid=kv_cache and "mlp" in {SUBLAYER[kind] for kind in kinds})
        tick(progress)
        p_corrupt = states.p_corrupt
        p_corrupted.append(p_corrupt.cpu())
        jobs = [(kind, layer, rows) for kind, layer in sites]
        if kv_cache:
            restored = _restored_probs_cached(model, batch, jobs, states, window, max_rows, progress)
        else:
            restored = []
            for kind, layer, _ in jobs:
                restored.append(_restored_probs(model, batch, rows, states, kind, layer, window, max_rows))
                tick(progress)
        _fill(effects[s], of, [(probs - p_corrupt[prompts]).cpu() for probs in restored], prompts.cpu(), positions.cpu())
    return TraceEffects(effects, clean["p"].cpu(), torch.stack(p_corrupted), noise * std, tuple(kinds), window, batch)


def _fill(effects: Float[torch.Tensor, "kind layer batch pos"], of: list[int | None], per_site: list[torch.Tensor],
          prompts: Int[torch.Tensor, " rows"], positions: Int[torch.Tensor, " rows"]) -> None:
    """Every (kind, layer) of one seed's effects from the site it reads (`trace_sites`; None stays zero)."""
    n_layers = effects.shape[1]
    for cell, site in enumerate(of):
        if site is not None:
            effects[cell // n_layers, cell % n_layers, prompts, positions] = per_site[site]


def _engine_trace_effects(model, batch: Batch, engine, noise: float, seeds: Sequence[int], window: int,
                          kinds: Sequence[str], max_rows: int, progress: Progress) -> TraceEffects:
    """`trace_effects` through `engine`: per seed one request (`engine_restorations`) restoring every cell; the
    progress ticks are the local ones."""
    n_layers = model.cfg.n_layers
    rows = trace_rows(batch)
    prompts, positions = rows.prompts.cpu(), rows.positions.cpu()
    sites, of = trace_sites(kinds, window, n_layers)
    jobs = [(kind, layer, rows) for kind, layer in sites]
    effects = torch.zeros((len(seeds), len(kinds), n_layers, *batch.tokens.shape))
    p_corrupted, got = [], {}
    for s, seed in enumerate(seeds):
        got, restored = engine_restorations(model, batch, engine, noise, seed, jobs, window, max_rows)
        p_corrupted.append(got["p_corrupt"])
        _fill(effects[s], of, [probs - got["p_corrupt"][prompts] for probs in restored], prompts, positions)
        if progress:  # as many ticks as the local passes: the clean pass once, then the seed's passes
            progress((s == 0) + 1 + len(jobs))
    return TraceEffects(effects, got["p_clean"], torch.stack(p_corrupted), noise * float(got["std"]), tuple(kinds),
                        window, batch)


def trace_remote_cost(n_layers: int, known: list[Encoded], seeds: Sequence[int], d_model: int,
                      kinds: Sequence[str] = EXACT_KINDS, window: int = WINDOW) -> tuple[int, int, int]:
    """`trace_effects(engine=...)`: one session per seed restoring every cell at every distinct restoration
    (`restorations.trace_sites`) but the residual after the last block (`last_resid`: no pass). (requests, bytes
    back, bytes sent)."""
    cells, subject = known_cells(known)
    distinct, _ = trace_sites(kinds, window, n_layers)
    sites = len(distinct) - ("resid" in kinds)
    return tuple(len(seeds) * part for part in restoration_session_cost(len(known), sites * cells, subject, d_model))


def trace_passes(n_layers: int, seeds: Sequence[int] = SEEDS, kinds: Sequence[str] = EXACT_KINDS,
                 window: int = WINDOW) -> int:
    """How many times `trace_effects` calls `progress(1)`: the clean pass, and per seed the corrupted pass and one
    per distinct restoration (`restorations.trace_sites`)."""
    return 1 + len(seeds) * (1 + len(trace_sites(kinds, window, n_layers)[0]))


def trace_table(trace: TraceEffects) -> pd.DataFrame:
    """Causal tracing results as a tidy table (causal_trace.parquet).

    One row per (kind, layer, token): `token` is a position kind (`level="position"`: first_subject,
    mid_subject, last_subject, first_subsequent, further_tokens, last_token, after Meng et al.) or a token
    group (`level="group"`: bos, prefix, subject, relation); `kind` is resid, attn, mlp (windows), mlp_single (one
    MLP layer) or mlp_without_mlp0 (the mlp window less MLP0); `indirect_effect` is the seed-averaged effect
    pooled over every (prompt, token) of that kind (as ROME), `sem` its standard error with prompts as clusters,
    `sem_draws` the part of `sem` due to the noise draws (`sem_at_draws`); `n_tokens` the pooled tokens;
    `first_layer`..`last_layer` is the restored window; `p_clean` and `p_corrupted` are means; `peak_*` the
    re-picked bootstrap intervals of each (kind, token)'s peak (`_peak_intervals`), and MLP0 apart from the peak
    MLP window (`_mlp0_columns`).
    """
    n_layers = trace.effects.shape[2]
    table = _trace_table(trace.effects, trace_labels(trace.batch), trace.kinds, trace.window, n_layers,
                         trace.batch.relations)
    table["p_clean"] = float(trace.p_clean.mean())
    table["p_corrupted"] = float(trace.p_corrupted.mean())
    table["noise_std"] = trace.noise_std
    table["n_seeds"] = trace.effects.shape[0]
    return table


def _clean_states(model: LoadedModel, batch: Batch, kinds: Sequence[str], kv_cache: bool = False) -> tuple[dict, float]:
    """Clean activations to restore from, p(a), and the std of the subjects' token embeddings; with `kv_cache`,
    also every layer's keys and values under "kv" (as `States.kv`)."""
    from transformers import DynamicCache

    store: dict = {}
    hooks = [capture(store, act_name("embed"))]
    sublayers = {SUBLAYER[kind] for kind in kinds}
    for layer in range(model.cfg.n_layers):
        hooks += [capture(store, act_name(_RESTORED[kind], layer)) for kind in TRACE_KINDS if kind in sublayers]
    cache = DynamicCache() if kv_cache else None  # without the model's config: see `_corrupted_states`
    with bridge_reads_cache(model.bridge, kv_cache):
        logits = end_logits(model, batch.tokens, batch.mask, batch.ends, hooks, past_key_values=cache)
    if kv_cache:
        store["kv"] = [(layer.keys, layer.values) for layer in cache.layers]
    store["p"] = logits.softmax(-1)[batch.rows, batch.answers]
    subject = batch.subject
    return store, float(store.pop(act_name("embed"))[subject].std())


def _corrupted_states(
    model: LoadedModel, batch: Batch, noise: Float[torch.Tensor, "batch pos d_model"], clean: dict, kv_cache: bool,
    resid_mid: bool = False,
) -> States:
    """The corrupted run: the residual stream entering every block, p(a), (`kv_cache`) every layer's keys and
    values, and (`resid_mid`, where the blocks have one) the residual stream between every block's attention and
    MLP."""
    from transformers import DynamicCache

    store: dict = {}
    names = [act_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    mid_names = [act_name("resid_mid", layer) for layer in range(model.cfg.n_layers)] if resid_mid and sequential(model) else []
    hooks = [(act_name("embed"), lambda x, hook: add_noise(x, noise)), *(capture(store, name) for name in names + mid_names)]
    # A cache without the model's config keeps every position: one built from Gemma's config would keep only the
    # last `sliding_window` keys of its local layers, and the prefixes cut from it would be the wrong positions.
    cache = DynamicCache() if kv_cache else None
    with bridge_reads_cache(model.bridge, kv_cache):
        logits = end_logits(model, batch.tokens, batch.mask, batch.ends, hooks, past_key_values=cache)
    kv = [(layer.keys, layer.values) for layer in cache.layers] if kv_cache else None
    return States(clean, [store[name] for name in names], logits.softmax(-1)[batch.rows, batch.answers], kv,
                  [store[name] for name in mid_names] or None)



def sequential(model: LoadedModel) -> bool:
    """Whether the model's blocks run attention, then the MLP on its result (a `resid_mid` between them), rather
    than both on the block's input (GPT-NeoX, GPT-J: parallel)."""
    return act_name("resid_mid", 0) in model.bridge.hook_dict


def _restored_probs_cached(
    model: LoadedModel, batch: Batch, jobs: Sequence[tuple[str, int, Restorations]], states: States, window: int,
    max_rows: int, progress: Progress = None,
) -> list[Float[torch.Tensor, " rows"]]:
    """`_restored_probs` of every (kind, layer, rows) job, computing only what a restoration can change: each row from
    its job's first changed block (`restored_blocks`) and from its restored position on (`resume`). Rows of every job
    share passes, whatever their kind, layer, position and first block (`shared_passes`); `progress` ticks once per
    job's worth of rows done."""
    n_layers = model.cfg.n_layers
    clean, p_corrupt = states.clean, states.p_corrupt
    out = [torch.empty(len(rows.prompts), device=batch.tokens.device) for _, _, rows in jobs]
    passing = []
    for j, (kind, layer, rows) in enumerate(jobs):
        if kind == "resid" and layer == n_layers - 1:
            out[j] = last_resid(batch, rows, clean["p"], p_corrupt)
            tick(progress)
        else:
            passing.append(j)
    if not passing:
        return out
    sizes = [len(jobs[j][2].prompts) for j in passing]

    def per_row(values) -> Int[torch.Tensor, " rows"]:
        return torch.cat([torch.full((n,), value) for value, n in zip(values, sizes)])

    windows = [restored_blocks(jobs[j][0], jobs[j][1], window, n_layers) for j in passing]
    job, firsts, lasts = per_row(passing), per_row([w[0] for w in windows]), per_row([w[1] for w in windows])
    starts = per_row([resumed_block(jobs[j][0], jobs[j][1], window, n_layers, states.corrupt_mid is not None)
                      for j in passing])
    kinds = per_row([TRACE_KINDS.index(SUBLAYER[jobs[j][0]]) for j in passing])
    row = torch.cat([torch.arange(n) for n in sizes])
    prompts = torch.cat([jobs[j][2].prompts for j in passing])
    positions = torch.cat([jobs[j][2].positions for j in passing])
    done, ticked = 0, 0
    for chunk in shared_passes((batch.ends[prompts] - positions).cpu(), n_layers - starts, max_rows):
        chunk = chunk[torch.argsort(starts[chunk], stable=True)]  # `resume` takes its rows in the order they join
        p, i, first = prompts[chunk], positions[chunk], starts[chunk]
        resid = corrupted_tails(states, first, batch, p, i)
        for start in first[kinds[chunk] == TRACE_KINDS.index("resid")].unique().tolist():
            # restored residuals enter block `start`: they are the state after block start − 1
            local = torch.nonzero((first == start) & (kinds[chunk] == TRACE_KINDS.index("resid"))).flatten().to(p.device)
            resid[local, 0] = clean[act_name("resid_post", start - 1)][p[local], i[local]]
        folded = (kinds[chunk] == TRACE_KINDS.index("mlp")) & (first > firsts[chunk])  # `resumed_block`
        for start in first[folded].unique().tolist():
            local = torch.nonzero(folded & (first == start)).flatten().to(p.device)
            # the block's own sum, in the model's dtype: the same number the full pass adds
            resid[local, 0] = (states.corrupt_mid[start - 1][p[local], i[local]]
                               + clean[act_name("mlp_out", start - 1)][p[local], i[local]])
        # the last block's MLP runs at END alone (`resume`): there a restored MLP output before END changes nothing
        at_end = i == batch.ends[p]
        hooks = []
        for kind in ("attn", "mlp"):
            for layer in range(int(first.min()), n_layers):
                covered = (kinds[chunk] == TRACE_KINDS.index(kind)) & (first <= layer) & (lasts[chunk] >= layer)
                if kind == "mlp" and layer == n_layers - 1:
                    covered &= at_end.to(covered.device)
                local = torch.nonzero(covered).flatten().to(p.device)
                if len(local):
                    name = act_name(_RESTORED[kind], layer)
                    hooks.append((name, _restore_first(local, clean[name][p[local], i[local]])))
        logits = resume(model, batch, states, p, i, resid, first, hooks)
        probs = logits.softmax(-1)[torch.arange(len(chunk), device=p.device), batch.answers[p]]
        chunk_jobs, chunk_rows = job[chunk], row[chunk]
        for j in chunk_jobs.unique().tolist():
            mine = chunk_jobs == j
            out[j][chunk_rows[mine].to(p.device)] = probs[mine.to(p.device)]
        done += len(chunk)
        for _ in range(done * len(passing) // len(job) - ticked):
            tick(progress)
        ticked = done * len(passing) // len(job)
    return out



def _restore_first(local: Int[torch.Tensor, " rows"], clean_out: Float[torch.Tensor, "rows d_model"]):
    def hook(x: Float[torch.Tensor, "rows pos d_model"], hook):
        x[local, 0] = clean_out  # in place: the sublayer's output is a fresh tensor that nothing else holds
        return x

    return hook


def _restored_probs(
    model: LoadedModel, batch: Batch, rows: Restorations, states: States, kind: str, layer: int, window: int, max_rows: int
) -> Float[torch.Tensor, " rows"]:
    """p(a) with one clean state restored per row (row = one prompt and one position), every row the prompt's
    full width."""
    n_layers = model.cfg.n_layers
    prompts, positions, clean, p_corrupt = rows.prompts, rows.positions, states.clean, states.p_corrupt
    if kind == "resid" and layer == n_layers - 1:
        return last_resid(batch, rows, clean["p"], p_corrupt)
    first, last = restored_blocks(kind, layer, window, n_layers)
    out = torch.empty(len(prompts), device=batch.tokens.device)
    for chunk in restoration_chunks(batch, rows, max_rows):
        p, i = prompts[chunk], positions[chunk]
        width = int(batch.ends[p].max()) + 1
        resid = states.corrupt_pre[first][p, :width]
        hooks = []
        if kind == "resid":
            resid = restore_rows(resid, clean[act_name("resid_post", layer)], p, i)
        else:
            names = [act_name(_RESTORED[SUBLAYER[kind]], j) for j in range(first, last + 1)]
            hooks = [(name, _restore(clean[name], p, i)) for name in names]
        logits = end_logits(model, None, batch.mask[p, :width], batch.ends[p], hooks, resid=resid, start=first)
        out[chunk] = logits.softmax(-1)[torch.arange(len(chunk), device=p.device), batch.answers[p]]
    return out


def _restore(clean_out: Float[torch.Tensor, "batch pos d_model"], prompts: Int[torch.Tensor, " rows"],
             positions: Int[torch.Tensor, " rows"]):
    return lambda x, hook: restore_rows(x, clean_out, prompts, positions)


def _trace_table(
    effects: Float[torch.Tensor, "seed kind layer batch pos"],
    labels: dict[str, tuple[str, Bool[torch.Tensor, "batch pos"]]],
    kinds: Sequence[str],
    window: int,
    n_layers: int,
    relations: list[str] | None = None,
) -> pd.DataFrame:
    """Per (kind, layer, label) the seed-averaged effect pooled over every (prompt, token) of the label, its cluster
    standard error over prompts, and the part of it that the noise draws contribute (module docstring)."""
    n_seeds = effects.shape[0]
    records = []
    for token, (level, mask) in labels.items():
        has = mask.any(1)  # prompts with at least one such position
        if not has.any():
            continue
        per_seed = (effects * mask)[..., has, :].sum(-1).double()  # [seed, kind, layer, prompt]: S_p per draw
        summed = per_seed.mean(0)
        counts = mask[has].sum(1).double()
        n_prompts, total = len(counts), counts.sum()
        mean = summed.sum(-1) / total
        if n_prompts > 1:
            residual = summed - mean[..., None] * counts
            sem = (residual.pow(2).sum(-1) * n_prompts / (n_prompts - 1)).sqrt() / total
        else:
            sem = torch.full_like(mean, float("nan"))
        draws = (per_seed.var(0).sum(-1) / n_seeds).sqrt() / total if n_seeds > 1 else torch.full_like(mean, float("nan"))
        # the intervals resample the relations of the prompts that have this label, then those prompts
        kept = None if relations is None else [relation for relation, keep in zip(relations, has.tolist()) if keep]
        peak = _peak_intervals(summed.cpu().numpy(), counts.cpu().numpy(), kept)
        split = _mlp0_columns(summed.cpu().numpy(), counts.cpu().numpy(), kinds, kept)
        for k, kind in enumerate(kinds):
            for layer in range(n_layers):
                first, last = restored_layers(kind, layer, window, n_layers)
                records.append(
                    {
                        "kind": kind, "layer": layer, "first_layer": first, "last_layer": last, "token": token,
                        "level": level, "indirect_effect": float(mean[k, layer]), "sem": float(sem[k, layer]),
                        "sem_draws": float(draws[k, layer]), "n_prompts": n_prompts, "n_tokens": int(total),
                        **{name: float(values[k]) for name, values in peak.items()}, **split,
                    }
                )
    return pd.DataFrame.from_records(records)


PEAK_INTERVALS = ("peak_layer_low", "peak_layer_high", "peak_effect_low", "peak_effect_high")


def _peak_intervals(summed: np.ndarray, counts: np.ndarray, relations: list[str] | None = None) -> dict[str, np.ndarray]:
    """Bootstrap intervals (relations then prompts given enough `relations`, else prompts; `bootstrap`'s seed) of each kind's peak: the layer where the pooled effect
    is largest, and that largest effect, recomputed on every resample of the prompts.

    summed: [kind, layer, prompt] each prompt's seed-averaged effect summed over its tokens; counts: [prompt].
    """
    weights = bootstrap.resample_weights(summed.shape[-1], relations=relations)  # [resample, prompt]
    means = np.einsum("rp,klp->rkl", weights, summed) / (weights @ counts)[:, None, None]
    (layer_low, layer_high), (effect_low, effect_high) = (bootstrap.interval(means.argmax(-1).astype(float)),
                                                          bootstrap.interval(means.max(-1)))
    return dict(zip(PEAK_INTERVALS, (layer_low, layer_high, effect_low, effect_high)))




def _mlp0_columns(summed: np.ndarray, counts: np.ndarray, kinds: Sequence[str],
                  relations: list[str] | None = None) -> dict[str, float]:
    """MLP0 apart from the MLP window that peaks (one token's rows; every row of the token carries them): restoring
    MLP0 alone (`mlp0_alone`), the peak `mlp` window restored without MLP0 (`peak_without_mlp0`) and the share of
    the window's effect that this keeps (`peak_kept_without_mlp0`), each with a bootstrap interval (`_low`,
    `_high`) over prompts in which the peak's layer is re-picked in every resample (as `_peak_intervals`). Nothing
    where the trace lacks the `mlp`, `mlp_single` or `mlp_without_mlp0` kind.

    summed: [kind, layer, prompt] each prompt's seed-averaged effect summed over its tokens; counts: [prompt]."""
    if not {"mlp", *MLP0_KINDS} <= set(kinds):
        return {}
    window, single, without = (kinds.index(kind) for kind in ("mlp", "mlp_single", "mlp_without_mlp0"))
    weights = bootstrap.resample_weights(summed.shape[-1], relations=relations)  # [resample, prompt]

    def split(means: np.ndarray) -> np.ndarray:
        """[..., kind, layer] pooled means → [..., 3]: MLP0 alone, the peak window without MLP0, the share kept."""
        peak = means[..., window, :].argmax(-1)[..., None]
        whole = np.take_along_axis(means[..., window, :], peak, -1)[..., 0]
        kept = np.take_along_axis(means[..., without, :], peak, -1)[..., 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(whole > 0, kept / whole, np.nan)  # no share of a window that recovers nothing
        return np.stack([means[..., single, 0], kept, share], -1)

    point = split(summed.sum(-1) / counts.sum())
    resampled = split(np.einsum("rp,klp->rkl", weights, summed) / (weights @ counts)[:, None, None])
    with warnings.catch_warnings():  # a share no resample has (the window never recovers anything) is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = bootstrap.interval(resampled)
    out = {}
    for c, name in enumerate(MLP0_COLUMNS):
        out[name], out[f"{name}_low"], out[f"{name}_high"] = float(point[c]), float(low[c]), float(high[c])
    return out


def sem_at_draws(table: pd.DataFrame, n_draws: int) -> pd.Series:
    """Each row's standard error had the run used `n_draws` noise draws instead of its own `n_seeds`: the draws'
    part of the variance scales as 1/draws, the prompts' part stays (clipped at zero where, on few prompts, the
    estimated draws' part exceeds the whole)."""
    between = (table["sem"] ** 2 - table["sem_draws"] ** 2).clip(lower=0)
    return (between + table["sem_draws"] ** 2 * table["n_seeds"] / n_draws) ** 0.5


def trace_peaks(trace: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, token) the layer of the largest indirect effect, with the bootstrap intervals of that layer and of
    the peak effect where the table has them (`_peak_intervals`)."""
    index = trace.groupby(["kind", "token"])["indirect_effect"].idxmax()
    columns = ["kind", "token", "level", "layer", "indirect_effect", *(c for c in PEAK_INTERVALS if c in trace)]
    return trace.loc[index, columns].reset_index(drop=True)


def trace_summary(table: pd.DataFrame, peaks: pd.DataFrame) -> dict:
    """p(a) clean and corrupted (means over prompts and seeds), the peak of every (kind, token), MLP0 apart from
    the peak MLP window at the last subject token (`mlp0_split`, where the trace has the kinds), and what the
    number of noise draws does to the standard errors (medians over the rows with an effect; NaN → None)."""
    live = table[table["sem"] > 0]
    draws = {"n_draws": int(table["n_seeds"].iloc[0])}
    for name, values in (("sem", live["sem"]), ("sem_draws", live["sem_draws"]),
                         ("sem_at_1_draw", sem_at_draws(live, 1)), ("sem_at_10_draws", sem_at_draws(live, 10))):
        median = float(values.median()) if len(values) else float("nan")
        draws[f"median_{name}"] = median if median == median else None
    out = {"p_clean": float(table["p_clean"].iloc[0]), "p_corrupted": float(table["p_corrupted"].iloc[0]),
           "peaks": peaks.to_dict(orient="records"), "draws": draws}
    split = mlp0_split(table)
    if split is not None:
        out["mlp0"] = split
    return out
