"""Static twins of the report's main figures, for papers and slides: figures/*.png, drawn with matplotlib from
the same `*_table` data as the interactive figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import FactscopeError
from ..rundir import atomic_path
from ..taxonomy import CLASSES, MECHANISM_ORDER
from .figures_dla import additive_table, lens_table, share_table
from .figures_heads import HEATMAP_PANELS, heatmap_arrays, sweep_table, top_heads
from .style import CLASS_COLORS, MECHANISM_COLORS, MECHANISM_LABELS, SHOWN_CLASSES, series_color, series_dash

if TYPE_CHECKING:
    from ..rundir import Run

def save_pngs(run: Run, folder: Path, dpi: int = 200) -> list[Path]:
    """figures/*.png: additivity, signature, DLA heatmap, mechanism shares, logit lens, k-sweep (those whose
    tables exist). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder = Path(folder)
    if folder.is_symlink():
        raise FactscopeError(f"{folder}: is a symbolic link; factscope never writes figures through a link (remove it)")
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
             "mixed_relation": "mixed ·\nRELATION", "relation_heads": "relation\nheads",
             "end_heads": "END←END\nparts", "mlps": "MLPs",
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
    for name in SHOWN_CLASSES:
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
    n_layers, n_heads = run.n_layers, run.n_heads
    keys = [key for key in HEATMAP_PANELS if key in arrays]
    limit = float(np.nanmax(np.abs([arrays[key] for key in keys]))) or 1.0
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), max(3.5, 0.16 * n_layers + 1.2)), sharey=True)
    for ax, key in zip(axes, keys):
        title = HEATMAP_PANELS[key]
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
        style = dict(color="#111111", lw=2.8) if pooled else dict(color=series_color(index), lw=1.1, ls=styles[series_dash(index)])
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
        for name in SHOWN_CLASSES:
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
