"""The figures of what writes the answer at END, one function per figure (each takes a `rundir.Run` and returns a
plotly Figure): recall, how the mechanisms add up (headline, shares by relation), the logit lens, MLP boosting and
the per-prompt drill-down. The `*_table` functions prepare their data; the PNG twins (`pngs`) and the text
(`text`) read the same tables, so every version shows the same numbers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import FactscopeError
from ..rundir import TABLES
from ..taxonomy import HEAD_MECHANISM, MECHANISM_ORDER
from .style import (GROUP_COLORS, MECHANISM_COLORS, MECHANISM_LABELS, METRIC_LABELS, MONO, SHARE_METRICS, display_token,
                    dropdown, layer_ticks, log_dtick, nested, require, series_color, series_dash, style_figure)

if TYPE_CHECKING:
    from ..rundir import Run

def share_table(run: Run, metric: str = "logit_diff") -> pd.DataFrame:
    """Per relation ("all" first) and mechanism: mean contribution, share and n_prompts (mechanisms.csv)."""
    table = require(run, "mechanisms")
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
    lens = require(run, "logit_lens")
    recall = require(run, "recall")[["prompt_id", "relation"]].astype({"prompt_id": str})
    lens = lens.astype({"prompt_id": str}).merge(recall, on="prompt_id", how="left")
    stats = {"median_rank": ("rank", "median"), "mean_prob": ("prob", "mean"), "n_prompts": ("prompt_id", "nunique")}
    pooled = lens.groupby("layer").agg(**stats).reset_index().assign(relation="all")
    per_relation = lens.groupby(["relation", "layer"]).agg(**stats).reset_index()
    return pd.concat([pooled, per_relation], ignore_index=True)


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
        raise FactscopeError(f"this figure needs {TABLES['attributions']}, which the run directory does not have")
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
    recall = require(run, "recall").astype({"prompt_id": str})
    analysed = set(run.correct_parts()["prompt_id"].unique())
    rows = recall[recall["prompt_id"].isin(analysed)]
    if len(rows) <= max_prompts:
        return rows["prompt_id"].tolist()
    rows = rows.assign(turn=rows.groupby("relation").cumcount())
    chosen = set(rows.sort_values(["turn"], kind="stable")["prompt_id"].head(max_prompts))
    return [p for p in rows["prompt_id"] if p in chosen]


def _n_analysed(run: Run) -> int:
    if "n_analysed" in run.summary:
        return int(run.summary["n_analysed"])
    return int(run.correct_parts()["prompt_id"].nunique())


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
    style_figure(
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
    recall = require(run, "recall")
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
    style_figure(fig, "Which facts the model knows", "Fraction of prompts whose attribute is the top-1 next token, per relation.",
                 height=max(360, 26 * len(table) + 170))
    fig.update_xaxes(title_text="recall@1 · mean p(a)", range=[0, 1.02], tickformat=".0%")
    fig.update_layout(legend=dict(orientation="h", y=-0.18, x=0))
    return fig


def fig_mechanism_shares(run: Run) -> go.Figure:
    """Per relation: each mechanism's share of a − mean(R∖a) (dropdown: of the centred logit of a), stacked."""
    fig = go.Figure()
    metrics = SHARE_METRICS
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
    style_figure(fig, "Mechanism shares by relation",
                 "Mean contribution / mean total; shares add to 100%, a negative share is destructive interference. "
                 "Hover a segment for its mean contribution in logits.", height=max(440, 30 * n_rel + 260), menu=True)
    fig.update_layout(
        barmode="relative", bargap=0.3,
        legend=dict(orientation="v", y=1, x=1.01, xanchor="left", yanchor="top", traceorder="normal"),
        updatemenus=[dropdown(buttons)],
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
        line = dict(color="#111111", width=4) if pooled else dict(color=series_color(index), width=1.6, dash=series_dash(index))
        name = f"all ({int(rows['n_prompts'].max())} prompts)" if pooled else relation
        for col, column in ((1, "median_rank"), (2, "mean_prob")):
            fig.add_scatter(
                x=rows["layer"], y=rows[column], mode="lines" if rows["layer"].nunique() > 3 else "lines+markers", line=line, name=name, legendgroup=relation,
                showlegend=col == 1, opacity=1.0 if pooled else 0.85,
                hovertemplate=f"<b>{relation}</b> · layer %{{x}}<br>{column.replace('_', ' ')} %{{y:.3g}}<extra></extra>",
                row=1, col=col,
            )
    fig.update_yaxes(type="log", autorange="reversed", dtick=log_dtick(table["median_rank"]),
                     title_text="median rank of a (log scale)", row=1, col=1)
    fig.update_yaxes(title_text="mean p(a)", range=[0, 1], row=1, col=2)
    fig.update_xaxes(title_text="layer (residual stream after it)", **layer_ticks(table["layer"]))
    style_figure(fig, "Logit lens: when does the answer appear?",
                 "The residual stream at END after each layer, normalised and unembedded; thick black: all analysed prompts.",
                 height=520, extra_top=24)
    fig.update_layout(legend=dict(x=1.01, y=1, xanchor="left", font=dict(size=12)))
    return fig


def fig_mlp_boosting(run: Run) -> go.Figure:
    """Per MLP layer at END: DLA to a, breadth (mean DLA over all of R_r) and specificity (a − mean(R∖a))."""
    table = require(run, "mlp_boosting")
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
    style_figure(fig, "MLP boosting: broad or specific?",
                 "Mean over analysed prompts, per MLP layer at END. Breadth ≫ specificity: the MLP raises every attribute "
                 "of the relation, not just the right one. Choose a relation in the dropdown.", height=500, menu=True)
    fig.update_layout(
        barmode="group", bargap=0.2,
        legend=dict(orientation="h", y=1.0, x=1.0, xanchor="right", yanchor="bottom"),
        updatemenus=[dropdown(buttons)],
    )
    fig.update_xaxes(title_text="MLP layer", showgrid=False, **layer_ticks(table["layer"]))
    fig.update_yaxes(title_text="DLA (logits)", zeroline=True, zerolinecolor="#444444")
    return fig


def fig_drilldown(run: Run, n_top: int = 15, max_prompts: int = 150) -> go.Figure:
    """Choose a prompt (dropdown): its tokens coloured by group, and its top parts by |DLA to a|, with each
    part's a − mean(R∖a) as a diamond."""
    top = drilldown_table(run, n_top, max_prompts)
    tokens = require(run, "tokens").astype({"prompt_id": str})
    recall = require(run, "recall").astype({"prompt_id": str}).set_index("prompt_id")
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
    style_figure(fig, states[0]["title"] if states else "", f"Top {n_top} parts by |DLA to a| (bars, logits); diamonds: "
                 "the same part's a − mean(R∖a). Tokens coloured by group; outlined: END.", height=plot_height + 90, menu=True)
    fig.update_layout(
        barmode="overlay", bargap=0.15,
        title=dict(font=dict(size=16)),
        legend=dict(x=1.01, y=1, xanchor="left", groupclick="toggleitem", font=dict(size=12)),
        updatemenus=[dropdown(buttons)],
        margin=dict(l=160),
    )
    fig.update_xaxes(visible=False, row=1, col=1)
    fig.update_yaxes(visible=False, range=[-0.5, 0.5], row=1, col=1)
    fig.update_xaxes(title_text="contribution (logits)", zeroline=True, zerolinecolor="#444444", row=2, col=1)
    fig.update_yaxes(showgrid=False, row=2, col=1)
    if states:
        fig.update_layout(**nested(layout_for(0)))
    return fig
