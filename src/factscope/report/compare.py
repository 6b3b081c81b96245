"""Finished runs side by side: `write_compare(DIRS, OUT)` writes OUT (one self-contained HTML file, plotly.js inlined
once) and beside it OUT with suffix .csv, the tidy table of every number the page shows.

Like the report, only saved tables are read (summary.json, recall.csv, heads.csv, mechanisms.csv of each
`factscope analyze` directory), never a model. A run is named by its directory, so one model analysed twice
(another dataset, BOS choice or class rule) compares like two models. Models differ in depth and width, so head
counts are fractions of the model's heads and layers are relative depths.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import FactscopeError
from ..rundir import SUMMARY, TABLES, Run, atomic_write_text, check_file_output, load_run, write_csv
from ..taxonomy import CLASSES, MECHANISM_ORDER
from .page import GENERATOR, PAPER, Section, figure_div, page_html
from .style import (CLASS_COLORS, CLASS_LETTERS, MECHANISM_COLORS, MECHANISM_LABELS, METRIC_LABELS, SHARE_METRICS,
                    SHOWN_CLASSES, dropdown, series_color, style_figure)
from .text import pct

REQUIRED_FILES = (SUMMARY, *(TABLES[name] for name in ("recall", "heads", "mechanisms")))
EXACTNESS = ("max_abs_reconstruction_error", "max_abs_head_error", "tolerance")  # keys of summary.json
COLUMNS = ["run", "model", "metric", "relation", "part", "value"]


@dataclass
class Comparison:
    """The runs by label (their directory names), the tidy table (compare.csv), and every head's relative depth."""

    runs: dict[str, Run]
    table: pd.DataFrame
    depths: pd.DataFrame

    @property
    def labels(self) -> list[str]:
        return list(self.runs)


def load_comparison(run_dirs: Sequence[str | Path]) -> Comparison:
    runs = load_runs(run_dirs)
    depths = pd.concat([head_depths(label, run) for label, run in runs.items()], ignore_index=True)
    table = pd.concat([run_metrics(label, run, depths[depths["run"] == label]) for label, run in runs.items()],
                      ignore_index=True)
    return Comparison(runs, table, depths)


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, Run]:
    """label → Run, in the order given; each directory must hold a finished `factscope analyze` run."""
    paths = [Path(d) for d in run_dirs]
    if len(paths) < 2:
        raise FactscopeError("compare needs at least two run directories")
    for path in paths:
        if not path.is_dir():
            raise FactscopeError(f"{path}: no such run directory")
        for name in REQUIRED_FILES:
            if not (path / name).is_file():
                raise FactscopeError(f"{path}: no {name}; is this a finished `factscope analyze` run directory?")
    runs = {label: load_run(path) for label, path in zip(run_labels(paths), paths)}
    for run in runs.values():
        missing = [key for key in EXACTNESS if key not in run.summary]
        if missing:
            raise FactscopeError(f"{run.path / SUMMARY}: no '{missing[0]}'; was it written by `factscope analyze`?")
    return runs


