"""The figures of attention heads by class, one function per figure (each takes a `rundir.Run` and returns a
plotly Figure): the signature view, the layer × head heatmap, specificity, the threshold sweep and the subject
swap, with the `*_table` functions that prepare their data (shared with the PNG twins and the text)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import FactscopeError
from ..taxonomy import CLASSES
from .style import (CLASS_COLORS, CLASS_LETTERS, DIVERGING, SHOWN_CLASSES, dropdown, nested, require,
                    style_figure)

if TYPE_CHECKING:
    from ..rundir import Run

def class_rank(heads: pd.DataFrame) -> pd.Series:
    """The score that defines each head's class (as in mechanisms.class_counts): S, R or S + R."""
    score = heads["subject_dla"] + heads["relation_dla"]
    score = score.where(heads["class"] != "subject", heads["subject_dla"])
    return score.where(heads["class"] != "relation", heads["relation_dla"])


def top_heads(heads: pd.DataFrame, name: str, n: int | None = None) -> list[str]:
    members = heads[heads["class"] == name]
    order = class_rank(members).sort_values(ascending=False, kind="stable").index
    names = members.loc[order, "name"].tolist()
    return names if n is None else names[:n]


# the heatmaps' panels: key in `heatmap_arrays`, title; the paper's RELATION is `relation` + `end`
HEATMAP_PANELS = {"total": "all sources", "subject": "from SUBJECT", "relation": "from RELATION (END excluded)",
                  "end": "from END itself"}


def heatmap_arrays(run: Run) -> dict[str, np.ndarray]:
    """layer × head arrays of mean DLA to a: all sources, SUBJECT, RELATION, END (runs from before END was its own
    group have no END panel); and the class letters."""
    heads = require(run, "heads")
    n_layers, n_heads = run.n_layers, run.n_heads
    out = {}
    sources = {key: heads[f"{key}_dla"] for key in ("subject", "relation", "end") if f"{key}_dla" in heads}
    total = sum(sources.values()) + heads["other_dla"]
    for key, values in {"total": total, **sources}.items():
        grid = np.full((n_layers, n_heads), np.nan)
        grid[heads["layer"], heads["head"]] = values
        out[key] = grid
    letters = np.full((n_layers, n_heads), "", dtype=object)
    letters[heads["layer"], heads["head"]] = heads["class"].map(CLASS_LETTERS).fillna("")
    out["letters"] = letters
    return out


def specificity_heads(run: Run, relation: str, n: int = 2) -> list[tuple[str, int, int, str]]:
    """The relation's strongest subject heads (by their SUBJECT DLA on it) and relation heads (RELATION DLA):
    [(class, layer, head, source)]. Heads keep their pooled class; within it they are ranked on this relation."""
    heads = require(run, "heads")
    per_relation = run.head_relation_classes
    if per_relation is not None and relation in set(per_relation["relation"]):
        scores = per_relation[per_relation["relation"] == relation].set_index(["layer", "head"])
    else:
        scores = heads.set_index(["layer", "head"])
    chosen = []
    for name in ("subject", "relation"):
        members = heads[heads["class"] == name].set_index(["layer", "head"]).index
        if members.empty:
            continue
        ranked = scores.loc[scores.index.intersection(members), f"{name}_dla"].sort_values(ascending=False)
        chosen += [(name, int(layer), int(head), name) for layer, head in ranked.index[:n]]
    return chosen


def specificity_table(run: Run, n: int = 2) -> pd.DataFrame:
    """For every relation's chosen heads, the DLA of the head's own part (SUBJECT for subject heads, RELATION for
    relation heads) to every attribute of R_r on every analysed prompt of the relation."""
    relations = sorted(run.correct_parts()["relation"].unique())
    chosen = pd.DataFrame(
        [(relation, *spec) for relation in relations for spec in specificity_heads(run, relation, n)],
        columns=["relation", "class", "layer", "head", "source"],
    )
    if chosen.empty:
        return chosen.assign(prompt_id=[], target=[], value=[], is_correct_target=[])
    rows = run.attributions(
        columns=["prompt_id", "relation", "target", "is_correct_target", "layer", "head", "source", "value"],
        filters=[
            ("component", "==", "attn"), ("source", "in", ["subject", "relation"]),
            ("layer", "in", sorted(set(chosen["layer"]))), ("head", "in", sorted(set(chosen["head"]))),
        ],
    )
    return rows.merge(chosen, on=["relation", "layer", "head", "source"])


