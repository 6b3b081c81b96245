"""The report's figures: one function per figure, each taking a `report.Run` and returning a plotly Figure,
plus matplotlib twins of the main ones for papers (`save_pngs`).

Everything is computed from the saved tables of a run directory (see `report.load_run`); nothing here loads a
model. Data preparation (`*_table` functions) is shared by the interactive and the static version, so both show
the same numbers. Colours are colour-blind safe (Okabe & Ito) and the same in every figure: blue is SUBJECT,
vermillion RELATION, reddish purple mixed, green MLPs, greys for everything else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .errors import FactscopeError
from .rundir import atomic_path
from .taxonomy import CLASSES, HEAD_MECHANISM, MECHANISM_ORDER

if TYPE_CHECKING:  # report imports this module; the reverse import is for type checkers only
    from .rundir import Run

# ---------------------------------------------------------------------------------------------------------------
# Style: one palette and one font for every figure

FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "Noto Sans", "Liberation Sans", Arial, sans-serif'
MONO = 'ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace'

CLASS_COLORS = {"subject": "#0072B2", "relation": "#D55E00", "mixed": "#CC79A7", "negligible": "#B4B4B4"}
CLASS_LETTERS = {"subject": "S", "relation": "R", "mixed": "M", "negligible": ""}

MECHANISM_COLORS = {
    "subject_heads": "#0072B2", "mixed_subject": "#56B4E9", "mixed_relation": "#E69F00", "relation_heads": "#D55E00",
    "mlps": "#009E73", "other_heads": "#A6A6A6", "embed_bias": "#4D4D4D",
}
MECHANISM_LABELS = {
    "subject_heads": "subject heads", "mixed_subject": "mixed heads · SUBJECT part",
    "mixed_relation": "mixed heads · RELATION part", "relation_heads": "relation heads", "mlps": "MLPs",
    "other_heads": "other head parts", "embed_bias": "embeddings + biases",
}
GROUP_COLORS = {"bos": "#D9D9D9", "prefix": "#EDEDED", "subject": "#A6CDE8", "relation": "#F3C4A2"}
SOURCE_COLORS = {"subject": CLASS_COLORS["subject"], "relation": CLASS_COLORS["relation"]}
# CARTO "Safe": a qualitative palette designed to stay distinguishable under colour-vision deficiency
QUALITATIVE = ("#88CCEE", "#CC6677", "#DDCC77", "#117733", "#332288", "#AA4499", "#44AA99", "#999933", "#882255",
               "#661100", "#6699CC", "#888888")
DASHES = ("solid", "dash", "dot", "dashdot")
DIVERGING = "RdBu"  # ColorBrewer, colour-blind safe; blue = raises the logit, red = lowers it
METRIC_LABELS = {"logit_diff": "a − mean(R∖a)", "logit": "logit of a"}

TEMPLATE = go.layout.Template(pio.templates["simple_white"])
TEMPLATE.layout.update(
    font=dict(family=FONT, size=14, color="#222222"),
    title=dict(font=dict(size=18), x=0.0, xanchor="left", xref="paper", y=1.0, yref="container", yanchor="top",
               pad=dict(t=14)),
    hoverlabel=dict(font=dict(family=FONT, size=13)),
    legend=dict(font=dict(size=13)),
    margin=dict(l=70, r=30, t=90, b=60),
    paper_bgcolor="white",
    plot_bgcolor="white",
)
TEMPLATE.layout.xaxis.update(showgrid=True, gridcolor="#EBEBEB", zeroline=False, ticks="outside")
TEMPLATE.layout.yaxis.update(showgrid=True, gridcolor="#EBEBEB", zeroline=False, ticks="outside")


def _style(fig: go.Figure, title: str, subtitle: str = "", height: int = 520, menu: bool = False,
           extra_top: int = 0) -> go.Figure:
    """Template, title and a wrapped subtitle, with room above the plot for them (and for a dropdown)."""
    lines = wrap(subtitle)
    top = 14 + 28 + 19 * len(lines) + 14 + (44 if menu else 0) + extra_top
    fig.update_layout(
        template=TEMPLATE, height=height + top - 90, margin=dict(t=top),
        title=dict(text=title, subtitle=dict(text="<br>".join(lines), font=dict(size=13, color="#555555"))),
    )
    return fig


def wrap(text: str, width: int = 118) -> list[str]:
    """Plotly does not wrap titles: break a subtitle into lines of at most `width` characters."""
    if not text:
        return []
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line]


def _menu(buttons: list[dict], active: int = 0, above: int = 0) -> dict:
    """A dropdown at the top left, just above the plot area (`above`: extra pixels, e.g. for subplot titles)."""
    return dict(buttons=buttons, active=active, direction="down", x=0.0, xanchor="left", y=1.0, yanchor="bottom",
                pad=dict(b=8 + above, l=0), showactive=True, bgcolor="white", bordercolor="#BBBBBB",
                font=dict(size=13))


def _require(table: pd.DataFrame | None, name: str) -> pd.DataFrame:
    if table is None or table.empty:
        raise FactscopeError(f"this figure needs {name}, which the run directory does not have")
    return table


def _dash(index: int) -> str:
    return DASHES[(index // len(QUALITATIVE)) % len(DASHES)]


def _color(index: int) -> str:
    return QUALITATIVE[index % len(QUALITATIVE)]


def _layer_ticks(layers: pd.Series) -> dict:
    """Integer ticks for a layer axis: every layer when there are few, else about ten."""
    n = int(pd.Series(layers).max()) + 1 if len(layers) else 1
    return dict(tick0=0, dtick=max(1, round(n / 10)))


def _log_dtick(values: pd.Series) -> int | None:
    """Ticks at powers of ten on a log axis spanning more than a decade; plotly's own otherwise."""
    values = pd.Series(values).dropna()
    values = values[values > 0]
    return 1 if len(values) and values.max() / values.min() >= 10 else None


def display_token(token: str) -> str:
    """A tokenizer's raw token as text: byte-level BPE's Ġ and SentencePiece's ▁ are spaces, Ċ a newline."""
    return str(token).replace("Ġ", " ").replace("▁", " ").replace("Ċ", "↵").replace("ĉ", "⇥")


# ---------------------------------------------------------------------------------------------------------------
# Shared data preparation (interactive and static figures use the same numbers)


def model_shape(run: Run) -> tuple[int, int]:
    heads = _require(run.heads, "heads.csv")
    return int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1


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


