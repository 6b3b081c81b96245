"""The report reads a finished run directory and nothing else: tables back as DataFrames, one plotly Figure per
figure, a self-contained report.html, valid PNGs, and generated text whose numbers are the tables' numbers.

Two runs are built through the CLI, as users build them:
- a tiny random Llama (`tiny_llama_dir`), re-summarised with a permissive class rule so that every class and
  every figure has something to show, plus a subject swap from the library and the causal tables from `factscope ablate` and `trace`;
- the hand-built one-layer GPT-2 (`handbuilt.py`), whose subject head and relation head are known, so the text
  about it can be checked against the truth.
"""

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

import handbuilt
from factscope import figures as F
from factscope import report
from factscope.errors import FactscopeError

CAUSAL_FILES = ("knockout.csv", "ablations.csv", "causal_trace.parquet", "extraction_rate.csv", "enrichment.csv",
                "noise_robustness.csv")
PNGS = {"additivity", "signature", "dla_heatmap", "mechanism_shares", "logit_lens", "k_sweep"}
_BUILT: dict[str, Path] = {}


def factscope(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "factscope", "--debug", *map(str, args)], capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def analyze(model_dir: Path, out: Path, *extra: str) -> None:
    factscope("analyze", "--model", model_dir, "--out", out, *extra)


def build_full_run(root: Path, model_dir: Path) -> Path:
    """A tiny-Llama run with every table the report knows about (memoised for the session)."""
    if "full" in _BUILT:
        return _BUILT["full"]
    from factscope.data import encode_all, load_facts
    from factscope.mechanisms import ClassRule, subject_swap, summarize, swap_summary
    from factscope.models import load_model

    out = root / "full-run"
    analyze(model_dir, out, "--all-prompts")
    # a random model writes ~1e-3 logits per head: a permissive rule gives it subject, relation and mixed heads
    summary = json.loads((out / "summary.json").read_text())
    summary.update(summarize(out, ClassRule(k=1.5, z=0.0, floor=0.0)))
    model = load_model(str(model_dir))
    encoded = encode_all(load_facts(), model.tokenizer, model.prepend_bos)
    heads = pd.read_csv(out / "heads.csv")
    swap = subject_swap(model, encoded, heads)
    swap.to_csv(out / "subject_swap.csv", index=False)
    summary["subject_swap"] = swap_summary(swap)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    # the causal tables as users make them: through the CLI, on samples that cover every relation
    factscope("ablate", out, "--limit", "24", "--noise-scales", "0,1,4", "--seeds", "0,1", "--threads", "1")
    factscope("trace", out, "--limit", "8", "--seeds", "0", "--threads", "1")
    _BUILT["full"] = out
    return out


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    return build_full_run(tmp_path_factory.mktemp("report"), tiny_llama_dir)


@pytest.fixture(scope="module")
def full_run(full_dir) -> report.Run:
    return report.load_run(full_dir)


@pytest.fixture(scope="module")
def written(full_dir) -> Path:
    return report.write_report(full_dir)


@pytest.fixture(scope="module")
def handbuilt_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("handbuilt-report")
    model_dir = handbuilt.build_model_dir(root / "model")
    dataset = root / "facts.jsonl"
    dataset.write_text("".join(
        json.dumps({"id": f.prompt_id, "relation": f.relation, "subject": f.subject, "prompt": f.prompt,
                    "attribute": f.attribute}) + "\n"
        for f in handbuilt.facts()
    ))
    out = root / "run"
    analyze(model_dir, out, "--dataset", str(dataset), "--swap")
    return out


@pytest.fixture(scope="module")
def minimal_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """What plain `analyze --all-prompts` writes for a random model: no classified head, no swap, no causal."""
    out = tmp_path_factory.mktemp("minimal") / "run"
    analyze(tiny_llama_dir, out, "--all-prompts")
    return out


# ---------------------------------------------------------------------------------------------------------------
# load_run


def test_load_run_gives_every_table(full_dir, full_run):
    for name, filename in report.TABLES.items():
        table = getattr(full_run, name)
        assert isinstance(table, pd.DataFrame) and len(table), filename
    assert full_run.summary == json.loads((full_dir / "summary.json").read_text())
    assert full_run.recall["prompt_id"].map(type).eq(str).all()
    assert (full_run.n_layers, full_run.n_heads) == (3, 4)


