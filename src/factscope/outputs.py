"""Output directories that are never half-written: a run writes into a staging folder that replaces DIR only
when everything in it is complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import FactscopeError


@contextmanager
def output_dir(path: str | Path, overwrite: bool = False):
    """Yield a staging directory; on success it becomes `path`, on failure it vanishes and `path` is untouched."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FactscopeError(f"{path}: output directory exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise FactscopeError(f"{path}: exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's private 0700 would otherwise become the output's mode
    except OSError as err:
        raise FactscopeError(f"{path}: cannot create output directory ({err.strerror})") from None
    try:
        yield staging
        _replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: Path, path: Path) -> None:
    if not path.exists():
        staging.rename(path)
        return
    retired = path.with_name(f".{path.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    path.rename(retired)
    staging.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


class ParquetStream:
    """Append DataFrames batch by batch to one parquet file, so a long run never holds every table in memory."""

    def __init__(self, path: Path):
        self.path, self.writer = path, None

    def write(self, frame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
