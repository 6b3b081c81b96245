"""Command line: each command calls one library stage (`stages`) and prints what it returned."""

from __future__ import annotations

import math
import signal
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import stages
from .errors import FactscopeError
from .taxonomy import CLASSES, DEFAULT_MODEL, MECHANISM_ORDER
from .stage_io import Reporter

app = typer.Typer(add_completion=False, no_args_is_help=True, help="How a language model recalls a fact.")
# markup off: every string printed can hold user text (a relation named `[/fs]`, a path), which rich would parse
console = Console(stderr=True, markup=False)
stdout = Console(markup=False)
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


class RichReporter(Reporter):
    """Spinners, progress bars and warnings on stderr, so stdout keeps only the result tables."""

    def status(self, text: str):
        return console.status(Text(text))  # a str would be parsed as markup whatever the console says

    @contextmanager
    def progress(self, label: str, total: int):
        columns = (TextColumn(label, markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and total < 1) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)

    def warn(self, text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)


REPORTER = RichReporter()
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads (default: torch's own choice).")]


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _plan_only(dry_run: bool, remote: bool) -> bool:
    if dry_run and not remote:
        raise FactscopeError("--dry-run plans a --remote run; add --remote")
    return dry_run


def _value(option: Enum | None) -> str | None:
    return None if option is None else option.value


DtypeOpt = Annotated[Optional[Dtype], typer.Option("--dtype", help="The dtype the model runs in (default float32; with --remote, bfloat16, the only one NDIF serves); the parts are summed in fp32.", show_default=False)]


@app.command()
def recall(
    model: ModelOpt = DEFAULT_MODEL,
    dataset: DatasetOpt = None,
    out: OutOpt = Path("factscope-recall"),
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    batch_size: BatchOpt = 32,
    bos: BosOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    remote: Annotated[bool, typer.Option("--remote", help="Run the passes on NDIF through nnsight (--model is a Hub id; needs NDIF_API_KEY and factscope[remote]).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --remote: print the requests and bytes a run would cost, send nothing.")] = False,
) -> None:
    """Which facts does the model know? Writes DIR/recall.csv and DIR/summary.json."""
    from .recall import accuracy_table

    if _plan_only(dry_run, remote):
        console.print(stages.remote_plan(model, dataset, batch_size=batch_size, bos=bos, command="recall",
                                         dtype=_value(dtype)).describe())
        return
    run = stages.recall(model, dataset, out, overwrite=overwrite, device=device, batch_size=batch_size, bos=bos,
                        dtype=_value(dtype), threads=threads, remote=remote, reporter=REPORTER)
    _print_accuracy(accuracy_table(run.recall), _model_title(run))
    console.print(f"wrote {out}/recall.csv")


@app.command()
def analyze(
    model: ModelOpt = DEFAULT_MODEL,
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
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    remote: Annotated[bool, typer.Option("--remote", help="Run the forward passes on NDIF through nnsight (--model is a Hub id; needs NDIF_API_KEY and factscope[remote]).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --remote: print the requests and bytes a run would cost, send nothing.")] = False,
) -> None:
    """Exact DLA by component and source group, the logit lens, head classes and mechanism shares."""
    from .recall import accuracy_table

    if _plan_only(dry_run, remote):
        console.print(stages.remote_plan(model, dataset, batch_size=batch_size, bos=bos, dtype=_value(dtype), swap=swap).describe())
        return
    run = stages.analyze(model, dataset, out, overwrite=overwrite, device=device, batch_size=batch_size, bos=bos,
                         all_prompts=all_prompts, k=k, z=z, swap=swap, resume=resume, dtype=_value(dtype), threads=threads,
                         remote=remote, reporter=REPORTER)
    summary = run.summary
    _print_accuracy(accuracy_table(run.recall), _model_title(run))
    _print_mechanisms(summary)
    _print_report(run)
    reconstruction, head_error, tolerance = (summary[key] for key in ("max_abs_reconstruction_error", "max_abs_head_error", "tolerance"))
    console.print(
        f"analysed {summary['n_analysed']}/{summary['n_prompts']} prompts · sum of parts = model logit within "
        f"{reconstruction:.1e} (per head {head_error:.1e}; tolerance {tolerance:g}) · wrote {out}/ (open report.html)"
    )


RunArg = Annotated[Path, typer.Argument(help="A finished `factscope analyze` output directory.", exists=True, file_okay=False)]
SeedsOpt = Annotated[Optional[str], typer.Option("--seeds", help="Comma-separated random seeds (default: the check's own, 0,1,2).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="At most N known facts, taken in turn from each relation.")]
CausalOverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace causal tables this command wrote before.")]


class AblationMode(str, Enum):
    mean = "mean"
    zero = "zero"


@app.command()
def ablate(
    run_dir: RunArg,
    mode: Annotated[AblationMode, typer.Option("--mode", help="Replace a removed path by its dataset mean, or by zero.")] = AblationMode.mean,
    window: Annotated[int, typer.Option("--window", min=1, help="Layers per attention-knockout window.")] = 9,
    noise_scales: Annotated[Optional[str], typer.Option("--noise-scales", help="Comma-separated noise scales (× the norm of END's clean final residual, spread over a mechanism's paths; default: the noise check's own, 0,0.05,0.1,0.15,0.25,0.5,1,2; keep 0 in it: the summary is read where the full model's accuracy has halved from scale 0's).")] = None,
    seeds: SeedsOpt = None,
    method: Annotated[str, typer.Option("--method", help="exact (the mechanism grid only), atp (also every single path by attribution patching, checked on a sample ablated exactly) or both (every path ablated exactly too).")] = "exact",
    limit: LimitOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    overwrite: CausalOverwriteOpt = False,
    remote: Annotated[bool, typer.Option("--remote", help="Run the attention knockout, the mechanism ablations, the noise check, the extraction rate, subject enrichment and path AtP (--method) on NDIF through nnsight, for a run of analyze --remote.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --remote: print the requests and bytes the checks would cost (and the noise draws they send), send nothing.")] = False,
) -> None:
    """Causal checks of a finished run on its model's known facts: attention knockout, mechanism ablations (alone,
    in pairs, together), noise robustness, attribute extraction rate, subject enrichment. Adds their tables and
    summary.json["causal"] to RUN_DIR and re-renders the report. --method atp|both adds path_ablations.csv and
    atp_path_agreement.csv (every head path and MLP at END removed alone)."""
    scales, seed_list = _numbers(noise_scales, float, "--noise-scales"), _numbers(seeds, int, "--seeds")
    if _plan_only(dry_run, remote):
        console.print(stages.remote_ablate_plan(run_dir, window=window, mode=mode.value, noise_scales=scales,
                                                seeds=seed_list, method=method, limit=limit).describe())
        return
    run = stages.ablate(run_dir, mode=mode.value, window=window, noise_scales=scales, seeds=seed_list, method=method, limit=limit, device=device, threads=threads,
                        overwrite=overwrite, remote=remote, reporter=REPORTER)
    _print_causal(run.summary["causal"], ("ablate", "knockout", "ablations", "noise_robustness", "extraction_rate", "enrichment",
                                          "path_ablations"))
    _print_report(run)


@app.command()
def trace(
    run_dir: RunArg,
    noise: Annotated[float, typer.Option("--noise", min=0.0, help="Noise std, in units of the std of the subjects' token embeddings.")] = 3.0,
    window: Annotated[int, typer.Option("--window", min=1, help="Layers per restored attention / MLP window.")] = 10,
    seeds: SeedsOpt = None,
    method: Annotated[str, typer.Option("--method", help="exact (patching), atp (attribution patching, checked on a sample restored exactly) or both.")] = "exact",
    graddrop: Annotated[bool, typer.Option("--graddrop", help="With --method atp|both: also AtP*'s GradDrop (one backward pass per layer), checked the same way.")] = False,
    limit: LimitOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    overwrite: CausalOverwriteOpt = False,
    remote: Annotated[bool, typer.Option("--remote", help="Run tracing on NDIF through nnsight (exact: one session per seed; each AtP estimate: one session; the sampled exact check: one per seed), for a run of analyze --remote.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --remote: print the requests and bytes tracing would cost (and the noise draws it sends), send nothing.")] = False,
) -> None:
    """Causal tracing (Meng et al. 2022) on a finished run's known facts: noise on the subject's embeddings, one
    clean state restored per (layer, position). Writes RUN_DIR/causal_trace.parquet and trace_peaks.csv, adds
    summary.json["causal"]["trace"] and re-renders the report. Costs about 1 + seeds × (1 + 3 × layers) passes,
    each over the positions from the restored one on. --method atp writes atp_trace.parquet and atp_agreement.csv
    instead (1 + seeds forward and backward passes, plus the sampled exact check); both writes all four.
    --graddrop adds GradDrop's error to atp_agreement.csv (layers backward passes per seed)."""
    if _plan_only(dry_run, remote):
        console.print(stages.remote_trace_plan(run_dir, seeds=_numbers(seeds, int, "--seeds"), limit=limit,
                                               method=method, graddrop=graddrop, window=window).describe())
        return
    run = stages.trace(run_dir, noise=noise, window=window, seeds=_numbers(seeds, int, "--seeds"), method=method,
                       graddrop=graddrop, limit=limit, device=device, threads=threads, overwrite=overwrite,
                       remote=remote, reporter=REPORTER)
    _print_causal(run.summary["causal"], ("trace",))
    _print_report(run)


def _numbers(text: Optional[str], kind: type, option: str) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated {kind.__name__}s", param_hint=option) from None
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=option)
    return values


def _ci(interval: list | None, spec: str) -> str:
    """A bootstrap interval from summary.json as " [low, high]"; nothing where it has none."""
    if not interval or any(value is None or not math.isfinite(value) for value in interval):
        return ""
    return f" [{format(interval[0], spec)}, {format(interval[1], spec)}]"


def _print_causal(causal: dict, keys: tuple[str, ...]) -> None:
    """The entries of summary.json["causal"] this command wrote."""
    summary = {key: causal[key] for key in keys if key in causal}
    table = Table(title="causal checks (summary.json[\"causal\"])")
    table.add_column("check")
    table.add_column("result", overflow="fold")
    if "ablations" in summary:
        from .report.text import MIN_ABLATION_PROMPTS

        n_prompts = summary.get("ablate", {}).get("n_prompts", 0)
        ablations = summary["ablations"]
        for label, entry in (("", ablations), (" (direct)", ablations.get("direct"))):
            if entry is None:
                continue
            singles = ", ".join(f"{name} {acc:.0%}" for name, acc in entry["accuracy_single_removed"].items())
            table.add_row(f"accuracy, one mechanism removed{label}", f"clean {entry['accuracy_clean']:.0%}; {singles}")
            value = entry["interaction_logit_diff_all"]
            if math.isfinite(value) and n_prompts >= MIN_ABLATION_PROMPTS:
                interaction = f"interaction {value:+.2f}{_ci(entry.get('interaction_logit_diff_all_ci'), '+.2f')} logits of a − mean(R∖a)"
            else:  # the same rule as the report's verdict
                interaction = f"interaction inconclusive on {n_prompts} prompts"
            accuracy = f"{entry['accuracy_all_removed']:.0%}{_ci(entry.get('accuracy_all_removed_ci'), '.0%')}"
            table.add_row(f"accuracy, all removed{label}", f"{accuracy} ({interaction})")
    for key, entry in summary.get("knockout", {}).items():
        if key == "bootstrap":
            continue
        layers = entry["layers"]
        # a worst window's interval re-picks the window in every resample where the summary has it
        size = _ci(entry.get("picked_rel_change_p_ci") or entry.get("rel_change_p_ci"), "+.0%")
        centre = _ci(entry.get("layer_ci"), ".0f").replace(", ", "–")
        table.add_row(f"knockout {key}", f"layers {layers[0]}–{layers[1]}{f' (centre{centre}, re-picked)' if centre else ''}: "
                      f"p(a) {entry['rel_change_p']:+.0%}{size}, accuracy → {entry['accuracy_after']:.0%}"
                      f"{_ci(entry.get('accuracy_after_ci'), '.0%')}")
    for sublayer, entry in summary.get("extraction_rate", {}).items():
        best = (f"best layer {entry['layer']}{_ci(entry.get('layer_ci'), '.0f').replace(', ', '–')}: "
                f"{entry['extraction_rate']:.1%}{_ci(entry.get('extraction_rate_ci'), '.1%')}"
                if entry["layer"] is not None else "no layer extracts the prediction (0% everywhere)")
        if "any_layer_rate" in entry:  # Geva et al.'s per-example rate
            best += f"; at any layer {entry['any_layer_rate']:.1%}{_ci(entry.get('any_layer_rate_ci'), '.1%')}"
        table.add_row(f"extraction rate ({sublayer})", best)
    for mechanism, entry in summary.get("noise_robustness", {}).items():
        if "at_halved" in entry and mechanism != "all":
            at = entry["at_halved"]
            table.add_row(f"noise → {mechanism} (at {at['halved_scale']:g}×, accuracy halved)" if at["accuracy_halved"]
                          else f"noise → {mechanism} (at {at['halved_scale']:g}×: accuracy never halves)",
                          f"margin {at['margin_at_halved']:+.0%}{_ci(at['margin_at_halved_ci'], '+.0%')}; area between "
                          f"the curves {at['margin_area']:+.0%}{_ci(at['margin_area_ci'], '+.0%')}"
                          + ("" if at["informative"] else "; the model is at chance at every noisy scale"))
            continue
        text = f"accuracy at max scale {entry['accuracy_at_max_scale']:.0%}; mean over scales {entry['mean_accuracy_over_scales']:.0%}"
        if "alone_first_among_r_at_max_scale" in entry:
            text += (f"; a first among R_r at max scale: model {entry['first_among_r_at_max_scale']:.0%}, "
                     f"noisy mechanism alone {entry['alone_first_among_r_at_max_scale']:.0%}")
        if entry.get("margin_at_max_scale") is not None:
            text += f", margin {entry['margin_at_max_scale']:+.0%}{_ci(entry.get('margin_at_max_scale_ci'), '+.0%')}"
        table.add_row(f"noise → {mechanism}", text)
    for peak in summary.get("trace", {}).get("peaks", []):
        if peak["token"] in ("last_subject", "last_token"):
            layers = _ci([peak.get("peak_layer_low"), peak.get("peak_layer_high")], ".0f").replace(", ", "–")
            effect = _ci([peak.get("peak_effect_low"), peak.get("peak_effect_high")], "+.3f")
            table.add_row(f"trace peak {peak['kind']} @ {peak['token']}",
                          f"layer {peak['layer']}{layers}: Δp {peak['indirect_effect']:+.3f}{effect}")
    split = summary.get("trace", {}).get("mlp0")
    if split:
        window, without = split["window"], split["without_mlp0"]
        table.add_row("trace: MLP0 apart @ last_subject",
                      f"window {window['layers'][0]}–{window['layers'][1]} Δp {window['effect']:+.3f}; MLP0 alone "
                      f"{split['mlp0_alone']['effect']:+.3f}{_ci(split['mlp0_alone']['effect_ci'], '+.3f')}; without MLP0 "
                      f"{without['effect']:+.3f}{_ci(without['effect_ci'], '+.3f')}")
    paths = summary.get("path_ablations", {})
    if paths.get("atp_top_paths"):
        table.add_row("AtP: paths whose removal costs most", ", ".join(paths["atp_top_paths"]) + " (logits of a − mean(R∖a))")
    # no AtP number is printed without its error against exact patching
    for label, agreement, file in (("AtP vs exact patching", summary.get("trace", {}).get("atp_agreement"), "atp_agreement.csv"),
                                   ("AtP vs exact path ablation (total)", paths.get("atp_agreement"), "atp_path_agreement.csv")):
        if agreement:
            table.add_row(label, _agreement_text(agreement, file))
            if agreement.get("graddrop"):
                table.add_row(f"{label}, GradDrop", _agreement_text(agreement["graddrop"], file))
    stdout.print(table)


def _agreement_text(agreement: dict, file: str) -> str:
    scope = f"{agreement['n_cells']} sampled cells" if agreement["sampled"] else f"all {agreement['n_cells']} cells"
    pearson, spearman = (f"{agreement[key]:.2f}" if agreement[key] is not None else "n/a" for key in ("pearson", "spearman"))
    return (f"{scope}: Pearson {pearson}, Spearman {spearman}, top-{agreement['top_k']} overlap {agreement['top_k_overlap']:.0%}, "
            f"{agreement['false_negatives']}/{agreement['n_exact_above']} effects ≥ {agreement['threshold']} missed ({file})")


@app.command("report")
def report_command(
    run_dir: RunArg,
    pngs: Annotated[bool, typer.Option("--pngs/--no-pngs", help="Also write DIR/figures/*.png.")] = True,
) -> None:
    """Write DIR/report.html (one self-contained file, opens offline) and DIR/figures/*.png from a finished run."""
    from .rundir import load_run

    stages.write_report(run_dir, pngs=pngs, reporter=REPORTER)
    _print_report(load_run(run_dir), pngs)


def _print_report(run, pngs: bool = True) -> None:
    """The paper verdicts of a run whose report was just written, and where the report is."""
    _print_departures(run)
    path = run.path / "report.html"
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)" + (f" and {run.path}/figures/*.png" if pngs else ""))


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more finished `factscope analyze` output directories.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write; the tidy table goes beside it as .csv.")] = Path("compare.html"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
) -> None:
    """Runs side by side: recall, head classes per model size, their depth, mechanism shares, exactness."""
    with console.status("comparing runs"):
        html_path, csv_path = stages.compare(run_dirs, out, overwrite)
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
    stdout.print(table)


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
    rows = stages.import_facts(source, format.value, out, prefix, limit, overwrite)
    console.print(f"imported {len(rows)} facts over {len({row['relation'] for row in rows})} relations · wrote {out}")


def _print_departures(run) -> None:
    from .report import departures

    table = Table(title="where this model departs from the paper (Pythia-2.8B)")
    table.add_column("verdict")
    table.add_column("this run", overflow="fold")
    colour = {"agrees": "green", "departs": "yellow", "inconclusive": "dim", "not run": "dim"}
    for verdict in departures(run):
        table.add_row(Text(verdict.status, style=colour[verdict.status]), verdict.text)
    stdout.print(table)


def _print_mechanisms(summary: dict) -> None:
    classes = Table(title="head classes (mean DLA to the correct attribute, by source)")
    for column in ("class", "heads", "strongest"):
        classes.add_column(column, justify="right" if column == "heads" else "left")
    for name in CLASSES:  # summary.json's keys come back sorted: print in the taxonomy's order
        entry = summary["head_classes"][name]
        classes.add_row(name, str(entry["count"]), ", ".join(entry["top"]) if name != "negligible" else "")
    # the centred logit (less its vocabulary mean): what raises every logit alike changes no probability
    shares = Table(title="share of a − mean(R \\ a) and of the correct attribute's centred logit [95% CI], by mechanism")
    for column in ("mechanism", "a − mean(R\\a)", "centred logit"):
        shares.add_column(column, justify="left" if column == "mechanism" else "right")
    by_metric, intervals = summary["mechanism_shares"], summary.get("mechanism_shares_ci", {})

    def cell(metric: str, mechanism: str) -> str:
        if metric not in by_metric:  # a run from before the centred shares
            return "—"
        low, high = intervals.get(metric, {}).get(mechanism, (None, None))
        interval = f" [{low:+.1%}, {high:+.1%}]" if low is not None else ""
        return f"{by_metric[metric][mechanism]:+.1%}{interval}"

    for mechanism in MECHANISM_ORDER:
        shares.add_row(mechanism, cell("logit_diff", mechanism), cell("centred_logit", mechanism))
    stdout.print(classes)
    stdout.print(shares)


def _model_title(run) -> str:
    bos = run.summary.get("prepend_bos")
    return f"{run.summary['model']} · BOS {'prepended' if bos else 'not prepended'}"


def _print_accuracy(accuracy, title: str) -> None:
    table = Table(title=f"recall@1 — {title}")
    for column in ("relation", "n", "correct", "accuracy", "mean p(attribute)"):
        table.add_column(column, justify="left" if column == "relation" else "right")
    for row in accuracy.itertuples():
        table.add_row(row.relation, str(row.n), str(int(row.correct)), f"{row.accuracy:.1%}", f"{row.mean_prob:.3f}")
    stdout.print(table)


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread. Not a KeyboardInterrupt: typer turns that into a return value,
    which exited 0 after Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(signum)


def run() -> None:
    """Entry point: one clear line and a non-zero exit for any user error, a traceback only with --debug;
    128 + the signal's number after SIGINT (130) or SIGTERM (143), once the run has cleaned up."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup and `cmd &` ask for the signal to be ignored
            signal.signal(signum, _interrupt)
    try:
        # standalone_mode=False: click's Exit (--help, usage) comes back as a return value, not an exception
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
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
    except Interrupted as err:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C while exiting ends at once
            signal.signal(signum, signal.SIG_DFL)
        _fail(err, f"interrupted by {err}", 128 + err.signum)
    except Exception as err:  # noqa: BLE001 — the user gets one line; --debug gives the traceback
        _fail(err, f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", 1)


def _fail(err: BaseException, message: str, code: int) -> None:
    if state["debug"]:
        raise err
    message = "; ".join([message, *getattr(err, "__notes__", ())])
    console.print(Text.assemble(("factscope: error:", "red"), " ", message), highlight=False, soft_wrap=True)
    sys.exit(code)
