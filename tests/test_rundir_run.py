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


def test_a_run_shows_its_summary_in_jupyter(full_run):
    page = full_run._repr_html_()
    summary = full_run.summary
    assert f"{summary['accuracy']:.1%}" in page and "sum of parts = logit" in page
    for name, entry in summary["head_classes"].items():
        assert f"{name} heads" in page and str(entry["count"]) in page
    assert "knockout" in page and "causal_trace" in page  # the full run has both kinds of causal checks
    assert "<script" not in page  # nothing from a table reaches the page unescaped


def test_the_library_stages_are_the_commands(tmp_path, tiny_llama_dir):
    """`factscope.analyze` with the CLI's options returns the finished run, as `factscope analyze` writes it."""
    import factscope

    run = factscope.analyze(str(tiny_llama_dir), out=tmp_path / "run", all_prompts=True, k=2.0, z=1.0, report=False)
    assert isinstance(run, factscope.Run) and run.has("heads") and run.has("relation_targets")
    assert run.manifest["config"]["k"] == 2.0 and run.summary["head_class_rule"]["z"] == 1.0
    assert not (tmp_path / "run" / "report.html").exists()
    with pytest.raises(FactscopeError, match="exists"):
        factscope.analyze(str(tiny_llama_dir), out=tmp_path / "run")
