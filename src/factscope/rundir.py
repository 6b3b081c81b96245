"""The run directory, both ways: what it holds (`TABLES`, the one registry of its file names), how a stage writes
it (never half-written, resumable) and how it is read back (`load_run` → `Run`). Torch-free: the report and
notebooks read runs without loading a model.

Output directories are never half-written, and runs resume after a crash.

A run writes into a staging folder `.DIR.partial` beside DIR, which replaces DIR only when everything in it is
complete. Long runs write each finished batch there as its own parquet parts plus a `.done` marker (both
renamed into place, so a kill -9 leaves either a whole batch or none); `--resume` skips those batches and the
final tables are the parts concatenated in batch order, so they are byte-identical to an uninterrupted run.

Nothing factscope did not write is ever deleted or replaced. `--overwrite` replaces only a directory that holds
nothing but factscope's own files beside a run.json factscope wrote (`check_output`), or an empty one; temporary
files are created exclusively (never through a planted link); locks are taken on the resolved path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .errors import FactscopeError

if TYPE_CHECKING:
    from .data import Dataset

MANIFEST = "run.json"
SUMMARY = "summary.json"
# name → file of every table a run directory can hold; the name is the attribute of `Run` that reads it back
TABLES = {
    "recall": "recall.csv",
    "tokens": "tokens.parquet",
    "relation_targets": "relation_targets.csv",  # R_r of the run: every later stage reads a − mean(R∖a) on it
    "attributions": "attributions.parquet",
    "logit_lens": "logit_lens.parquet",
    "heads": "heads.csv",
    "head_relation_classes": "head_relation_classes.csv",
    "class_sweep": "head_class_sweep.csv",
    "mlp_boosting": "mlp_boosting.csv",
    "mechanisms": "mechanisms.csv",
    "subject_swap": "subject_swap.csv",
    # causal checks (written by `ablate` and `trace` when they were run)
    "knockout": "knockout.csv",
    "ablations": "ablations.csv",
    "noise_robustness": "noise_robustness.csv",
    "extraction_rate": "extraction_rate.csv",
    "enrichment": "enrichment.csv",
    "causal_trace": "causal_trace.parquet",
    "trace_peaks": "trace_peaks.csv",
    "atp_trace": "atp_trace.parquet",  # causal_trace's rows estimated by attribution patching (trace --method atp|both)
    "atp_agreement": "atp_agreement.csv",  # AtP against exact patching, per kind (causal.atp)
    "path_ablations": "path_ablations.csv",  # every single path removed: AtP and exact (ablate --method atp|both)
    "atp_path_agreement": "atp_path_agreement.csv",  # AtP against exact path ablation, per kind (causal.atp_paths)
}
LAZY_TABLES = ("attributions",)  # ~10⁶ rows: read on demand with filters (`Run.attributions`)
REPORT = "report.html"
FIGURES = "figures"  # the report's PNG twins, *.png only
TEMPORARY_SUFFIX = ".tmp"  # of `atomic_path`'s files, `.NAME.XXXXXXXX.tmp`: left behind only by a kill -9
# every name a finished run directory can hold: `check_output` replaces a directory only if it holds no other
RUN_FILES = frozenset({MANIFEST, SUMMARY, REPORT, *TABLES.values()})


def write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_path(path: Path):
    """Yield a sibling temporary path to write; it becomes `path` only once complete.

    The temporary file is created exclusively under a fresh name (`tempfile.mkstemp`: O_CREAT | O_EXCL), so a link
    planted in the directory is never written through; renaming over `path` replaces a link there, not its target.
    A failed write (a full disk, say) removes the partial file and names the file in the error.
    """
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as err:
        raise FactscopeError(f"{path}: cannot write ({err.strerror or err})") from err
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would make every table private to its writer
    finally:
        os.close(handle)
    partial = Path(name)
    try:
        yield partial
        partial.replace(path)
    except OSError as err:
        raise FactscopeError(f"{path}: cannot write ({err.strerror or err})") from err
    finally:
        partial.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without setting it (`os.umask` sets it, racing the threads that create files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as partial:
        frame.to_parquet(partial, index=False, compression="zstd")


SLICE_ROWS = 65_536


def _write_parquet_in_slices(frame: pd.DataFrame, path: Path) -> None:
    """`write_parquet`, converting `SLICE_ROWS` rows to Arrow at a time: converting a batch's whole attribution
    table at once held a second copy of it, the decomposition's peak (SmolLM2, fp32: +56 MB on the first batch's
    508k rows). Each slice is a row group of its own; `RunDir.merge` reads them back as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.Schema.from_pandas(frame.iloc[:0], preserve_index=False)
    with atomic_path(path) as partial, pq.ParquetWriter(partial, schema, compression="zstd") as writer:
        for start in range(0, max(len(frame), 1), SLICE_ROWS):
            writer.write_table(pa.Table.from_pandas(frame.iloc[start:start + SLICE_ROWS], schema=schema,
                                                    preserve_index=False))


