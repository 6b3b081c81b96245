"""Causal checks of the additive story: does what DLA reads off the model also move its output?

DLA is correlational. Here we intervene at END (and, for causal tracing, at every position) and measure
what happens to the attribute's probability, logit and top-1 accuracy. One module per check:

- `knockout`    attention knockout (Geva et al. 2023): END may not attend to a token group;
- `ablation`    remove paths (a head's END←group contribution, an MLP at END) alone, in pairs, together, as
                total effects (the layers above react) and direct effects (only their share of END's residual);
- `noise`       noise on one mechanism: does the full model keep a first more often than the mechanism alone?
                (read at the scale where the full model's accuracy has halved, `causal_readings.HALVING_RULE`)
- `extraction`  attribute extraction rate (Geva et al. 2023) of every attention / MLP sublayer;
- `enrichment`  logit lens at the last subject token: from which layer is `a` decodable there;
- `trace`       causal tracing (Meng et al. 2022): noise on the subject, restore one clean state (MLP0 apart: one MLP
                layer alone, MLP windows without MLP0);
- `atp`         the same restorations estimated by attribution patching, with its error against exact patching;
- `atp_paths`   the effect of removing every head path and MLP at END estimated by attribution patching
                (`ablate --method atp|both`), with its error against exact path ablation.

`sites` says WHERE an intervention acts (typed paths, head masks, layer windows), `edits` WHAT it does there
(record, ablate, add noise), `scores` what is measured; `restorations` is what a restoration of causal tracing is,
for `trace`, `atp` and their nnsight sessions. Every condition is ONE batched forward pass over all
prompts (causal tracing stacks its restorations into the batch dimension). Passes stop at the final norm and
unembed END only, so the vocabulary-sized logits of every position are never materialised.

A new check is its own module defining `CHECK` (a `CausalCheck`), plus its entry in `CHECKS`; `ablate_checks`
and `trace_checks` run the checks of each command in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import pandas as pd

from ..data import Encoded
from ..models import LoadedModel
from . import ablation, atp, atp_paths, enrichment, extraction, knockout, noise, trace
from .ablation import robustness_summary
from .check import CausalCheck
from .enrichment import enrichment_summary
from .extraction import extraction_summary
from .knockout import knockout_summary
from .noise import NOISE_SCALES, SEEDS, noise_summary
from .scores import KNOWN_BATCH, known_facts, spread
from .sites import taxonomy_paths
from .trace import trace_peaks

__all__ = [
    "CHECKS", "KNOWN_BATCH", "CausalCheck", "NOISE_SCALES", "SEEDS", "ablate_checks", "enrichment_summary",
    "extraction_summary", "knockout_summary", "known_facts", "noise_summary", "remote_ablate_checks",
    "remote_ablate_cost", "remote_checks", "remote_scope", "remote_trace_cost",
    "robustness_summary", "spread", "taxonomy_paths", "trace_checks", "trace_peaks",
]

CHECKS: tuple[CausalCheck, ...] = (
    knockout.CHECK, ablation.CHECK, noise.CHECK, extraction.CHECK, enrichment.CHECK, atp_paths.CHECK, atp.CHECK,
)

# progress(label, total) → a context manager yielding advance(n) (or None), around each check's passes
ProgressBars = Callable[[str, int], AbstractContextManager[Callable[[int], None] | None]] | None


def ablate_checks(
    model: LoadedModel,
    known: list[Encoded],
    heads: pd.DataFrame,
    *,
    mode: str = ablation.MODE,
    window: int = knockout.WINDOW,
    noise_scales: Sequence[float] = NOISE_SCALES,
    seeds: Sequence[int] = SEEDS,
    progress: ProgressBars = None,
    trace: pd.DataFrame | None = None,
    targets: dict[str, dict[int, str]] | None = None,
    method: str = "exact",
) -> tuple[dict[str, pd.DataFrame], dict]:
    """The `ablate` command's checks on the known facts, for the head classes of `heads` (columns layer, head,
    class): tables by rundir.TABLES name, and the entries of summary.json["causal"]. `trace` is the run's
    causal_trace table, if it has one: the enrichment summary then names the MLP tracing peak. `targets` is the
    run's R_r (relation → target token → attribute; by default, from `known`): pass the analysis's own, so that
    a − mean(R∖a) means the same here as there whatever `known` was cut to. `method` "atp" adds attribution
    patching of every single path (with its error on a sample ablated exactly), "both" ablates every path exactly
    too; "exact" runs the mechanism grid only."""
    options = {
        **_knockout_options(model, heads, window),
        "mechanisms": taxonomy_paths(heads, model.cfg.n_layers), "mode": mode,
        "noise_scales": noise_scales, "seeds": seeds, "targets": targets, "method": method,
        **atp_paths.path_sizes(model), **noise.draw_sizes(model),
    }
    tables = _run(_of("ablate"), model, known, options, progress)
    earlier = {"causal_trace": trace} if trace is not None else {}
    summary = {"ablate": {"mode": mode, "window": window, "noise_scales": list(noise_scales), "seeds": list(seeds),
                          "method": method, "n_prompts": len(known)}}
    # a check that wrote nothing (path AtP under --method exact) adds no entry
    summary.update((check.name, check.summarize({**earlier, **tables})) for check in _of("ablate")
                   if any(name in tables for name in check.tables))
    return tables, summary


def trace_checks(
    model: LoadedModel,
    known: list[Encoded],
    *,
    noise: float = trace.NOISE,
    window: int = trace.WINDOW,
    seeds: Sequence[int] = trace.SEEDS,
    method: str = "exact",
    graddrop: bool = False,
    progress: ProgressBars = None,
    enrichment: pd.DataFrame | None = None,
    engine=None,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """The `trace` command's checks on the known facts: tables by rundir.TABLES name, and the entries of
    summary.json["causal"]. `method` is exact patching, attribution patching (`atp`, with its error on a sample
    restored exactly) or both; `graddrop` adds AtP*'s GradDrop to the AtP check. `enrichment` is the run's
    enrichment table, if it has one: its summary is redone with the new tracing peak (exact tracing only).
    `engine`: an nnsight engine whose sessions run every pass (`trace --remote`; `model` may hold no weights)."""
    options = {"noise": noise, "window": window, "seeds": seeds, "method": method, "graddrop": graddrop,
               "d_model": model.cfg.d_model}
    tables = _run(_of("trace"), model, known, options, progress, engine)
    settings = {"noise": noise, "window": window, "seeds": list(seeds), "method": method, "graddrop": graddrop,
                "n_prompts": len(known)}
    summary = {check.name: {**settings, **check.summarize(tables)} for check in _of("trace")}
    if enrichment is not None and "causal_trace" in tables:
        summary["enrichment"] = enrichment_summary(enrichment, tables["causal_trace"])
    return tables, summary


def remote_ablate_checks(
    model, known: list[Encoded], heads: pd.DataFrame, engine, *, window: int = knockout.WINDOW,
    mode: str = ablation.MODE, noise_scales: Sequence[float] = NOISE_SCALES, seeds: Sequence[int] = SEEDS,
    targets: dict[str, dict[int, str]] | None = None, trace: pd.DataFrame | None = None, progress: ProgressBars = None,
    method: str = "exact",
) -> tuple[dict[str, pd.DataFrame], dict]:
    """`ablate --remote`: the `ablate` checks that run through an nnsight engine (`CausalCheck.remote`: the
    attention knockout, the mechanism ablations, the noise check, the attribute extraction rate, subject
    enrichment and path AtP), with `engine`'s passes; `model` may hold no weights
    (`nnsight_engine.ConfigOnlyModel`). `mode`, `noise_scales`, `seeds`, `targets`, `trace` and `method` as
    `ablate_checks` takes them."""
    checks = remote_checks("ablate")
    options = _remote_options(model, heads, window, mode, noise_scales, seeds, targets, method)
    tables = _run(checks, model, known, options, progress, engine)
    earlier = {"causal_trace": trace} if trace is not None else {}
    ran = [check for check in checks if any(name in tables for name in check.tables)]  # path AtP: not under exact
    summary = {"ablate": {"mode": mode, "window": window, "noise_scales": list(noise_scales), "seeds": list(seeds),
                          "method": method, "n_prompts": len(known), "remote": {"checks": [check.name for check in ran]}}}
    summary.update((check.name, check.summarize({**earlier, **tables})) for check in ran)
    return tables, summary


def remote_checks(command: str) -> list[CausalCheck]:
    return [check for check in _of(command) if check.remote]


def remote_scope(command: str) -> str:
    """Which of `command`'s checks run remotely, in one line (the plan)."""
    return f"{command} --remote runs {', '.join(check.name for check in remote_checks(command))}"


