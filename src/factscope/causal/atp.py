"""Attribution patching (AtP: Nanda 2023; Kramár et al. 2024) for causal tracing, with its error beside it.

Every restoration of `trace` at once, to first order: restoring a clean activation c at (site, layer, position) in
the corrupted run moves p(a) by about (c − x) · ∂p(a)/∂x, with x and the gradient taken in the corrupted run. One
forward and one backward per seed (per chunk of prompts) give every (kind, layer, position) of the trace:

- `resid`: the residual stream after the layer, as the exact trace restores it;
- `attn` / `mlp`: the sum of the single-layer estimates over the same window of layers the exact trace restores.
  This is not the first-order effect of the joint restoration: restoring layers j < k together clamps k, so the
  path from j through k is cut, while the gradient at j includes it; the sum counts that path twice (with the
  change at j, and again inside the clean value at k). Getting it right takes one backward (or forward-mode) pass
  per window, which is what AtP is meant to avoid; the error this leaves is measured (`agreement`), not assumed
  small. With a window of one layer the estimate is first-order exact, as for `resid`.

A row's metric is its own p(a), and prompts never interact in a batch, so the gradient of Σ p(a) is every prompt's
own gradient. The noise draws are the exact trace's (`restorations.subject_noise`, same seeds), so the two are compared
draw for draw.

AtP* (Kramár et al.) corrects two failure modes. Its attention-softmax recomputation applies to patches of queries
and keys; the trace restores residual, attention-output and MLP-output states, whose effect on later attention is
through both keys and values of every later layer, so it does not apply as such and is not done. GradDrop, its
correction for effects that cancel along different paths, is `atp_trace(graddrop=True)` (`trace --graddrop`): for every
layer ℓ the AtP estimate is taken again with no gradient flowing back through layer ℓ's contributions to the
residual stream (its attention and MLP outputs), and the cell's estimate is Σ_ℓ |estimate without ℓ| / (L − 1).
Where nothing cancels, every path of an effect runs through some of the L layers, so the sum is (L − 1) × the
effect and GradDrop equals |AtP|; where paths cancel, dropping one of them uncovers the rest. It is unsigned and
costs L backward passes instead of one. Every AtP result comes with its error: `agreement` compares it with exact
patching on every cell where both ran (`--method both`), or on a sample — the `N_TOP` largest AtP cells of each
kind and `N_RANDOM` seeded random cells, and GradDrop's largest cells too when it ran — restored exactly
(`--method atp`). `atp_agreement.csv`, one row per kind and one
for all cells: Pearson and Spearman correlation over cells (a cell: kind, layer, prompt, position, averaged over
seeds), the overlap of the `TOP_K` largest cells of each, and false negatives — cells whose exact effect is at
least `THRESHOLD` (in p) where AtP gives less than half of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from ..data import Encoded
from ..trace_maths import add_noise, restoration_estimates
from ..forward import Batch, act_name, make_batch, unembed
from ..models import LoadedModel
from ..errors import FactscopeError
from .check import CausalCheck
from .scores import Progress, tick
from .restorations import (
    Restorations, engine_restorations, known_cells, noise_draws, restoration_session_cost, restored_layers,
    subject_noise, trace_rows,
)
from .resume import bridge_reads_cache, left_padded_cache, tail_positions
from .trace import (
    _RESTORED, NOISE, SEEDS, TRACE_KINDS, WINDOW, TraceEffects, _clean_states, _corrupted_states,
    _restored_probs_cached, trace_effects, trace_passes, trace_peaks, trace_remote_cost, trace_summary, trace_table,
)

THRESHOLD = 0.05  # a restoration effect (in p) that a false negative misses
TOP_K = 20
N_TOP, N_RANDOM = 20, 40  # cells per kind restored exactly when only AtP ran
SAMPLE_SEED = 0


def atp_trace(
    model: LoadedModel,
    encoded: list[Encoded],
    noise: float = NOISE,
    seeds: Sequence[int] = SEEDS,
    window: int = WINDOW,
    kinds: Sequence[str] = TRACE_KINDS,
    chunk: int = 32,
    progress: Progress = None,
    graddrop: bool = False,
    engine=None,
) -> TraceEffects:
    """`trace.trace_effects` estimated by attribution patching: same shape, same zeros (positions before the
    subject, padding), one forward and one backward per seed and chunk of `chunk` prompts. Progress ticks:
    `atp_passes`.

    `graddrop`: AtP*'s GradDrop instead (Kramár et al. 2024, §3.1.2): Σ_ℓ |AtP with no gradient through layer ℓ's
    outputs| / (L − 1), per seed; unsigned. One forward and L backward passes per seed and chunk.

    `engine`: an nnsight engine (`NnsightEngine.trace_atp`, on NDIF with `trace --remote`) runs every pass in one
    session, full width (every prompt from its first token, as `trace_effects(engine=...)` runs), from the same
    noise draws, and sends back the estimates of the restorable cells only."""
    if graddrop and model.cfg.n_layers < 2:
        raise FactscopeError("GradDrop needs a model of at least two layers")
    drops = tuple(range(model.cfg.n_layers)) if graddrop else (None,)
    return _estimate(model, encoded, noise, seeds, window, kinds, chunk, progress, drops=drops, engine=engine)


def _estimate(model: LoadedModel, encoded: list[Encoded], noise: float, seeds: Sequence[int], window: int,
              kinds: Sequence[str], chunk: int, progress: Progress, drops: tuple[int | None, ...],
              engine=None) -> TraceEffects:
    """AtP of every restoration with each of `drops` (None: no layer dropped) in turn; with one entry the signed
    estimate, with several Σ |estimate| / (L − 1)."""
    batch = make_batch(model, encoded)
    n_layers = model.cfg.n_layers
    windows = {kind: [restored_layers(kind, layer, window, n_layers) for layer in range(n_layers)] for kind in kinds}
    if engine is not None:
        return _engine_estimate(model, batch, engine, noise, seeds, window, kinds, chunk, progress, drops, windows)
    clean, std = _clean_states(model, batch, kinds, kv_cache=True)
    tick(progress)
    effects = torch.zeros((len(seeds), len(kinds), n_layers, *batch.tokens.shape))  # zero where not restorable
    p_corrupted = torch.zeros((len(seeds), len(batch)))
    names = {kind: [act_name(_RESTORED[kind], layer) for layer in range(n_layers)] for kind in kinds}
    firsts = torch.tensor([item.subject_positions[0] for item in batch.items], device=batch.tokens.device)
    # longest tail first, so that a chunk's rows are of about the same width: on SmolLM2's 108 known facts, chunks
    # of 32 in dataset order padded 1,034 tokens to 1,360; their 607 tail tokens, chunked by length, run as 792
    order = torch.argsort(batch.ends - firsts, descending=True, stable=True)
    for s, seed in enumerate(seeds):
        noise_all = subject_noise(batch, noise * std, seed, model.cfg.d_model)
        for rows in order.split(chunk):
            run = _corrupted_run(model, batch, rows, firsts[rows], noise_all, clean["kv"],
                                 [n for kind in kinds for n in names[kind]])
            p_corrupted[s, rows.cpu()] = run.p.cpu()
            at, real = run.positions, run.computed
            delta = {name: clean[name][rows[:, None], at].float() - run.acts[name].float()
                     for kind in kinds for name in names[kind]}
            where = (rows[:, None].expand_as(at)[real].cpu(), at[real].cpu())
            for dropped in drops:
                grads = run.backward(dropped)
                for k, kind in enumerate(kinds):
                    estimate = restoration_estimates([delta[name] for name in names[kind]],
                                                     [grads[name] for name in names[kind]], windows[kind])[:, real].cpu()
                    if dropped is None:
                        effects[s, k][(slice(None), *where)] = estimate
                    else:
                        effects[s, k][(slice(None), *where)] += estimate.abs() / (n_layers - 1)
        tick(progress)
    return TraceEffects(effects, clean["p"].cpu(), p_corrupted, noise * std, tuple(kinds), window, batch)


def _engine_estimate(model, batch: Batch, engine, noise: float, seeds: Sequence[int], window: int,
                     kinds: Sequence[str], chunk: int, progress: Progress, drops: tuple[int | None, ...],
                     windows: dict[str, list[tuple[int, int]]]) -> TraceEffects:
    """`_estimate` through `engine`, in one request: the prompts chunked by length (longest first, as the
    full-width passes pad to the longest), the subject rows of every seed's local draws sent; the progress ticks
    are the local ones."""
    rows = trace_rows(batch)
    prompts, positions = rows.prompts.cpu(), rows.positions.cpu()
    chunks = list(torch.argsort(batch.ends.cpu(), descending=True, stable=True).split(chunk))
    draws = [noise_draws(batch, seed, model.cfg.d_model)[batch.subject] for seed in seeds]
    got = engine.trace_atp(model, batch, chunks, draws, noise, kinds, windows, drops, prompts, positions)
    effects = torch.zeros((len(seeds), len(kinds), model.cfg.n_layers, *batch.tokens.shape))
    effects[..., prompts, positions] = got["estimates"]
    if progress:
        progress(atp_passes(seeds))
    return TraceEffects(effects, got["p_clean"], got["p_corrupt"], noise * float(got["std"]), tuple(kinds), window,
                        batch)


def atp_passes(seeds: Sequence[int] = SEEDS) -> int:
    """How many times `atp_trace` calls `progress(1)`."""
    return 1 + len(seeds)


def _restorable(batch: Batch) -> Bool[torch.Tensor, "batch pos"]:
    """The cells the exact trace restores: the first subject token to END of every prompt."""
    mask = torch.zeros(batch.tokens.shape, dtype=torch.bool)
    for row, item in enumerate(batch.items):
        mask[row, item.subject_positions[0] : item.end + 1] = True
    return mask


class _LayerGate(torch.autograd.Function):
    """Identity forward; backward passes the gradient on unless `dropped.layer` is this layer, where it passes
    zero: GradDrop's 'no gradient through layer ℓ's outputs' for one backward pass of a graph recorded once."""

    @staticmethod
    def forward(ctx, x, layer: int, dropped: "_Dropped"):
        ctx.layer, ctx.dropped = layer, dropped
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (torch.zeros_like(grad) if ctx.dropped.layer == ctx.layer else grad), None, None


class _Dropped:
    """The layer whose outputs pass no gradient in the current backward pass (None: every layer passes it)."""

    layer: int | None = None


@dataclass
class _CorruptedRun:
    """The corrupted run of some prompts from their first subject token to END (`positions`, padded to the longest:
    `computed` says which are real): each named activation there, p(a), and `backward(dropped)` → name →
    ∂(Σ p(a))/∂ activation with no gradient through layer `dropped`'s attention and MLP outputs (None: none)."""

    positions: Int[torch.Tensor, "rows tail"]
    computed: Bool[torch.Tensor, "rows tail"]
    acts: dict[str, Float[torch.Tensor, "rows tail d_model"]]
    p: Float[torch.Tensor, " rows"]
    backward: Callable[[int | None], dict[str, torch.Tensor]]


