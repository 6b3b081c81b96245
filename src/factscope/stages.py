"""The library's entry points: one function per command, taking the command's options as arguments and returning
the finished run (`rundir.Run`, which shows its summary when displayed in Jupyter).

    import factscope
    run = factscope.analyze("smollm2-135m", out="runs/smollm2")
    run = factscope.ablate(run.path, limit=24)
    run = factscope.trace(run.path, limit=6, seeds=[0])

Each stage checks its inputs before any model work, writes its run directory atomically (see `rundir`), and
re-renders the report last, so a rendering failure cannot cost the tables. How a stage talks to a person —
spinners, progress bars, warnings — is a `Reporter`; the default says nothing, the CLI's draws with rich.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from . import bootstrap, rundir, stage_io
from .errors import FactscopeError
from .stage_io import (
    QUIET, Reporter, causal_inputs, causal_run, check_device, finished_run, refuse_existing, remote_model,
    run_json, run_targets, write_causal, write_report,
)
from .taxonomy import DEFAULT_MODEL


def recall(
    model: str = DEFAULT_MODEL,
    dataset: str | Path | None = None,
    out: str | Path = "factscope-recall",
    *,
    overwrite: bool = False,
    device: str = "cpu",
    batch_size: int = 32,
    bos: bool | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    remote: bool = False,
    reporter: Reporter = QUIET,
) -> rundir.Run:
    """Which facts does the model know? Writes OUT/recall.csv and OUT/summary.json. `remote`: the passes run on
    NDIF (`model` is a Hub id) and only each prompt's rank, probability, logit and top tokens come back. `dtype`:
    float32 by default; a remote run runs in the dtype NDIF serves (`remote.check_dtype` refuses any other)."""
    from .recall import accuracy_table, recall as recall_table

    out = Path(out)
    sending = nullcontext
    if remote:
        dtype, sending = _before_remote(model, dataset, dtype, batch_size, bos, reporter, command="recall")
    with rundir.locked(out):
        refuse_existing(out, overwrite, dataset=dataset)
        loaded, encoded, source, engine = _load(model, dataset, remote=remote, device=device, bos=bos,
                                                dtype=dtype, threads=threads, reporter=reporter)
        with reporter.progress("recall", len(encoded)) as advance, sending():
            table = recall_table(loaded, encoded, batch_size=batch_size, progress=advance, engine=engine)
        table.insert(0, "model", loaded.name)
        table["prepend_bos"] = loaded.prepend_bos
        accuracy = accuracy_table(table)
        config = {"command": "recall", "batch_size": batch_size, "prepend_bos": loaded.prepend_bos,
                  "device": _used_device(loaded, device), "dtype": loaded.dtype, "remote": remote}
        manifest = rundir.manifest(loaded.name, loaded.weights_sha256, source, config)
        with rundir.output_dir(out, overwrite, manifest=manifest) as run:
            rundir.write_table(table, run.staging, "recall")
            rundir.write_json(
                run.staging / rundir.SUMMARY,
                {
                    "model": loaded.name,
                    "weights_sha256": loaded.weights_sha256,
                    "dataset": str(source.path),
                    "prepend_bos": loaded.prepend_bos,
                    "n_prompts": len(table),
                    "accuracy": float(accuracy.iloc[-1]["accuracy"]),
                    "accuracy_per_relation": dict(zip(accuracy["relation"], accuracy["accuracy"].astype(float))),
                    **({"remote": {"requests": engine.requests, "bytes_back": engine.bytes_back}} if remote else {}),
                },
            )
        return rundir.load_run(out)


def analyze(
    model: str = DEFAULT_MODEL,
    dataset: str | Path | None = None,
    out: str | Path = "factscope-run",
    *,
    overwrite: bool = False,
    device: str = "cpu",
    batch_size: int = 16,
    bos: bool | None = None,
    all_prompts: bool = False,
    k: float = 10.0,
    z: float = 3.0,
    swap: bool = False,
    resume: bool = False,
    report: bool = True,
    dtype: str | None = None,
    threads: int | None = None,
    remote: bool = False,
    reporter: Reporter = QUIET,
) -> rundir.Run:
    """Exact DLA by component and source group, the logit lens, head classes and mechanism shares (and, with
    `swap`, the subject swap). `k` and `z` are the head-class rule's dominance ratio and significance.

    `remote`: the passes run on NDIF through nnsight (`model` is a Hub id; see `remote_plan`, printed before
    anything is sent), and so do the maths that read weights: only the tokenizer and config are read here. `dtype`:
    float32 by default; a remote run runs in the dtype NDIF serves (`remote.check_dtype` refuses any other)."""
    import pandas as pd

    from .data import relation_targets, targets_table
    from .decompose import finish_batches, write_batches
    from .forward import local_end_activations
    from .mechanisms import ClassRule, summarize
    from .memory import release_unreferenced

    out = Path(out)
    sending = nullcontext
    if remote:
        dtype, sending = _before_remote(model, dataset, dtype, batch_size, bos, reporter, command="analyze", swap=swap)
    with rundir.locked(out):
        refuse_existing(out, overwrite, resume, dataset)
        rule = ClassRule(k=k, z=z)  # invalid k or z is refused before the model loads
        loaded, encoded, source, engine = _load(model, dataset, remote=remote, device=device, bos=bos,
                                                dtype=dtype, threads=threads, reporter=reporter)
        config = {"command": "analyze", "batch_size": batch_size, "known_only": not all_prompts, "k": k, "z": z,
                  "swap": swap, "prepend_bos": loaded.prepend_bos, "device": _used_device(loaded, device),
                  "dtype": loaded.dtype, "remote": remote}
        manifest = rundir.manifest(loaded.name, loaded.weights_sha256, source, config)
        with rundir.output_dir(out, overwrite, resume, manifest) as run:
            with reporter.progress("analyze", len(encoded)) as advance:
                summary = {"model": loaded.name, "weights_sha256": loaded.weights_sha256, "dataset": str(source.path)}
                with sending():
                    written = write_batches(run, loaded, encoded, batch_size, advance, known_only=not all_prompts,
                                            engine=engine or local_end_activations)
            if not swap:
                # the weights' pages beside the merge of the batch tables, or beside the attribution tables read by
                # `summarize`, were the run's peak (SmolLM2, fp32: 1.7 GB against 0.95 GB for the model alone);
                # nothing after this point runs the model
                loaded = None
                release_unreferenced()
            summary.update(finish_batches(run, encoded, written))
            # R_r over every prompt of the dataset, known or not: the one every later stage of this run uses
            rundir.write_table(pd.DataFrame(targets_table(relation_targets(encoded))), run.staging, "relation_targets")
            recall_rows = rundir.read_table(run.staging, "recall", required=True)
            summary["accuracy_ci"] = bootstrap.mean_interval(recall_rows["correct"], relations=recall_rows["relation"])
            summary["accuracy_intervals"] = bootstrap.record(bootstrap.count_relations(recall_rows["relation"]))
            if summary["n_analysed"] == 0:
                raise FactscopeError("no prompt is a known fact for this model; rerun with --all-prompts")
            summary.update(summarize(run.staging, rule))
            if swap:
                from .mechanisms import swap_summary
                from .swap import subject_swap

                # all prompts decomposed, known or not, so that every R_r is the one the analysis used; measured
                # on the prompts the analysis analysed
                analysed = recall_rows if all_prompts else recall_rows[recall_rows["correct"]]
                with sending():
                    stats = subject_swap(loaded, encoded, rundir.read_table(run.staging, "heads", required=True),
                                         batch_size, engine=engine or local_end_activations,
                                         measured=set(analysed["prompt_id"].astype(str)))
                rundir.write_table(stats, run.staging, "subject_swap")
                summary["subject_swap"] = swap_summary(stats)
            if remote:  # the swap's passes included
                summary["remote"] = {"requests": engine.requests, "bytes_back": engine.bytes_back}
            rundir.write_json(run.staging / rundir.SUMMARY, summary)
        if report:  # after the analysis is safely in place: a rendering failure cannot cost it
            write_report(out, reporter=reporter)
        return rundir.load_run(out)


def ablate(
    run_dir: str | Path,
    *,
    mode: str = "mean",
    window: int = 9,
    noise_scales: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    method: str = "exact",
    limit: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    overwrite: bool = False,
    report: bool = True,
    remote: bool = False,
    reporter: Reporter = QUIET,
) -> rundir.Run:
    """Causal checks of a finished run on its model's known facts: attention knockout (windows of `window`
    layers), mechanism ablations (`mode` "mean" or "zero"; alone, in pairs, together), noise robustness
    (`noise_scales` × `seeds`), attribute extraction rate, subject enrichment. `limit`: at most N known facts,
    taken in turn from each relation. Adds their tables and summary.json["causal"] to the run. `method` "atp"
    also estimates the removal of every single head path and MLP at END by attribution patching
    (path_ablations.csv, with atp_path_agreement.csv from a sample ablated exactly); "both" ablates every path
    exactly too and compares them on every (path, prompt).

    `remote`: the passes of a run analysed with `analyze --remote` run on NDIF through nnsight, as nnsight
    sessions and traces (`causal.remote_checks`: every check, path AtP's gradients included); each brings back a
    few numbers per prompt (path AtP: one per path and prompt). The plan (`remote_ablate_plan`) is printed before
    anything is sent."""
    from .causal.atp_paths import METHODS
    from . import causal

    if mode not in ("mean", "zero"):
        raise FactscopeError(f"ablation mode {mode!r}: use 'mean' or 'zero'")
    if method not in METHODS:
        raise FactscopeError(f"ablate method {method!r}: use {', '.join(METHODS)}")
    if remote:
        seeds = checked_seeds(seeds) if seeds is not None else None
        noise = {name: list(value) for name, value in (("noise_scales", noise_scales), ("seeds", seeds)) if value is not None}
        return _remote_ablate(run_dir, window=window, mode=mode, noise=noise, method=method, limit=limit,
                              overwrite=overwrite, report=report, reporter=reporter)
    options = {"mode": mode, "window": window, "method": method}
    if noise_scales is not None:
        options["noise_scales"] = list(noise_scales)
    if seeds is not None:
        options["seeds"] = checked_seeds(seeds)
    run_dir = finished_run(run_dir)
    with rundir.locked(run_dir):
        trace, targets = rundir.read_table(run_dir, "causal_trace"), run_targets(run_dir, reporter)  # before the model
        model, known, heads, _ = causal_inputs(run_dir, "ablate", overwrite, device, threads, limit, reporter)
        tables, summary = causal.ablate_checks(model, known, heads, **options, trace=trace, targets=targets,
                                               progress=reporter.progress)
        return write_causal(run_dir, "ablate", tables, summary, report, reporter)


def trace(
    run_dir: str | Path,
    *,
    noise: float = 3.0,
    window: int = 10,
    seeds: Sequence[int] | None = None,
    method: str = "exact",
    graddrop: bool = False,
    limit: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    overwrite: bool = False,
    report: bool = True,
    remote: bool = False,
    reporter: Reporter = QUIET,
) -> rundir.Run:
    """Causal tracing (Meng et al. 2022) on a finished run's known facts: noise of `noise` × the std of the
    subjects' token embeddings on the subject, one clean state restored per (layer, position); attention and
    MLP outputs restored over `window` layers. Adds causal_trace.parquet, trace_peaks.csv and
    summary.json["causal"]["trace"] to the run. `method` "atp" estimates the restorations by attribution patching
    instead (atp_trace.parquet, with atp_agreement.csv from a sample restored exactly), "both" runs both and
    compares them on every cell. `graddrop` (with "atp" or "both") adds AtP*'s GradDrop and its error to
    atp_agreement.csv.

    `remote`: a run analysed with `analyze --remote` is traced on NDIF through nnsight: exact tracing one session
    per seed, p(a) per restoration coming back; each AtP estimate one session, its estimate per cell coming back;
    the sampled exact check one session per seed (`remote_trace_plan` is printed before anything is sent)."""
    from . import causal
    from .causal.atp import check_method

    check_method(method, graddrop)
    options = {"noise": noise, "window": window, "method": method, "graddrop": graddrop}
    if seeds is not None:
        options["seeds"] = checked_seeds(seeds)
    if remote:
        return _remote_trace(run_dir, options=options, limit=limit, overwrite=overwrite, report=report,
                             reporter=reporter)
    run_dir = finished_run(run_dir)
    with rundir.locked(run_dir):
        enrichment = rundir.read_table(run_dir, "enrichment")
        model, known, _, _ = causal_inputs(run_dir, "trace", overwrite, device, threads, limit, reporter)
        tables, summary = causal.trace_checks(model, known, **options, enrichment=enrichment, progress=reporter.progress)
        return write_causal(run_dir, "trace", tables, summary, report, reporter)


def _remote_trace(run_dir: str | Path, *, options: dict, limit: int | None, overwrite: bool, report: bool,
                  reporter: Reporter) -> rundir.Run:
    """`trace(remote=True)`: the trace checks through nnsight sessions; the refusals come before the run is locked."""
    from . import causal
    from . import remote as ndif

    run_dir = _remote_run(run_dir, "trace")
    reporter.warn(remote_trace_plan(run_dir, seeds=options.get("seeds"), limit=limit, method=options["method"],
                                    graddrop=options["graddrop"]).describe())
    with rundir.locked(run_dir), ndif.one_line_errors():
        enrichment = rundir.read_table(run_dir, "enrichment")
        model, known, _, engine = causal_inputs(run_dir, "trace", overwrite, "cpu", None, limit, reporter,
                                                 remote=True)
        tables, summary = causal.trace_checks(model, known, **options, enrichment=enrichment, engine=engine,
                                              progress=reporter.progress)
        summary["trace"]["remote"] = {"requests": engine.requests, "bytes_back": engine.bytes_back,
                                      "bytes_sent": engine.bytes_sent}
        return write_causal(run_dir, "trace", tables, summary, report, reporter)


def _remote_run(run_dir: str | Path, command: str) -> Path:
    """A finished run of `analyze --remote` (a local one is refused), once NDIF's preflight passed."""
    from . import remote as ndif

    run_dir = finished_run(run_dir)
    manifest = run_json(run_dir / rundir.MANIFEST)
    if not manifest.get("config", {}).get("remote"):
        raise FactscopeError(f"{run_dir}: analysed locally; {command} --remote checks a run of `analyze --remote` "
                             "(drop --remote to check this one locally)")
    ndif.preflight(manifest.get("model", ""), send=True)
    return run_dir


SEED_LIMIT = 2**63  # torch.Generator takes any 64-bit seed, numpy's bootstrap no negative one; JSON readers want int64


def checked_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds as the noise draws take them, refused in one line before the model loads if any cannot be one."""
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
            raise FactscopeError(f"seed {seed!r}: seeds are integers from 0 to 2^63-1")
    if not seeds:
        raise FactscopeError("seeds: give at least one")
    return [int(seed) for seed in seeds]


def remote_ablate_plan(run_dir: str | Path, *, window: int = 9, mode: str = "mean", noise_scales: Sequence[float] | None = None,
                       seeds: Sequence[int] | None = None, method: str = "exact", limit: int | None = None):
    """What `ablate --remote` would send and get back (`remote.Plan`), from the run, the model's config and
    tokenizer: the recall passes that find the known facts again, then the requests of the checks that run
    remotely, each bringing back what its check says (`CausalCheck.remote_cost`; path AtP's under `method`). The
    prompts are the run's known facts as its recall.csv has them (the run finds them again on the server).
    `noise_scales` and `seeds`: the noise check's (None: its own), whose draws are sent."""
    from . import causal
    from . import remote as ndif

    seeds = checked_seeds(seeds) if seeds is not None else None
    model, heads, recalled, checked = _remote_plan_inputs(run_dir, limit)
    noise = {name: value for name, value in (("noise_scales", noise_scales), ("seeds", seeds)) if value is not None}
    requests, bytes_back, bytes_sent = causal.remote_ablate_cost(model, checked, heads, window=window, mode=mode,
                                                                 targets=run_targets(Path(run_dir), QUIET),
                                                                 method=method, **noise)
    return ndif.causal_plan(model.name, recalled, causal.KNOWN_BATCH, len(checked), requests, bytes_back, bytes_sent,
                            causal.remote_scope("ablate"))


def remote_trace_plan(run_dir: str | Path, *, seeds: Sequence[int] | None = None, limit: int | None = None,
                      method: str = "exact", graddrop: bool = False, window: int = 10):
    """What `trace --remote` would send and get back (`remote.Plan`): the recall passes, then the trace check's
    sessions (`causal.remote_trace_cost`), over the prompts `_remote_plan_inputs` expects the server to find
    again. `window`: the trace's, which decides how many of its restorations are distinct (an MLP window without
    MLP0 that never held MLP0 is its MLP window)."""
    from . import causal
    from . import remote as ndif
    from .causal.atp import check_method
    from .causal.trace import SEEDS

    check_method(method, graddrop)
    seeds = checked_seeds(seeds) if seeds is not None else None
    model, _, recalled, checked = _remote_plan_inputs(run_dir, limit)
    requests, bytes_back, bytes_sent = causal.remote_trace_cost(model, checked, seeds=seeds if seeds is not None else SEEDS,
                                                                method=method, graddrop=graddrop, window=window)
    note = "bytes back at most: the sampled exact check's cells are chosen from the estimates" if method == "atp" else ""
    return ndif.causal_plan(model.name, recalled, causal.KNOWN_BATCH, len(checked), requests, bytes_back, bytes_sent,
                            note)


def _remote_plan_inputs(run_dir: str | Path, limit: int | None):
    """For a remote causal plan, from the run, the model's config and tokenizer: the config-only model, the run's
    heads, how many prompts the recall passes will read (none when the run analysed every prompt), and the prompts
    checked: the run's known facts as its recall.csv has them (the run finds them again on the server), spread."""
    from . import causal
    from . import remote as ndif
    from .data import encode_all

    run_dir = finished_run(run_dir)
    manifest, heads, facts = causal_run(run_dir)
    ndif.check_model_id(manifest["model"])
    model = remote_model(manifest["model"], manifest.get("config", {}).get("prepend_bos"), ndif.SERVED_DTYPE)
    encoded = encode_all(facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)
    known_only = manifest.get("config", {}).get("known_only", True)
    if known_only:
        correct = set(rundir.read_table(run_dir, "recall", required=True).query("correct")["prompt_id"].astype(str))
        checked = [item for item in encoded if item.fact.prompt_id in correct]
    else:
        checked = encoded
    return model, heads, len(encoded) if known_only else 0, causal.spread(checked, limit)


def _remote_ablate(run_dir: str | Path, *, window: int, mode: str, noise: dict, method: str, limit: int | None,
                   overwrite: bool, report: bool, reporter: Reporter) -> rundir.Run:
    """`ablate(remote=True)`: every check that can refuse comes before the run directory is locked."""
    from . import causal
    from . import remote as ndif

    run_dir = _remote_run(run_dir, "ablate")
    reporter.warn(remote_ablate_plan(run_dir, window=window, mode=mode, method=method, limit=limit, **noise).describe())
    with rundir.locked(run_dir), ndif.one_line_errors():
        trace, targets = rundir.read_table(run_dir, "causal_trace"), run_targets(run_dir, reporter)
        model, known, heads, engine = causal_inputs(run_dir, "ablate", overwrite, "cpu", None, limit, reporter,
                                                     remote=True)
        tables, summary = causal.remote_ablate_checks(model, known, heads, engine, window=window, mode=mode, **noise,
                                                      targets=targets, trace=trace, method=method,
                                                      progress=reporter.progress)
        summary["ablate"]["remote"] |= {"requests": engine.requests, "bytes_back": engine.bytes_back,
                                        "bytes_sent": engine.bytes_sent}
        return write_causal(run_dir, "ablate", tables, summary, report, reporter)


def compare(run_dirs: Sequence[str | Path], out: str | Path = "compare.html", overwrite: bool = False) -> tuple[Path, Path]:
    """Runs side by side (recall, head classes per model size, their depth, mechanism shares, exactness):
    writes OUT (HTML) and the tidy table beside it as .csv; returns both paths."""
    from .report.compare import write_compare

    return write_compare(run_dirs, out, overwrite)


def import_facts(source: str | Path, format: str, out: str | Path = "facts.jsonl", prefix: str = "",
                 limit: int | None = None, overwrite: bool = False) -> list[dict]:
    """Convert known_1000 or CounterFact records into factscope's facts (JSONL) at OUT; returns the rows."""
    from .data import facts_jsonl, import_facts as read_records, imported_facts_file

    if Path(out).suffix.lower() == ".csv":
        raise FactscopeError(f"{out}: import-facts writes JSONL; name the output .jsonl")
    out = rundir.check_file_output(out, overwrite, imported_facts_file)
    rows = read_records(source, format, prefix, limit)
    rundir.atomic_write_text(out, facts_jsonl(rows))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Shared steps


def remote_plan(model: str, dataset: str | Path | None = None, *, batch_size: int = 16, bos: bool | None = None,
                command: str = "analyze", dtype: str | None = None, swap: bool = False):
    """What `analyze --remote` (or `recall --remote`) would send and get back (`remote.Plan`), from the model's
    config and tokenizer only: no weights are loaded and nothing is sent. A `dtype` the run could not honour is
    refused here as it would be there. `swap`: with `analyze --swap`'s two decompositions of the swapped
    prompts (`swap.subject_swap`: every prompt of a relation with two subjects, before and after the swap)."""
    from . import remote as ndif
    from .data import encode_all, load_facts, relation_targets, shipped_dataset
    from .models import tokenizer_prepends_bos

    ndif.check_dtype(dtype)
    ndif.check_model_id(model)
    config, tokenizer = stage_io.hub_config_and_tokenizer(model)  # looked up at call time, as remote_model does
    facts = load_facts(Path(dataset) if dataset is not None else shipped_dataset())
    prepend = tokenizer_prepends_bos(tokenizer) if bos is None else bos
    encoded = encode_all(facts, tokenizer, prepend)
    if command == "recall":
        return ndif.recall_plan(model, len(encoded), batch_size)
    targets = relation_targets(encoded)
    widths = [1 + sum(t != item.attribute_token for t in targets[item.fact.relation]) for item in encoded]
    shape = ndif.Shape.from_config(config)
    plan = ndif.plan(model, shape, widths, batch_size)
    if not swap:
        return plan
    from .swap import swap_subjects

    swapped = swap_subjects(facts)
    both = ndif.plan(model, shape, [w for item, w in zip(encoded, widths) if item.fact.prompt_id in swapped], batch_size)
    return replace(plan, requests=plan.requests + 2 * both.requests, bytes_back=plan.bytes_back + 2 * both.bytes_back,
                   note=f"with --swap's two passes over {both.prompts} prompts")


def _before_remote(model: str, dataset: str | Path | None, dtype: str | None, batch_size: int, bos: bool | None,
                   reporter: Reporter, command: str, swap: bool = False):
    """What a remote `recall` or `analyze` does before the run directory is touched: every check that can refuse
    it, and its cost plan printed. Returns the dtype it runs in and what makes a context that turns the
    transport's errors into one line (one per block of requests)."""
    from . import remote as ndif

    dtype = ndif.check_dtype(dtype)
    ndif.preflight(model, send=True)
    reporter.warn(remote_plan(model, dataset, batch_size=batch_size, bos=bos, command=command, swap=swap).describe())
    return dtype, ndif.one_line_errors


def _load(model: str, dataset: str | Path | None, *, remote: bool, device: str, bos: bool | None, dtype: str | None,
          threads: int | None, reporter: Reporter):
    """The model, the dataset encoded for it, the dataset as read (`data.Dataset`), and the engine whose passes a remote run sends
    (None: the local engine). A remote run reads the model's config and tokenizer only (`_prepare_remote`)."""
    if remote:
        from . import remote as ndif

        loaded, encoded, source = _prepare_remote(model, dataset, bos, dtype, reporter)
        return loaded, encoded, source, ndif.remote_engine(model, loaded.tokenizer)
    loaded, encoded, source = _prepare(model, dataset, device, bos, reporter, dtype=dtype or "float32", threads=threads)
    return loaded, encoded, source, None


def _prepare_remote(model_name: str, dataset: str | Path | None, bos: bool | None, dtype: str, reporter: Reporter):
    """`_prepare` for a remote run: the dataset, then the Hub config and tokenizer, never the weights."""
    from .data import encode_all, read_dataset

    source = read_dataset(dataset)
    model = remote_model(model_name, bos, dtype, reporter)
    return model, encode_all(source.facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens), source


def _prepare(model_name: str, dataset: str | Path | None, device: str, bos: bool | None, reporter: Reporter, seed: int = 0,
             dtype: str = "float32", threads: int | None = None):
    """Validate the dataset before the (slow) model load, then tokenize it for that model.

    Seeds torch with `seed`, the value the command records in run.json (`rundir.manifest`).
    """
    import torch

    from .data import encode_all, read_dataset, single_target_relations
    from .memory import tune_allocator
    from .models import load_model

    source = read_dataset(dataset)
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    tune_allocator()
    with reporter.status(f"loading {model_name}"):
        model = load_model(model_name, device=device, prepend_bos=bos, dtype=dtype)
    encoded = encode_all(source.facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)
    single = single_target_relations(encoded)
    if single:
        which = ", ".join(f"relation {relation!r} has one attribute ({attribute!r})" for relation, attribute in single.items())
        skipped = "it" if len(single) == 1 else "them"
        reporter.warn(f"warning: {which}; analyses of a − mean(R∖a) skip {skipped}")
    torch.manual_seed(seed)
    return model, encoded, source


def _used_device(model, requested: str) -> str:
    """What run.json records: where the weights are, not only what was asked for."""
    return requested if requested == "auto" else str(model.device)


