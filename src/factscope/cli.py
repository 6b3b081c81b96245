"""Command line: thin wrappers that load, call a stage, write its tables, and print a summary."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import FactscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="How a language model recalls a fact.")
console = Console(stderr=True)
state = {"debug": False}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="smollm2-135m, gemma3-270m, a HF dir, a .gguf, or a cached hub id.")]
DatasetOpt = Annotated[Optional[Path], typer.Option("--dataset", "-d", help="JSONL or CSV facts (default: the shipped set).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (must not exist).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps ..., or auto: split the layers over all GPUs (device_map=\"auto\").")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a killed run into the same --out, skipping finished batches.")]
BosOpt = Annotated[
    Optional[bool],
    typer.Option("--bos/--no-bos", help="Prepend BOS (default: as the model's tokenizer does by default)."),
]


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    state["debug"] = debug


@contextmanager
def progress_bar(label: str, total: int):
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and total < 1) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _prepare(model_name: str, dataset: Optional[Path], device: str, bos: Optional[bool], seed: int = 0):
    """Validate the dataset before the (slow) model load, then tokenize it for that model.

    Seeds torch with `seed`, the value the command records in run.json (`rundir.manifest`).
    """
    import torch

    from .data import encode_all, load_facts, shipped_dataset, single_target_relations
    from .models import load_model

    dataset_path = dataset or shipped_dataset()
    facts = load_facts(dataset_path)
    with console.status(f"loading {model_name}"):
        model = load_model(model_name, device=device, prepend_bos=bos)
    encoded = encode_all(facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)
    single = single_target_relations(encoded)
    if single:
        which = ", ".join(f"relation {relation!r} has one attribute ({attribute!r})" for relation, attribute in single.items())
        skipped = "it" if len(single) == 1 else "them"
        console.print(escape(f"warning: {which}; analyses of a − mean(R∖a) skip {skipped}"), highlight=False, soft_wrap=True)
    torch.manual_seed(seed)
    return model, encoded, dataset_path


def _refuse_existing(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Checked before any slow work, so a wrong --out costs nothing."""
    if out.exists() and not (overwrite or resume):
        raise FactscopeError(f"{out}: output directory exists; pass --overwrite to replace it")


@app.command()
def recall(
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = None,
    out: OutOpt = Path("factscope-recall"),
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    batch_size: BatchOpt = 32,
    bos: BosOpt = None,
) -> None:
    """Which facts does the model know? Writes DIR/recall.csv and DIR/summary.json."""
    from .rundir import manifest, output_dir, write_csv, write_json
    from .recall import accuracy_table, recall as run_recall

    _refuse_existing(out, overwrite)
    loaded, encoded, dataset_path = _prepare(model, dataset, device, bos)
    with progress_bar("recall", len(encoded)) as advance:
        table = run_recall(loaded, encoded, batch_size=batch_size, progress=advance)
    table.insert(0, "model", loaded.name)
    table["prepend_bos"] = loaded.prepend_bos
    accuracy = accuracy_table(table)
    config = {"command": "recall", "batch_size": batch_size, "prepend_bos": loaded.prepend_bos, "device": device}
    with output_dir(out, overwrite, manifest=manifest(loaded.name, loaded.weights_sha256, dataset_path, config)) as run:
        write_csv(table, run.staging / "recall.csv")
        write_json(
            run.staging / "summary.json",
            {
                "model": loaded.name,
                "weights_sha256": loaded.weights_sha256,
                "dataset": str(dataset_path),
                "prepend_bos": loaded.prepend_bos,
                "n_prompts": len(table),
                "accuracy": float(accuracy.iloc[-1]["accuracy"]),
                "accuracy_per_relation": dict(zip(accuracy["relation"], accuracy["accuracy"].astype(float))),
            },
        )
    _print_accuracy(accuracy, f"{loaded.name} · BOS {'prepended' if loaded.prepend_bos else 'not prepended'}")
    console.print(f"wrote {out}/recall.csv")