def sweep_table(run: Run) -> pd.DataFrame:
    return require(run, "class_sweep")


def fig_signature(run: Run, label_top: int = 3) -> go.Figure:
    """Every head as a point: mean DLA to a read from the SUBJECT tokens against that read from RELATION.

    A dropdown switches both axes to a signed square root, which spreads out the crowd of small heads near 0.
    """
    heads = require(run, "heads")
    rule = run.summary.get("head_class_rule", {})
    fig = go.Figure()
    hover = (
        "<b>%{customdata[0]}</b> · %{customdata[1]} head<br>SUBJECT DLA %{customdata[6]:+.3f} · RELATION DLA "
        "%{customdata[7]:+.3f}<br>BOS + prefix DLA %{customdata[2]:+.3f} (logits)"
        "<br>same class on %{customdata[3]:.0%} of prompts, %{customdata[4]:.0%} of relations"
        "<br>boosts most: %{customdata[5]}<extra></extra>"
    )
    xs, ys = [], []  # per trace, linear coordinates
    for name in CLASSES:
        members = heads[heads["class"] == name]
        if members.empty:
            continue
        custom = np.stack(
            [members["name"], members["class"], members["other_dla"], members.get("stability", np.nan),
             members.get("relation_stability", np.nan), members.get("top_targets", "").fillna(""),
             members["subject_dla"], members["relation_dla"]], axis=1,
        )
        fig.add_scatter(
            x=members["subject_dla"], y=members["relation_dla"], mode="markers", name=f"{name} ({len(members)})",
            marker=dict(
                color=CLASS_COLORS[name], size=7 if name == "negligible" else 10,
                opacity=0.55 if name == "negligible" else 0.9, line=dict(color="white", width=0.6),
            ),
            customdata=custom, hovertemplate=hover,
        )
        xs.append(members["subject_dla"].to_numpy(float))
        ys.append(members["relation_dla"].to_numpy(float))
    s_cut, r_cut, k = rule.get("subject_threshold"), rule.get("relation_threshold"), rule.get("k")
    top = float(max(heads["relation_dla"].max(), heads["subject_dla"].max(), r_cut or 0, s_cut or 0, 1e-9)) * 1.05
    if k:  # the dominance lines S = k·R and R = k·S (straight in both scales)
        for x_line, y_line in (([0, top / k], [0, top]), ([0, top], [0, top / k])):
            fig.add_scatter(x=x_line, y=y_line, mode="lines", line=dict(color="#999999", dash="dash", width=1),
                            hoverinfo="skip", showlegend=False)
            xs.append(np.array(x_line, float))
            ys.append(np.array(y_line, float))
    labelled = [(name, heads[heads["name"] == head].iloc[0]) for name in SHOWN_CLASSES
                for head in top_heads(heads, name, label_top)]

    def state(f) -> tuple[dict, dict]:
        data = {"x": [f(x).tolist() for x in xs], "y": [f(y).tolist() for y in ys]}
        layout = {
            "annotations": [dict(x=float(f(row["subject_dla"])), y=float(f(row["relation_dla"])), text=row["name"], showarrow=False,
                                 xanchor="left", xshift=7, font=dict(size=12, color=CLASS_COLORS[name]))
                            for name, row in labelled],
            "shapes": [] if s_cut is None or r_cut is None else [
                dict(type="line", xref="x", yref="paper", x0=float(f(s_cut)), x1=float(f(s_cut)), y0=0, y1=1,
                     line=dict(color=CLASS_COLORS["subject"], dash="dot", width=1.5)),
                dict(type="line", xref="paper", yref="y", x0=0, x1=1, y0=float(f(r_cut)), y1=float(f(r_cut)),
                     line=dict(color=CLASS_COLORS["relation"], dash="dot", width=1.5)),
            ],
            "xaxis.range": _padded(pd.Series(f(heads["subject_dla"].to_numpy(float))), 0.06),
            "yaxis.range": _padded(pd.Series(f(heads["relation_dla"].to_numpy(float))), 0.06),
        }
        return data, layout

    linear = state(lambda v: np.asarray(v, float))
    root = state(signed_sqrt)
    for axis, values in (("xaxis", heads["subject_dla"]), ("yaxis", heads["relation_dla"])):
        ticks = _sqrt_ticks(values)
        root[1][f"{axis}.tickvals"], root[1][f"{axis}.ticktext"] = list(signed_sqrt(ticks)), [f"{t:g}" for t in ticks]
        linear[1][f"{axis}.tickvals"], linear[1][f"{axis}.ticktext"] = None, None
    buttons = [dict(label="linear axes", method="update", args=[linear[0], linear[1]]),
               dict(label="signed √ axes (spread small heads)", method="update", args=[root[0], root[1]])]
    subtitle = "Mean over analysed prompts of each head's DLA to the correct attribute a, split by where it read from."
    if s_cut is not None:
        subtitle += f" Dotted: significance thresholds (z = {rule.get('z', '?'):g}); dashed: dominance ratio k = {k:g}."
    style_figure(fig, "The signature: subject heads, relation heads, mixed heads", subtitle, height=620, menu=True)
    fig.update_layout(legend=dict(title_text="class (heads)", orientation="v", x=1.01, y=1, xanchor="left"),
                      updatemenus=[dropdown(buttons)], **nested({k: v for k, v in linear[1].items() if "tick" not in k}))
    fig.update_xaxes(title_text="SUBJECT DLA (logits)", zeroline=True, zerolinecolor="#BBBBBB")
    fig.update_yaxes(title_text="RELATION DLA (logits)", zeroline=True, zerolinecolor="#BBBBBB")
    return fig


