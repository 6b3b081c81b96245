"""The report's figures (`factscope.report.figures_*`, `pngs`): one plotly Figure per figure, whose numbers are the
tables' numbers, and valid PNG twins."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
from report_runs import full_dir, full_run, written  # noqa: F401 — fixtures

from factscope.report import SECTIONS
from factscope.report.figures_causal import (fig_ablations, fig_atp_paths, fig_atp_trace, fig_causal_trace, fig_enrichment,
                                             fig_extraction_rate, fig_knockout, fig_noise_robustness)
from factscope.report.figures_dla import (drilldown_prompts, drilldown_table, fig_drilldown, fig_headline,
                                          fig_logit_lens, fig_mechanism_shares, fig_mlp_boosting, fig_recall)
from factscope.report.figures_heads import (fig_heatmap, fig_k_sweep, fig_signature, fig_specificity, fig_subject_swap,
                                            heatmap_arrays, specificity_table)
from factscope.report.style import CLASS_COLORS, CLASS_LETTERS, MECHANISM_COLORS, MECHANISM_LABELS
from factscope.taxonomy import CLASSES, MECHANISMS

PNGS = {"additivity", "signature", "dla_heatmap", "mechanism_shares", "logit_lens", "k_sweep"}
FIGURES = [
    fig_headline, fig_recall, fig_signature, fig_heatmap, fig_mechanism_shares, fig_logit_lens, fig_specificity,
    fig_mlp_boosting, fig_k_sweep, fig_drilldown, fig_subject_swap, fig_knockout, fig_ablations, fig_causal_trace,
    fig_extraction_rate, fig_enrichment, fig_noise_robustness, fig_atp_trace, fig_atp_paths,
]


def test_the_style_covers_every_class_and_mechanism():
    assert set(CLASS_COLORS) == set(CLASS_LETTERS) == set(CLASSES)
    assert set(MECHANISM_COLORS) == set(MECHANISM_LABELS) == set(MECHANISMS)


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
    assert set(FIGURES) - {fig_headline} == {section.figure for section in SECTIONS}


def test_signature_shows_every_head_with_its_class(full_run):
    fig = fig_signature(full_run)
    points = [t for t in fig.data if t.customdata is not None]
    names = {row[0]: row[1] for t in points for row in t.customdata}
    heads = full_run.heads
    assert names == dict(zip(heads["name"], heads["class"]))
    colours = {t.customdata[0][1]: t.marker.color for t in points}
    assert all(colours[name] == CLASS_COLORS[name] for name in colours)


def test_heatmap_holds_the_head_table(full_run):
    arrays = heatmap_arrays(full_run)
    heads = full_run.heads
    row = heads.iloc[5]
    layer, head = int(row["layer"]), int(row["head"])
    assert arrays["subject"][layer, head] == pytest.approx(row["subject_dla"])
    assert arrays["end"][layer, head] == pytest.approx(row["end_dla"])
    total = row["subject_dla"] + row["relation_dla"] + row["end_dla"] + row["other_dla"]
    assert arrays["total"][layer, head] == pytest.approx(total)


def test_drilldown_lists_every_analysed_prompt_with_its_top_parts(full_run):
    fig = fig_drilldown(full_run, n_top=15)
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == min(150, full_run.summary["n_analysed"])
    top = drilldown_table(full_run, 15)
    prompt = top["prompt_id"].iloc[0]
    parts = full_run.correct_parts()
    expected = parts[parts["prompt_id"] == prompt]["value"].abs().nlargest(15).to_numpy()
    assert np.allclose(np.sort(top[top["prompt_id"] == prompt]["value"].abs().to_numpy())[::-1], expected)


def test_drilldown_caps_the_number_of_prompts(full_run):
    chosen = drilldown_prompts(full_run, 20)
    assert len(chosen) == 20
    relations = full_run.recall.set_index("prompt_id").loc[chosen, "relation"]
    assert relations.nunique() == full_run.recall["relation"].nunique()  # spread over relations


def test_specificity_marks_each_prompts_correct_attribute(full_run):
    table = specificity_table(full_run)
    assert set(table["class"]) == {"subject", "relation"}
    per_prompt = table.groupby(["relation", "layer", "head", "prompt_id"])["is_correct_target"].sum()
    assert (per_prompt == 1).all()
    fig = fig_specificity(full_run)
    relation = fig.layout.updatemenus[0].buttons[fig.layout.updatemenus[0].active].label
    n_prompts = table[table["relation"] == relation]["prompt_id"].nunique()
    n_panels = len(table[table["relation"] == relation][["layer", "head"]].drop_duplicates())
    assert len(fig.layout.shapes) == n_prompts * n_panels


def test_pngs_are_valid(written):
    import matplotlib.image

    folder = written.parent / "figures"
    assert {p.stem for p in folder.glob("*.png")} == PNGS
    for path in folder.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0.01, path.name


def test_atp_figures_put_exact_and_atp_side_by_side_with_their_error(full_run):
    """Two heatmaps per kind on one colour scale, the exact one first; the caption is the agreement row over all
    cells; the path map's cells are the table's drops."""
    for fig, agreement in ((fig_atp_trace(full_run), full_run.atp_agreement), (fig_atp_paths(full_run), full_run.atp_path_agreement)):
        heatmaps = [trace for trace in fig.data if trace.type == "heatmap"]
        assert len(heatmaps) % 2 == 0 and {trace.coloraxis for trace in heatmaps} == {"coloraxis"}
        assert "exact" in heatmaps[0].hovertemplate and "AtP" in heatmaps[1].hovertemplate
        row = agreement[agreement["kind"] == "all"].iloc[0]
        subtitle = fig.layout.title.subtitle.text.replace("<br>", " ")  # wrapped at spaces
        assert f"Pearson {row['pearson']:.2f}" in subtitle and f"{int(row['false_negatives'])} of {int(row['n_exact_above'])}" in subtitle
    paths = full_run.path_ablations
    atp = paths[(paths["method"] == "atp") & (paths["effect"] == "total") & (paths["component"] == "mlp")].set_index("layer")
    right = fig_atp_paths(full_run).data[1]
    assert np.allclose(np.asarray(right.z, dtype=float)[:, -1], -atp["delta_logit_diff"].sort_index().to_numpy())
