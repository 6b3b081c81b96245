"""The figures of the causal checks (the tables `factscope ablate` and `trace` add to a run), one function per
figure, each taking a `rundir.Run` and returning a plotly Figure. The causal tables are young: each function is
small so it can follow their columns."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import bootstrap
from ..taxonomy import GROUPS
from .text_causal import agreement_caption
from .style import (BLOCKED_LABELS, CLASS_COLORS, MECHANISM_COLORS, MECHANISM_LABELS, METRIC_LABELS, SOURCE_COLORS, layer_ticks,
                    log_dtick, require, series_color, style_figure)

if TYPE_CHECKING:
    from ..rundir import Run

def fig_knockout(run: Run) -> go.Figure:
    """knockout.csv: relative change of p(a) when END may not attend to a group, for a window of layers."""
    table = require(run, "knockout")
    windows = table[table["condition"] == "window"] if "condition" in table else table
    fig = go.Figure()
    for index, (blocked, rows) in enumerate(windows.groupby("blocked", sort=True)):
        rows = rows.sort_values("layer")
        color = SOURCE_COLORS.get(blocked, series_color(index))
        fig.add_scatter(
            x=rows["layer"], y=100 * rows["rel_change_p"], mode="lines+markers", name=f"END ↛ {BLOCKED_LABELS.get(blocked, blocked)}",
            line=dict(color=color, width=2.5), customdata=np.stack([rows["first_layer"], rows["last_layer"]], axis=1),
            hovertemplate="layers %{customdata[0]}–%{customdata[1]} blocked<br>Δp(a) %{y:+.1f}%<extra>" + blocked + "</extra>",
        )
    fig.add_hline(y=0, line=dict(color="#444444", width=1))
    width = int((windows["last_layer"] - windows["first_layer"]).max() + 1) if len(windows) else 0
    style_figure(fig, "Attention knockout", f"Mean relative change of p(a) when END's attention to a token group is cut "
                 f"in a window of {width} layers centred on the layer on the x axis.", height=440)
    fig.update_xaxes(title_text="window centre (layer)", **layer_ticks(windows["layer"]))
    fig.update_yaxes(title_text="relative change of p(a) (%)")
    return fig


EFFECT_LABELS = {"total": "total effect (layers above react)", "direct": "direct effect (own contribution at END only)"}


def fig_ablations(run: Run, metric: str = "logit_diff") -> go.Figure:
    """ablations.csv: change of a − mean(R∖a) when mechanisms are removed alone, in pairs and together, as a total
    and as a direct effect (with bootstrap intervals where the table has them), against the sum of their single
    total effects (the gap is the interaction term)."""
    table = require(run, "ablations")
    table = table[table["mechanism_set"] != "none"]
    effects = table["effect"] if "effect" in table else pd.Series("total", index=table.index)
    fig = go.Figure()
    for effect, color in (("total", "#0072B2"), ("direct", "#56B4E9")):
        rows = table[effects == effect]
        if rows.empty:
            continue
        error = None
        if f"delta_{metric}_low" in rows:
            error = dict(type="data", symmetric=False, array=rows[f"delta_{metric}_high"] - rows[f"delta_{metric}"],
                         arrayminus=rows[f"delta_{metric}"] - rows[f"delta_{metric}_low"], color="#444444")
        fig.add_bar(
            x=rows["mechanism_set"], y=rows[f"delta_{metric}"], name=EFFECT_LABELS[effect], marker_color=color, error_y=error,
            customdata=np.stack([rows["accuracy"], rows.get(f"interaction_{metric}", np.nan)], axis=1),
            hovertemplate="<b>%{x}</b><br>Δ %{y:+.3f} logits<br>accuracy %{customdata[0]:.0%}"
            "<br>interaction %{customdata[1]:+.3f}<extra>" + effect + "</extra>",
        )
    total = table[effects == "total"]
    if f"sum_alone_delta_{metric}" in total:
        fig.add_scatter(x=total["mechanism_set"], y=total[f"sum_alone_delta_{metric}"], mode="markers",
                        name="sum of single total effects", marker=dict(symbol="diamond", size=12, color="#D55E00"),
                        hovertemplate="sum of single effects %{y:+.3f}<extra></extra>")
    n_relations = int(table["n_relations"].iloc[0]) if "n_relations" in table else None
    intervals_over = bootstrap.unit_text(bootstrap.record(n_relations))
    style_figure(fig, "Ablations: are the mechanisms additive?", f"Change of {METRIC_LABELS.get(metric, metric)} when the "
                 f"mechanisms are removed (bars: {intervals_over}). Direct effects add up by "
                 "construction; where the diamond meets the total-effect bar the total effects add up too.", height=480)
    fig.update_yaxes(title_text=f"Δ {METRIC_LABELS.get(metric, metric)} (logits)")
    fig.update_xaxes(tickangle=-30)
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig


TRACE_ORDER = ("first_subject", "mid_subject", "last_subject", "first_subsequent", "further_tokens", "last_token",
               *GROUPS)


def fig_causal_trace(run: Run) -> go.Figure:
    """causal_trace.parquet: indirect effect of restoring one clean state (residual, attention or MLP window)."""
    table = require(run, "causal_trace")
    if "level" in table and (table["level"] == "position").any():
        table = table[table["level"] == "position"]
    kinds = [k for k in TRACE_KIND_LABELS if k in set(table["kind"])]
    fig = make_subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[TRACE_KIND_LABELS[k] for k in kinds])
    tokens = [t for t in TRACE_ORDER if t in set(table["token"])] + sorted(set(table["token"]) - set(TRACE_ORDER))
    top = float(table["indirect_effect"].max()) or 1.0
    for col, kind in enumerate(kinds, start=1):
        grid = table[table["kind"] == kind].pivot_table(index="token", columns="layer", values="indirect_effect").reindex(tokens)
        fig.add_heatmap(z=grid.to_numpy(), x=grid.columns, y=tokens, coloraxis="coloraxis",
                        hovertemplate="%{y} · layer %{x}<br>indirect effect %{z:.3f}<extra>" + kind + "</extra>", row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col, **layer_ticks(table["layer"]))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_layout(coloraxis=dict(colorscale="Purples", cmin=0, cmax=top, colorbar=dict(title=dict(text="Δp(a)", side="top"))))
    style_figure(fig, "Causal tracing", "Noise on the subject embeddings, one clean state restored: the recovered p(a)"
                 + (" — MLP0 apart: one MLP layer alone, and each MLP window without MLP0." if len(kinds) > 3 else "."),
                 height=max(360, 40 * len(tokens) + 200), extra_top=24)
    return fig


def fig_extraction_rate(run: Run) -> go.Figure:
    """extraction_rate.csv: fraction of prompts whose sublayer output at END, projected with the raw unembedding
    (Geva et al.), has the model's top-1 prediction (solid) or the attribute a (dotted) at top-1; through the final
    norm (dashed) where the table has it."""
    table = require(run, "extraction_rate")
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
        if "extraction_rate_normed" in rows:
            fig.add_scatter(x=rows["layer"], y=rows["extraction_rate_normed"], mode="lines",
                            name=f"{sublayer}: prediction, through the final norm", line=dict(color=color, width=1.5, dash="dash"))
    style_figure(fig, "Attribute extraction rate", "Fraction of prompts where one sublayer's END output alone, "
                 "projected with the unembedding matrix (Geva et al.: no final norm), puts the prediction at top-1.", height=420)
    fig.update_xaxes(title_text="layer", **layer_ticks(table["layer"]))
    fig.update_yaxes(title_text="extraction rate", tickformat=".0%", rangemode="tozero")
    return fig


def fig_enrichment(run: Run) -> go.Figure:
    """enrichment.csv: logit lens at the last SUBJECT token — median rank of a and of the rest of R_r by layer."""
    table = require(run, "enrichment").sort_values("layer")
    fig = go.Figure()
    fig.add_scatter(x=table["layer"], y=table["median_rank_a"], mode="lines+markers", name="a",
                    line=dict(color=CLASS_COLORS["subject"], width=2.5))
    if "median_rank_others" in table:
        fig.add_scatter(x=table["layer"], y=table["median_rank_others"], mode="lines", name="R_r ∖ a (mean per prompt)",
                        line=dict(color="#777777", width=2, dash="dash"))
    style_figure(fig, "Subject enrichment", "Logit lens on the residual stream at the last subject token: median rank "
                 "(1 = top) of the attribute.", height=420)
    fig.update_xaxes(title_text="layer", **layer_ticks(table["layer"]))
    ranks = pd.concat([table["median_rank_a"], table.get("median_rank_others", table["median_rank_a"])])
    fig.update_yaxes(type="log", autorange="reversed", dtick=log_dtick(ranks), title_text="median rank (log scale)")
    return fig


def fig_noise_robustness(run: Run) -> go.Figure:
    """noise_robustness.csv: with Gaussian noise on one mechanism's paths at END, how often the full model (solid)
    and the noisy mechanism alone (dotted) rank a first among R_r; the additive story predicts solid far above
    dotted. Tables from before that reading show top-1 accuracy with noise on each mechanism and on all."""
    table = require(run, "noise_robustness")
    fig = go.Figure()
    prediction = "alone_first_among_r" in table
    for index, (mechanism, rows) in enumerate(table.groupby("mechanism", sort=False)):
        if prediction and mechanism == "all":
            continue  # noise on every path adds up under any story: no test of additivity
        rows = rows.sort_values("noise_scale")
        color = "#111111" if mechanism == "all" else MECHANISM_COLORS.get(mechanism, series_color(index))
        label = MECHANISM_LABELS.get(mechanism, mechanism)
        if prediction:
            fig.add_scatter(x=rows["noise_scale"], y=rows["first_among_r"], mode="lines+markers", name=f"model, noise on {label}",
                            line=dict(color=color, width=2.5), legendgroup=mechanism)
            fig.add_scatter(x=rows["noise_scale"], y=rows["alone_first_among_r"], mode="lines", name=f"{label} alone",
                            line=dict(color=color, width=1.5, dash="dot"), legendgroup=mechanism)
            if "halved_scale" in rows and pd.notna(rows["halved_scale"].iloc[0]):  # where the rule reads it
                fig.add_vline(x=float(rows["halved_scale"].iloc[0]), line=dict(color=color, width=1, dash="dash"))
        else:
            fig.add_scatter(
                x=rows["noise_scale"], y=rows["accuracy"], mode="lines+markers", name=label,
                line=dict(color=color, width=3 if mechanism == "all" else 2),
                error_y=dict(type="data", array=rows["accuracy_std"], visible=True) if "accuracy_std" in rows else None,
            )
    if prediction:
        style_figure(fig, "Robustness to noise", "Noise on one mechanism's paths at END: how often the full model (solid) "
                     "and that mechanism alone under the same noise (dotted) rank a first among R_r. Additive parts "
                     "predict solid far above dotted. Dashed: the scale where the full model's accuracy has halved, "
                     "where each is read.", height=440)
        fig.update_xaxes(title_text="noise norm (× END's clean residual norm, spread over the mechanism's paths)")
        fig.update_yaxes(title_text="a first among R_r", tickformat=".0%", range=[0, 1.02])
    else:
        style_figure(fig, "Robustness to noise", "Accuracy as Gaussian noise (norm = scale × the part's own norm) is added "
                     "to one mechanism's contribution at END.", height=440)
        fig.update_xaxes(title_text="noise scale (× the part's norm)")
        fig.update_yaxes(title_text="recall@1", tickformat=".0%", range=[0, 1.02])
    return fig


TRACE_KIND_LABELS = {"resid": "residual stream", "attn": "attention (window)", "mlp": "MLP (window)",
                     "mlp_single": "MLP (one layer)", "mlp_without_mlp0": "MLP (window without MLP0)"}


def fig_atp_trace(run: Run) -> go.Figure:
    """atp_trace.parquet beside causal_trace.parquet (where exact patching ran too): each restoration kind as two
    heatmaps on one colour scale, exact left and AtP right, with atp_agreement.csv's numbers in the caption."""
    estimate, agreement = require(run, "atp_trace"), require(run, "atp_agreement")
    exact = run.causal_trace
    methods = [("exact patching", exact)] if exact is not None and not exact.empty else []
    methods.append(("attribution patching (AtP)", estimate))
    methods = [(label, t[t["level"] == "position"] if "level" in t else t) for label, t in methods]
    kinds = [k for k in ("resid", "attn", "mlp") if k in set(methods[-1][1]["kind"])]  # the kinds AtP estimates
    present = set(methods[-1][1]["token"])  # position kinds only: the token-group rows are another level
    tokens = [t for t in TRACE_ORDER if t in present] + sorted(present - set(TRACE_ORDER))
    fig = make_subplots(rows=len(kinds), cols=len(methods), shared_yaxes=True, horizontal_spacing=0.04, vertical_spacing=0.08,
                        subplot_titles=[f"{TRACE_KIND_LABELS[k]} · {label}" for k in kinds for label, _ in methods])
    values = pd.concat([t["indirect_effect"] for _, t in methods])
    top = float(values.abs().max()) or 1.0
    for row, kind in enumerate(kinds, start=1):
        for col, (label, table) in enumerate(methods, start=1):
            grid = table[table["kind"] == kind].pivot_table(index="token", columns="layer", values="indirect_effect").reindex(tokens)
            fig.add_heatmap(z=grid.to_numpy(), x=grid.columns, y=tokens, coloraxis="coloraxis", row=row, col=col,
                            hovertemplate="%{y} · layer %{x}<br>Δp(a) %{z:.3f}<extra>" + label + "</extra>")
            fig.update_xaxes(title_text="layer" if row == len(kinds) else None, row=row, col=col, **layer_ticks(table["layer"]))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_layout(coloraxis=dict(colorscale="RdBu", cmid=0, cmin=-top, cmax=top,
                                     colorbar=dict(title=dict(text="Δp(a)", side="top"))))
    style_figure(fig, "Causal tracing: attribution patching against exact patching", agreement_caption(agreement, "in p"),
                 height=max(420, len(kinds) * (28 * len(tokens) + 120)), extra_top=24)
    return fig