def run_labels(paths: list[Path]) -> list[str]:
    """Directory names; where two runs share a name (a/run, b/run), their paths as given."""
    resolved = [path.resolve() for path in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise FactscopeError(f"{paths[index]}: the same run directory is given twice")
    names = [path.name for path in resolved]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def head_depths(label: str, run: Run) -> pd.DataFrame:
    """Every head with its class and relative depth (layer + ½) / n_layers: the middle of the layer's share of the
    depth, so the first and last layers sit symmetrically at any depth (layer / n_layers would put a 3-layer
    model's last layer at 0.67 but a 30-layer model's at 0.97)."""
    heads = run.heads[["name", "layer", "head", "class"]]
    return heads.assign(run=label, relative_depth=(heads["layer"] + 0.5) / run.n_layers)


def run_metrics(label: str, run: Run, depths: pd.DataFrame) -> pd.DataFrame:
    """compare.csv's rows for one run; `relation` is "all" where pooled, `part` empty where the metric has none."""
    summary = run.summary
    scalars = pd.DataFrame({
        "metric": ["n_layers", "n_heads", "n_prompts", "n_analysed", *EXACTNESS],
        "value": [run.n_layers, run.n_heads, len(run.recall), summary.get("n_analysed", np.nan),
                  *(summary[key] for key in EXACTNESS)],
    })
    correct = run.recall.groupby("relation")["correct"].mean()
    accuracy = pd.DataFrame({"metric": "accuracy", "relation": ["all", *correct.index],
                             "value": [run.recall["correct"].mean(), *correct]})
    by_class = depths.groupby("class")["relative_depth"].agg(["size", "mean"]).reindex(CLASSES)
    classes = pd.concat([
        pd.DataFrame({"metric": "head_count", "part": CLASSES, "value": by_class["size"].fillna(0).to_numpy()}),
        pd.DataFrame({"metric": "head_fraction", "part": CLASSES,
                      "value": by_class["size"].fillna(0).to_numpy() / len(depths)}),
        pd.DataFrame({"metric": "mean_relative_depth", "part": CLASSES, "value": by_class["mean"].to_numpy()}),
    ])
    mechanisms = run.mechanisms
    shares = pd.DataFrame({"metric": "share_" + mechanisms["metric"], "relation": mechanisms["relation"],
                           "part": mechanisms["mechanism"], "value": mechanisms["share"]})
    table = pd.concat([scalars, accuracy, classes, shares], ignore_index=True)
    table = table.fillna({"relation": "all", "part": ""}).assign(run=label, model=str(summary.get("model", "?")))
    return table[COLUMNS].astype({"value": float})


def metric(comparison: Comparison, name: str) -> pd.DataFrame:
    return comparison.table[comparison.table["metric"] == name]


def relation_order(relations) -> list[str]:
    return ["all", *sorted(set(relations) - {"all"})]


def fig_accuracy(comparison: Comparison) -> go.Figure:
    rows = metric(comparison, "accuracy")
    relations = relation_order(rows["relation"])
    fig = go.Figure()
    for index, label in enumerate(comparison.labels):
        values = rows[rows["run"] == label].set_index("relation")["value"].reindex(relations)
        fig.add_bar(x=relations, y=values, name=label, marker_color=series_color(index),
                    hovertemplate=f"<b>{html.escape(label)}</b> · %{{x}}<br>recall@1 %{{y:.0%}}<extra></extra>")
    style_figure(fig, "Recall@1 by relation", "Fraction of facts whose attribute's first token is the model's top "
                 "prediction; \"all\" pools every relation. A gap means the run's dataset lacks the relation.", height=480)
    fig.update_layout(barmode="group", bargap=0.2, legend=dict(title_text="run"))
    fig.update_yaxes(title_text="recall@1", tickformat=".0%", range=[0, 1.02])
    fig.update_xaxes(showgrid=False)
    return fig


def fig_head_classes(comparison: Comparison) -> go.Figure:
    fractions = metric(comparison, "head_fraction").set_index(["run", "part"])["value"]
    counts = metric(comparison, "head_count").set_index(["run", "part"])["value"]
    totals = metric(comparison, "n_layers").set_index("run")["value"] * metric(comparison, "n_heads").set_index("run")["value"]
    labels = comparison.labels
    fig = go.Figure()
    for name in SHOWN_CLASSES:
        keys = [(label, name) for label in labels]
        fig.add_bar(
            x=labels, y=fractions.reindex(keys).to_numpy(), name=name, marker_color=CLASS_COLORS[name],
            customdata=np.stack([counts.reindex(keys).to_numpy(), totals.reindex(labels).to_numpy()], axis=1),
            hovertemplate=f"<b>%{{x}}</b> · {name} heads<br>%{{customdata[0]:.0f}} of %{{customdata[1]:.0f}} heads "
                          "(%{y:.1%})<extra></extra>",
        )
    style_figure(fig, "Head classes, as a fraction of each model's heads",
                 "Each run's own class rule (summary.json: head_class_rule); the rest of the heads are negligible.",
                 height=460)
    fig.update_layout(barmode="group", bargap=0.25, legend=dict(title_text="class"))
    fig.update_yaxes(title_text="fraction of all heads", tickformat=".0%", rangemode="tozero")
    fig.update_xaxes(showgrid=False, categoryorder="array", categoryarray=labels)
    return fig


def fig_depths(comparison: Comparison) -> go.Figure:
    depths = comparison.depths
    fig = go.Figure()
    for name in SHOWN_CLASSES:
        members = depths[depths["class"] == name]
        if members.empty:
            continue
        fig.add_box(
            x=members["run"], y=members["relative_depth"], name=name, marker_color=CLASS_COLORS[name],
            boxpoints="all", jitter=0.6, pointpos=0, marker=dict(size=6, opacity=0.7), line=dict(width=1.5),
            customdata=members[["name", "layer"]].to_numpy(),
            hovertemplate="<b>%{customdata[0]}</b> (%{x})<br>layer %{customdata[1]} · relative depth %{y:.2f}"
                          "<extra>" + name + "</extra>",
        )
    if not fig.data:
        fig.add_annotation(text="no run has subject, relation or mixed heads", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper", font=dict(size=15, color="#555555"))
    style_figure(fig, "Where each class sits in depth",
                 "Every classified head as a point at (layer + ½) / number of layers: 0 is the embedding, 1 the "
                 "unembedding. Boxes give the median and quartiles per run and class.", height=500)
    fig.update_layout(boxmode="group", legend=dict(title_text="class"))
    fig.update_yaxes(title_text="relative depth", range=[0, 1])
    fig.update_xaxes(showgrid=False, categoryorder="array", categoryarray=comparison.labels,
                     range=[-0.5, len(comparison.labels) - 0.5])
    return fig


def fig_shares(comparison: Comparison) -> go.Figure:
    """Per relation and run, each mechanism's share of a − mean(R∖a) (dropdown: of the centred logit of a), stacked."""
    fig = go.Figure()
    metrics = SHARE_METRICS
    n_traces = dict.fromkeys(metrics, 0)
    for metric_name in metrics:
        rows = metric(comparison, f"share_{metric_name}")
        order = pd.MultiIndex.from_product([relation_order(rows["relation"]), comparison.labels])
        for mechanism in MECHANISM_ORDER:
            part = rows[rows["part"] == mechanism].set_index(["relation", "run"])["value"]
            part = part.reindex(order).dropna()
            if part.empty:
                continue
            relations, runs = part.index.get_level_values(0), part.index.get_level_values(1)
            fig.add_bar(
                y=[list(relations), list(runs)], x=part.to_numpy(), orientation="h", legendgroup=mechanism,
                name=MECHANISM_LABELS[mechanism], marker_color=MECHANISM_COLORS[mechanism],
                visible=metric_name == "logit_diff", showlegend=True,
                hovertemplate="<b>%{y}</b> · " + MECHANISM_LABELS[mechanism] + "<br>share %{x:.1%}<extra></extra>",
            )
            n_traces[metric_name] += 1
    buttons = [
        dict(label=f"share of {METRIC_LABELS[m]}", method="update",
             args=[{"visible": [shown == m for shown in metrics for _ in range(n_traces[shown])]}])
        for m in metrics
    ]
    n_bars = len(relation_order(metric(comparison, "share_logit_diff")["relation"])) * len(comparison.labels)
    style_figure(fig, "Mechanism shares by relation and run",
                 "Mean contribution / mean total per relation, one bar per run; shares add to 100% (dotted line), a "
                 "negative share is destructive interference.", height=max(460, 22 * n_bars + 200), menu=True)
    fig.update_layout(barmode="relative", bargap=0.25, updatemenus=[dropdown(buttons)],
                      legend=dict(orientation="v", y=1, x=1.01, xanchor="left", yanchor="top", traceorder="normal"))
    fig.add_vline(x=1.0, line=dict(color="#444444", dash="dot", width=1))
    fig.update_xaxes(title_text="share", tickformat=".0%", zeroline=True, zerolinecolor="#444444", zerolinewidth=1)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return fig


def fig_exactness(comparison: Comparison) -> go.Figure:
    """Each run's largest decomposition error (log scale) against its tolerance."""
    labels = comparison.labels
    fig = go.Figure()
    for index, (name, text) in enumerate((("max_abs_reconstruction_error", "Σ parts − model logit"),
                                          ("max_abs_head_error", "per head: split − hook_z DLA"))):
        values = metric(comparison, name).set_index("run")["value"].reindex(labels)
        fig.add_bar(x=labels, y=values, name=text, marker_color=("#444444", "#999999")[index],
                    text=[f"{v:.1e}" for v in values], textposition="outside", cliponaxis=False,
                    hovertemplate="<b>%{x}</b><br>" + text + ": %{y:.2e}<extra></extra>")
    tolerance = metric(comparison, "tolerance").set_index("run")["value"].reindex(labels)
    fig.add_scatter(x=labels, y=tolerance, mode="markers", name="tolerance", marker=dict(
        symbol="line-ew-open", size=60, color=CLASS_COLORS["relation"], line=dict(width=2.5)),
        hovertemplate="<b>%{x}</b><br>tolerance %{y:g}<extra></extra>")
    style_figure(fig, "Exactness of each decomposition",
                 "Largest |error| over the run's analysed prompts and targets; a run fails if either exceeds its "
                 "tolerance (the red mark).", height=440)
    fig.update_layout(barmode="group", bargap=0.3)
    fig.update_yaxes(type="log", title_text="max |error| (logits)", dtick=1, exponentformat="power")
    fig.update_xaxes(showgrid=False)
    return fig


SECTIONS = (
    Section("recall", "Recall", "Which facts each model knows.", fig_accuracy, ()),
    Section("classes", "Head classes", "How many heads of each class each model has, relative to its size.",
            fig_head_classes, ()),
    Section("depth", "Depth of each class", "Where subject, relation and mixed heads sit, as a fraction of the "
            "model's depth. In the paper (Pythia-2.8B) subject and relation heads sit in the middle-to-late layers.",
            fig_depths, ()),
    Section("shares", "Mechanism shares", "How much of <i>a</i> − mean(R∖a) each mechanism supplies, per relation "
            "and run. The dropdown switches to the logit of <i>a</i> itself.", fig_shares, ()),
    Section("exactness", "Exactness", "The sum of parts against the model's own logit, per run.", fig_exactness, ()),
)


def write_compare(run_dirs: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write OUT (HTML) and OUT.csv (the tidy table); refuse existing files unless `overwrite`, and files factscope
    did not write even then."""
    out = check_file_output(out, overwrite, _our_page)
    csv_path = check_file_output(out.with_suffix(".csv"), overwrite, _our_table)
    comparison = load_comparison(run_dirs)
    page = render_html(comparison)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(comparison.table, csv_path)
    atomic_write_text(out, page)
    return out, csv_path


def _our_page(path: Path) -> bool:
    with path.open("rb") as handle:
        return GENERATOR.encode() in handle.read(4096)


def _our_table(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as handle:
        return handle.readline().strip().replace('"', "").split(",") == COLUMNS


def render_html(comparison: Comparison) -> str:
    esc = html.escape
    sections = [f'<section id="{section.id}"><h2>{esc(section.title)}</h2><p class="intro">{section.intro}</p>'
                f"{figure_div(section.figure(comparison), section.id)}</section>" for section in SECTIONS]
    toc = '<li><a href="#runs">Runs</a></li>' + "".join(f'<li><a href="#{s.id}">{esc(s.title)}</a></li>' for s in SECTIONS)
    title = f"factscope · {len(comparison.runs)} runs compared"
    return page_html(title, f"Direct logit attribution across models, after {PAPER}.", toc,
                     _runs_html(comparison) + "".join(sections))


def _runs_html(comparison: Comparison) -> str:
    esc = html.escape
    value = comparison.table[comparison.table["relation"] == "all"].set_index(["run", "metric", "part"])["value"]
    rows = []
    for label, run in comparison.runs.items():
        summary = run.summary
        cells = [
            label, str(summary.get("model", "?")), Path(str(summary.get("dataset", "?"))).name,
            f"{run.n_layers} × {run.n_heads}",
            f"{value[label, 'n_analysed', '']:.0f} of {value[label, 'n_prompts', '']:.0f}",
            pct(value[label, "accuracy", ""]),
            " · ".join(f"{value[label, 'head_count', c]:.0f} {CLASS_LETTERS[c]}" for c in SHOWN_CLASSES),
            "yes" if summary.get("prepend_bos") else "no",
            f"{value[label, 'max_abs_reconstruction_error', '']:.1e}",
        ]
        rows.append("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in cells) + "</tr>")
    head = ("run", "model", "dataset", "layers × heads", "analysed", "recall@1", "S · R · M heads", "BOS", "max |error|")
    return ('<section id="runs"><h2>Runs</h2><p class="intro">Each run is named by its directory; its numbers are in '
            "the .csv beside this page (one row per run × metric).</p>"
            '<table class="checks runs"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></section>")