def share_table(run: Run, metric: str = "logit_diff") -> pd.DataFrame:
    """Per relation ("all" first) and mechanism: mean contribution, share and n_prompts (mechanisms.csv)."""
    table = _require(run.mechanisms, "mechanisms.csv")
    table = table[table["metric"] == metric]
    relations = ["all", *sorted(r for r in table["relation"].unique() if r != "all")]
    table = table.assign(relation=pd.Categorical(table["relation"], relations, ordered=True))
    return table.sort_values(["relation", "mechanism"]).reset_index(drop=True)


def additive_table(run: Run, metric: str = "logit_diff") -> pd.DataFrame:
    """Pooled mean contribution of each mechanism in display order, with its running start (for floating bars)."""
    table = share_table(run, metric)
    pooled = table[table["relation"] == "all"].set_index("mechanism").reindex(list(MECHANISM_ORDER))
    pooled = pooled.fillna({"mean_value": 0.0, "share": 0.0})
    pooled["start"] = pooled["mean_value"].cumsum() - pooled["mean_value"]
    return pooled.reset_index()


def lens_table(run: Run) -> pd.DataFrame:
    """Logit lens per relation and pooled ("all"): median rank and mean probability of a after each layer."""
    lens = _require(run.logit_lens, "logit_lens.parquet")
    recall = _require(run.recall, "recall.csv")[["prompt_id", "relation"]].astype({"prompt_id": str})
    lens = lens.astype({"prompt_id": str}).merge(recall, on="prompt_id", how="left")
    stats = {"median_rank": ("rank", "median"), "mean_prob": ("prob", "mean"), "n_prompts": ("prompt_id", "nunique")}
    pooled = lens.groupby("layer").agg(**stats).reset_index().assign(relation="all")
    per_relation = lens.groupby(["relation", "layer"]).agg(**stats).reset_index()
    return pd.concat([pooled, per_relation], ignore_index=True)


def heatmap_arrays(run: Run) -> dict[str, np.ndarray]:
    """layer × head arrays of mean DLA to a: all sources, SUBJECT, RELATION; and the class letters."""
    heads = _require(run.heads, "heads.csv")
    n_layers, n_heads = model_shape(run)
    out = {}
    total = heads["subject_dla"] + heads["relation_dla"] + heads["other_dla"]
    for key, values in (("total", total), ("subject", heads["subject_dla"]), ("relation", heads["relation_dla"])):
        grid = np.full((n_layers, n_heads), np.nan)
        grid[heads["layer"], heads["head"]] = values
        out[key] = grid
    letters = np.full((n_layers, n_heads), "", dtype=object)
    letters[heads["layer"], heads["head"]] = heads["class"].map(CLASS_LETTERS).fillna("")
    out["letters"] = letters
    return out


def part_label(component: str, layer: int, head: int, source: str) -> str:
    if component == "attn":
        return f"L{layer}H{head} ← {source}"
    if component == "mlp":
        return f"MLP {layer}"
    if component == "bias":
        return f"attn bias L{layer}"
    return {"embed": "token embedding", "pos_embed": "position embedding", "unembed_bias": "unembedding bias"}.get(
        component, component
    )


def part_mechanisms(parts: pd.DataFrame, heads: pd.DataFrame | None) -> pd.Series:
    """The mechanism of each attribution row (same partition as mechanisms.mechanism_parts)."""
    mechanism = pd.Series(np.where(parts["component"] == "mlp", "mlps", "embed_bias"), index=parts.index, dtype=object)
    attn = parts["component"] == "attn"
    if heads is not None:
        classes = heads.set_index(["layer", "head"])["class"]
        keys = pd.MultiIndex.from_frame(parts.loc[attn, ["layer", "head"]])
        klass = classes.reindex(keys).to_numpy()
        mapped = [HEAD_MECHANISM.get((c, s), "other_heads") for c, s in zip(klass, parts.loc[attn, "source"])]
        mechanism[attn] = mapped
    else:
        mechanism[attn] = "other_heads"
    return mechanism


def drilldown_table(run: Run, n_top: int = 15, max_prompts: int = 150) -> pd.DataFrame:
    """Per analysed prompt (at most `max_prompts`, spread over relations), its `n_top` parts by |DLA to a|."""
    parts = run.correct_parts()
    if parts is None or parts.empty:
        raise FactscopeError("this figure needs attributions.parquet, which the run directory does not have")
    keep = drilldown_prompts(run, max_prompts)
    parts = parts[parts["prompt_id"].isin(keep)].copy()
    parts["magnitude"] = parts["value"].abs()
    parts = parts.sort_values(["prompt_id", "magnitude"], ascending=[True, False], kind="stable")
    top = parts.groupby("prompt_id", sort=False).head(n_top).copy()
    top["label"] = [part_label(*row) for row in top[["component", "layer", "head", "source"]].itertuples(index=False)]
    top["mechanism"] = part_mechanisms(top, run.heads).to_numpy()
    return top.drop(columns="magnitude")


def drilldown_prompts(run: Run, max_prompts: int) -> list[str]:
    """Analysed prompt ids in dataset order; round-robin over relations when there are more than `max_prompts`."""
    recall = _require(run.recall, "recall.csv").astype({"prompt_id": str})
    analysed = set(run.correct_parts()["prompt_id"].unique())
    rows = recall[recall["prompt_id"].isin(analysed)]
    if len(rows) <= max_prompts:
        return rows["prompt_id"].tolist()
    rows = rows.assign(turn=rows.groupby("relation").cumcount())
    chosen = set(rows.sort_values(["turn"], kind="stable")["prompt_id"].head(max_prompts))
    return [p for p in rows["prompt_id"] if p in chosen]


def specificity_heads(run: Run, relation: str, n: int = 2) -> list[tuple[str, int, int, str]]:
    """The relation's strongest subject heads (by their SUBJECT DLA on it) and relation heads (RELATION DLA):
    [(class, layer, head, source)]. Heads keep their pooled class; within it they are ranked on this relation."""
    heads = _require(run.heads, "heads.csv")
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
    return _require(run.class_sweep, "head_class_sweep.csv")


# ---------------------------------------------------------------------------------------------------------------
# Interactive figures