def signed_sqrt(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return np.sign(values) * np.sqrt(np.abs(values))


def _sqrt_ticks(values: pd.Series) -> np.ndarray:
    """Round tick values for a signed-square-root axis covering `values`."""
    steps = np.array([0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50])
    low, high = float(min(values.min(), 0)), float(max(values.max(), 0))
    positive = steps[steps <= high * 1.05]
    negative = -steps[steps <= -low * 1.05]
    ticks = np.concatenate([negative[::-1], [0.0], positive])
    span = signed_sqrt([high])[0] - signed_sqrt([low])[0] + 1e-12
    kept = [ticks[0]]
    for tick in ticks[1:]:  # drop ticks that would crowd the previous one
        if signed_sqrt([tick])[0] - signed_sqrt([kept[-1]])[0] > 0.06 * span:
            kept.append(tick)
    return np.array(kept)


def _padded(values: pd.Series, pad: float) -> list[float]:
    low, high = float(min(values.min(), 0)), float(max(values.max(), 0))
    span = (high - low) or 1.0
    return [low - pad * span, high + pad * span]


def fig_heatmap(run: Run) -> go.Figure:
    """Layer × head heatmaps of mean DLA to a: all sources, from SUBJECT, from RELATION, from END; letters mark
    classes."""
    arrays = heatmap_arrays(run)
    n_layers, n_heads = run.n_layers, run.n_heads
    keys = [key for key in HEATMAP_PANELS if key in arrays]
    limit = float(np.nanmax(np.abs([arrays[key] for key in keys]))) or 1.0
    titles = [HEATMAP_PANELS[key] + (" (S/R/M = class)" if key == "total" else "") for key in keys]
    fig = make_subplots(rows=1, cols=len(keys), shared_yaxes=True, horizontal_spacing=0.035, subplot_titles=titles)
    layers, head_index = np.arange(n_layers), np.arange(n_heads)
    text_size = max(7, min(12, int(300 / max(n_heads, 1))))
    for col, key in enumerate(keys, start=1):
        fig.add_heatmap(
            z=arrays[key], x=head_index, y=layers, coloraxis="coloraxis", xgap=1, ygap=1,
            text=arrays["letters"] if key == "total" else None,
            texttemplate="%{text}" if key == "total" else None, textfont=dict(size=text_size),
            hovertemplate="<b>L%{y}H%{x}</b><br>" + titles[col - 1].split(" (")[0] + ": %{z:+.3f} logits<extra></extra>",
            row=1, col=col,
        )
        fig.update_xaxes(title_text="head", row=1, col=col, showgrid=False, dtick=max(1, n_heads // 8), ticks="")
    fig.update_yaxes(title_text="layer", row=1, col=1, showgrid=False, dtick=max(1, n_layers // 15), ticks="")
    fig.update_yaxes(showgrid=False)
    fig.update_layout(coloraxis=dict(colorscale=DIVERGING, cmin=-limit, cmax=limit, cmid=0,
                                     colorbar=dict(title=dict(text="DLA to a<br>(logits)", side="top"), thickness=14)))
    style_figure(fig, "Where the correct attribute comes from, head by head",
                 "Mean DLA to a over analysed prompts; blue raises a, red lowers it. Layer 0 at the bottom.",
                 height=max(460, 17 * n_layers + 190), extra_top=24)
    return fig


def fig_specificity(run: Run, relation: str | None = None, n: int = 2) -> go.Figure:
    """For a relation (dropdown), its strongest subject and relation heads: DLA of the head's own part to every
    attribute of R_r (columns) on every prompt (rows); the correct attribute of each prompt is outlined."""
    table = specificity_table(run, n)
    if table.empty:
        raise FactscopeError("no subject or relation heads: nothing to show for specificity")
    relations = sorted(table["relation"].unique())
    relation = relation if relation in relations else _default_relation(table, relations)
    subjects = require(run, "recall").astype({"prompt_id": str}).set_index("prompt_id")["subject"]
    n_panels = int(table.groupby("relation")[["layer", "head"]].apply(lambda g: len(g.drop_duplicates())).max())
    fig = make_subplots(rows=1, cols=n_panels, shared_yaxes=True, horizontal_spacing=0.02,
                        subplot_titles=[" "] * n_panels)
    states = {}
    trace = 0
    for rel in relations:
        rows = table[table["relation"] == rel]
        correct = rows[rows["is_correct_target"]]
        attributes = list(dict.fromkeys(correct.sort_values("target")["target"]))
        attributes += sorted(set(rows["target"]) - set(attributes))
        prompts = correct.assign(order=correct["target"].map({a: i for i, a in enumerate(attributes)}))
        prompts = list(dict.fromkeys(prompts.sort_values(["order", "prompt_id"])["prompt_id"]))
        limit = float(rows["value"].abs().max()) or 1.0
        specs = rows[["class", "layer", "head", "source"]].drop_duplicates().values.tolist()
        titles, shapes, traces = [], [], []
        for col, (klass, layer, head, source) in enumerate(specs, start=1):
            part = rows[(rows["layer"] == layer) & (rows["head"] == head)]
            grid = part.pivot_table(index="prompt_id", columns="target", values="value").reindex(index=prompts, columns=attributes)
            fig.add_heatmap(
                z=grid.to_numpy(), x=np.arange(len(attributes)), y=np.arange(len(prompts)), coloraxis="coloraxis",
                xgap=1, ygap=1, visible=rel == relation, row=1, col=col,
                customdata=np.array([[[subjects.get(p, p), a] for a in attributes] for p in prompts], dtype=object),
                hovertemplate=f"<b>L{layer}H{head}</b> ← {source}<br>%{{customdata[0]}} → %{{customdata[1]}}"
                "<br>DLA %{z:+.3f} logits<extra></extra>",
            )
            traces.append(trace)
            trace += 1
            titles.append(f"<b>L{layer}H{head}</b> {klass} head<br>← {source.upper()}")
            axis = "" if col == 1 else str(col)
            for p_index, prompt in enumerate(prompts):
                target = correct.loc[correct["prompt_id"] == prompt, "target"]
                if target.empty or target.iloc[0] not in attributes:
                    continue
                a_index = attributes.index(target.iloc[0])
                shapes.append(dict(type="rect", xref=f"x{axis}", yref=f"y{axis}", x0=a_index - 0.5, x1=a_index + 0.5,
                                   y0=p_index - 0.5, y1=p_index + 0.5, fillcolor="rgba(0,0,0,0)", layer="above",
                                   line=dict(color="#111111", width=1.6)))
        states[rel] = dict(traces=traces, titles=titles, shapes=shapes, attributes=attributes,
                           prompts=[subjects.get(p, p) for p in prompts], limit=limit, n=len(specs))
    n_traces = trace

    def layout_for(rel: str) -> dict:
        state = states[rel]
        layout = {"shapes": state["shapes"], "coloraxis.cmin": -state["limit"], "coloraxis.cmax": state["limit"]}
        for col in range(1, n_panels + 1):
            axis = "" if col == 1 else str(col)
            has = col <= state["n"]
            layout[f"xaxis{axis}.tickvals"] = list(range(len(state["attributes"]))) if has else []
            layout[f"xaxis{axis}.ticktext"] = state["attributes"] if has else []
            layout[f"xaxis{axis}.range"] = [-0.5, len(state["attributes"]) - 0.5]
            layout[f"xaxis{axis}.visible"] = has
        layout["yaxis.tickvals"] = list(range(len(state["prompts"])))
        layout["yaxis.ticktext"] = state["prompts"]
        layout["yaxis.range"] = [len(state["prompts"]) - 0.5, -0.5]
        return layout

    def annotations_for(rel: str) -> list[dict]:
        state = states[rel]
        out = []
        for col in range(1, n_panels + 1):
            domain = fig.layout[f"xaxis{'' if col == 1 else col}"].domain
            text = state["titles"][col - 1] if col <= state["n"] else ""
            out.append(dict(text=text, x=(domain[0] + domain[1]) / 2, y=1.0, xref="paper", yref="paper",
                            xanchor="center", yanchor="bottom", showarrow=False, font=dict(size=13)))
        return out

    buttons = []
    for rel in relations:
        visible = [False] * n_traces
        for index in states[rel]["traces"]:
            visible[index] = True
        buttons.append(dict(label=rel, method="update",
                            args=[{"visible": visible}, {**layout_for(rel), "annotations": annotations_for(rel)}]))
    n_rows = max(len(states[r]["prompts"]) for r in relations)
    style_figure(fig, "Specificity: what the strongest heads write, attribute by attribute",
                 "DLA of each head's own part to every attribute of the relation (columns) on each prompt (rows); "
                 "□ marks the prompt's correct attribute. A subject head lights up the outlined cells, a relation head "
                 "whole columns.", height=max(420, 22 * n_rows + 230), menu=True, extra_top=40)
    fig.update_layout(
        coloraxis=dict(colorscale=DIVERGING, cmid=0, colorbar=dict(title=dict(text="DLA<br>(logits)", side="top"), thickness=14)),
        updatemenus=[dropdown(buttons, relations.index(relation), above=40)],
        margin=dict(b=100),
    )
    fig.update_xaxes(tickangle=-45, showgrid=False, ticks="", tickfont=dict(size=11))
    fig.update_yaxes(showgrid=False, ticks="", tickfont=dict(size=11))
    fig.update_layout(**nested(layout_for(relation)), annotations=annotations_for(relation))
    return fig


def _default_relation(table: pd.DataFrame, relations: Sequence[str]) -> str:
    """The relation with the most analysed prompts (ties: alphabetical)."""
    counts = table[table["is_correct_target"]].groupby("relation")["prompt_id"].nunique()
    return str(counts.reindex(relations).fillna(0).sort_values(ascending=False, kind="stable").index[0])


def fig_k_sweep(run: Run) -> go.Figure:
    """Head-class counts against the dominance ratio k, one panel per significance z: how arbitrary is the cut?"""
    sweep = sweep_table(run)
    rule = run.summary.get("head_class_rule", {})
    zs = sorted(sweep["z"].unique())
    fig = make_subplots(rows=1, cols=len(zs), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"z = {z:g}" + (" (used)" if math.isclose(z, rule.get("z", -1)) else "") for z in zs])
    for col, z in enumerate(zs, start=1):
        rows = sweep[sweep["z"] == z]
        for name in SHOWN_CLASSES:
            line = rows[rows["class"] == name].sort_values("k")
            fig.add_scatter(
                x=line["k"], y=line["count"], mode="lines+markers", name=name, legendgroup=name, showlegend=col == 1,
                line=dict(color=CLASS_COLORS[name], width=2.5), marker=dict(size=7),
                hovertemplate=f"{name} heads: %{{y}}<br>k = %{{x:g}}, z = {z:g}<extra></extra>", row=1, col=col,
            )
        if "k" in rule:
            fig.add_vline(x=math.log10(rule["k"]), line=dict(color="#555555", dash="dot", width=1), row=1, col=col)
        negligible = rows[rows["class"] == "negligible"]["count"]
        if len(negligible):
            fig.add_annotation(text=f"negligible: {int(negligible.min())}–{int(negligible.max())}", x=0.02, y=0.98,
                               xref=f"x{'' if col == 1 else col} domain", yref=f"y{'' if col == 1 else col} domain",
                               showarrow=False, xanchor="left", yanchor="top", font=dict(size=12, color="#666666"))
    ks = sorted(sweep["k"].unique())
    fig.update_xaxes(type="log", title_text="dominance ratio k", tickvals=ks, ticktext=[f"{k:g}" for k in ks])
    fig.update_yaxes(title_text="heads in class", row=1, col=1, rangemode="tozero")
    style_figure(fig, "Do the classes depend on the thresholds?",
                 "Class counts as the dominance ratio k (S ≥ k·R ⇒ subject) and the significance z (robust z-score "
                 "against all heads) vary; dotted: the k used.", height=440, extra_top=24)
    fig.update_layout(legend=dict(orientation="h", y=-0.22, x=0))
    return fig


def fig_subject_swap(run: Run) -> go.Figure:
    """How far each classified head's own part moves when the subject is swapped for another of the relation."""
    swap = require(run, "subject_swap")
    order = [("relation", "relation"), ("mixed", "relation"), ("mixed", "subject"), ("subject", "subject")]
    fig = go.Figure()
    for klass, source in order:
        rows = swap[(swap["class"] == klass) & (swap["source"] == source)]
        if rows.empty:
            continue
        label = f"{klass} heads · {source.upper()} part"
        fig.add_box(
            y=rows["rel_change"], x=[label] * len(rows), name=label, boxpoints="all", jitter=0.4, pointpos=0,
            marker=dict(color=CLASS_COLORS[klass], size=8, opacity=0.85), line=dict(color=CLASS_COLORS[klass]),
            fillcolor="rgba(0,0,0,0)", customdata=np.stack([rows["name"], rows["corr"]], axis=1),
            hovertemplate="<b>%{customdata[0]}</b><br>relative change %{y:.2f}"
            "<br>corr(clean, swapped) over R_r %{customdata[1]:.2f}<extra></extra>",
        )
    fig.add_hline(y=0.5, line=dict(color="#555555", dash="dot", width=1), annotation_text="0.5",
                  annotation_position="right")
    style_figure(fig, "Subject swap: do relation heads ignore the subject?",
                 "Mean |Δ DLA| / mean |DLA| of each head's own part when the subject is replaced by another of the same "
                 "relation (over prompts × R_r). Relation heads should stay near 0.", height=480)
    fig.update_yaxes(title_text="relative change of DLA", rangemode="tozero")
    fig.update_layout(showlegend=False)
    return fig