def test_attributions_are_read_lazily_and_filtered(full_dir):
    run = report.load_run(full_dir)
    assert run._correct is None  # nothing of the big table is read until asked for
    correct = run.correct_parts()
    full = pd.read_parquet(full_dir / "attributions.parquet")
    assert len(correct) == int(full["is_correct_target"].sum())
    mlp = run.attributions(["prompt_id", "layer", "value"], [("component", "==", "mlp"), ("layer", "in", [1])])
    assert list(mlp.columns) == ["prompt_id", "layer", "value"] and set(mlp["layer"]) == {1}
    assert len(mlp) == int(((full["component"] == "mlp") & (full["layer"] == 1)).sum())


def test_missing_tables_are_none_and_missing_summary_is_an_error(tmp_path, full_dir):
    (tmp_path / "summary.json").write_text(json.dumps({"model": "m"}))
    run = report.load_run(tmp_path)
    assert run.heads is None and run.correct_parts() is None and not run.has("recall")
    with pytest.raises(FactscopeError, match="summary.json"):
        report.load_run(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{")
    with pytest.raises(FactscopeError, match="malformed JSON"):
        report.load_run(tmp_path / "bad")


def test_constants_match_the_mechanisms_module():
    from factscope import mechanisms

    assert F.MECHANISMS == mechanisms.MECHANISMS
    assert set(F.MECHANISM_ORDER) == set(mechanisms.MECHANISMS)
    assert F.HEAD_MECHANISM == mechanisms.HEAD_MECHANISM
    assert F.CLASSES == mechanisms.CLASSES


# ---------------------------------------------------------------------------------------------------------------
# figures

FIGURES = [
    F.fig_headline, F.fig_recall, F.fig_signature, F.fig_heatmap, F.fig_mechanism_shares, F.fig_logit_lens,
    F.fig_specificity, F.fig_mlp_boosting, F.fig_k_sweep, F.fig_drilldown, F.fig_subject_swap, F.fig_knockout,
    F.fig_ablations, F.fig_causal_trace, F.fig_extraction_rate, F.fig_enrichment, F.fig_noise_robustness,
]


def has_data(trace) -> bool:
    for key in ("x", "y", "z"):
        values = getattr(trace, key, None)
        if values is not None and len(values) and not all(v is None for v in np.ravel(np.asarray(values, dtype=object))):
            return True
    return False


@pytest.mark.parametrize("function", FIGURES, ids=lambda f: f.__name__)
def test_every_figure_is_a_plotly_figure_with_data(full_run, function):
    fig = function(full_run)
    assert isinstance(fig, go.Figure)
    assert any(has_data(trace) for trace in fig.data)
    assert fig.layout.title.text  # every figure says what it is
    fig.to_json()  # serialisable as it will be embedded


def test_every_section_of_the_report_has_a_figure_function():
    assert set(FIGURES) - {F.fig_headline} == {section.figure for section in report.SECTIONS}


def test_signature_shows_every_head_with_its_class(full_run):
    fig = F.fig_signature(full_run)
    points = [t for t in fig.data if t.customdata is not None]
    names = {row[0]: row[1] for t in points for row in t.customdata}
    heads = full_run.heads
    assert names == dict(zip(heads["name"], heads["class"]))
    colours = {t.customdata[0][1]: t.marker.color for t in points}
    assert all(colours[name] == F.CLASS_COLORS[name] for name in colours)


def test_heatmap_holds_the_head_table(full_run):
    arrays = F.heatmap_arrays(full_run)
    heads = full_run.heads
    row = heads.iloc[5]
    layer, head = int(row["layer"]), int(row["head"])
    assert arrays["subject"][layer, head] == pytest.approx(row["subject_dla"])
    assert arrays["total"][layer, head] == pytest.approx(row["subject_dla"] + row["relation_dla"] + row["other_dla"])


def test_drilldown_lists_every_analysed_prompt_with_its_top_parts(full_run):
    fig = F.fig_drilldown(full_run, n_top=15)
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == min(150, full_run.summary["n_analysed"])
    top = F.drilldown_table(full_run, 15)
    prompt = top["prompt_id"].iloc[0]
    parts = full_run.correct_parts()
    expected = parts[parts["prompt_id"] == prompt]["value"].abs().nlargest(15).to_numpy()
    assert np.allclose(np.sort(top[top["prompt_id"] == prompt]["value"].abs().to_numpy())[::-1], expected)


def test_drilldown_caps_the_number_of_prompts(full_run):
    chosen = F.drilldown_prompts(full_run, 20)
    assert len(chosen) == 20
    relations = full_run.recall.set_index("prompt_id").loc[chosen, "relation"]
    assert relations.nunique() == full_run.recall["relation"].nunique()  # spread over relations


def test_specificity_marks_each_prompts_correct_attribute(full_run):
    table = F.specificity_table(full_run)
    assert set(table["class"]) == {"subject", "relation"}
    per_prompt = table.groupby(["relation", "layer", "head", "prompt_id"])["is_correct_target"].sum()
    assert (per_prompt == 1).all()
    fig = F.fig_specificity(full_run)
    relation = fig.layout.updatemenus[0].buttons[fig.layout.updatemenus[0].active].label
    n_prompts = table[table["relation"] == relation]["prompt_id"].nunique()
    n_panels = len(table[table["relation"] == relation][["layer", "head"]].drop_duplicates())
    assert len(fig.layout.shapes) == n_prompts * n_panels


# ---------------------------------------------------------------------------------------------------------------
# report.html and the PNGs

EXTERNAL = re.compile(
    r"<(script|link|img|iframe|source|video|audio|embed|object)\b[^>]*\b(src|href|data)\s*=\s*[\"']?\s*(https?:)?//",
    re.IGNORECASE,
)


def test_report_html_is_one_self_contained_file(written, full_run):
    text = written.read_text(encoding="utf-8")
    assert written.name == "report.html"
    assert not EXTERNAL.search(text)
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.IGNORECASE)  # every script is inline
    assert not re.search(r"<link\b", text, re.IGNORECASE)  # no stylesheet, font or icon fetched
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text)  # nor from CSS
    assert not re.search(r"@import", text)
    assert text.count("* plotly.js v") == 1  # the bundle is inlined exactly once
    for section in report.SECTIONS:
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