def remote_ablate_cost(model, known: list[Encoded], heads: pd.DataFrame, *, window: int = knockout.WINDOW,
                       mode: str = ablation.MODE, noise_scales: Sequence[float] = NOISE_SCALES,
                       seeds: Sequence[int] = SEEDS, targets: dict[str, dict[int, str]] | None = None,
                       method: str = "exact") -> tuple[int, int, int]:
    """How many requests `remote_ablate_checks` sends over `known`, the bytes they bring back and the bytes of
    tensors they send besides the prompts (`CausalCheck.remote_cost`)."""
    options = _remote_options(model, heads, window, mode, noise_scales, seeds, targets, method)
    n_layers = model.cfg.n_layers
    costs = [check.remote_cost(n_layers, known, **{name: options[name] for name in check.options})
             for check in remote_checks("ablate")]
    return tuple(sum(column) for column in zip(*costs))


def remote_trace_cost(model, known: list[Encoded], *, seeds: Sequence[int] = trace.SEEDS, method: str = "exact",
                      graddrop: bool = False, window: int = trace.WINDOW) -> tuple[int, int, int]:
    """How many requests `trace_checks(engine=...)` sends over `known`, the bytes they bring back and the bytes of
    noise draws they send (`atp.CHECK.remote_cost`; with `method` "atp" the bytes back are an upper bound)."""
    return atp.CHECK.remote_cost(model.cfg.n_layers, known, seeds=seeds, method=method, graddrop=graddrop,
                                 d_model=model.cfg.d_model, window=window)