def fig_headline(run: Run, metric: str = "logit_diff") -> go.Figure:
    """The additive story in one picture: each mechanism's pooled mean contribution, stacked up to the total."""
    table = additive_table(run, metric)
    total = float(table["mean_value"].sum())
    labels = [MECHANISM_LABELS[m].replace(" · ", "<br>").replace("embeddings + biases", "embeddings<br>+ biases")
              .replace("other head parts", "other<br>head parts") for m in table["mechanism"]]
    fig = go.Figure()
    fig.add_bar(
        x=labels, y=table["mean_value"], base=table["start"],
        marker=dict(color=[MECHANISM_COLORS[m] for m in table["mechanism"]], line=dict(width=0)),
        text=[f"{v:+.2f}<br>({s:.0%})" for v, s in zip(table["mean_value"], table["share"])],
        textposition="outside", cliponaxis=False, showlegend=False,
        customdata=np.stack([table["share"], table["alone_ranks_first"].fillna(np.nan)], axis=1),
        hovertemplate="<b>%{x}</b><br>mean contribution %{y:+.3f} logits<br>share %{customdata[0]:.1%}"
        "<br>ranks a first on its own: %{customdata[1]:.0%} of prompts<extra></extra>",
    )
    fig.add_bar(
        x=["total"], y=[total], marker=dict(color="#222222"), text=[f"{total:.2f}"], textposition="outside",
        cliponaxis=False, showlegend=False, hovertemplate="total %{y:.3f} logits<extra></extra>",
    )
    fig.add_hline(y=0, line=dict(color="#888888", width=1))
    model = run.summary.get("model", "?")
    _style(
        fig, f"How the parts add up — {model}",
        f"Mean over {_n_analysed(run)} analysed prompts of each mechanism's contribution to {METRIC_LABELS[metric]} "
        "(logits); bars float from the running sum, labels give the share of the total.",
        height=500,
    )
    fig.update_layout(barmode="overlay", bargap=0.25)
    fig.update_yaxes(title_text=f"{METRIC_LABELS[metric]} (logits)")
    fig.update_xaxes(tickangle=0, showgrid=False)
    return fig


def fig_recall(run: Run) -> go.Figure:
    """Recall@1 by relation (bars) and the mean probability of the attribute (diamonds)."""
    recall = _require(run.recall, "recall.csv")
    table = recall.groupby("relation").agg(accuracy=("correct", "mean"), n=("correct", "size"), correct=("correct", "sum"),
                                           mean_prob=("prob", "mean")).reset_index().sort_values("accuracy")
    fig = go.Figure()
    fig.add_bar(
        y=table["relation"], x=table["accuracy"], orientation="h", name="recall@1", marker_color="#6E6E6E",
        customdata=np.stack([table["correct"], table["n"]], axis=1),
        hovertemplate="<b>%{y}</b><br>%{customdata[0]} of %{customdata[1]} correct (%{x:.0%})<extra></extra>",
    )
    fig.add_scatter(
        y=table["relation"], x=table["mean_prob"], mode="markers", name="mean p(a)",
        marker=dict(symbol="diamond", size=11, color="#E69F00", line=dict(color="#222222", width=1)),
        hovertemplate="<b>%{y}</b><br>mean p(a) = %{x:.3f}<extra></extra>",
    )
    _style(fig, "Which facts the model knows", "Fraction of prompts whose attribute is the top-1 next token, per relation.",
           height=max(360, 26 * len(table) + 170))
    fig.update_xaxes(title_text="recall@1 · mean p(a)", range=[0, 1.02], tickformat=".0%")
    fig.update_layout(legend=dict(orientation="h", y=-0.18, x=0))
    return fig


def fig_signature(run: Run, label_top: int = 3) -> go.Figure:
    """Every head as a point: mean DLA to a read from the SUBJECT tokens against that read from RELATION.

    A dropdown switches both axes to a signed square root, which spreads out the crowd of small heads near 0.
    """
    heads = _require(run.heads, "heads.csv")
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
    labelled = [(name, heads[heads["name"] == head].iloc[0]) for name in ("subject", "relation", "mixed")
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
    _style(fig, "The signature: subject heads, relation heads, mixed heads", subtitle, height=620, menu=True)
    fig.update_layout(legend=dict(title_text="class (heads)", orientation="v", x=1.01, y=1, xanchor="left"),
                      updatemenus=[_menu(buttons)], **_nested({k: v for k, v in linear[1].items() if "tick" not in k}))
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
    """Layer × head heatmaps of mean DLA to a: all sources, from SUBJECT, from RELATION; letters mark classes."""
    arrays = heatmap_arrays(run)
    n_layers, n_heads = model_shape(run)
    limit = float(np.nanmax(np.abs([arrays["total"], arrays["subject"], arrays["relation"]]))) or 1.0
    titles = ("all sources (S/R/M = class)", "read from SUBJECT", "read from RELATION")
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.035, subplot_titles=titles)
    layers, head_index = np.arange(n_layers), np.arange(n_heads)
    text_size = max(7, min(12, int(300 / max(n_heads, 1))))
    for col, key in enumerate(("total", "subject", "relation"), start=1):
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
    _style(fig, "Where the correct attribute comes from, head by head",
           "Mean DLA to a over analysed prompts; blue raises a, red lowers it. Layer 0 at the bottom.",
           height=max(460, 17 * n_layers + 190), extra_top=24)
    return fig


def fig_mechanism_shares(run: Run) -> go.Figure:
    """Per relation: each mechanism's share of a − mean(R∖a) (dropdown: of the logit of a), stacked."""
    fig = go.Figure()
    metrics = ("logit_diff", "logit")
    n_traces = {}
    for metric in metrics:
        table = share_table(run, metric)
        counts = table.groupby("relation", observed=True)["n_prompts"].max()
        labels = {r: f"<b>all</b> (n={counts[r]})" if r == "all" else f"{r} (n={counts[r]})" for r in counts.index}
        n_traces[metric] = 0
        for mechanism in MECHANISM_ORDER:
            rows = table[table["mechanism"] == mechanism]
            if rows.empty:
                continue
            fig.add_bar(
                y=[labels[r] for r in rows["relation"]], x=rows["share"], orientation="h",
                name=MECHANISM_LABELS[mechanism], marker_color=MECHANISM_COLORS[mechanism],
                visible=metric == "logit_diff", legendgroup=mechanism,
                customdata=np.stack([rows["mean_value"], rows["alone_ranks_first"]], axis=1),
                hovertemplate="<b>%{y}</b> · " + MECHANISM_LABELS[mechanism] + "<br>share %{x:.1%}"
                "<br>mean contribution %{customdata[0]:+.3f} logits"
                "<br>alone ranks a first on %{customdata[1]:.0%} of prompts<extra></extra>",
            )
            n_traces[metric] += 1
    buttons = []
    for metric in metrics:
        visible = [m == metric for m in metrics for _ in range(n_traces[m])]
        buttons.append(dict(label=f"share of {METRIC_LABELS[metric]}", method="update", args=[{"visible": visible}]))
    n_rel = len(share_table(run)["relation"].unique())
    _style(fig, "Mechanism shares by relation",
           "Mean contribution / mean total; shares add to 100%, a negative share is destructive interference. "
           "Hover a segment for its mean contribution in logits.", height=max(440, 30 * n_rel + 260), menu=True)
    fig.update_layout(
        barmode="relative", bargap=0.3,
        legend=dict(orientation="v", y=1, x=1.01, xanchor="left", yanchor="top", traceorder="normal"),
        updatemenus=[_menu(buttons)],
    )
    fig.add_vline(x=1.0, line=dict(color="#444444", dash="dot", width=1))
    fig.update_xaxes(title_text="share (dotted: 100%, the total)", tickformat=".0%", zeroline=True,
                     zerolinecolor="#444444", zerolinewidth=1)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return fig