class RunDir:
    """The staging folder of one run. `path` is where the finished run will be."""

    def __init__(self, path: Path, staging: Path):
        self.path, self.staging = path, staging
        self.batches = staging / "batches"
        self.owns_staging = False  # set once the staging folder is known to be this run's: only then removed

    def done_batches(self) -> dict[int, dict]:
        """Finished batches and the metadata each recorded (its exactness errors)."""
        if not self.batches.is_dir():
            return {}
        return {int(marker.stem): json.loads(marker.read_text()) for marker in sorted(self.batches.glob("*.done"))}

    def write_batch(self, index: int, tables: dict[str, pd.DataFrame], meta: dict) -> None:
        self.batches.mkdir(exist_ok=True)
        for name, frame in tables.items():
            _write_parquet_in_slices(frame, self.batches / f"{index:06d}.{name}.parquet")
        write_json(self.batches / f"{index:06d}.done", meta)

    def merge(self, name: str) -> Path:
        """Concatenate a table's batch parts, in batch order, into `name.parquet`, streaming part by part."""
        import pyarrow.parquet as pq

        target, writer = self.staging / f"{name}.parquet", None
        with atomic_path(target) as partial:
            try:
                for index in sorted(self.done_batches()):
                    table = pq.read_table(self.batches / f"{index:06d}.{name}.parquet")
                    if writer is None:
                        writer = pq.ParquetWriter(partial, table.schema, compression="zstd")
                    writer.write_table(table.cast(writer.schema))
            finally:
                if writer is not None:
                    writer.close()
        return target

    def read_parts(self, name: str) -> pd.DataFrame:
        frames = [pd.read_parquet(self.batches / f"{i:06d}.{name}.parquet") for i in sorted(self.done_batches())]
        return pd.concat(frames, ignore_index=True)