def _remote_options(model, heads: pd.DataFrame, window: int, mode: str, noise_scales: Sequence[float],
                    seeds: Sequence[int], targets: dict[str, dict[int, str]] | None, method: str) -> dict:
    return {**_knockout_options(model, heads, window), "mechanisms": taxonomy_paths(heads, model.cfg.n_layers),
            "mode": mode, "noise_scales": noise_scales, "seeds": seeds, "targets": targets, "method": method,
            **atp_paths.path_sizes(model), **noise.draw_sizes(model)}


def _knockout_options(model, heads: pd.DataFrame, window: int) -> dict:
    """The knockout's options as `ablate` sets them: every window, the run's subject and relation heads as sets."""
    return {"window": window, "head_sets": knockout.class_head_sets(heads),
            "blocked": knockout.blocked_groups(model.prepend_bos)}


def _of(command: str) -> list[CausalCheck]:
    return [check for check in CHECKS if check.command == command]


def _run(checks: list[CausalCheck], model: LoadedModel, known: list[Encoded], options: dict, progress: ProgressBars,
         engine=None) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    through = {} if engine is None else {"engine": engine}
    for check in checks:
        chosen = {name: options[name] for name in check.options}
        total = check.n_passes(model.cfg.n_layers, **chosen)
        if total == 0:  # nothing to run (path AtP under --method exact): no empty progress bar
            tables.update(check.run(model, known, progress=None, **chosen, **through))
            continue
        bar = progress(check.name, total) if progress else nullcontext()
        with bar as advance:
            tables.update(check.run(model, known, progress=advance, **chosen, **through))
    return tables
