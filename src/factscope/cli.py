"""Command line: thin wrappers that load, call a stage, write its tables, and print a summary."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import FactscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="How a language model recalls a fact.")
console = Console(stderr=True)
state = {"debug": False}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="smollm2-135m, gemma3-270m, a HF dir, a .gguf, or a cached hub id.")]
DatasetOpt = Annotated[Optional[Path], typer.Option("--dataset", "-d", help="JSONL or CSV facts (default: the shipped set).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (must not exist).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps ...")]
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
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and total < 1) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _prepare(model_name: str, dataset: Optional[Path], device: str, bos: Optional[bool]):
    """Validate the dataset before the (slow) model load, then tokenize it for that model."""
    from .data import encode_all, load_facts, shipped_dataset
    from .models import load_model

    dataset_path = dataset or shipped_dataset()
    facts = load_facts(dataset_path)
    with console.status(f"loading {model_name}"):
        model = load_model(model_name, device=device, prepend_bos=bos)
    return model, encode_all(facts, model.tokenizer, model.prepend_bos), dataset_path


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
    from .outputs import manifest, output_dir, write_csv, write_json
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
    from .outputs import manifest, output_dir, write_csv, write_json
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
        _fail(err, f"{err.filename or ''}: {err.strerror or err}", 2)
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
