"""What a causal check is to the commands that run it; `causal.CHECKS` registers them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from ..rundir import TABLES

COMMANDS = ("ablate", "trace")


@dataclass(frozen=True)
class CausalCheck:
    """One check: which command runs it, the run-directory tables it writes, the command options it reads, and
    three functions of those options (as keyword arguments):

    - `n_passes(n_layers, **options)`: how many forward passes `run` reports to its progress callback;
    - `run(model, known, progress=..., **options)`: table name → table, for every name in `tables`;
    - `summarize(tables)`: its entry in summary.json["causal"]; `tables` holds every table of the run so far.

    A check with `remote` runs through an nnsight engine too (`run(..., engine=...)`), for `ablate --remote` and
    `trace --remote`, and says what it costs, for the plan printed before anything is sent:
    `remote_cost(n_layers, known, **options)` → (requests, bytes back, bytes of tensors sent besides the prompts
    and R_r: noise draws) (`causal.remote_ablate_cost`, `causal.remote_trace_cost`).
    """

    name: str  # its key in summary.json["causal"] and its progress label
    command: Literal["ablate", "trace"]
    tables: tuple[str, ...]  # names in rundir.TABLES
    options: tuple[str, ...]
    n_passes: Callable[..., int]
    run: Callable[..., dict[str, pd.DataFrame]]
    summarize: Callable[[Mapping[str, pd.DataFrame]], dict]
    remote: bool = False  # `run` also takes `engine=`, an nnsight engine whose passes may run on NDIF (`--remote`)
    remote_cost: Callable[..., tuple[int, int, int]] | None = None

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"check {self.name!r}: command {self.command!r} is not one of {COMMANDS}")
        unknown = [table for table in self.tables if table not in TABLES]
        if unknown:
            raise ValueError(f"check {self.name!r}: table {unknown[0]!r} is not in rundir.TABLES")
        if self.remote and self.remote_cost is None:
            raise ValueError(f"check {self.name!r} runs remotely: its plan needs remote_cost")
