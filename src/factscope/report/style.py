"""The style kit every figure of the report and the compare page shares: one font, one colour-blind safe palette
(Okabe & Ito) that means the same in every figure — blue is SUBJECT, vermillion RELATION, reddish purple mixed,
green MLPs, greys for everything else — one plotly template, and the layout helpers that place titles, dropdowns
and axes alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from ..errors import FactscopeError
from ..rundir import TABLES
from ..taxonomy import CLASS_SOURCES

if TYPE_CHECKING:
    from ..rundir import Run

FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "Noto Sans", "Liberation Sans", Arial, sans-serif'
MONO = 'ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace'

SHOWN_CLASSES = tuple(CLASS_SOURCES)  # every class but negligible: most heads are negligible and would flatten the rest
CLASS_COLORS = {"subject": "#0072B2", "relation": "#D55E00", "mixed": "#CC79A7", "negligible": "#B4B4B4"}
CLASS_LETTERS = {"subject": "S", "relation": "R", "mixed": "M", "negligible": ""}

MECHANISM_COLORS = {
    "subject_heads": "#0072B2", "mixed_subject": "#56B4E9", "mixed_relation": "#E69F00", "relation_heads": "#D55E00",
    "end_heads": "#F0B27A", "mlps": "#009E73", "other_heads": "#A6A6A6", "embed_bias": "#4D4D4D",
}
MECHANISM_LABELS = {
    "subject_heads": "subject heads", "mixed_subject": "mixed heads · SUBJECT part",
    "mixed_relation": "mixed heads · RELATION part", "relation_heads": "relation heads",
    "end_heads": "heads reading END (END←END parts)", "mlps": "MLPs",
    "other_heads": "other head parts", "embed_bias": "embeddings + biases",
}

GROUP_COLORS = {"bos": "#D9D9D9", "first": "#C9C9C9", "prefix": "#EDEDED", "subject": "#A6CDE8",
                "relation": "#F3C4A2", "end": "#F8DEC9"}
# what `ablate` knocks out (`causal.knockout.blocked_groups`), as the report names it
BLOCKED_LABELS = {"first": "the first token (the sink)", "end": "END itself", "non_subject": "every non-subject position"}
SOURCE_COLORS = {"subject": CLASS_COLORS["subject"], "relation": CLASS_COLORS["relation"],
                 "end": MECHANISM_COLORS["end_heads"]}

# CARTO "Safe": a qualitative palette designed to stay distinguishable under colour-vision deficiency
QUALITATIVE = ("#88CCEE", "#CC6677", "#DDCC77", "#117733", "#332288", "#AA4499", "#44AA99", "#999933", "#882255",
               "#661100", "#6699CC", "#888888")
DASHES = ("solid", "dash", "dot", "dashdot")
DIVERGING = "RdBu"  # ColorBrewer, colour-blind safe; blue = raises the logit, red = lowers it
METRIC_LABELS = {"logit_diff": "a − mean(R∖a)", "centred_logit": "centred logit of a", "logit": "logit of a"}
# the shares the report shows: a raise of every logit alike changes no probability, so "of the logit" is centred
SHARE_METRICS = ("logit_diff", "centred_logit")

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


def style_figure(fig: go.Figure, title: str, subtitle: str = "", height: int = 520, menu: bool = False,
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


def dropdown(buttons: list[dict], active: int = 0, above: int = 0) -> dict:
    """A dropdown at the top left, just above the plot area (`above`: extra pixels, e.g. for subplot titles)."""
    return dict(buttons=buttons, active=active, direction="down", x=0.0, xanchor="left", y=1.0, yanchor="bottom",
                pad=dict(b=8 + above, l=0), showactive=True, bgcolor="white", bordercolor="#BBBBBB",
                font=dict(size=13))


def nested(flat: dict) -> dict:
    """{"xaxis2.range": r} → {"xaxis2": {"range": r}} for update_layout."""
    out: dict = {}
    for key, value in flat.items():
        target = out
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    return out


def require(run: Run, name: str) -> pd.DataFrame:
    """A table of `rundir.TABLES` that a figure cannot do without."""
    table = getattr(run, name)
    if table is None or table.empty:
        raise FactscopeError(f"this figure needs {TABLES[name]}, which the run directory does not have")
    return table


def series_dash(index: int) -> str:
    """The line dash of the index-th series without a colour of its own: solid until the palette runs out."""
    return DASHES[(index // len(QUALITATIVE)) % len(DASHES)]


def series_color(index: int) -> str:
    """The colour of the index-th series without a colour of its own (relations, runs)."""
    return QUALITATIVE[index % len(QUALITATIVE)]


def layer_ticks(layers: pd.Series) -> dict:
    """Integer ticks for a layer axis: every layer when there are few, else about ten."""
    n = int(pd.Series(layers).max()) + 1 if len(layers) else 1
    return dict(tick0=0, dtick=max(1, round(n / 10)))


def log_dtick(values: pd.Series) -> int | None:
    """Ticks at powers of ten on a log axis spanning more than a decade; plotly's own otherwise."""
    values = pd.Series(values).dropna()
    values = values[values > 0]
    return 1 if len(values) and values.max() / values.min() >= 10 else None


def display_token(token: str) -> str:
    """A tokenizer's raw token as text: byte-level BPE's Ġ and SentencePiece's ▁ are spaces, Ċ a newline."""
    return str(token).replace("Ġ", " ").replace("▁", " ").replace("Ċ", "↵").replace("ĉ", "⇥")