def test_pngs_are_valid(written):
    import matplotlib.image

    folder = written.parent / "figures"
    assert {p.stem for p in folder.glob("*.png")} == PNGS
    for path in folder.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0.01, path.name


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
    path = report.write_report(minimal_dir)
    text = path.read_text(encoding="utf-8")
    run = report.load_run(minimal_dir)
    assert (run.heads["class"] == "negligible").all()
    checks = {c.key: c for c in report.departures(run)}
    assert checks["swap"].status == "not run" and "--swap" in checks["swap"].text
    assert checks["ablation"].status == "not run"
    assert checks["specificity"].status == "not run"
    assert 'id="fig-signature"' in text and 'id="fig-swap"' not in text
    assert "Causal checks not in this run" in text


# ---------------------------------------------------------------------------------------------------------------
# Generated text: every number is the tables' number


def finding(run: report.Run, key: str) -> str:
    return {f.key: f.text for f in report.findings(run)}[key]


def percent(x: float) -> str:
    return f"{round(100 * x):.0f}%"


def test_every_finding_has_a_title(full_run):
    keys = [f.key for f in report.findings(full_run)]
    assert {"knockout", "ablations", "causal_trace", "noise"} <= set(keys)
    assert set(keys) <= set(report.FINDING_TITLES)


def test_a_change_that_rounds_to_nothing_is_not_negative():
    assert report.pct(-0.004) == "0%" and report.pct(-0.006) == "-1%" and report.pct(0.4707) == "47%"