def fig_atp_paths(run: Run) -> go.Figure:
    """path_ablations.csv: the drop of a − mean(R∖a) when one path is removed (total effect; mean over prompts), as a
    layer × (source group, head) map, exact ablation left and AtP right (paths not ablated exactly are blank when
    only AtP ran), with atp_path_agreement.csv's numbers in the caption."""
    paths, agreement = require(run, "path_ablations"), require(run, "atp_path_agreement")
    paths = paths[paths["effect"] == "total"].copy()
    paths["drop"] = -paths["delta_logit_diff"]
    paths["column"] = np.where(paths["component"] == "mlp", "MLP", paths["group"].astype(str) + " H" + paths["head"].astype(str))
    order = [g for g in GROUPS if g in set(paths["group"])]
    columns = (paths[paths["component"] == "head"].assign(g=lambda t: t["group"].map(order.index))
               .sort_values(["g", "head"])["column"].drop_duplicates().tolist()) + ["MLP"]
    layers = sorted(paths["layer"].unique())
    methods = [(label, paths[paths["method"] == m]) for m, label in (("exact", "exact ablation"), ("atp", "attribution patching (AtP)"))]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04, subplot_titles=[label for label, _ in methods])
    top = float(paths["drop"].abs().max()) or 1.0
    for col, (label, table) in enumerate(methods, start=1):
        grid = table.pivot_table(index="layer", columns="column", values="drop").reindex(index=layers, columns=columns)
        fig.add_heatmap(z=grid.to_numpy(), x=columns, y=layers, coloraxis="coloraxis", row=1, col=col,
                        hovertemplate="layer %{y} · %{x}<br>drop of a − mean(R∖a) %{z:+.3f}<extra>" + label + "</extra>")
        # one tick per source group, at its first head; the heads follow in order
        starts = [c for c in columns if c == "MLP" or c.endswith(" H0")]
        fig.update_xaxes(tickvals=starts, ticktext=[c.removesuffix(" H0") for c in starts], tickangle=-45,
                         title_text="source group × head", row=1, col=col)
    fig.update_yaxes(title_text="layer", autorange="reversed", showgrid=False, row=1, col=1)
    fig.update_layout(coloraxis=dict(colorscale="RdBu_r", cmid=0, cmin=-top, cmax=top,
                                     colorbar=dict(title=dict(text="drop (logits)", side="top"))))
    mode = str(paths["mode"].iloc[0]) if "mode" in paths and len(paths) else "mean"
    style_figure(fig, "Path ablation: attribution patching against exact ablation",
                 f"Each head's END←group path and each MLP at END {mode}-ablated alone (total effect): how far a − mean(R∖a) "
                 f"drops, mean over prompts. " + agreement_caption(agreement, "logits"), height=max(420, 16 * len(layers) + 160))
    return fig
