"""`rundir.load_run`: a finished run directory read back — every table as a DataFrame, attributions on demand,
None for what is absent, an error naming summary.json when there is none. (Moved here with `Run` from the report.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from report_runs import full_dir, full_run  # noqa: F401 — fixtures

from factscope.errors import FactscopeError
from factscope.rundir import LAZY_TABLES, TABLES, load_run


def test_load_run_gives_every_table(full_dir, full_run):
    for name, filename in TABLES.items():
        table = getattr(full_run, name)(["prompt_id"]) if name in LAZY_TABLES else getattr(full_run, name)
        assert isinstance(table, pd.DataFrame) and len(table), filename
    assert full_run.summary == json.loads((full_dir / "summary.json").read_text())
    assert full_run.recall["prompt_id"].map(type).eq(str).all()
    assert (full_run.n_layers, full_run.n_heads) == (3, 4)


def test_attributions_are_read_lazily_and_filtered(full_dir):
    run = load_run(full_dir)
    assert run._correct is None  # nothing of the big table is read until asked for
    correct = run.correct_parts()
    full = pd.read_parquet(full_dir / "attributions.parquet")
    assert len(correct) == int(full["is_correct_target"].sum())
    mlp = run.attributions(["prompt_id", "layer", "value"], [("component", "==", "mlp"), ("layer", "in", [1])])
    assert list(mlp.columns) == ["prompt_id", "layer", "value"] and set(mlp["layer"]) == {1}
    assert len(mlp) == int(((full["component"] == "mlp") & (full["layer"] == 1)).sum())


def test_missing_tables_are_none_and_missing_summary_is_an_error(tmp_path, full_dir):
    (tmp_path / "summary.json").write_text(json.dumps({"model": "m"}))
    run = load_run(tmp_path)
    assert run.heads is None and run.correct_parts() is None and not run.has("recall")
    with pytest.raises(FactscopeError, match="summary.json"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{")
    with pytest.raises(FactscopeError, match="malformed JSON"):
        load_run(tmp_path / "bad")