def check_output(path: str | Path, overwrite: bool, resume: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """Refuse, before any work, an output that this run may not write; return its absolute path.

    An existing `path` is replaced only with `overwrite`, and only if factscope wrote it (`_foreign_entry`) and it
    holds none of the `protected` files (the run's dataset, the dataset of the run it replaces). `resume`
    continues an unfinished staging folder; it never replaces a finished run.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.name:
        raise FactscopeError(f"{path}: the root directory cannot be an output; name a new directory")
    if path.is_symlink():
        raise FactscopeError(f"{path}: is a symbolic link; give the directory itself (factscope never writes through a link)")
    if not path.exists():
        return path
    if not path.is_dir():
        raise FactscopeError(f"{path}: exists and is not a directory")
    if not overwrite:
        hint = ("it is a finished run; --resume continues only an unfinished one, " if resume else "")
        raise FactscopeError(f"{path}: output directory exists; {hint}pass --overwrite to replace it"
                             + ("" if resume else " or --resume to continue"))
    cwd = Path(os.path.abspath(os.getcwd()))
    if cwd == path or path in cwd.parents:
        raise FactscopeError(f"{path}: holds the current directory; --overwrite never replaces it")
    foreign = _foreign_entry(path)
    if foreign is not None:
        raise FactscopeError(f"{path}: not a factscope output ({foreign}); --overwrite replaces only a directory "
                             "factscope wrote, or an empty one: choose another --out")
    previous = _read_manifest(path) or {}
    for file in [*protected, previous.get("dataset")]:
        if file and Path(file).exists() and _inside(Path(file), path):
            raise FactscopeError(f"{path}: holds the dataset {file}; --overwrite would delete it: choose another --out")
    return path


def check_file_output(path: str | Path, overwrite: bool, written_by_factscope) -> Path:
    """`check_output` for a single file (a comparison page, imported facts): an existing file is replaced only with
    `overwrite` and only if `written_by_factscope(path)` recognises it as factscope's own output."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_symlink():
        raise FactscopeError(f"{path}: is a symbolic link; give the file itself (factscope never writes through a link)")
    if path.is_dir():
        raise FactscopeError(f"{path}: is a directory; name a file")
    if path.exists():
        if not overwrite:
            raise FactscopeError(f"{path}: exists; pass --overwrite to replace it")
        if not written_by_factscope(path):
            raise FactscopeError(f"{path}: not a file factscope wrote; --overwrite replaces only factscope's own "
                                 "output: choose another name")
    return path


def _inside(file: Path, folder: Path) -> bool:
    real, parent = Path(os.path.realpath(file)), Path(os.path.realpath(folder))
    return real == parent or parent in real.parents


def _foreign_entry(folder: Path, staging: bool = False) -> str | None:
    """What in `folder` factscope did not write, or None: nothing outside the run's own file names (`RUN_FILES`,
    the figures, a staging folder's batches, `atomic_path`'s leftovers), and a run.json factscope wrote, unless the
    folder is empty. A home directory, a project folder or `/` all fail this on their first entry."""
    entries = list(folder.iterdir())
    if not entries:
        return None
    for entry in entries:
        if not _factscope_entry(entry, staging):
            return f"it holds {entry.name!r}"
    if "factscope" not in (_read_manifest(folder) or {}).get("versions", {}):
        return f"no {MANIFEST} written by factscope"
    return None


def _factscope_entry(entry: Path, staging: bool) -> bool:
    name = entry.name
    if entry.is_symlink():
        return False
    if entry.is_dir():
        expected = {FIGURES: r"[\w-]+\.png", **({"batches": r"\d{6}\.(?:[a-z_]+\.parquet|done)"} if staging else {})}
        pattern = expected.get(name)
        return pattern is not None and all(
            not child.is_symlink() and child.is_file() and (re.fullmatch(pattern, child.name) or _temporary(child.name))
            for child in entry.iterdir())
    return entry.is_file() and (name in RUN_FILES or _temporary(name))


def _temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


@contextmanager
def output_dir(path: str | Path, overwrite: bool = False, resume: bool = False, manifest: dict | None = None):
    """Yield a RunDir; on success its staging folder becomes `path`.

    On failure the staging folder is removed, unless it holds finished batches that `--resume` can reuse.
    With `resume`, a staging folder whose manifest matches this run's is continued; otherwise it starts anew.
    """
    protected = [manifest["dataset"]] if manifest and manifest.get("dataset") else []
    path = check_output(path, overwrite, resume, protected)
    staging = path.with_name(f".{path.name}.partial")
    run = RunDir(path, staging)
    try:
        _prepare_staging(run, resume, manifest)
        yield run
    except BaseException as err:
        kept = len(run.done_batches()) if run.owns_staging else 0
        if kept:
            # the one place that knows the folder was kept: the CLI prints notes after the error line
            err.add_note(f"kept {kept} finished batches in {staging}: rerun with --resume to continue, "
                         f"or rm -rf {staging} to discard them")
        elif run.owns_staging:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(run.batches, ignore_errors=True)
    _replace(staging, check_output(path, overwrite, resume, protected))


@contextmanager
def locked(path: str | Path):
    """Hold `.DIR.lock` beside `path` for one process at a time: a second process writing the same output (or the
    same run directory) is refused at once instead of interleaving its files with the first's.

    The lock file is removed on release; a process that locked a file since unlinked retries on the new one.
    """
    import fcntl

    # the real path: a run reached through a link and through its own name is one run, with one lock
    path = Path(os.path.realpath(Path(path).expanduser()))
    if not path.name:
        raise FactscopeError(f"{path}: the root directory cannot be an output; name a new directory")
    lock = path.with_name(f".{path.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            # O_NOFOLLOW: a link planted at the lock's name is refused, never created or truncated through
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FactscopeError(f"{path}: another factscope process is writing it (it holds {lock}); "
                                     "wait for it to finish or choose another --out") from None
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as err:
        raise FactscopeError(f"{lock}: cannot create the lock file ({err.strerror or err})") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _prepare_staging(run: RunDir, resume: bool, manifest: dict | None) -> None:
    """Continue (with `resume`) or start the staging folder. One factscope did not write, or a link, is refused,
    never removed: the name `.DIR.partial` may be taken by anything."""
    staging = run.staging
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        raise FactscopeError(f"{staging}: is not factscope's staging folder (a link or a file); remove it or choose another --out")
    if staging.exists():
        foreign = _foreign_entry(staging, staging=True)
        if foreign is not None:
            raise FactscopeError(f"{staging}: is not factscope's staging folder ({foreign}); remove it or choose another --out")
        previous = _read_manifest(staging)
        if not (resume and previous is not None and _same_run(previous, manifest)):
            shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FactscopeError(f"{run.path}: cannot create output directory ({err.strerror})") from None
    run.owns_staging = True
    if manifest is not None and not (staging / MANIFEST).exists():
        write_json(staging / MANIFEST, manifest)


def _read_manifest(staging: Path) -> dict | None:
    try:
        return json.loads((staging / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _same_run(previous: dict, current: dict | None) -> bool:
    """A resume must continue the same computation: same inputs, model, configuration and code version."""
    keys = ("config", "seed", "dataset_sha256", "weights_sha256", "versions")
    return current is not None and all(previous.get(key) == current.get(key) for key in keys)


def _replace(staging: Path, path: Path) -> None:
    """Rename the staging folder into place. A run it replaces (checked by `check_output` just before) moves into a
    fresh private folder first, and only that folder is removed: no fixed name such as `.DIR.old` that anything
    could already hold."""
    if not path.exists():
        staging.rename(path)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    path.rename(retired / path.name)
    staging.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


def manifest(model_name: str, weights_sha256: str, dataset: Dataset, config: dict, seed: int = 0) -> dict:
    """What a run was: enough to reproduce it, and to refuse resuming a different one.

    `seed` is the one the command passed to `torch.manual_seed` before any computation (the CLI seeds every
    command, 0 unless it takes a --seed), so that a command that samples can be rerun exactly.
    """
    import platform
    from importlib.metadata import version

    packages = ("factscope", "torch", "transformers", "transformer-lens", "pandas", "pyarrow", "numpy")
    return {
        "model": model_name,
        "weights_sha256": weights_sha256,
        "dataset": str(dataset.path),
        "dataset_sha256": dataset.sha256,  # of the bytes the facts were parsed from, not of a second read
        "config": config,
        "seed": seed,
        "versions": {"python": platform.python_version(), **{name: version(name) for name in packages}},
    }


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Every string quoted: decoded tokens can hold a bare '\\r', which default readers take as a line break."""
    import csv

    with atomic_path(path) as partial:
        frame.to_csv(partial, index=False, quoting=csv.QUOTE_NONNUMERIC)


def table_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / TABLES[name]


def write_table(frame: pd.DataFrame, run_dir: str | Path, name: str) -> Path:
    """A registered table into a run (or staging) directory, atomically, as CSV or parquet by its file name."""
    path = table_path(run_dir, name)
    (write_csv if path.suffix == ".csv" else write_parquet)(frame, path)
    return path


def read_table(run_dir: str | Path, name: str, required: bool = False) -> pd.DataFrame | None:
    """A registered table of a run directory; None where it is absent (an error naming it when `required`)."""
    path = table_path(run_dir, name)
    if not path.is_file():
        if required:
            raise FactscopeError(f"{path}: missing; is {path.parent} a finished `factscope analyze` run?")
        return None
    if path.suffix == ".csv":
        return read_csv(path)
    return read_parquet(path)


def read_parquet(path: Path, **options) -> pd.DataFrame:
    """A run's parquet table, or one error line naming the file."""
    try:
        table = pd.read_parquet(path, **options)
    except Exception as err:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        raise FactscopeError(f"{path}: not a readable parquet table ({type(err).__name__}: {_first_line(err)})") from None
    return table.astype({"prompt_id": str}) if "prompt_id" in table else table


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def read_csv(path: Path) -> pd.DataFrame:
    """A run's CSV, or one error line naming the file. Rows end in "\\n" only: pandas writes a bare "\\r" inside
    a field (a token such as the top-5 predictions of a small model) unquoted, and the default reader would split
    the row there."""
    import warnings

    try:
        # a row longer than the header would silently become the index: refuse it like any malformed row
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(path, dtype={"prompt_id": str}, index_col=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, pd.errors.ParserWarning) as err:
        raise FactscopeError(f"{path}: not a readable CSV table ({type(err).__name__}: {_first_line(err)})") from None
    last = str(table.columns[-1]) if len(table.columns) else ""
    if last.endswith("\r"):  # written with "\r\n" line ends (Windows): strip them from the last column
        table = table.rename(columns={last: last[:-1]})
        column = table[last[:-1]].astype(str).str.rstrip("\r")
        try:
            table[last[:-1]] = pd.to_numeric(column)
        except ValueError:
            table[last[:-1]] = column
    return table


CORRECT_COLUMNS = ["prompt_id", "relation", "target", "component", "layer", "head", "source", "value", "logit_diff"]


class Run:
    """A finished run directory read back: `run.summary` (summary.json), `run.manifest` (run.json) and every
    table of `TABLES` as an attribute (`run.heads`, `run.knockout`, ...; None where absent). Attributions are
    read on demand (`run.attributions(columns, filters)`). Displayed in Jupyter, a run shows its summary."""

    def __init__(self, path: Path, summary: dict, tables: dict[str, pd.DataFrame], manifest: dict | None = None):
        self.path, self.summary, self.manifest = path, summary, manifest or {}
        self.tables = tables
        self._correct: pd.DataFrame | None = None

    def __getattr__(self, name: str):
        if name in TABLES and name not in LAZY_TABLES:
            return self.__dict__["tables"].get(name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {', '.join(self.tables)})"

    @property
    def attributions_path(self) -> Path:
        return table_path(self.path, "attributions")

    def has(self, name: str) -> bool:
        table = self.tables.get(name)
        return table is not None and not table.empty

    def attributions(self, columns: list[str] | None = None, filters: list | None = None) -> pd.DataFrame:
        """Rows of attributions.parquet, read with pyarrow filters (the file has ~10⁶ rows: ask for what you need),
        e.g. `run.attributions(["prompt_id", "value"], [("component", "==", "mlp"), ("layer", "in", [27, 28])])`."""
        if not self.attributions_path.is_file():
            raise FactscopeError(f"{self.attributions_path}: not found; run `factscope analyze` first")
        return read_parquet(self.attributions_path, columns=columns, filters=filters)

    def correct_parts(self) -> pd.DataFrame | None:
        """Every part's contribution to each analysed prompt's correct attribute (cached); None without attributions."""
        if self._correct is None and self.attributions_path.is_file():
            self._correct = self.attributions(CORRECT_COLUMNS, [("is_correct_target", "==", True)])
        return self._correct

    @property
    def n_layers(self) -> int | None:
        return int(self.heads["layer"].max()) + 1 if self.has("heads") else None

    @property
    def n_heads(self) -> int | None:
        return int(self.heads["head"].max()) + 1 if self.has("heads") else None

    def _repr_html_(self) -> str:
        import html

        summary, rows = self.summary, []
        if "accuracy" in summary or self.has("recall"):
            accuracy = summary.get("accuracy", float(self.recall["correct"].mean()) if self.has("recall") else None)
            rows.append(("recall@1", f"{accuracy:.1%} of {summary.get('n_prompts', '?')} prompts"))
        if "n_analysed" in summary:
            rows.append(("analysed", f"{summary['n_analysed']} prompts"))
        if "max_abs_reconstruction_error" in summary:
            rows.append(("sum of parts = logit", f"within {summary['max_abs_reconstruction_error']:.1e} "
                                                 f"(tolerance {summary.get('tolerance', '?')})"))
        for name, entry in summary.get("head_classes", {}).items():
            top = ", ".join(entry.get("top", [])) if name != "negligible" else ""
            rows.append((f"{name} heads", f"{entry['count']}" + (f" · strongest {top}" if top else "")))
        for name, share in summary.get("mechanism_shares", {}).get("logit_diff", {}).items():
            rows.append((f"share · {name}", f"{share:+.1%} of a − mean(R∖a)"))
        causal = ", ".join(name for name in ("knockout", "ablations", "noise_robustness", "extraction_rate",
                                             "enrichment", "causal_trace") if self.has(name))
        rows.append(("causal checks", causal or "not run (factscope ablate / trace)"))
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(str(v))}</td></tr>" for k, v in rows)
        title = html.escape(f"factscope run · {summary.get('model', '?')} · {self.path}")
        return f"<div><strong>{title}</strong><table>{body}</table></div>"


def load_run(run_dir: str | Path) -> Run:
    """The tables of a finished run directory as DataFrames, and summary.json as a dict."""
    path = Path(run_dir)
    summary_path = path / SUMMARY
    if not summary_path.is_file():
        raise FactscopeError(f"{path}: no summary.json; is this a finished `factscope analyze` run directory?")
    summary = read_json_object(summary_path)
    manifest = read_json_object(path / MANIFEST) if (path / MANIFEST).is_file() else None
    tables = {name: read_table(path, name) for name in TABLES if name not in LAZY_TABLES}
    return Run(path, summary, {name: table for name, table in tables.items() if table is not None}, manifest)


def read_json_object(path: Path) -> dict:
    """summary.json or run.json: a JSON object, or one error line naming the file."""
    from .data import read_json

    payload = read_json(path)
    if not isinstance(payload, dict):
        raise FactscopeError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload
