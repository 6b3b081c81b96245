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

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from . import bootstrap, rundir
from .errors import FactscopeError
from .taxonomy import DEFAULT_MODEL

if TYPE_CHECKING:
    import pandas as pd

    from .data import Fact

Advance = Callable[[int], None]


class Reporter:
    """What a stage tells the person running it. Subclass it to show progress; this one is silent."""

    def status(self, text: str) -> AbstractContextManager:
        """Around a step of unknown length (loading a model)."""
        return nullcontext()

    def progress(self, label: str, total: int) -> AbstractContextManager[Advance]:
        """Around `total` steps; the context yields `advance(n)`."""
        return nullcontext(lambda n: None)

    def warn(self, text: str) -> None:
        """Something the person should know that does not stop the stage."""


QUIET = Reporter()


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
    engine, sending = None, nullcontext()
    if remote:  # every check that can refuse the run comes before the run directory is touched
        from . import remote as ndif

        dtype = ndif.check_dtype(dtype)
        ndif.preflight(model, send=True)
        reporter.warn(remote_plan(model, dataset, batch_size=batch_size, bos=bos, command="recall").describe())
        sending = ndif.one_line_errors()
    with rundir.locked(out):
        _refuse_existing(out, overwrite)
        if remote:
            loaded, encoded, dataset_path = _prepare_remote(model, dataset, bos, dtype, reporter)
            engine = ndif.remote_engine(model, loaded.tokenizer)
        else:
            loaded, encoded, dataset_path = _prepare(model, dataset, device, bos, reporter, dtype=dtype or "float32",
                                                     threads=threads)
        with reporter.progress("recall", len(encoded)) as advance, sending:
            table = recall_table(loaded, encoded, batch_size=batch_size, progress=advance, engine=engine)
        table.insert(0, "model", loaded.name)
        table["prepend_bos"] = loaded.prepend_bos
        accuracy = accuracy_table(table)
        config = {"command": "recall", "batch_size": batch_size, "prepend_bos": loaded.prepend_bos,
                  "device": _used_device(loaded, device), "dtype": loaded.dtype, "remote": remote}
        manifest = rundir.manifest(loaded.name, loaded.weights_sha256, dataset_path, config)
        with rundir.output_dir(out, overwrite, manifest=manifest) as run:
            rundir.write_table(table, run.staging, "recall")
            rundir.write_json(
                run.staging / rundir.SUMMARY,
                {
                    "model": loaded.name,
                    "weights_sha256": loaded.weights_sha256,
                    "dataset": str(dataset_path),
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
    from .decompose import decompose_to_dir
    from .forward import local_end_activations
    from .mechanisms import ClassRule, summarize
    from .memory import release_unreferenced

    out = Path(out)
    engine, sending = local_end_activations, nullcontext()
    if remote:  # every check that can refuse the run comes before the run directory is touched
        from . import remote as ndif

        if swap:
            raise FactscopeError("--swap does not run remotely yet (its passes use the local engine)")
        dtype = ndif.check_dtype(dtype)
        ndif.preflight(model, send=True)
        reporter.warn(remote_plan(model, dataset, batch_size=batch_size, bos=bos).describe())
        sending = ndif.one_line_errors()
    with rundir.locked(out):
        _refuse_existing(out, overwrite, resume)
        rule = ClassRule(k=k, z=z)  # invalid k or z is refused before the model loads
        if remote:
            loaded, encoded, dataset_path = _prepare_remote(model, dataset, bos, dtype, reporter)
            engine = ndif.remote_engine(model, loaded.tokenizer)
        else:
            loaded, encoded, dataset_path = _prepare(model, dataset, device, bos, reporter, dtype=dtype or "float32",
                                                     threads=threads)
        config = {"command": "analyze", "batch_size": batch_size, "known_only": not all_prompts, "k": k, "z": z,
                  "swap": swap, "prepend_bos": loaded.prepend_bos, "device": _used_device(loaded, device),
                  "dtype": loaded.dtype, "remote": remote}
        manifest = rundir.manifest(loaded.name, loaded.weights_sha256, dataset_path, config)
        with rundir.output_dir(out, overwrite, resume, manifest) as run:
            with reporter.progress("analyze", len(encoded)) as advance:
                summary = {"model": loaded.name, "weights_sha256": loaded.weights_sha256, "dataset": str(dataset_path)}
                with sending:
                    summary.update(decompose_to_dir(run, loaded, encoded, batch_size, advance,
                                                    known_only=not all_prompts, engine=engine))
                if remote:
                    summary["remote"] = {"requests": engine.requests, "bytes_back": engine.bytes_back}
            # R_r over every prompt of the dataset, known or not: the one every later stage of this run uses
            rundir.write_table(pd.DataFrame(targets_table(relation_targets(encoded))), run.staging, "relation_targets")
            summary["accuracy_ci"] = bootstrap.mean_interval(rundir.read_table(run.staging, "recall", required=True)["correct"])
            if summary["n_analysed"] == 0:
                raise FactscopeError("no prompt is a known fact for this model; rerun with --all-prompts")
            if not swap:
                # the weights' pages and the attribution tables were the run's peak together (SmolLM2, fp32:
                # 1.7 GB against 0.95 GB for the model alone); nothing after this point runs the model
                loaded = None
                release_unreferenced()
            summary.update(summarize(run.staging, rule))
            if swap:
                from .swap import subject_swap, swap_summary

                # all prompts, known or not, so that every R_r is the one the analysis used
                stats = subject_swap(loaded, encoded, rundir.read_table(run.staging, "heads", required=True), batch_size)
                rundir.write_table(stats, run.staging, "subject_swap")
                summary["subject_swap"] = swap_summary(stats)
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

    `remote`: the passes of a run analysed with `analyze --remote` run on NDIF through nnsight, and only the
    checks that can (`causal.remote_checks`: the attention knockout) run; each pass sends back three numbers per
    prompt. The plan (`remote_ablate_plan`) is printed before anything is sent."""
    from .causal.atp_paths import METHODS
    from . import causal

    if remote:
        return _remote_ablate(run_dir, window=window, limit=limit, overwrite=overwrite, report=report,
                              reporter=reporter, refused={"--method": method != "exact", "--noise-scales":
                                                          noise_scales is not None, "--seeds": seeds is not None})
    if mode not in ("mean", "zero"):
        raise FactscopeError(f"ablation mode {mode!r}: use 'mean' or 'zero'")
    if method not in METHODS:
        raise FactscopeError(f"ablate method {method!r}: use {', '.join(METHODS)}")
    options = {"mode": mode, "window": window, "method": method}
    if noise_scales is not None:
        options["noise_scales"] = list(noise_scales)
    if seeds is not None:
        options["seeds"] = list(seeds)
    run_dir = _finished_run(run_dir)
    with rundir.locked(run_dir):
        trace, targets = rundir.read_table(run_dir, "causal_trace"), _run_targets(run_dir, reporter)  # before the model
        model, known, heads, _ = _causal_inputs(run_dir, "ablate", overwrite, device, threads, limit, reporter)
        tables, summary = causal.ablate_checks(model, known, heads, **options, trace=trace, targets=targets,
                                               progress=reporter.progress)
        return _write_causal(run_dir, "ablate", tables, summary, report, reporter)


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

    `remote`: exact tracing of a run analysed with `analyze --remote`, on NDIF through nnsight, one session per
    seed, p(a) per restoration coming back (`remote_trace_plan` is printed before anything is sent)."""
    from . import causal

    if graddrop and method == "exact":
        raise FactscopeError("--graddrop corrects attribution patching: use it with --method atp or both")
    options = {"noise": noise, "window": window, "method": method, "graddrop": graddrop}
    if seeds is not None:
        options["seeds"] = list(seeds)
    if remote:
        return _remote_trace(run_dir, options=options, limit=limit, overwrite=overwrite, report=report,
                             reporter=reporter)
    run_dir = _finished_run(run_dir)
    with rundir.locked(run_dir):
        enrichment = rundir.read_table(run_dir, "enrichment")
        model, known, _, _ = _causal_inputs(run_dir, "trace", overwrite, device, threads, limit, reporter)
        tables, summary = causal.trace_checks(model, known, **options, enrichment=enrichment, progress=reporter.progress)
        return _write_causal(run_dir, "trace", tables, summary, report, reporter)


def _remote_trace(run_dir: str | Path, *, options: dict, limit: int | None, overwrite: bool, report: bool,
                  reporter: Reporter) -> rundir.Run:
    """`trace(remote=True)`: exact tracing through nnsight sessions; the refusals come before the run is locked."""
    from . import causal
    from . import remote as ndif
    from .causal.atp import check_remote_method

    check_remote_method(options["method"])
    run_dir = _remote_run(run_dir, "trace")
    reporter.warn(remote_trace_plan(run_dir, seeds=options.get("seeds"), limit=limit).describe())
    with rundir.locked(run_dir), ndif.one_line_errors():
        enrichment = rundir.read_table(run_dir, "enrichment")
        model, known, _, engine = _causal_inputs(run_dir, "trace", overwrite, "cpu", None, limit, reporter,
                                                 remote=True)
        tables, summary = causal.trace_checks(model, known, **options, enrichment=enrichment, engine=engine,
                                              progress=reporter.progress)
        summary["trace"]["remote"] = {"requests": engine.requests, "bytes_back": engine.bytes_back,
                                      "bytes_sent": engine.bytes_sent}
        return _write_causal(run_dir, "trace", tables, summary, report, reporter)


def _remote_run(run_dir: str | Path, command: str) -> Path:
    """A finished run of `analyze --remote` (a local one is refused), once NDIF's preflight passed."""
    from . import remote as ndif

    run_dir = _finished_run(run_dir)
    manifest = _run_json(run_dir / rundir.MANIFEST)
    if not manifest.get("config", {}).get("remote"):
        raise FactscopeError(f"{run_dir}: analysed locally; {command} --remote checks a run of `analyze --remote` "
                             "(drop --remote to check this one locally)")
    ndif.preflight(manifest.get("model", ""), send=True)
    return run_dir


def remote_ablate_plan(run_dir: str | Path, *, window: int = 9, limit: int | None = None):
    """What `ablate --remote` would send and get back (`remote.Plan`), from the run, the model's config and
    tokenizer: the recall passes that find the known facts again, then one request per knockout pass, each
    bringing back `remote.SCORE_BYTES` per prompt. The prompts are the run's known facts as its recall.csv has
    them (the run finds them again on the server)."""
    from . import causal
    from . import remote as ndif

    model, heads, recalled, checked = _remote_plan_inputs(run_dir, limit)
    passes = causal.remote_ablate_passes(model, heads, window=window)
    return ndif.ablate_plan(model.name, recalled, causal.KNOWN_BATCH, len(checked), passes)


def remote_trace_plan(run_dir: str | Path, *, seeds: Sequence[int] | None = None, limit: int | None = None,
                      method: str = "exact"):
    """What `trace --remote` would send and get back (`remote.Plan`): the recall passes, then one session per
    seed (`remote.trace_plan`), over the prompts `_remote_plan_inputs` expects the server to find again."""
    from . import causal
    from .causal.atp import check_remote_method

    check_remote_method(method)
    from . import remote as ndif
    from .causal.trace import SEEDS, TRACE_KINDS

    model, _, recalled, checked = _remote_plan_inputs(run_dir, limit)
    restorations = sum(len(item.token_ids) - item.subject_positions[0] for item in checked)
    subject_tokens = sum(len(item.subject_positions) for item in checked)
    sites = len(TRACE_KINDS) * model.cfg.n_layers - 1  # resid after the last block needs no pass (`last_resid`)
    return ndif.trace_plan(model.name, recalled, causal.KNOWN_BATCH, len(checked), restorations, subject_tokens,
                           len(seeds if seeds is not None else SEEDS), sites, model.cfg.d_model)


def _remote_plan_inputs(run_dir: str | Path, limit: int | None):
    """For a remote causal plan, from the run, the model's config and tokenizer: the config-only model, the run's
    heads, how many prompts the recall passes will read (none when the run analysed every prompt), and the prompts
    checked: the run's known facts as its recall.csv has them (the run finds them again on the server), spread."""
    from . import causal
    from . import remote as ndif
    from .data import encode_all

    run_dir = _finished_run(run_dir)
    manifest, heads, facts = _causal_run(run_dir)
    ndif.check_model_id(manifest["model"])
    model = _remote_model(manifest["model"], manifest.get("config", {}).get("prepend_bos"), ndif.SERVED_DTYPE)
    encoded = encode_all(facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)
    known_only = manifest.get("config", {}).get("known_only", True)
    if known_only:
        correct = set(rundir.read_table(run_dir, "recall", required=True).query("correct")["prompt_id"].astype(str))
        checked = [item for item in encoded if item.fact.prompt_id in correct]
    else:
        checked = encoded
    return model, heads, len(encoded) if known_only else 0, causal.spread(checked, limit)


def _remote_ablate(run_dir: str | Path, *, window: int, limit: int | None, overwrite: bool, report: bool,
                   reporter: Reporter, refused: dict[str, bool]) -> rundir.Run:
    """`ablate(remote=True)`: every check that can refuse comes before the run directory is locked."""
    from . import causal
    from . import remote as ndif

    given = [option for option, set_ in refused.items() if set_]
    if given:
        names = ", ".join(check.name for check in causal.remote_checks("ablate"))
        raise FactscopeError(f"ablate --remote runs the {names} check only; {given[0]} does not run remotely")
    run_dir = _remote_run(run_dir, "ablate")
    reporter.warn(remote_ablate_plan(run_dir, window=window, limit=limit).describe())
    with rundir.locked(run_dir), ndif.one_line_errors():
        model, known, heads, engine = _causal_inputs(run_dir, "ablate", overwrite, "cpu", None, limit, reporter,
                                                     remote=True)
        tables, summary = causal.remote_ablate_checks(model, known, heads, engine, window=window,
                                                      progress=reporter.progress)
        summary["ablate"]["remote"] |= {"requests": engine.requests, "bytes_back": engine.bytes_back}
        return _write_causal(run_dir, "ablate", tables, summary, report, reporter)


def write_report(run_dir: str | Path, pngs: bool = True, reporter: Reporter = QUIET) -> Path:
    """DIR/report.html (one self-contained file, opens offline) and DIR/figures/*.png from a finished run."""
    from .report import write_report as render

    with reporter.status("rendering the report"):
        return render(run_dir, pngs=pngs)


def compare(run_dirs: Sequence[str | Path], out: str | Path = "compare.html", overwrite: bool = False) -> tuple[Path, Path]:
    """Runs side by side (recall, head classes per model size, their depth, mechanism shares, exactness):
    writes OUT (HTML) and the tidy table beside it as .csv; returns both paths."""
    from .report.compare import write_compare

    return write_compare(run_dirs, out, overwrite)


def import_facts(source: str | Path, format: str, out: str | Path = "facts.jsonl", prefix: str = "",
                 limit: int | None = None, overwrite: bool = False) -> list[dict]:
    """Convert known_1000 or CounterFact records into factscope's facts (JSONL) at OUT; returns the rows."""
    from .data import facts_jsonl, import_facts as read_records

    out = Path(out)
    if out.exists() and not overwrite:
        raise FactscopeError(f"{out}: exists; pass --overwrite to replace it")
    if out.suffix.lower() == ".csv":
        raise FactscopeError(f"{out}: import-facts writes JSONL; name the output .jsonl")
    rows = read_records(source, format, prefix, limit)
    rundir.atomic_write_text(out, facts_jsonl(rows))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Shared steps


def remote_plan(model: str, dataset: str | Path | None = None, *, batch_size: int = 16, bos: bool | None = None,
                command: str = "analyze", dtype: str | None = None):
    """What `analyze --remote` (or `recall --remote`) would send and get back (`remote.Plan`), from the model's
    config and tokenizer only: no weights are loaded and nothing is sent. A `dtype` the run could not honour is
    refused here as it would be there."""
    from . import remote as ndif
    from .data import encode_all, load_facts, relation_targets, shipped_dataset
    from .models import tokenizer_prepends_bos

    ndif.check_dtype(dtype)
    ndif.check_model_id(model)
    config, tokenizer = _hub_config_and_tokenizer(model)
    facts = load_facts(Path(dataset) if dataset is not None else shipped_dataset())
    prepend = tokenizer_prepends_bos(tokenizer) if bos is None else bos
    encoded = encode_all(facts, tokenizer, prepend)
    if command == "recall":
        return ndif.recall_plan(model, len(encoded), batch_size)
    targets = relation_targets(encoded)
    widths = [1 + sum(t != item.attribute_token for t in targets[item.fact.relation]) for item in encoded]
    return ndif.plan(model, ndif.Shape.from_config(config), widths, batch_size)


def _prepare_remote(model_name: str, dataset: str | Path | None, bos: bool | None, dtype: str, reporter: Reporter):
    """`_prepare` for a remote run: the dataset, then the Hub config and tokenizer, never the weights."""
    from .data import encode_all, load_facts, shipped_dataset

    dataset_path = Path(dataset) if dataset is not None else shipped_dataset()
    facts = load_facts(dataset_path)
    model = _remote_model(model_name, bos, dtype, reporter)
    return model, encode_all(facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens), dataset_path


def _remote_model(model_name: str, bos: bool | None, dtype: str, reporter: Reporter = QUIET):
    """What a remote run holds of the model: `nnsight_engine.ConfigOnlyModel` (config and tokenizer from the Hub, in
    the server's `dtype`), which stands in for the loaded model."""
    from .nnsight_engine import config_only_model

    with reporter.status(f"reading {model_name}'s config and tokenizer"):
        config, tokenizer = _hub_config_and_tokenizer(model_name)
    return config_only_model(model_name, config, tokenizer, dtype, bos)


def _hub_config_and_tokenizer(model: str):
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoConfig.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise FactscopeError(f"cannot read {model!r}'s config and tokenizer from the Hub ({str(err).splitlines()[0]})") from None


def _prepare(model_name: str, dataset: str | Path | None, device: str, bos: bool | None, reporter: Reporter, seed: int = 0,
             dtype: str = "float32", threads: int | None = None):
    """Validate the dataset before the (slow) model load, then tokenize it for that model.

    Seeds torch with `seed`, the value the command records in run.json (`rundir.manifest`).
    """
    import torch

    from .data import encode_all, load_facts, shipped_dataset, single_target_relations
    from .memory import tune_allocator
    from .models import load_model

    dataset_path = Path(dataset) if dataset is not None else shipped_dataset()
    facts = load_facts(dataset_path)
    _check_device(device)
    if threads:
        torch.set_num_threads(threads)
    tune_allocator()
    with reporter.status(f"loading {model_name}"):
        model = load_model(model_name, device=device, prepend_bos=bos, dtype=dtype)
    encoded = encode_all(facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)
    single = single_target_relations(encoded)
    if single:
        which = ", ".join(f"relation {relation!r} has one attribute ({attribute!r})" for relation, attribute in single.items())
        skipped = "it" if len(single) == 1 else "them"
        reporter.warn(f"warning: {which}; analyses of a − mean(R∖a) skip {skipped}")
    torch.manual_seed(seed)
    return model, encoded, dataset_path


def _check_device(device: str) -> None:
    """`device` in one line before the model loads: a device torch knows, on hardware this machine has. Without
    the check `--device cuda` on a machine with no GPU ran on the CPU and recorded "cuda"."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            raise FactscopeError("--device auto splits the layers over the GPUs, and torch sees no CUDA GPU; use --device cpu")
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise FactscopeError(f"--device {device!r}: unknown device; use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FactscopeError(f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise FactscopeError(f"--device {device}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise FactscopeError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise FactscopeError(f"--device {device!r}: factscope runs on cpu, cuda, cuda:N, mps or auto")


def _used_device(model, requested: str) -> str:
    """What run.json records: where the weights are, not only what was asked for."""
    return requested if requested == "auto" else str(model.device)


def _finished_run(run_dir: str | Path) -> Path:
    """Checked before the run directory is locked, so that locking never creates a folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FactscopeError(f"{run_dir}: not a directory; give a finished `factscope analyze` run")
    return run_dir


def _refuse_existing(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Checked before any slow work, so a wrong --out costs nothing."""
    if out.exists() and not (overwrite or resume):
        raise FactscopeError(f"{out}: output directory exists; pass --overwrite to replace it")


def _causal_run(run_dir: Path) -> tuple[dict, pd.DataFrame, list[Fact]]:
    """A finished run's manifest, head table and facts, each checked before any model work."""
    from .data import load_facts

    manifest = _run_json(run_dir / rundir.MANIFEST)
    _run_json(run_dir / rundir.SUMMARY)  # rewritten after the checks ran: a damaged one must stop them first
    heads = rundir.read_table(run_dir, "heads", required=True)
    lacking = sorted({"layer", "head", "class"} - set(heads.columns))
    if lacking:
        raise FactscopeError(f"{rundir.table_path(run_dir, 'heads')}: lacks column {lacking[0]!r}; rerun `factscope analyze`")
    if "model" not in manifest:
        raise FactscopeError(f"{run_dir / rundir.MANIFEST}: names no model; rerun `factscope analyze`")
    dataset = Path(manifest.get("dataset", ""))
    if not dataset.is_file():
        raise FactscopeError(f"{run_dir / rundir.MANIFEST}: its dataset {dataset} is not there (run from the directory the analysis ran in)")
    if rundir.dataset_sha256(dataset) != manifest.get("dataset_sha256"):
        raise FactscopeError(f"{dataset}: changed since the run that wrote run.json; rerun `factscope analyze`")
    return manifest, heads, load_facts(dataset)


def _causal_inputs(run_dir: str | Path, command: str, overwrite: bool, device: str, threads: int | None,
                   limit: int | None, reporter: Reporter, remote: bool = False):
    """The run's model (same weights, same BOS) and the prompts it analysed (its known facts, or all of them
    after `analyze --all-prompts`), checked before the slow work; and the nnsight engine of a `remote` run (None
    otherwise), whose model is the config-only stand-in of `_remote_model`."""
    from .causal import CHECKS, known_facts, remote_checks, spread
    from .data import encode_all

    checks = remote_checks(command) if remote else [check for check in CHECKS if check.command == command]
    existing = [rundir.table_path(run_dir, name) for check in checks for name in check.tables
                if rundir.table_path(run_dir, name).exists()]
    if existing and not overwrite:
        raise FactscopeError(f"{existing[0]}: exists; pass --overwrite to replace it")
    manifest, heads, facts = _causal_run(Path(run_dir))
    if threads:
        import torch

        torch.set_num_threads(threads)
    _check_device(device)
    prepend_bos = manifest.get("config", {}).get("prepend_bos")
    dtype = manifest.get("config", {}).get("dtype", "float32")  # the dtype the analysis ran in
    engine = None
    if remote:
        from . import remote as ndif

        model = _remote_model(manifest["model"], prepend_bos, ndif.check_dtype(dtype), reporter)
        engine = ndif.remote_engine(model.name, model.tokenizer)
    else:
        from .models import load_model

        with reporter.status(f"loading {manifest['model']}"):
            model = load_model(manifest["model"], device=device, prepend_bos=prepend_bos, dtype=dtype)
    if model.weights_sha256 != manifest.get("weights_sha256"):
        raise FactscopeError(f"{run_dir / rundir.MANIFEST}: the weights of {manifest['model']} changed since the run")
    encoded = encode_all(facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)
    if manifest.get("config", {}).get("known_only", True):  # the same prompts the analysis used
        with reporter.status("finding the known facts"):
            encoded = known_facts(model, encoded, engine=engine)
    known = spread(encoded, limit)
    if not known:
        raise FactscopeError(f"{manifest['model']} knows none of the facts in {manifest['dataset']}: nothing to check causally")
    return model, known, heads, engine


def _run_targets(run_dir: Path, reporter: Reporter) -> dict[str, dict[int, str]] | None:
    """The run's own R_r (relation_targets.csv, written by `analyze`); None for a run from before it was kept."""
    from .data import targets_from_rows

    table = rundir.read_table(run_dir, "relation_targets")
    if table is None:
        reporter.warn(f"warning: {run_dir} has no {rundir.TABLES['relation_targets']} (an older run): R_r is taken "
                      "from the checked prompts, so a − mean(R∖a) may differ from the analysis's")
        return None
    return targets_from_rows(table[["relation", "target_token", "attribute"]].itertuples(index=False, name=None))


def _run_json(path: Path) -> dict:
    if not path.is_file():
        raise FactscopeError(f"{path}: missing; is {path.parent} a finished `factscope analyze` run?")
    return rundir.read_json_object(path)


def _write_causal(run_dir: Path, command: str, tables: dict, summary: dict, report: bool,
                  reporter: Reporter) -> rundir.Run:
    """Every table, then summary.json, each replaced atomically; the report is re-rendered last, so a rendering
    failure cannot cost the tables. What an earlier run of `command` wrote and this one did not (AtP tables after
    `--method atp`, rerun with `--method exact`) is removed with its summary entry, last: the report must not show
    a previous run's results beside this one's as if they belonged together."""
    from .causal import CHECKS

    checks = [check for check in CHECKS if check.command == command]
    run_summary = _run_json(run_dir / rundir.SUMMARY)
    for name, table in tables.items():
        rundir.write_table(table, run_dir, name)
    causal = {key: value for key, value in run_summary.get("causal", {}).items()
              if key in summary or key not in {check.name for check in checks}}
    run_summary["causal"] = {**causal, **summary}
    rundir.write_json(run_dir / rundir.SUMMARY, run_summary)
    for name in {name for check in checks for name in check.tables} - set(tables):
        rundir.table_path(run_dir, name).unlink(missing_ok=True)
    if report:
        write_report(run_dir, reporter=reporter)
    return rundir.load_run(run_dir)