def fig_logit_lens(run: Run) -> go.Figure:
    """After each layer, the residual at END read through the unembedding: median rank and mean p of a."""
    table = lens_table(run)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.09,
                        subplot_titles=("median rank of a (1 = top)", "mean probability of a"))
    relations = [r for r in table["relation"].dropna().unique() if r != "all"]
    for index, relation in enumerate([*relations, "all"]):
        rows = table[table["relation"] == relation]
        pooled = relation == "all"
        line = dict(color="#111111", width=4) if pooled else dict(color=_color(index), width=1.6, dash=_dash(index))
        name = f"all ({int(rows['n_prompts'].max())} prompts)" if pooled else relation
        for col, column in ((1, "median_rank"), (2, "mean_prob")):
            fig.add_scatter(
                x=rows["layer"], y=rows[column], mode="lines" if rows["layer"].nunique() > 3 else "lines+markers", line=line, name=name, legendgroup=relation,
                showlegend=col == 1, opacity=1.0 if pooled else 0.85,
                hovertemplate=f"<b>{relation}</b> · layer %{{x}}<br>{column.replace('_', ' ')} %{{y:.3g}}<extra></extra>",
                row=1, col=col,
            )
    fig.update_yaxes(type="log", autorange="reversed", dtick=_log_dtick(table["median_rank"]),
                     title_text="median rank of a (log scale)", row=1, col=1)
    fig.update_yaxes(title_text="mean p(a)", range=[0, 1], row=1, col=2)
    fig.update_xaxes(title_text="layer (residual stream after it)", **_layer_ticks(table["layer"]))
    _style(fig, "Logit lens: when does the answer appear?",
           "The residual stream at END after each layer, normalised and unembedded; thick black: all analysed prompts.",
           height=520, extra_top=24)
    fig.update_layout(legend=dict(x=1.01, y=1, xanchor="left", font=dict(size=12)))
    return fig


def fig_specificity(run: Run, relation: str | None = None, n: int = 2) -> go.Figure:
    """For a relation (dropdown), its strongest subject and relation heads: DLA of the head's own part to every
    attribute of R_r (columns) on every prompt (rows); the correct attribute of each prompt is outlined."""
    table = specificity_table(run, n)
    if table.empty:
        raise FactscopeError("no subject or relation heads: nothing to show for specificity")
    relations = sorted(table["relation"].unique())
    relation = relation if relation in relations else _default_relation(table, relations)
    subjects = _require(run.recall, "recall.csv").astype({"prompt_id": str}).set_index("prompt_id")["subject"]
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
    _style(fig, "Specificity: what the strongest heads write, attribute by attribute",
           "DLA of each head's own part to every attribute of the relation (columns) on each prompt (rows); "
           "□ marks the prompt's correct attribute. A subject head lights up the outlined cells, a relation head "
           "whole columns.", height=max(420, 22 * n_rows + 230), menu=True, extra_top=40)
    fig.update_layout(
        coloraxis=dict(colorscale=DIVERGING, cmid=0, colorbar=dict(title=dict(text="DLA<br>(logits)", side="top"), thickness=14)),
        updatemenus=[_menu(buttons, relations.index(relation), above=40)],
        margin=dict(b=100),
    )
    fig.update_xaxes(tickangle=-45, showgrid=False, ticks="", tickfont=dict(size=11))
    fig.update_yaxes(showgrid=False, ticks="", tickfont=dict(size=11))
    fig.update_layout(**_nested(layout_for(relation)), annotations=annotations_for(relation))
    return fig


def _default_relation(table: pd.DataFrame, relations: Sequence[str]) -> str:
    """The relation with the most analysed prompts (ties: alphabetical)."""
    counts = table[table["is_correct_target"]].groupby("relation")["prompt_id"].nunique()
    return str(counts.reindex(relations).fillna(0).sort_values(ascending=False, kind="stable").index[0])


def _nested(flat: dict) -> dict:
    """{"xaxis2.range": r} → {"xaxis2": {"range": r}} for update_layout."""
    out: dict = {}
    for key, value in flat.items():
        target = out
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    return out


def fig_mlp_boosting(run: Run) -> go.Figure:
    """Per MLP layer at END: DLA to a, breadth (mean DLA over all of R_r) and specificity (a − mean(R∖a))."""
    table = _require(run.mlp_boosting, "mlp_boosting.csv")
    relations = ["all", *sorted(r for r in table["relation"].unique() if r != "all")]
    fig = go.Figure()
    series = (
        ("breadth", "breadth: mean DLA over R_r", "#8FD3B8", "bar"),
        ("specificity", "specificity: a − mean(R∖a)", "#00664A", "bar"),
        ("correct_dla", "DLA to a", "#111111", "line"),
    )
    for relation in relations:
        rows = table[table["relation"] == relation]
        for column, name, color, kind in series:
            common = dict(x=rows["layer"], y=rows[column], name=name, visible=relation == "all", legendgroup=column,
                          hovertemplate=f"MLP %{{x}} · {name}<br>%{{y:+.3f}} logits<extra>{relation}</extra>")
            if kind == "bar":
                fig.add_bar(marker_color=color, **common)
            else:
                fig.add_scatter(mode="lines+markers", line=dict(color=color, width=2), marker=dict(size=5), **common)
    buttons = []
    for index, relation in enumerate(relations):
        visible = [i // len(series) == index for i in range(len(relations) * len(series))]
        buttons.append(dict(label=relation, method="update", args=[{"visible": visible}]))
    _style(fig, "MLP boosting: broad or specific?",
           "Mean over analysed prompts, per MLP layer at END. Breadth ≫ specificity: the MLP raises every attribute "
           "of the relation, not just the right one. Choose a relation in the dropdown.", height=500, menu=True)
    fig.update_layout(
        barmode="group", bargap=0.2,
        legend=dict(orientation="h", y=1.0, x=1.0, xanchor="right", yanchor="bottom"),
        updatemenus=[_menu(buttons)],
    )
    fig.update_xaxes(title_text="MLP layer", showgrid=False, **_layer_ticks(table["layer"]))
    fig.update_yaxes(title_text="DLA (logits)", zeroline=True, zerolinecolor="#444444")
    return fig


def fig_k_sweep(run: Run) -> go.Figure:
    """Head-class counts against the dominance ratio k, one panel per significance z: how arbitrary is the cut?"""
    sweep = sweep_table(run)
    rule = run.summary.get("head_class_rule", {})
    zs = sorted(sweep["z"].unique())
    fig = make_subplots(rows=1, cols=len(zs), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"z = {z:g}" + (" (used)" if math.isclose(z, rule.get("z", -1)) else "") for z in zs])
    for col, z in enumerate(zs, start=1):
        rows = sweep[sweep["z"] == z]
        for name in ("subject", "relation", "mixed"):
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
    _style(fig, "Do the classes depend on the thresholds?",
           "Class counts as the dominance ratio k (S ≥ k·R ⇒ subject) and the significance z (robust z-score "
           "against all heads) vary; dotted: the k used.", height=440, extra_top=24)
    fig.update_layout(legend=dict(orientation="h", y=-0.22, x=0))
    return fig