@app.command()
def analyze(
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = None,
    out: OutOpt = Path("factscope-run"),
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    batch_size: BatchOpt = 16,
    bos: BosOpt = None,
    all_prompts: Annotated[bool, typer.Option("--all-prompts", help="Analyse every prompt, not only known facts.")] = False,
    k: Annotated[float, typer.Option("--k", min=1.0, help="Dominance ratio between subject and relation DLA.")] = 10.0,
    z: Annotated[float, typer.Option("--z", min=0.0, help="Significance: robust z-score against all heads.")] = 3.0,
    swap: Annotated[bool, typer.Option("--swap", help="Also rerun with subjects swapped (relation heads should not move).")] = False,
    resume: ResumeOpt = False,
) -> None:
    """Exact DLA by component and source group, the logit lens, head classes and mechanism shares."""
    from .decompose import decompose_to_dir
    from .mechanisms import ClassRule, subject_swap, summarize, swap_summary
    from .rundir import manifest, output_dir, write_csv, write_json
    from .recall import accuracy_table

    _refuse_existing(out, overwrite, resume)
    loaded, encoded, dataset_path = _prepare(model, dataset, device, bos)
    config = {"command": "analyze", "batch_size": batch_size, "known_only": not all_prompts, "k": k, "z": z,
              "swap": swap, "prepend_bos": loaded.prepend_bos, "device": device}
    run_manifest = manifest(loaded.name, loaded.weights_sha256, dataset_path, config)
    with output_dir(out, overwrite, resume, run_manifest) as run:
        with progress_bar("analyze", len(encoded)) as advance:
            summary = {"model": loaded.name, "weights_sha256": loaded.weights_sha256, "dataset": str(dataset_path)}
            summary.update(decompose_to_dir(run, loaded, encoded, batch_size, advance, known_only=not all_prompts))
        if summary["n_analysed"] == 0:
            raise FactscopeError("no prompt is a known fact for this model; rerun with --all-prompts")
        summary.update(summarize(run.staging, ClassRule(k=k, z=z)))
        if swap:
            # all prompts, known or not, so that every R_r is the one the analysis used
            stats = subject_swap(loaded, encoded, pd.read_csv(run.staging / "heads.csv"), batch_size)
            write_csv(stats, run.staging / "subject_swap.csv")
            summary["subject_swap"] = swap_summary(stats)
        write_json(run.staging / "summary.json", summary)
        accuracy = accuracy_table(pd.read_csv(run.staging / "recall.csv"))
        reconstruction, head_error, tolerance = (summary[key] for key in ("max_abs_reconstruction_error", "max_abs_head_error", "tolerance"))
    _print_accuracy(accuracy, f"{loaded.name} · BOS {'prepended' if loaded.prepend_bos else 'not prepended'}")
    _print_mechanisms(summary)
    report_command(out)  # after the analysis is safely in place: a rendering failure cannot cost it
    console.print(
        f"analysed {summary['n_analysed']}/{summary['n_prompts']} prompts · sum of parts = model logit within "
        f"{reconstruction:.1e} (per head {head_error:.1e}; tolerance {tolerance:g}) · wrote {out}/ (open report.html)"
    )