def _corrupted_run(model: LoadedModel, batch: Batch, rows: Int[torch.Tensor, " rows"], firsts: Int[torch.Tensor, " rows"],
                   noise: Float[torch.Tensor, "batch pos d_model"], clean_kv: list, names: list[str]) -> _CorruptedRun:
    """The corrupted run of `rows`, recorded once. Positions before a prompt's first subject token cannot see the
    noise, so they are the clean run's: they enter as its keys and values (`resume.left_padded_cache`, each row
    with its own position ids) and only the subject to END is computed — on the shipped prompts 59% of the tokens
    (SmolLM2's 108 known facts). A restoration there changes nothing, so no gradient is lost. The activations are
    taken after the gates, so a gate never drops its own site's gradient, only the paths from a site through the
    dropped layer."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    store: dict = {}
    at = tail_positions(batch, rows, firsts)
    tails = batch.ends[rows] - firsts
    computed = torch.arange(at.shape[1], device=at.device) <= tails[:, None]
    cache, cached = left_padded_cache(clean_kv, rows, firsts)
    local = torch.arange(len(rows), device=at.device)
    dropped = _Dropped()

    def corrupt(x, hook):
        # a leaf that needs a gradient, so the whole pass is recorded even when the weights are frozen
        x = add_noise(x, noise[rows[:, None], at]).detach()
        return x.requires_grad_(True)

    def gate(layer, name):
        def hook(x, hook):
            store[name] = _LayerGate.apply(x, layer, dropped)
            return store[name]

        return hook

    def keep(name):
        def hook(x, hook):
            store[name] = x

        return hook

    def stop(normed, hook):
        raise StopAtLayerException(normed[local, tails])

    gated = {act_name(site, layer): layer for layer in range(model.cfg.n_layers) for site in ("attn_out", "mlp_out")}
    hooks = [(act_name("embed"), corrupt), *((name, gate(layer, name)) for name, layer in gated.items()),
             *((name, keep(name)) for name in names if name not in gated), (act_name("final_out"), stop)]
    extra = {} if cache is None else {"past_key_values": cache}
    with torch.enable_grad(), bridge_reads_cache(model.bridge, cache is not None):
        normed = model.bridge.run_with_hooks(batch.tokens[rows[:, None], at], attention_mask=torch.cat([cached, computed], 1).long(),
                                             fwd_hooks=hooks, position_ids=at, **extra)
        p = unembed(model, normed).softmax(-1)[local, batch.answers[rows]]

    def backward(layer: int | None) -> dict:
        dropped.layer = layer
        with torch.enable_grad():
            grads = torch.autograd.grad(p.sum(), [store[name] for name in names], retain_graph=True)
        return dict(zip(names, grads))

    return _CorruptedRun(at, computed, {name: store[name].detach() for name in names}, p.detach(), backward)


# ---------------------------------------------------------------------------------------------------------------
# Its error


def agreement(
    exact: Float[torch.Tensor, "kind layer batch pos"],
    estimate: Float[torch.Tensor, "kind layer batch pos"],
    cells: Bool[torch.Tensor, "kind layer batch pos"],
    kinds: Sequence[str],
    sampled: bool,
    threshold: float = THRESHOLD,
    estimator: str = "atp",
) -> pd.DataFrame:
    """An estimate (`estimator`: "atp", or "graddrop" for `atp_trace(graddrop=True)`) against exact patching on `cells`
    (seed-averaged effects): one row per kind and one for all cells. Any shape with the kind first works
    (`atp_paths` passes [kind, layer, head, prompt]); `threshold` is the smallest exact effect a false negative
    misses, in the effects' own unit."""
    records = []
    parts = [(kind, exact[k][cells[k]], estimate[k][cells[k]]) for k, kind in enumerate(kinds)]
    for kind, x, y in [*parts, ("all", exact[cells], estimate[cells])]:
        records.append({"kind": kind, "estimator": estimator, "sampled": sampled,
                        **_statistics(x.double().numpy(), y.double().numpy(), threshold)})
    return pd.DataFrame.from_records(records)


