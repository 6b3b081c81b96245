"""report.html (`factscope.report.page`): one self-contained file with a figure per section, a contents list that
leads to every section, the verdicts table, and a note for every check that was not run; rendering needs no
model, and no module of the report imports torch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pandas as pd
from report_runs import full_dir, full_run, minimal_dir, written  # noqa: F401 — fixtures

from factscope.report import SECTIONS, departures, write_report
from factscope.rundir import load_run

EXTERNAL = re.compile(
    r"<(script|link|img|iframe|source|video|audio|embed|object)\b[^>]*\b(src|href|data)\s*=\s*[\"']?\s*(https?:)?//",
    re.IGNORECASE,
)
MODULES = ("factscope.report", "factscope.report.style", "factscope.report.figures_dla", "factscope.report.figures_heads",
           "factscope.report.figures_causal", "factscope.report.pngs", "factscope.report.prose", "factscope.report.text",
           "factscope.report.text_causal", "factscope.report.page",
           "factscope.report.compare")


def test_no_report_module_imports_torch():
    from pathlib import Path

    import factscope.report

    modules = {f"factscope.report.{p.stem}" for p in Path(factscope.report.__file__).parent.glob("*.py")}
    assert modules - {"factscope.report.__init__"} | {"factscope.report"} == set(MODULES)  # the list below is complete
    code = f"import sys; import {', '.join(MODULES)}; assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_report_html_is_one_self_contained_file(written, full_run):
    text = written.read_text(encoding="utf-8")
    assert written.name == "report.html"
    assert not EXTERNAL.search(text)
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.IGNORECASE)  # every script is inline
    assert not re.search(r"<link\b", text, re.IGNORECASE)  # no stylesheet, font or icon fetched
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text)  # nor from CSS
    assert not re.search(r"@import", text)
    assert text.count("* plotly.js v") == 1  # the bundle is inlined exactly once
    for section in SECTIONS:
        assert f'id="fig-{section.id}"' in text, section.id
    assert 'id="fig-headline"' in text
    assert len(written.read_bytes()) < 10_000_000


def test_report_has_contents_headline_and_departures(written, full_run):
    text = written.read_text(encoding="utf-8")
    toc = re.search(r'<nav class="toc".*?</nav>', text, re.S).group(0)
    for anchor in re.findall(r'href="#([^"]+)"', toc):
        assert f'id="{anchor}"' in text
    for needle in (full_run.summary["model"], "not prepended" if not full_run.summary["prepend_bos"] else "prepended",
                   f"{full_run.summary['max_abs_reconstruction_error']:.1e}", "Where this model departs from the paper"):
        assert needle in text


def test_the_report_needs_no_model(full_dir, tmp_path):
    """Rendering imports neither torch nor transformer_lens: a finished run renders anywhere."""
    copy = tmp_path / "run"
    shutil.copytree(full_dir, copy)
    code = (
        "import sys; from factscope.report import write_report; write_report(sys.argv[1]); "
        "loaded = [m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (copy / "report.html").is_file()


def test_minimal_run_renders_and_says_what_was_not_run(minimal_dir):
    path = write_report(minimal_dir)
    text = path.read_text(encoding="utf-8")
    run = load_run(minimal_dir)
    assert (run.heads["class"] == "negligible").all()
    verdicts = {v.key: v for v in departures(run)}
    assert verdicts["swap"].status == "not run" and "--swap" in verdicts["swap"].text
    assert verdicts["ablation"].status == "not run"
    assert verdicts["specificity"].status == "not run"
    assert 'id="fig-signature"' in text and 'id="fig-swap"' not in text
    assert "Causal checks not in this run" in text


def test_a_causal_table_in_an_unknown_format_does_not_break_the_report(full_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(full_dir, copy)
    pd.DataFrame({"window": [0, 1], "effect": [0.1, 0.2]}).to_csv(copy / "knockout.csv", index=False)
    pd.DataFrame({"what": ["x"]}).to_csv(copy / "ablations.csv", index=False)
    text = write_report(copy).read_text(encoding="utf-8")
    assert "Not available: column" in text and 'id="fig-knockout"' not in text
    assert "knockout.csv does not have the expected column" in text
    assert 'id="fig-signature"' in text and 'id="fig-trace"' in text
    run = load_run(copy)
    assert {v.key: v.status for v in departures(run)}["ablation"] == "not run"
