"""`factscope compare`: several finished runs in one self-contained HTML page and one tidy table, whose numbers are
the runs' own. Three runs through the CLI, as users make them: a tiny Llama (re-summarised with a permissive class
rule so that it has subject, relation and mixed heads), a tiny GPT-NeoX (default rule: every head negligible), and
the same Llama again with BOS prepended, in a directory of the same name elsewhere."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from factscope.report import compare
from factscope.data import load_facts
from factscope.errors import FactscopeError
from factscope.taxonomy import CLASSES

def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factscope", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, model_dirs) -> list[Path]:
    from factscope.mechanisms import ClassRule, summarize

    root = tmp_path_factory.mktemp("compare")
    dataset = root / "facts.jsonl"
    dataset.write_text("".join(
        json.dumps({"id": f.prompt_id, "relation": f.relation, "subject": f.subject, "prompt": f.prompt,
                    "attribute": f.attribute}) + "\n"
        for f in load_facts()[::3]  # 48 facts, 4 per relation
    ))
    llama, neox, again = root / "llama", root / "neox", root / "again" / "llama"
    for model, out, extra in (("llama", llama, ()), ("neox", neox, ()), ("llama", again, ("--bos",))):
        result = cli("--debug", "analyze", "--model", model_dirs[model], "--dataset", dataset, "--out", out,
                     "--all-prompts", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    # a random model's heads write ~1e-3 logits: a permissive rule gives it every class
    summary = json.loads((llama / "summary.json").read_text())
    summary.update(summarize(llama, ClassRule(k=1.5, z=0.0, floor=0.0)))
    (llama / "summary.json").write_text(json.dumps(summary))
    return [llama, neox, again]


@pytest.fixture(scope="module")
def written(run_dirs) -> Path:
    out = run_dirs[0].parent / "side-by-side" / "compare.html"
    result = cli("compare", *run_dirs, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"compared 3 runs · wrote {out}" in " ".join(result.stderr.split())
    # one summary row per run on stdout (long labels fold over several lines)
    assert "runs compared" in result.stdout and result.stdout.count("3 × 4") == 3
    return out


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values={"value": [""]})


def expected_rows(run_dir: Path, label: str) -> pd.DataFrame:
    """compare.csv's rows for one run, computed here from the run's files."""
    recall = pd.read_csv(run_dir / "recall.csv")
    heads = pd.read_csv(run_dir / "heads.csv")
    mechanisms = pd.read_csv(run_dir / "mechanisms.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    n_layers, n_heads = heads["layer"].max() + 1, heads["head"].max() + 1
    rows = [("n_layers", "all", "", n_layers), ("n_heads", "all", "", n_heads), ("n_prompts", "all", "", len(recall))]
    rows += [(key, "all", "", summary[key])
             for key in ("n_analysed", "max_abs_reconstruction_error", "max_abs_head_error", "tolerance")]
    rows.append(("accuracy", "all", "", recall["correct"].mean()))
    rows += [("accuracy", relation, "", group["correct"].mean()) for relation, group in recall.groupby("relation")]
    for name in CLASSES:
        members = heads[heads["class"] == name]
        rows += [("head_count", "all", name, len(members)), ("head_fraction", "all", name, len(members) / len(heads)),
                 ("mean_relative_depth", "all", name, ((members["layer"] + 0.5) / n_layers).mean())]
    rows += [(f"share_{r.metric}", r.relation, r.mechanism, r.share) for r in mechanisms.itertuples()]
    table = pd.DataFrame(rows, columns=["metric", "relation", "part", "value"])
    return table.assign(run=label, model=summary["model"])


def test_compare_csv_holds_each_runs_own_numbers(written, run_dirs):
    table = read_table(written.with_name("compare.csv"))
    assert list(table.columns) == compare.COLUMNS
    labels = [str(run_dirs[0]), "neox", str(run_dirs[2])]  # two runs named "llama": their paths tell them apart
    assert list(dict.fromkeys(table["run"])) == labels
    expected = pd.concat([expected_rows(path, label) for path, label in zip(run_dirs, labels)], ignore_index=True)
    keys = ["run", "metric", "relation", "part"]
    assert not table.duplicated(keys).any()
    merged = expected.merge(table, on=keys, how="outer", suffixes=("_expected", ""), indicator=True)
    assert (merged["_merge"] == "both").all(), merged.loc[merged["_merge"] != "both", keys + ["_merge"]]
    assert (merged["model"] == merged["model_expected"]).all()
    np.testing.assert_allclose(merged["value"], merged["value_expected"].astype(float), rtol=1e-12, equal_nan=True)


def test_the_runs_differ_where_they_should(written, run_dirs):
    """The fixture is not degenerate: one run has every class, one none; the second Llama run prepended BOS."""
    table = read_table(written.with_name("compare.csv")).set_index(["run", "metric", "part"])
    counts = table.xs("head_count", level="metric")["value"]
    assert (counts[str(run_dirs[0])].reindex(["subject", "relation", "mixed"]) > 0).all()
    assert counts["neox"]["negligible"] == table.loc[("neox", "n_layers", ""), "value"] * table.loc[("neox", "n_heads", ""), "value"]
    assert json.loads((run_dirs[2] / "summary.json").read_text())["prepend_bos"] is True


def test_compare_html_is_one_self_contained_page_with_a_figure_per_section(written, run_dirs):
    text = written.read_text(encoding="utf-8")
    assert text.count("* plotly.js v") == 1  # inlined once
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.IGNORECASE) and not re.search(r"<link\b", text)
    for section in compare.SECTIONS:
        assert f'<section id="{section.id}">' in text and f'id="fig-{section.id}"' in text, section.id
    toc = re.search(r'<nav class="toc".*?</nav>', text, re.S).group(0)
    assert re.findall(r'href="#([^"]+)"', toc) == ["runs", *(s.id for s in compare.SECTIONS)]
    runs = re.search(r'<section id="runs">.*?</section>', text, re.S).group(0)
    for path in run_dirs:
        summary = json.loads((path / "summary.json").read_text())
        assert f"{summary['max_abs_reconstruction_error']:.1e}" in runs


def test_every_figure_shows_every_run(run_dirs):
    comparison = compare.load_comparison(run_dirs)
    for section in compare.SECTIONS:
        fig = section.figure(comparison)
        assert isinstance(fig, go.Figure) and fig.data, section.id
    accuracy = compare.fig_accuracy(comparison)
    assert [trace.name for trace in accuracy.data] == comparison.labels
    depth = compare.fig_depths(comparison)
    assert {trace.name for trace in depth.data} == {"subject", "relation", "mixed"}
    assert set(depth.data[0].x) == {comparison.labels[0]}  # only the permissive Llama run has classified heads
    assert list(depth.layout.xaxis.categoryarray) == comparison.labels  # the others keep their place on the axis
    shares = compare.fig_shares(comparison)
    shown = [trace for trace in shares.data if trace.visible]
    assert {run for trace in shown for run in trace.y[1]} == set(comparison.labels)


def test_a_run_without_any_classified_head_draws_an_empty_depth_figure(run_dirs):
    comparison = compare.load_comparison(run_dirs[1:])
    depth = compare.fig_depths(comparison)
    assert not depth.data and "no run has" in depth.layout.annotations[0].text


@pytest.mark.parametrize("missing", compare.REQUIRED_FILES)
def test_a_run_missing_a_file_is_named(run_dirs, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(run_dirs[1], broken)
    (broken / missing).unlink()
    with pytest.raises(FactscopeError, match=re.escape(f"{broken}: no {missing}")):
        compare.write_compare([run_dirs[0], broken], tmp_path / "compare.html")
    assert not (tmp_path / "compare.html").exists() and not (tmp_path / "compare.csv").exists()


def test_a_summary_without_exactness_is_named(run_dirs, tmp_path):
    recall_only = tmp_path / "recall-run"
    shutil.copytree(run_dirs[1], recall_only)
    summary = json.loads((recall_only / "summary.json").read_text())
    del summary["max_abs_head_error"]
    (recall_only / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(FactscopeError, match="summary.json: no 'max_abs_head_error'"):
        compare.load_comparison([run_dirs[0], recall_only])


def test_cli_errors_are_one_line(run_dirs, tmp_path):
    result = cli("compare", run_dirs[0], tmp_path / "absent", "--out", tmp_path / "c.html")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"factscope: error: {tmp_path / 'absent'}: no such run directory"]
    result = cli("compare", run_dirs[0], "--out", tmp_path / "c.html")
    assert result.returncode == 2 and "at least two run directories" in result.stderr
    result = cli("compare", run_dirs[0], run_dirs[0].parent / "." / "llama", "--out", tmp_path / "c.html")
    assert result.returncode == 2 and "the same run directory is given twice" in result.stderr
    assert not list(tmp_path.iterdir())


def test_existing_outputs_are_refused_unless_overwrite(run_dirs, tmp_path):
    out = tmp_path / "mine.html"
    out.with_suffix(".csv").write_text("mine\n")
    with pytest.raises(FactscopeError, match=re.escape(f"{tmp_path / 'mine.csv'}: exists; pass --overwrite")):
        compare.write_compare(run_dirs[:2], out)
    assert not out.exists()
    with pytest.raises(FactscopeError, match="not a file factscope wrote"):  # a table of the user's own
        compare.write_compare(run_dirs[:2], out, overwrite=True)
    assert (tmp_path / "mine.csv").read_text() == "mine\n"
    (tmp_path / "mine.csv").unlink()
    compare.write_compare(run_dirs[:2], out)
    assert compare.write_compare(run_dirs[:2], out, overwrite=True) == (out, tmp_path / "mine.csv")  # its own
    assert read_table(tmp_path / "mine.csv")["run"].nunique() == 2


def test_compare_needs_no_model(run_dirs, tmp_path):
    """Like the report, the comparison reads saved tables only: it renders where no model or torch is."""
    code = (
        "import sys; from factscope.report.compare import write_compare; write_compare(sys.argv[1:3], sys.argv[3]); "
        "loaded = [m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code, *map(str, run_dirs[:2]), str(tmp_path / "c.html")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