def _statistics(exact: np.ndarray, estimate: np.ndarray, threshold: float = THRESHOLD) -> dict:
    n = len(exact)
    k = min(TOP_K, n)
    top = lambda values: set(np.argsort(-values, kind="stable")[:k].tolist())  # noqa: E731
    found = exact >= threshold
    return {
        "n_cells": n, "pearson": _correlation(exact, estimate), "spearman": _correlation(_ranks(exact), _ranks(estimate)),
        "top_k": k, "top_k_overlap": len(top(exact) & top(estimate)) / k if k else float("nan"),
        "threshold": threshold, "n_exact_above": int(found.sum()),
        "false_negatives": int((found & (estimate < exact / 2)).sum()),
        "max_abs_error": float(np.abs(exact - estimate).max()) if n else float("nan"),
    }


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank(method="average").to_numpy()


def sample_cells(estimate: Float[torch.Tensor, "kind layer batch pos"], restorable: Bool[torch.Tensor, "..."],
                 seed: int = SAMPLE_SEED, n_top: int = N_TOP, n_random: int = N_RANDOM) -> Bool[torch.Tensor, "kind layer batch pos"]:
    """Per kind the `n_top` largest AtP cells and `n_random` other cells drawn with a seeded generator, among the
    cells `restorable` allows (broadcast to `estimate`'s shape: [batch, pos] for the trace, a full mask for
    `atp_paths`)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(estimate.shape, dtype=torch.bool)
    for k in range(estimate.shape[0]):
        candidates = torch.nonzero(restorable.expand_as(estimate)[k].flatten()).flatten()
        values = estimate[k].flatten()[candidates]
        top = candidates[torch.argsort(values, descending=True, stable=True)[:n_top]]
        rest = candidates[~torch.isin(candidates, top)]
        drawn = rest[torch.randperm(len(rest), generator=generator)[:n_random]]
        chosen[k].view(-1)[torch.cat([top, drawn])] = True
    return chosen


def exact_cells(model: LoadedModel, atp: TraceEffects, cells: Bool[torch.Tensor, "kind layer batch pos"], seeds: Sequence[int],
                noise: float, max_rows: int = 1024, engine=None) -> Float[torch.Tensor, "kind layer batch pos"]:
    """The exact trace's seed-averaged effect on `cells` only (zero elsewhere), on the same noise draws (`noise` ×
    the std of the subjects' embeddings). `engine`: per seed one session of the nnsight engine restores the cells
    (`restorations.engine_restorations`, full width, as `trace_effects(engine=...)`)."""
    batch, n_layers = atp.batch, model.cfg.n_layers
    out = torch.zeros(cells.shape)
    device = batch.tokens.device
    jobs = []
    for k in range(len(atp.kinds)):
        for layer in range(n_layers):
            where = torch.nonzero(cells[k, layer])
            if len(where):
                jobs.append((k, layer, where, Restorations(where[:, 0].to(device), where[:, 1].to(device))))
    if engine is None:
        clean, std = _clean_states(model, batch, atp.kinds)
    for seed in seeds:
        if engine is None:
            states = _corrupted_states(model, batch, subject_noise(batch, noise * std, seed, model.cfg.d_model), clean, True,
                                       resid_mid="mlp" in atp.kinds)
            restored = _restored_probs_cached(model, batch, [(atp.kinds[k], layer, rows) for k, layer, _, rows in jobs],
                                              states, atp.window, max_rows)
            p_corrupt = states.p_corrupt
        else:
            got, restored = engine_restorations(model, batch, engine, noise, seed,
                                                [(atp.kinds[k], layer, rows) for k, layer, _, rows in jobs],
                                                atp.window, max_rows)
            p_corrupt = got["p_corrupt"]
        for (k, layer, where, rows), probs in zip(jobs, restored):
            out[k, layer, where[:, 0], where[:, 1]] += ((probs - p_corrupt[rows.prompts.to(p_corrupt.device)]) / len(seeds)).cpu()
    return out


def sampled_agreement(model: LoadedModel, estimates: dict[str, TraceEffects], seeds: Sequence[int], noise: float,
                      engine=None) -> pd.DataFrame:
    """`agreement` of every estimate (estimator → its effects) on the union of their `sample_cells`, whose exact
    effects are computed for them alone (`exact_cells`, through `engine` if given)."""
    first = next(iter(estimates.values()))
    means = {name: estimate.effects.mean(0) for name, estimate in estimates.items()}
    cells = torch.stack([sample_cells(mean, _restorable(first.batch)) for mean in means.values()]).any(0)
    exact = exact_cells(model, first, cells, seeds, noise, engine=engine)
    return pd.concat([agreement(exact, mean, cells, first.kinds, sampled=True, estimator=name) for name, mean in means.items()],
                     ignore_index=True)


def full_agreement(exact: TraceEffects, estimates: dict[str, TraceEffects]) -> pd.DataFrame:
    """`agreement` of every estimate on every restored cell of a run where exact patching ran too, over the kinds
    the estimates have (exact tracing also restores single MLP layers and windows without MLP0, which AtP does not
    estimate)."""
    out = []
    for name, estimate in estimates.items():
        mean = exact.effects.mean(0)[[exact.kinds.index(kind) for kind in estimate.kinds]]
        cells = _restorable(exact.batch).expand(mean.shape).clone()
        out.append(agreement(mean, estimate.effects.mean(0), cells, estimate.kinds, sampled=False, estimator=name))
    return pd.concat(out, ignore_index=True)


def agreement_summary(table: pd.DataFrame) -> dict:
    """summary.json's line: AtP's statistics over all cells (NaN → None), and GradDrop's under "graddrop" where
    it ran."""
    def over_all(estimator: str) -> dict:
        row = table[(table["kind"] == "all") & (table["estimator"] == estimator)].iloc[0].to_dict()
        return {key: (None if isinstance(value, float) and value != value else value) for key, value in row.items()
                if key not in ("kind", "estimator")}

    summary = over_all("atp")
    if (table["estimator"] == "graddrop").any():
        summary["graddrop"] = over_all("graddrop")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# The `trace` command's check: exact patching, AtP, or both


METHODS = ("exact", "atp", "both")


def _run(model: LoadedModel, known: list[Encoded], *, noise: float, window: int, seeds: Sequence[int], method: str,
         graddrop: bool, progress: Progress, engine=None, **_sizes) -> dict[str, pd.DataFrame]:
    """`exact`: causal_trace and trace_peaks; `atp`: atp_trace and atp_agreement on a sample restored exactly;
    `both`: all four, atp_agreement on every cell. `graddrop` adds GradDrop's rows to atp_agreement. `engine` (an
    nnsight engine, `trace --remote`) runs every pass: exact tracing one session per seed, each AtP estimate one
    session, the sample's exact restorations one session per seed."""
    check_method(method, graddrop)
    tables, exact = {}, None
    if method != "atp":
        exact = trace_effects(model, known, noise, seeds, window, progress=progress, engine=engine)
        tables["causal_trace"] = trace_table(exact)
        tables["trace_peaks"] = trace_peaks(tables["causal_trace"])
    if method != "exact":
        estimates = {"atp": atp_trace(model, known, noise, seeds, window, progress=progress, engine=engine)}
        if graddrop:
            estimates["graddrop"] = atp_trace(model, known, noise, seeds, window, progress=progress, graddrop=True,
                                              engine=engine)
        tables["atp_trace"] = trace_table(estimates["atp"])
        tables["atp_agreement"] = (full_agreement(exact, estimates) if exact is not None
                                   else sampled_agreement(model, estimates, seeds, noise, engine))
    return tables