def test_findings_numbers_match_the_tables(full_dir, full_run):
    recall = pd.read_csv(full_dir / "recall.csv")
    text = finding(full_run, "recall")
    assert f"recalls {int(recall['correct'].sum())} of {len(recall)} facts" in text

    heads = pd.read_csv(full_dir / "heads.csv")
    mechanisms = pd.read_csv(full_dir / "mechanisms.csv")
    pooled = mechanisms[(mechanisms["relation"] == "all") & (mechanisms["metric"] == "logit_diff")].set_index("mechanism")
    text = finding(full_run, "classes")
    for name, mechanism in (("subject", "subject_heads"), ("relation", "relation_heads")):
        count = int((heads["class"] == name).sum())
        strongest = heads[heads["class"] == name].sort_values(f"{name}_dla", ascending=False)["name"].iloc[0]
        assert f"{count} {name} head{'' if count == 1 else 's'} ({strongest}" in text
        assert f"{percent(pooled.loc[mechanism, 'share'])} of it" in text
    assert f"MLPs supply {percent(pooled.loc['mlps', 'share'])}" in text
    assert f"averages {pooled['mean_value'].sum():.2f} logits" in text

    summary = json.loads((full_dir / "summary.json").read_text())
    text = finding(full_run, "exactness")
    assert f"{summary['max_abs_reconstruction_error']:.1e}" in text and f"{summary['max_abs_head_error']:.1e}" in text

    text = finding(full_run, "interference")
    assert f"on {percent(summary['interference']['sum_ranks_first'])} of prompts" in text
    assert f"On {percent(summary['interference']['only_sum_ranks_first'])} of prompts only the sum" in text

    mlp = pd.read_csv(full_dir / "mlp_boosting.csv").query("relation == 'all'")
    text = finding(full_run, "mlps")
    assert f"DLA to a {mlp['correct_dla'].sum():.2f} logits, breadth {mlp['breadth'].sum():.2f}" in text
    assert f"MLP {int(mlp.loc[mlp['correct_dla'].idxmax(), 'layer'])} ({mlp['correct_dla'].max():.2f} logits)" in text

    sweep = pd.read_csv(full_dir / "head_class_sweep.csv")
    at_z = sweep[sweep["z"] == summary["head_class_rule"]["z"]].query("`class` == 'subject'")["count"]
    assert f"subject {at_z.min()}–{at_z.max()}" in finding(full_run, "thresholds")

    swap = pd.read_csv(full_dir / "subject_swap.csv")
    strongest = heads[heads["class"] == "relation"].sort_values("relation_dla", ascending=False)["name"].iloc[0]
    change = swap[(swap["name"] == strongest) & (swap["source"] == "relation")]["rel_change"].iloc[0]
    assert f"The strongest relation head, {strongest}, changes by {change:.2f}" in finding(full_run, "subject_swap")

    knockout = pd.read_csv(full_dir / "knockout.csv").query("condition == 'window' and blocked == 'subject'")
    assert percent(knockout["rel_change_p"].min()) in finding(full_run, "knockout")


def test_departures_follow_the_numbers(full_dir, full_run):
    checks = {c.key: c for c in report.departures(full_run)}
    assert {c.status for c in checks.values()} <= {"agrees", "departs", "not run"}
    mechanisms = pd.read_csv(full_dir / "mechanisms.csv")
    pooled = mechanisms[(mechanisms["relation"] == "all") & (mechanisms["metric"] == "logit_diff")].set_index("mechanism")
    attention = pooled.loc[["subject_heads", "relation_heads", "mixed_subject", "mixed_relation", "other_heads"], "share"].sum()
    mlp = pooled.loc["mlps", "share"]
    assert checks["mlp_vs_attention"].status == ("departs" if mlp > attention else "agrees")
    assert f"{percent(mlp)} of a − mean(R∖a), all attention heads together {percent(attention)}" in checks["mlp_vs_attention"].text
    negative = pooled[pooled["mean_value"] < 0]
    assert checks["destructive"].status == ("departs" if len(negative) else "agrees")
    summary = full_run.summary["interference"]
    assert checks["only_sum"].status == ("departs" if summary["only_sum_ranks_first"] < 0.05 else "agrees")
    assert checks["ablation"].status in ("agrees", "departs")
    assert checks["swap"].status in ("agrees", "departs")


def test_the_handbuilt_model_is_described_as_it_was_built(handbuilt_dir):
    """One subject head (L0H0) and one relation head (L0H1) that ignores the subject, by construction."""
    run = report.load_run(handbuilt_dir)
    text = finding(run, "classes")
    assert "1 subject head (L0H0) supplies 100% of it" in text
    assert "1 relation head (L0H1)" in text
    assert "recalls 12 of 12 facts (100%)" in finding(run, "recall")
    checks = {c.key: c for c in report.departures(run)}
    assert checks["swap"].status == "agrees" and "L0H1" in checks["swap"].text
    assert checks["specificity"].status == "agrees"
    assert checks["mixed"].status == "departs"  # none built
    path = report.write_report(handbuilt_dir)
    assert "L0H0" in path.read_text(encoding="utf-8")


def test_a_causal_table_in_an_unknown_format_does_not_break_the_report(full_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(full_dir, copy)
    pd.DataFrame({"window": [0, 1], "effect": [0.1, 0.2]}).to_csv(copy / "knockout.csv", index=False)
    pd.DataFrame({"what": ["x"]}).to_csv(copy / "ablations.csv", index=False)
    text = report.write_report(copy).read_text(encoding="utf-8")
    assert "Not available: column" in text and 'id="fig-knockout"' not in text
    assert "knockout.csv does not have the expected column" in text
    assert 'id="fig-signature"' in text and 'id="fig-trace"' in text
    run = report.load_run(copy)
    assert {c.key: c.status for c in report.departures(run)}["ablation"] == "not run"