def fig_drilldown(run: Run, n_top: int = 15, max_prompts: int = 150) -> go.Figure:
    """Choose a prompt (dropdown): its tokens coloured by group, and its top parts by |DLA to a|, with each
    part's a − mean(R∖a) as a diamond."""
    top = drilldown_table(run, n_top, max_prompts)
    tokens = _require(run.tokens, "tokens.parquet").astype({"prompt_id": str})
    recall = _require(run.recall, "recall.csv").astype({"prompt_id": str}).set_index("prompt_id")
    prompts = list(dict.fromkeys(p for p in recall.index if p in set(top["prompt_id"])))
    n_rows = int(top.groupby("prompt_id").size().max())
    plot_height = 26 * n_rows + 150
    fig = make_subplots(rows=2, cols=1, row_heights=[44 / plot_height, 1 - 44 / plot_height], vertical_spacing=70 / plot_height)
    for group, color in GROUP_COLORS.items():  # legend entries that stay put whichever prompt is shown
        fig.add_bar(x=[None], y=[None], name=f"token: {group}", marker_color=color, legendgroup="tokens",
                    legendgrouptitle_text="tokens", row=1, col=1)
    for mechanism in MECHANISM_ORDER:
        fig.add_bar(x=[None], y=[None], name=MECHANISM_LABELS[mechanism], marker_color=MECHANISM_COLORS[mechanism],
                    legendgroup="parts", legendgrouptitle_text="parts (bars: DLA to a)", row=2, col=1)
    fig.add_scatter(x=[None], y=[None], mode="markers", name="a − mean(R∖a)", legendgroup="parts",
                    marker=dict(symbol="diamond", color="#111111", size=9), row=2, col=1)
    n_fixed = len(fig.data)
    states = []
    for index, prompt in enumerate(prompts):
        row = recall.loc[prompt]
        toks = tokens[tokens["prompt_id"] == prompt].sort_values("position")
        shown = [display_token(t) for t in toks["token"]]
        widths = np.array([max(len(t.strip()), 1) + 1.2 for t in shown], dtype=float)
        starts = np.concatenate([[0.0], np.cumsum(widths)[:-1]])
        fig.add_bar(
            x=widths, base=starts, y=np.zeros(len(toks)), orientation="h", showlegend=False, visible=index == 0,
            marker=dict(color=[GROUP_COLORS.get(g, "#FFFFFF") for g in toks["group"]],
                        line=dict(color=["#111111" if e else "#FFFFFF" for e in toks["is_end"]],
                                  width=[2.5 if e else 1 for e in toks["is_end"]])),
            text=[t.strip() or "␣" for t in shown], textposition="inside", insidetextanchor="middle",
            textfont=dict(family=MONO, size=14, color="#111111"), constraintext="none",
            customdata=np.stack([toks["group"], toks["position"], [repr(t) for t in shown], toks["is_end"]], axis=1),
            hovertemplate="position %{customdata[1]} · %{customdata[0]}<br>token %{customdata[2]}<extra></extra>",
            row=1, col=1,
        )
        parts = top[top["prompt_id"] == prompt].reset_index(drop=True)
        ypos = np.arange(len(parts))
        custom = np.stack([parts["label"], parts["mechanism"].map(MECHANISM_LABELS), parts["logit_diff"]], axis=1)
        fig.add_bar(
            x=parts["value"], y=ypos, orientation="h", showlegend=False, visible=index == 0,
            marker=dict(color=[MECHANISM_COLORS[m] for m in parts["mechanism"]]), customdata=custom,
            hovertemplate="<b>%{customdata[0]}</b> (%{customdata[1]})<br>DLA to a %{x:+.3f} logits"
            "<br>a − mean(R∖a) %{customdata[2]:+.3f}<extra></extra>", row=2, col=1,
        )
        fig.add_scatter(
            x=parts["logit_diff"], y=ypos, mode="markers", showlegend=False, visible=index == 0,
            marker=dict(symbol="diamond", color="#111111", size=9, line=dict(color="white", width=1)),
            hoverinfo="skip", row=2, col=1,
        )
        title = f"“{row['prompt']}” → <b>{row['attribute']}</b>  ·  p(a) = {row['prob']:.2f}, rank {int(row['rank'])}"
        states.append(dict(labels=parts["label"].tolist(), width=float(widths.sum()), title=title))
    n_per = 3

    def layout_for(index: int) -> dict:
        state = states[index]
        return {
            "yaxis2.tickvals": list(range(len(state["labels"]))), "yaxis2.ticktext": state["labels"],
            "yaxis2.range": [len(state["labels"]) - 0.5, -0.6], "xaxis.range": [0, state["width"]],
            "title.text": state["title"],
        }

    buttons = []
    for index, prompt in enumerate(prompts):
        visible = [True] * n_fixed + [i // n_per == index for i in range(len(prompts) * n_per)]
        row = recall.loc[prompt]
        buttons.append(dict(label=f"{row['relation']}: {row['subject']}", method="update",
                            args=[{"visible": visible}, layout_for(index)]))
    _style(fig, states[0]["title"] if states else "", f"Top {n_top} parts by |DLA to a| (bars, logits); diamonds: "
           "the same part's a − mean(R∖a). Tokens coloured by group; outlined: END.", height=plot_height + 90, menu=True)
    fig.update_layout(
        barmode="overlay", bargap=0.15,
        title=dict(font=dict(size=16)),
        legend=dict(x=1.01, y=1, xanchor="left", groupclick="toggleitem", font=dict(size=12)),
        updatemenus=[_menu(buttons)],
        margin=dict(l=160),
    )
    fig.update_xaxes(visible=False, row=1, col=1)
    fig.update_yaxes(visible=False, range=[-0.5, 0.5], row=1, col=1)
    fig.update_xaxes(title_text="contribution (logits)", zeroline=True, zerolinecolor="#444444", row=2, col=1)
    fig.update_yaxes(showgrid=False, row=2, col=1)
    if states:
        fig.update_layout(**_nested(layout_for(0)))
    return fig


def fig_subject_swap(run: Run) -> go.Figure:
    """How far each classified head's own part moves when the subject is swapped for another of the relation."""
    swap = _require(run.subject_swap, "subject_swap.csv")
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
    _style(fig, "Subject swap: do relation heads ignore the subject?",
           "Mean |Δ DLA| / mean |DLA| of each head's own part when the subject is replaced by another of the same "
           "relation (over prompts × R_r). Relation heads should stay near 0.", height=480)
    fig.update_yaxes(title_text="relative change of DLA", rangemode="tozero")
    fig.update_layout(showlegend=False)
    return fig


# ---- causal checks (tables written by `causal`; each function is small so it can follow their columns) ----


def fig_knockout(run: Run) -> go.Figure:
    """knockout.csv: relative change of p(a) when END may not attend to a group, for a window of layers."""
    table = _require(run.knockout, "knockout.csv")
    windows = table[table["condition"] == "window"] if "condition" in table else table
    fig = go.Figure()
    for index, (blocked, rows) in enumerate(windows.groupby("blocked", sort=True)):
        rows = rows.sort_values("layer")
        color = SOURCE_COLORS.get(blocked, _color(index))
        fig.add_scatter(
            x=rows["layer"], y=100 * rows["rel_change_p"], mode="lines+markers", name=f"END ↛ {blocked}",
            line=dict(color=color, width=2.5), customdata=np.stack([rows["first_layer"], rows["last_layer"]], axis=1),
            hovertemplate="layers %{customdata[0]}–%{customdata[1]} blocked<br>Δp(a) %{y:+.1f}%<extra>" + blocked + "</extra>",
        )
    fig.add_hline(y=0, line=dict(color="#444444", width=1))
    width = int((windows["last_layer"] - windows["first_layer"]).max() + 1) if len(windows) else 0
    _style(fig, "Attention knockout", f"Mean relative change of p(a) when END's attention to a token group is cut "
           f"in a window of {width} layers centred on the layer on the x axis.", height=440)
    fig.update_xaxes(title_text="window centre (layer)", **_layer_ticks(windows["layer"]))
    fig.update_yaxes(title_text="relative change of p(a) (%)")
    return fig


def fig_ablations(run: Run, metric: str = "logit_diff") -> go.Figure:
    """ablations.csv: change of a − mean(R∖a) when mechanisms are removed alone, in pairs and together, against
    the sum of their single effects (the gap is the interaction term)."""
    table = _require(run.ablations, "ablations.csv")
    table = table[table["mechanism_set"] != "none"]
    fig = go.Figure()
    fig.add_bar(
        x=table["mechanism_set"], y=table[f"delta_{metric}"], name="observed change", marker_color="#0072B2",
        customdata=np.stack([table["accuracy"], table.get(f"interaction_{metric}", np.nan)], axis=1),
        hovertemplate="<b>%{x}</b><br>Δ %{y:+.3f} logits<br>accuracy %{customdata[0]:.0%}"
        "<br>interaction %{customdata[1]:+.3f}<extra></extra>",
    )
    if f"sum_alone_delta_{metric}" in table:
        fig.add_scatter(x=table["mechanism_set"], y=table[f"sum_alone_delta_{metric}"], mode="markers",
                        name="sum of single removals", marker=dict(symbol="diamond", size=12, color="#D55E00"),
                        hovertemplate="sum of single effects %{y:+.3f}<extra></extra>")
    _style(fig, "Ablations: are the mechanisms additive?", f"Change of {METRIC_LABELS.get(metric, metric)} when the "
           "mechanisms are removed; where the diamond meets the bar the effects add up (interaction ≈ 0).", height=480)
    fig.update_yaxes(title_text=f"Δ {METRIC_LABELS.get(metric, metric)} (logits)")
    fig.update_xaxes(tickangle=-30)
    fig.update_layout(legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig


TRACE_ORDER = ("first_subject", "mid_subject", "last_subject", "first_subsequent", "further_tokens", "last_token",
               "bos", "prefix", "subject", "relation")


def fig_causal_trace(run: Run) -> go.Figure:
    """causal_trace.parquet: indirect effect of restoring one clean state (residual, attention or MLP window)."""
    table = _require(run.causal_trace, "causal_trace.parquet")
    if "level" in table and (table["level"] == "position").any():
        table = table[table["level"] == "position"]
    kinds = [k for k in ("resid", "attn", "mlp") if k in set(table["kind"])]
    fig = make_subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[{"resid": "residual stream", "attn": "attention (window)", "mlp": "MLP (window)"}[k] for k in kinds])
    tokens = [t for t in TRACE_ORDER if t in set(table["token"])] + sorted(set(table["token"]) - set(TRACE_ORDER))
    top = float(table["indirect_effect"].max()) or 1.0
    for col, kind in enumerate(kinds, start=1):
        grid = table[table["kind"] == kind].pivot_table(index="token", columns="layer", values="indirect_effect").reindex(tokens)
        fig.add_heatmap(z=grid.to_numpy(), x=grid.columns, y=tokens, coloraxis="coloraxis",
                        hovertemplate="%{y} · layer %{x}<br>indirect effect %{z:.3f}<extra>" + kind + "</extra>", row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col, **_layer_ticks(table["layer"]))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_layout(coloraxis=dict(colorscale="Purples", cmin=0, cmax=top, colorbar=dict(title=dict(text="Δp(a)", side="top"))))
    _style(fig, "Causal tracing", "Noise on the subject embeddings, one clean state restored: the recovered p(a).",
           height=max(360, 40 * len(tokens) + 200), extra_top=24)
    return fig


def fig_extraction_rate(run: Run) -> go.Figure:
    """extraction_rate.csv: fraction of prompts whose sublayer output at END, through the logit lens, has the
    model's top-1 prediction (solid) or the attribute a (dotted) at top-1."""
    table = _require(run.extraction_rate, "extraction_rate.csv")
    fig = go.Figure()
    colors = {"attn": CLASS_COLORS["relation"], "mlp": MECHANISM_COLORS["mlps"]}
    for sublayer, rows in table.groupby("sublayer"):
        rows = rows.sort_values("layer")
        color = colors.get(sublayer, "#444444")
        fig.add_scatter(x=rows["layer"], y=rows["extraction_rate"], mode="lines+markers", name=f"{sublayer}: prediction",
                        line=dict(color=color, width=2.5))
        if "attribute_rate" in rows:
            fig.add_scatter(x=rows["layer"], y=rows["attribute_rate"], mode="lines", name=f"{sublayer}: a",
                            line=dict(color=color, width=1.5, dash="dot"))
    _style(fig, "Attribute extraction rate", "Fraction of prompts where one sublayer's END output alone, "
           "unembedded, puts the prediction at top-1.", height=420)
    fig.update_xaxes(title_text="layer", **_layer_ticks(table["layer"]))
    fig.update_yaxes(title_text="extraction rate", tickformat=".0%", rangemode="tozero")
    return fig


def fig_enrichment(run: Run) -> go.Figure:
    """enrichment.csv: logit lens at the last SUBJECT token — median rank of a and of the rest of R_r by layer."""
    table = _require(run.enrichment, "enrichment.csv").sort_values("layer")
    fig = go.Figure()
    fig.add_scatter(x=table["layer"], y=table["median_rank_a"], mode="lines+markers", name="a",
                    line=dict(color=CLASS_COLORS["subject"], width=2.5))
    if "median_rank_others" in table:
        fig.add_scatter(x=table["layer"], y=table["median_rank_others"], mode="lines", name="R_r ∖ a (mean per prompt)",
                        line=dict(color="#777777", width=2, dash="dash"))
    _style(fig, "Subject enrichment", "Logit lens on the residual stream at the last subject token: median rank "
           "(1 = top) of the attribute.", height=420)
    fig.update_xaxes(title_text="layer", **_layer_ticks(table["layer"]))
    ranks = pd.concat([table["median_rank_a"], table.get("median_rank_others", table["median_rank_a"])])
    fig.update_yaxes(type="log", autorange="reversed", dtick=_log_dtick(ranks), title_text="median rank (log scale)")
    return fig


def fig_noise_robustness(run: Run) -> go.Figure:
    """noise_robustness.csv: accuracy as Gaussian noise on one mechanism's contribution (or on all) grows."""
    table = _require(run.noise_robustness, "noise_robustness.csv")
    fig = go.Figure()
    for index, (mechanism, rows) in enumerate(table.groupby("mechanism", sort=False)):
        rows = rows.sort_values("noise_scale")
        color = "#111111" if mechanism == "all" else MECHANISM_COLORS.get(mechanism, _color(index))
        fig.add_scatter(
            x=rows["noise_scale"], y=rows["accuracy"], mode="lines+markers", name=MECHANISM_LABELS.get(mechanism, mechanism),
            line=dict(color=color, width=3 if mechanism == "all" else 2),
            error_y=dict(type="data", array=rows["accuracy_std"], visible=True) if "accuracy_std" in rows else None,
        )
    _style(fig, "Robustness to noise", "Accuracy as Gaussian noise (norm = scale × the part's own norm) is added "
           "to one mechanism's contribution at END.", height=440)
    fig.update_xaxes(title_text="noise scale (× the part's norm)")
    fig.update_yaxes(title_text="recall@1", tickformat=".0%", range=[0, 1.02])
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Static figures (matplotlib) for papers and slides


def save_pngs(run: Run, folder: Path, dpi: int = 200) -> list[Path]:
    """figures/*.png: additivity, signature, DLA heatmap, mechanism shares, logit lens, k-sweep (those whose
    tables exist). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rc = {"font.size": 10, "axes.titlesize": 12, "axes.labelsize": 10, "axes.spines.top": False,
          "axes.spines.right": False, "legend.frameon": False, "figure.dpi": dpi, "savefig.bbox": "tight",
          "font.family": ["DejaVu Sans"]}
    makers = {
        "additivity": (_png_additivity, run.mechanisms),
        "signature": (_png_signature, run.heads),
        "dla_heatmap": (_png_heatmap, run.heads),
        "mechanism_shares": (_png_shares, run.mechanisms),
        "logit_lens": (_png_logit_lens, run.logit_lens),
        "k_sweep": (_png_k_sweep, run.class_sweep),
    }
    written = []
    with plt.rc_context(rc):
        for name, (maker, table) in makers.items():
            if table is None or table.empty:
                continue
            fig = maker(run, plt)
            path = folder / f"{name}.png"
            with atomic_path(path) as partial:
                fig.savefig(partial, format="png", dpi=dpi, facecolor="white")
            plt.close(fig)
            written.append(path)
    return written


def _png_additivity(run: Run, plt):
    table = additive_table(run)
    fig, ax = plt.subplots(figsize=(8.5, 4))
    short = {"subject_heads": "subject\nheads", "mixed_subject": "mixed ·\nSUBJECT",
             "mixed_relation": "mixed ·\nRELATION", "relation_heads": "relation\nheads", "mlps": "MLPs",
             "other_heads": "other\nhead parts", "embed_bias": "embeddings\n+ biases"}
    labels = [short.get(m, m) for m in table["mechanism"]] + ["total"]
    total = float(table["mean_value"].sum())
    colors = [MECHANISM_COLORS[m] for m in table["mechanism"]] + ["#222222"]
    ax.bar(labels, [*table["mean_value"], total], bottom=[*table["start"], 0.0], color=colors)
    for i, (v, s, b) in enumerate(zip(table["mean_value"], table["share"], table["start"])):
        up = v >= 0
        ax.annotate(f"{v:+.2f}\n({s:.0%})", (i, b + v if up else b + v), ha="center", va="bottom" if up else "top",
                    fontsize=8, xytext=(0, 2 if up else -2), textcoords="offset points")
    ends = np.concatenate([table["start"] + table["mean_value"], table["start"], [total, 0.0]])
    ax.set_ylim(min(0.0, ends.min()) - 0.12 * np.ptp(ends), ends.max() + 0.18 * np.ptp(ends))
    ax.annotate(f"{total:.2f}", (len(labels) - 1, total), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                textcoords="offset points")
    ax.axhline(0, color="#888888", lw=0.8)
    ax.set_ylabel("a − mean(R∖a) (logits)")
    ax.set_title(f"How the parts add up — {run.summary.get('model', '')}", loc="left")
    ax.tick_params(axis="x", labelsize=8.5)
    return fig


def _png_signature(run: Run, plt):
    heads = run.heads
    rule = run.summary.get("head_class_rule", {})
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    for name in reversed(CLASSES):
        members = heads[heads["class"] == name]
        if members.empty:
            continue
        ax.scatter(members["subject_dla"], members["relation_dla"], s=14 if name == "negligible" else 28,
                   color=CLASS_COLORS[name], alpha=0.6 if name == "negligible" else 0.9, linewidths=0.4,
                   edgecolors="white", label=f"{name} ({len(members)})", zorder=2 if name == "negligible" else 3)
    if "subject_threshold" in rule:
        ax.axvline(rule["subject_threshold"], color=CLASS_COLORS["subject"], ls=":", lw=1)
        ax.axhline(rule["relation_threshold"], color=CLASS_COLORS["relation"], ls=":", lw=1)
    for name in ("subject", "relation", "mixed"):
        for head in top_heads(heads, name, 3):
            row = heads[heads["name"] == head].iloc[0]
            ax.annotate(head, (row["subject_dla"], row["relation_dla"]), xytext=(4, 2), textcoords="offset points",
                        fontsize=7.5, color=CLASS_COLORS[name])
    ax.axhline(0, color="#BBBBBB", lw=0.6, zorder=1)
    ax.axvline(0, color="#BBBBBB", lw=0.6, zorder=1)
    ax.set_xlabel("SUBJECT DLA (logits)")
    ax.set_ylabel("RELATION DLA (logits)")
    ax.set_title("Heads by where they read the answer from", loc="left")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], title="class", loc="upper right", fontsize=8, title_fontsize=8)
    return fig


def _png_heatmap(run: Run, plt):
    arrays = heatmap_arrays(run)
    n_layers, n_heads = model_shape(run)
    limit = float(np.nanmax(np.abs([arrays["total"], arrays["subject"], arrays["relation"]]))) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(9, max(3.5, 0.16 * n_layers + 1.2)), sharey=True)
    for ax, key, title in zip(axes, ("total", "subject", "relation"), ("all sources", "from SUBJECT", "from RELATION")):
        image = ax.imshow(arrays[key], cmap="RdBu", vmin=-limit, vmax=limit, origin="lower", aspect="auto",
                          interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head")
        if key == "total" and n_heads * n_layers <= 1200:
            for (layer, head), letter in np.ndenumerate(arrays["letters"]):
                if letter:
                    dark = abs(arrays["total"][layer, head]) > 0.55 * limit
                    ax.text(head, layer, letter, ha="center", va="center", fontsize=5.5,
                            color="white" if dark else "#111111")
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="DLA to a (logits)")
    fig.suptitle("Mean DLA to the correct attribute, per head", x=0.05, ha="left", fontsize=12)
    return fig


def _png_shares(run: Run, plt):
    table = share_table(run)
    relations = list(table["relation"].cat.categories[table["relation"].cat.categories.isin(table["relation"].unique())])
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(relations) + 1.6))
    y = np.arange(len(relations))
    pos_left, neg_left = np.zeros(len(relations)), np.zeros(len(relations))
    for mechanism in MECHANISM_ORDER:
        shares = table[table["mechanism"] == mechanism].set_index("relation")["share"].reindex(relations).fillna(0).to_numpy()
        left = np.where(shares >= 0, pos_left, neg_left)
        ax.barh(y, shares, left=left, color=MECHANISM_COLORS[mechanism], label=MECHANISM_LABELS[mechanism], height=0.7)
        pos_left += np.where(shares >= 0, shares, 0)
        neg_left += np.where(shares < 0, shares, 0)
    ax.set_yticks(y, relations)
    ax.invert_yaxis()
    ax.axvline(0, color="#444444", lw=0.8)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.set_xlabel("share of a − mean(R∖a)")
    ax.set_title("Mechanism shares by relation", loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def _png_logit_lens(run: Run, plt):
    table = lens_table(run)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    relations = [r for r in table["relation"].dropna().unique() if r != "all"]
    styles = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}
    for index, relation in enumerate([*relations, "all"]):
        rows = table[table["relation"] == relation]
        pooled = relation == "all"
        style = dict(color="#111111", lw=2.8) if pooled else dict(color=_color(index), lw=1.1, ls=styles[_dash(index)])
        left.plot(rows["layer"], rows["median_rank"], label=relation, **style)
        right.plot(rows["layer"], rows["mean_prob"], **style)
    left.set_yscale("log")
    left.invert_yaxis()
    left.yaxis.set_major_formatter(plt.FuncFormatter(_plain_number))
    left.set_ylabel("median rank of a (log)")
    right.set_ylabel("mean p(a)")
    right.set_ylim(0, 1)
    for ax in (left, right):
        ax.set_xlabel("layer")
    left.set_title("Logit lens at END", loc="left")
    handles, labels = left.get_legend_handles_labels()
    right.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7.5)
    return fig


def _png_k_sweep(run: Run, plt):
    sweep = sweep_table(run)
    rule = run.summary.get("head_class_rule", {})
    zs = sorted(sweep["z"].unique())
    fig, axes = plt.subplots(1, len(zs), figsize=(3.2 * len(zs), 3.2), sharey=True, squeeze=False)
    for ax, z in zip(axes[0], zs):
        rows = sweep[sweep["z"] == z]
        for name in ("subject", "relation", "mixed"):
            line = rows[rows["class"] == name].sort_values("k")
            ax.plot(line["k"], line["count"], marker="o", ms=3.5, color=CLASS_COLORS[name], label=name)
        if "k" in rule:
            ax.axvline(rule["k"], color="#555555", ls=":", lw=1)
        ax.set_xscale("log")
        ks = sorted(sweep["k"].unique())
        ax.set_xticks(ks, [f"{k:g}" for k in ks], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("dominance ratio k")
        used = " (used)" if math.isclose(z, rule.get("z", -1)) else ""
        ax.set_title(f"z = {z:g}{used}", fontsize=10)
    axes[0][0].set_ylabel("heads in class")
    axes[0][0].set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Class counts against the thresholds", x=0.02, ha="left", fontsize=12)
    return fig


def _plain_number(value: float, _position=None) -> str:
    """Tick labels 1, 10, 100, 1000, 10k, 100k instead of powers of ten."""
    if value >= 10_000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _n_analysed(run: Run) -> int:
    if "n_analysed" in run.summary:
        return int(run.summary["n_analysed"])
    return int(run.correct_parts()["prompt_id"].nunique())