def check_method(method: str, graddrop: bool) -> None:
    """`trace`'s --method and --graddrop, refused in one line before anything runs or is planned."""
    if method not in METHODS:
        raise FactscopeError(f"unknown trace method {method!r} (use {', '.join(METHODS)})")
    if graddrop and method == "exact":
        raise FactscopeError("--graddrop corrects attribution patching: use it with --method atp or both")


def _passes(n_layers: int, noise: float, window: int, seeds: Sequence[int], method: str, graddrop: bool, **_) -> int:
    exact = trace_passes(n_layers, seeds, window=window) if method != "atp" else 0
    return exact + (atp_passes(seeds) * (1 + graddrop) if method != "exact" else 0)


def _remote_cost(n_layers: int, known: list[Encoded], *, seeds: Sequence[int], method: str, graddrop: bool,
                 d_model: int, window: int = WINDOW, **_) -> tuple[int, int, int]:
    """Through an engine (requests, bytes back, bytes sent): exact tracing's sessions (`trace_remote_cost`) unless
    `atp`; one session per estimate (AtP, and GradDrop with `graddrop`) bringing back p_clean per prompt, the std
    (fp64), p_corrupt per seed and prompt and the estimate per seed, kind, layer and restorable cell (fp32), and
    sending every seed's draws; with `atp`, the sampled exact check, one session per seed
    (`restorations.restoration_session_cost`). That check's bytes back are an upper bound: its cells are chosen from the
    estimates, so they are counted as if the estimators' samples did not overlap and every cell needed a pass
    (the residual after the last block needs none)."""
    n, n_seeds, estimators = len(known), len(seeds), 1 + graddrop
    cells, subject = known_cells(known)
    costs = [trace_remote_cost(n_layers, known, seeds, d_model, window=window)] if method != "atp" else []
    if method != "exact":
        back = 4 * n + 8 + n_seeds * 4 * n + n_seeds * len(TRACE_KINDS) * n_layers * cells * 4
        costs += [(1, back, n_seeds * subject * d_model * 4)] * estimators
    if method == "atp":
        sampled = estimators * len(TRACE_KINDS) * min(N_TOP + N_RANDOM, n_layers * cells)
        costs += [restoration_session_cost(n, sampled, subject, d_model)] * n_seeds
    return tuple(sum(column) for column in zip(*costs))


def _summary(tables) -> dict:
    summary = {}
    if "causal_trace" in tables:
        summary.update(trace_summary(tables["causal_trace"], tables["trace_peaks"]))
    if "atp_agreement" in tables:
        summary["atp_agreement"] = agreement_summary(tables["atp_agreement"])
    return summary


CHECK = CausalCheck(
    "trace", "trace", ("causal_trace", "trace_peaks", "atp_trace", "atp_agreement"),
    ("noise", "window", "seeds", "method", "graddrop", "d_model"),
    _passes, _run, _summary, remote=True, remote_cost=_remote_cost,
)