RunArg = Annotated[Path, typer.Argument(help="A finished `factscope analyze` output directory.", exists=True, file_okay=False)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads (default: torch's own choice).")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Comma-separated random seeds.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="At most N known facts, taken in turn from each relation.")]
CausalOverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace causal tables this command wrote before.")]


class AblationMode(str, Enum):
    mean = "mean"
    zero = "zero"


ABLATE_TABLES = ("knockout.csv", "ablations.csv", "noise_robustness.csv", "extraction_rate.csv", "enrichment.csv")
TRACE_TABLES = ("causal_trace.parquet", "trace_peaks.csv")


@app.command()
def ablate(
    run_dir: RunArg,
    mode: Annotated[AblationMode, typer.Option("--mode", help="Replace a removed path by its dataset mean, or by zero.")] = AblationMode.mean,
    window: Annotated[int, typer.Option("--window", min=1, help="Layers per attention-knockout window.")] = 9,
    noise_scales: Annotated[str, typer.Option("--noise-scales", help="Comma-separated noise scales (× each path's norm).")] = "0,0.5,1,2,4,8",
    seeds: SeedsOpt = "0,1,2",
    limit: LimitOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    overwrite: CausalOverwriteOpt = False,
) -> None:
    """Causal checks of a finished run on its model's known facts: attention knockout, mechanism ablations (alone,
    in pairs, together), noise robustness, attribute extraction rate, subject enrichment. Adds their tables and
    summary.json["causal"] to RUN_DIR and re-renders the report."""
    from . import causal

    scales, seed_list = _numbers(noise_scales, float, "--noise-scales"), _numbers(seeds, int, "--seeds")
    model, known, heads = _causal_inputs(run_dir, ABLATE_TABLES, overwrite, device, threads, limit)
    mechanisms = causal.taxonomy_paths(heads, model.cfg.n_layers)
    head_sets = {f"{name}_heads": list(zip(rows["layer"], rows["head"]))
                 for name, rows in heads.groupby("class") if name in ("subject", "relation")}
    n_layers = model.cfg.n_layers
    with progress_bar("knockout", causal.n_passes("knockout", n_layers) + causal.n_passes("knockout", n_layers, heads=head_sets)) as advance:
        knockout = pd.concat([causal.knockout(model, known, window=window, progress=advance),
                              causal.knockout(model, known, heads=head_sets, progress=advance)], ignore_index=True)
    with progress_bar("ablations", causal.n_passes("ablation_grid", n_layers, mechanisms=mechanisms, mode=mode.value)) as advance:
        ablations = causal.ablation_grid(model, known, mechanisms, mode.value, progress=advance)
    passes = causal.n_passes("noise_robustness", n_layers, mechanisms=mechanisms, scales=scales, seeds=seed_list)
    with progress_bar("noise robustness", passes) as advance:
        noise = causal.noise_robustness(model, known, mechanisms, scales, seed_list, progress=advance)
    with progress_bar("extraction, enrichment", 2) as advance:
        extraction = causal.extraction_rate(model, known, progress=advance)
        enrichment = causal.subject_enrichment(model, known, progress=advance)
    trace = _optional_parquet(run_dir / "causal_trace.parquet")
    summary = {
        "ablate": {"mode": mode.value, "window": window, "noise_scales": scales, "seeds": seed_list, "n_prompts": len(known)},
        "knockout": causal.knockout_summary(knockout),
        "ablations": causal.robustness_summary(ablations),
        "noise_robustness": causal.noise_summary(noise),
        "extraction_rate": causal.extraction_summary(extraction),
        "enrichment": causal.enrichment_summary(enrichment, trace),
    }
    tables = dict(zip(ABLATE_TABLES, (knockout, ablations, noise, extraction, enrichment)))
    _write_causal(run_dir, tables, summary)


@app.command()
def trace(
    run_dir: RunArg,
    noise: Annotated[float, typer.Option("--noise", min=0.0, help="Noise std, in units of the std of the subjects' token embeddings.")] = 3.0,
    window: Annotated[int, typer.Option("--window", min=1, help="Layers per restored attention / MLP window.")] = 10,
    seeds: SeedsOpt = "0,1,2",
    limit: LimitOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    overwrite: CausalOverwriteOpt = False,
) -> None:
    """Causal tracing (Meng et al. 2022) on a finished run's known facts: noise on the subject's embeddings, one
    clean state restored per (layer, position). Writes RUN_DIR/causal_trace.parquet and trace_peaks.csv, adds
    summary.json["causal"]["trace"] and re-renders the report. Costs about 1 + seeds × (1 + 3 × layers) passes,
    each over every (prompt, position from the subject on)."""
    from . import causal

    seed_list = _numbers(seeds, int, "--seeds")
    model, known, _ = _causal_inputs(run_dir, TRACE_TABLES, overwrite, device, threads, limit)
    with progress_bar("causal trace", causal.n_passes("trace_effects", model.cfg.n_layers, seeds=seed_list)) as advance:
        table = causal.trace_table(causal.trace_effects(model, known, noise, seed_list, window, progress=advance))
    peaks = causal.trace_peaks(table)
    summary = {
        "trace": {"noise": noise, "window": window, "seeds": seed_list, "n_prompts": len(known),
                  "p_clean": float(table["p_clean"].iloc[0]), "p_corrupted": float(table["p_corrupted"].iloc[0]),
                  "peaks": peaks.to_dict(orient="records")},
    }
    enrichment = _optional_csv(run_dir / "enrichment.csv")
    if enrichment is not None:
        summary["enrichment"] = causal.enrichment_summary(enrichment, table)
    _write_causal(run_dir, dict(zip(TRACE_TABLES, (table, peaks))), summary)


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated {kind.__name__}s", param_hint=option) from None
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=option)
    return values


def _causal_inputs(run_dir: Path, outputs: tuple[str, ...], overwrite: bool, device: str, threads: Optional[int], limit: Optional[int]):
    """The run's model (same weights, same BOS) and the prompts it analysed (its known facts, or all of them
    after `analyze --all-prompts`), checked before the slow work."""
    from .causal import known_facts, spread
    from .data import encode_all, load_facts
    from .models import load_model

    existing = [name for name in outputs if (run_dir / name).exists()]
    if existing and not overwrite:
        raise FactscopeError(f"{run_dir / existing[0]}: exists; pass --overwrite to replace it")
    manifest = _read_json(run_dir / "run.json")
    for name in ("summary.json", "heads.csv"):
        if not (run_dir / name).is_file():
            raise FactscopeError(f"{run_dir / name}: missing; is {run_dir} a finished `factscope analyze` run?")
    dataset = Path(manifest.get("dataset", ""))
    if not dataset.is_file():
        raise FactscopeError(f"{run_dir / 'run.json'}: its dataset {dataset} is not there (run from the directory the analysis ran in)")
    _check_same(dataset, manifest)
    if threads:
        import torch

        torch.set_num_threads(threads)
    facts = load_facts(dataset)
    prepend_bos = manifest.get("config", {}).get("prepend_bos")
    with console.status(f"loading {manifest['model']}"):
        model = load_model(manifest["model"], device=device, prepend_bos=prepend_bos)
    if model.weights_sha256 != manifest.get("weights_sha256"):
        raise FactscopeError(f"{run_dir / 'run.json'}: the weights of {manifest['model']} changed since the run")
    encoded = encode_all(facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)
    if manifest.get("config", {}).get("known_only", True):  # the same prompts the analysis used
        with console.status("finding the known facts"):
            encoded = known_facts(model, encoded)
    known = spread(encoded, limit)
    if not known:
        raise FactscopeError(f"{manifest['model']} knows none of the facts in {dataset}: nothing to check causally")
    from .rundir import read_csv

    return model, known, read_csv(run_dir / "heads.csv")


def _read_json(path: Path) -> dict:
    from .data import read_json

    if not path.is_file():
        raise FactscopeError(f"{path}: missing; is {path.parent} a finished `factscope analyze` run?")
    return read_json(path)


def _check_same(dataset: Path, manifest: dict) -> None:
    from .rundir import dataset_sha256

    if dataset_sha256(dataset) != manifest.get("dataset_sha256"):
        raise FactscopeError(f"{dataset}: changed since the run that wrote run.json; rerun `factscope analyze`")


def _optional_csv(path: Path):
    from .rundir import read_csv

    return read_csv(path) if path.is_file() else None


def _optional_parquet(path: Path):
    return pd.read_parquet(path) if path.is_file() else None


def _write_causal(run_dir: Path, tables: dict, summary: dict) -> None:
    """Every table, then summary.json, each replaced atomically; the report is re-rendered last, so a rendering
    failure cannot cost the tables."""
    from .rundir import write_csv, write_json, write_parquet

    for name, table in tables.items():
        (write_csv if name.endswith(".csv") else write_parquet)(table, run_dir / name)
    run_summary = _read_json(run_dir / "summary.json")
    run_summary["causal"] = {**run_summary.get("causal", {}), **summary}
    write_json(run_dir / "summary.json", run_summary)
    _print_causal(summary)
    report_command(run_dir)


def _print_causal(summary: dict) -> None:
    table = Table(title="causal checks (summary.json[\"causal\"])")
    table.add_column("check")
    table.add_column("result", overflow="fold")
    if "ablations" in summary:
        ablations = summary["ablations"]
        singles = ", ".join(f"{name} {acc:.0%}" for name, acc in ablations["accuracy_single_removed"].items())
        table.add_row("accuracy, one mechanism removed", f"clean {ablations['accuracy_clean']:.0%}; {singles}")
        interaction = f"interaction {ablations['interaction_logit_diff_all']:+.2f} logits of a − mean(R∖a)"
        table.add_row("accuracy, all removed", f"{ablations['accuracy_all_removed']:.0%} ({interaction})")
    for key, entry in summary.get("knockout", {}).items():
        layers = entry["layers"]
        table.add_row(f"knockout {key}", f"layers {layers[0]}–{layers[1]}: p(a) {entry['rel_change_p']:+.0%}, accuracy → {entry['accuracy_after']:.0%}")
    for sublayer, entry in summary.get("extraction_rate", {}).items():
        table.add_row(f"extraction rate ({sublayer})", f"best layer {entry['layer']}: {entry['extraction_rate']:.1%}")
    for mechanism, entry in summary.get("noise_robustness", {}).items():
        table.add_row(f"noise → {mechanism}", f"accuracy at max scale {entry['accuracy_at_max_scale']:.0%}; mean over scales {entry['mean_accuracy_over_scales']:.0%}")
    for peak in summary.get("trace", {}).get("peaks", []):
        if peak["token"] in ("last_subject", "last_token"):
            table.add_row(f"trace peak {peak['kind']} @ {peak['token']}", f"layer {peak['layer']}: Δp {peak['indirect_effect']:+.3f}")
    Console().print(table)


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished `factscope analyze` output directory.", exists=True, file_okay=False)],
    pngs: Annotated[bool, typer.Option("--pngs/--no-pngs", help="Also write DIR/figures/*.png.")] = True,
) -> None:
    """Write DIR/report.html (one self-contained file, opens offline) and DIR/figures/*.png from a finished run."""
    from .report import load_run, write_report

    with console.status("rendering the report"):
        path = write_report(run_dir, pngs=pngs)
    _print_departures(load_run(run_dir))
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)" + (f" and {run_dir}/figures/*.png" if pngs else ""))


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more finished `factscope analyze` output directories.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write; the tidy table goes beside it as .csv.")] = Path("compare.html"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
) -> None:
    """Runs side by side: recall, head classes per model size, their depth, mechanism shares, exactness."""
    from .compare import write_compare

    with console.status("comparing runs"):
        html_path, csv_path = write_compare(run_dirs, out, overwrite)
    _print_comparison(pd.read_csv(csv_path, dtype={"run": str, "part": str}).fillna({"part": ""}))
    console.print(f"compared {len(run_dirs)} runs · wrote {html_path} ({html_path.stat().st_size / 1e6:.1f} MB) and {csv_path}")


def _print_comparison(tidy: pd.DataFrame) -> None:
    """One row per run from compare.csv: size, recall, head classes, exactness."""
    overall = tidy[tidy["relation"] == "all"]
    value = overall.set_index(["run", "metric", "part"])["value"]
    table = Table(title="runs compared (compare.csv)")
    for column in ("run", "model", "layers × heads", "recall@1", "subject / relation / mixed heads", "max |error|"):
        table.add_column(column, justify="left" if column in ("run", "model") else "right", overflow="fold")
    for run, model in overall[["run", "model"]].drop_duplicates().itertuples(index=False):
        classes = " / ".join(f"{value.get((run, 'head_count', name), 0):.0f}" for name in ("subject", "relation", "mixed"))
        table.add_row(run, model, f"{value[(run, 'n_layers', '')]:.0f} × {value[(run, 'n_heads', '')]:.0f}",
                      f"{value[(run, 'accuracy', '')]:.1%}", classes, f"{value[(run, 'max_abs_reconstruction_error', '')]:.1e}")
    Console().print(table)


class FactFormat(str, Enum):
    """The formats of data.IMPORT_FORMATS."""

    known_1000 = "known_1000"
    counterfact = "counterfact"


@app.command("import-facts")
def import_facts_command(
    source: Annotated[Path, typer.Argument(help="A JSON list: ROME's known_1000.json or CounterFact records.")],
    format: Annotated[FactFormat, typer.Option("--format", "-f", help="The source's format.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSONL facts file to write.")] = Path("facts.jsonl"),
    prefix: Annotated[str, typer.Option("--prefix", help='Label before every prompt, e.g. "Fact:" as in the shipped set (default: none).')] = "",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Import only the first N records.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Convert known_1000 or CounterFact prompts into factscope's facts (JSONL), for --dataset."""
    from .data import facts_jsonl, import_facts
    from .rundir import atomic_write_text

    if out.exists() and not overwrite:
        raise FactscopeError(f"{out}: exists; pass --overwrite to replace it")
    if out.suffix.lower() == ".csv":
        raise FactscopeError(f"{out}: import-facts writes JSONL; name the output .jsonl")
    rows = import_facts(source, format.value, prefix, limit)
    atomic_write_text(out, facts_jsonl(rows))
    console.print(f"imported {len(rows)} facts over {len({row['relation'] for row in rows})} relations · wrote {out}")


def _print_departures(run) -> None:
    from .report import departures

    table = Table(title="where this model departs from the paper (Pythia-2.8B)")
    table.add_column("verdict")
    table.add_column("this run", overflow="fold")
    colour = {"agrees": "green", "departs": "yellow", "not run": "dim"}
    for check in departures(run):
        table.add_row(f"[{colour[check.status]}]{check.status}[/]", escape(check.text))
    Console().print(table)


def _print_mechanisms(summary: dict) -> None:
    classes = Table(title="head classes (mean DLA to the correct attribute, by source)")
    for column in ("class", "heads", "strongest"):
        classes.add_column(column, justify="right" if column == "heads" else "left")
    for name, entry in summary["head_classes"].items():
        classes.add_row(name, str(entry["count"]), ", ".join(entry["top"]) if name != "negligible" else "")
    shares = Table(title="share of the correct attribute's logit and of a − mean(R \\ a), by mechanism")
    for column in ("mechanism", "logit", "a − mean(R\\a)"):
        shares.add_column(column, justify="left" if column == "mechanism" else "right")
    by_metric = summary["mechanism_shares"]
    for mechanism in by_metric["logit"]:
        shares.add_row(mechanism, f"{by_metric['logit'][mechanism]:+.1%}", f"{by_metric['logit_diff'][mechanism]:+.1%}")
    out = Console()
    out.print(classes)
    out.print(shares)


def _print_accuracy(accuracy, title: str) -> None:
    table = Table(title=f"recall@1 — {title}")
    for column in ("relation", "n", "correct", "accuracy", "mean p(attribute)"):
        table.add_column(column, justify="left" if column == "relation" else "right")
    for row in accuracy.itertuples():
        table.add_row(row.relation, str(row.n), str(int(row.correct)), f"{row.accuracy:.1%}", f"{row.mean_prob:.3f}")
    Console().print(table)


def run() -> None:
    """Entry point: one clear line and a non-zero exit for any user error, a traceback only with --debug."""
    try:
        app(standalone_mode=False)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as err:  # usage errors: click's own message and exit code
        err.show()
        sys.exit(err.exit_code)
    except FactscopeError as err:
        _fail(err, str(err), 2)
    except OSError as err:
        reason = err.strerror or str(err)
        _fail(err, f"{err.filename}: {reason}" if err.filename else reason, 2)
    except KeyboardInterrupt:
        console.print("factscope: interrupted")
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 — the user gets one line; --debug gives the traceback
        _fail(err, f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", 1)


def _fail(err: BaseException, message: str, code: int) -> None:
    if state["debug"]:
        raise err
    console.print(f"[red]factscope: error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)
