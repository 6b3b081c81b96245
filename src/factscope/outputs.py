"""Output directories that are never half-written, and runs that resume after a crash.

A run writes into a staging folder `.DIR.partial` beside DIR, which replaces DIR only when everything in it is
complete. Long runs write each finished batch there as its own parquet parts plus a `.done` marker (both
renamed into place, so a kill -9 leaves either a whole batch or none); `--resume` skips those batches and the
final tables are the parts concatenated in batch order, so they are byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .errors import FactscopeError

MANIFEST = "run.json"


def write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_path(path: Path):
    """Yield a sibling temporary path to write; it becomes `path` only once complete.

    A failed write (a full disk, say) removes the partial file and names the file in the error.
    """
    partial = path.with_name(f".{path.name}.tmp")
    try:
        yield partial
        partial.replace(path)
    except OSError as err:
        raise FactscopeError(f"{path}: cannot write ({err.strerror or err})") from err
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as partial:
        frame.to_parquet(partial, index=False, compression="zstd")


class RunDir:
    """The staging folder of one run. `path` is where the finished run will be."""

    def __init__(self, path: Path, staging: Path):
        self.path, self.staging = path, staging
        self.batches = staging / "batches"

    def done_batches(self) -> dict[int, dict]:
        """Finished batches and the metadata each recorded (its exactness errors)."""
        if not self.batches.is_dir():
            return {}
        return {int(marker.stem): json.loads(marker.read_text()) for marker in sorted(self.batches.glob("*.done"))}

    def write_batch(self, index: int, tables: dict[str, pd.DataFrame], meta: dict) -> None:
        self.batches.mkdir(exist_ok=True)
        for name, frame in tables.items():
            write_parquet(frame, self.batches / f"{index:06d}.{name}.parquet")
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


@contextmanager
def output_dir(path: str | Path, overwrite: bool = False, resume: bool = False, manifest: dict | None = None):
    """Yield a RunDir; on success its staging folder becomes `path`.

    On failure the staging folder is removed, unless it holds finished batches that `--resume` can reuse.
    With `resume`, a staging folder whose manifest matches this run's is continued; otherwise it starts anew.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FactscopeError(f"{path}: exists and is not a directory")
    if path.exists() and not (overwrite or resume):
        raise FactscopeError(f"{path}: output directory exists; pass --overwrite to replace it or --resume to continue")
    staging = path.with_name(f".{path.name}.partial")
    run = RunDir(path, staging)
    try:
        _prepare_staging(run, resume, manifest)
        yield run
    except BaseException:
        if not run.done_batches():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(run.batches, ignore_errors=True)
    _replace(staging, path)


def _prepare_staging(run: RunDir, resume: bool, manifest: dict | None) -> None:
    staging = run.staging
    if staging.exists():
        previous = _read_manifest(staging)
        if not (resume and previous is not None and _same_run(previous, manifest)):
            shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FactscopeError(f"{run.path}: cannot create output directory ({err.strerror})") from None
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
    if not path.exists():
        staging.rename(path)
        return
    retired = path.with_name(f".{path.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    path.rename(retired)
    staging.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


def dataset_sha256(dataset: str | Path) -> str:
    """The hash a run's manifest records, and later commands check, of its dataset file."""
    import hashlib

    return hashlib.sha256(Path(dataset).read_bytes()).hexdigest()


def manifest(model_name: str, weights_sha256: str, dataset: Path, config: dict, seed: int = 0) -> dict:
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
        "dataset": str(dataset),
        "dataset_sha256": dataset_sha256(dataset),
        "config": config,
        "seed": seed,
        "versions": {"python": platform.python_version(), **{name: version(name) for name in packages}},
    }


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Every string quoted: decoded tokens can hold a bare '\\r', which default readers take as a line break."""
    import csv

    with atomic_path(path) as partial:
        frame.to_csv(partial, index=False, quoting=csv.QUOTE_NONNUMERIC)
