"""The report's sentences' parts: what a finding and a verdict are, and how numbers are written in them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Finding:
    key: str
    text: str


@dataclass
class Verdict:
    """One of the paper's claims held against this run: `status` is "agrees", "departs", "inconclusive" (too little
    evidence for either) or "not run"."""

    key: str
    claim: str
    status: str
    text: str


def pct(x: float) -> str:
    """A share as a whole percentage: 0.4707 → "47%"; a change that rounds to nothing is "0%", not "-0%"."""
    text = f"{x:.0%}"
    return "0%" if text == "-0%" else text


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def verb(count: int, stem: str) -> str:
    """Third person: "supply" → "supplies" for one subject, "supply" for several."""
    if count != 1:
        return stem
    return stem[:-1] + "ies" if stem.endswith("y") else stem + "s"


def names_list(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def interval_text(row: pd.Series, column: str, spec: str) -> str:
    """A column's bootstrap interval in a table row as " [95% CI low, high]"; nothing where there is none."""
    low, high = row.get(f"{column}_low", np.nan), row.get(f"{column}_high", np.nan)
    fmt = pct if spec == "%" else (lambda x: format(x, spec))
    return f" [95% CI {fmt(low)}, {fmt(high)}]" if np.isfinite(low) and np.isfinite(high) else ""
