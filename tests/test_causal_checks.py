"""The registry of checks and the two commands' runs of them: every table is registered in rundir.TABLES,
each check's pass count is the number of passes it reports, and the summary has one entry per check."""

from __future__ import annotations

from contextlib import contextmanager

import pandas as pd
from causal_helpers import tiny

from factscope.causal import CHECKS, ablate_checks, trace_checks
from factscope.causal.knockout import blocked_groups
from factscope.rundir import TABLES

HEADS = pd.DataFrame({"layer": [0, 1, 2], "head": [1, 0, 3], "class": ["subject", "mixed", "relation"]})


def counting():
    bars = {}

    @contextmanager
    def progress(label, total):
        bars[label] = [total, 0]

        def advance(n):
            bars[label][1] += n

        yield advance

    return bars, progress


def test_every_check_writes_registered_tables():
    assert {check.command for check in CHECKS} == {"ablate", "trace"}
    assert len({check.name for check in CHECKS}) == len(CHECKS)
    written = [table for check in CHECKS for table in check.tables]
    assert len(written) == len(set(written)) and set(written) <= set(TABLES)


def test_ablate_and_trace_checks(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    bars, progress = counting()
    tables, summary = ablate_checks(model, encoded, HEADS, window=2, noise_scales=[0.0, 1.0], seeds=[0], progress=progress)
    # the default method writes no path AtP: every other check's tables, and no summary entry for it
    assert list(tables) == [table for check in CHECKS if check.command == "ablate" and check.name != "path_ablations"
                            for table in check.tables]
    assert set(summary) == {"ablate"} | {check.name for check in CHECKS if check.command == "ablate"} - {"path_ablations"}
    assert summary["ablate"] == {"mode": "mean", "window": 2, "noise_scales": [0.0, 1.0], "seeds": [0], "method": "exact",
                                 "n_prompts": len(encoded)}
    windows = {key for key in summary["knockout"] if key.endswith("_worst_window")}
    assert windows == {f"{blocked}_worst_window" for blocked in blocked_groups(model.prepend_bos)}
    head_sets = set(summary["knockout"]) - windows - {"bootstrap"}
    assert head_sets and {key.split("_to_")[0] for key in head_sets} <= {"subject_heads", "relation_heads"}
    assert summary["knockout"]["bootstrap"]["seed"] == 0
    assert "mlp_trace_peak_layer" not in summary["enrichment"]
    traced, trace_summary = trace_checks(model, encoded[:3], seeds=[0], window=2, progress=progress, enrichment=tables["enrichment"])
    assert list(traced) == ["causal_trace", "trace_peaks"]
    assert set(trace_summary) == {"trace", "enrichment"} and trace_summary["trace"]["seeds"] == [0]
    assert "mlp_trace_peak_layer" in trace_summary["enrichment"]
    assert set(bars) == {check.name for check in CHECKS} - {"path_ablations"}  # no bar for a check with nothing to run
    assert all(total == done for total, done in bars.values()), bars
    _, again = ablate_checks(model, encoded, HEADS, window=2, noise_scales=[0.0], seeds=[0], trace=traced["causal_trace"])
    assert again["enrichment"] == trace_summary["enrichment"]
