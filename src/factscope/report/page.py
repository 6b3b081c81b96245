"""The report page: `SECTIONS` (the registry of the report's figures, each with the tables it needs),
`render_html(run)` and `write_report(DIR)`, which writes DIR/report.html (one self-contained file: plotly.js
inlined once, no network request) and DIR/figures/*.png. `page_html` and `figure_div` are the frame the compare
page shares."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import FactscopeError
from ..rundir import FIGURES, REPORT, TABLES, Run, atomic_write_text, load_run
from ..taxonomy import CLASSES
from .figures_causal import (fig_ablations, fig_atp_paths, fig_atp_trace, fig_causal_trace, fig_enrichment,
                             fig_extraction_rate, fig_knockout, fig_noise_robustness)
from .figures_dla import fig_drilldown, fig_headline, fig_logit_lens, fig_mechanism_shares, fig_mlp_boosting, fig_recall
from .figures_heads import fig_heatmap, fig_k_sweep, fig_signature, fig_specificity, fig_subject_swap
from .pngs import save_pngs
from .style import CLASS_COLORS, CLASS_LETTERS, FONT, MECHANISM_LABELS, MONO, SHOWN_CLASSES
from .text import FINDING_TITLES, departures, findings, pct, pooled_shares

PAPER = "Chughtai, Cooney & Nanda (2024), “Summing Up the Facts”, arXiv:2402.07321"


@dataclass
class Section:
    id: str
    title: str
    intro: str  # HTML
    figure: Callable  # Run (or compare's Comparison) → a plotly Figure
    needs: tuple[str, ...]
    group: str = "DLA"


SECTIONS = (
    Section("recall", "Recall by relation", "Which facts the model knows (recall@1). Only these are analysed unless "
            "the run used <code>--all-prompts</code>.", fig_recall, ("recall",), "Overview"),
    Section("signature", "The signature view",
            "The paper's picture: every attention head as a point, its mean DLA to the correct attribute <i>a</i> "
            "read from the SUBJECT tokens (x) against that read from the RELATION tokens (y). Hover a point for its "
            "name, how stable its class is across prompts and relations, and the attributes it boosts most; the dropdown "
            "spreads out the crowd of small heads near zero.",
            fig_signature, ("heads",)),
    Section("heatmap", "Heads, layer by layer",
            "The same DLA as a layer × head map, for all sources and split by source. Letters mark the classes.",
            fig_heatmap, ("heads",)),
    Section("shares", "Mechanism shares by relation",
            "How much of <i>a</i> − mean(R∖a) each mechanism supplies, per relation. The dropdown switches to the "
            "centred logit of <i>a</i> (its logit less its mean over the vocabulary).", fig_mechanism_shares, ("mechanisms",)),
    Section("lens", "Logit lens", "When does the answer become readable at END?", fig_logit_lens,
            ("logit_lens", "recall")),
    Section("specificity", "Specificity", "Subject heads should write the subject's own attribute; relation heads "
            "every attribute of the relation. Choose a relation in the dropdown.", fig_specificity,
            ("heads", "recall", "attributions")),
    Section("mlps", "MLP boosting", "What each MLP layer writes at END: to <i>a</i>, to the whole of R_r, and to "
            "<i>a</i> over the rest.", fig_mlp_boosting, ("mlp_boosting",)),
    Section("ksweep", "Threshold sweep", "The critique of the paper: the line between head classes is arbitrary. "
            "Here is how the counts move with it.", fig_k_sweep, ("class_sweep",)),
    Section("swap", "Subject swap", "Rerun with each subject replaced by another of the same relation.",
            fig_subject_swap, ("subject_swap",)),
    Section("knockout", "Attention knockout", "Causal check (Geva et al. 2023).", fig_knockout, ("knockout",), "Causal"),
    Section("ablations", "Ablations", "Causal check of additivity.", fig_ablations, ("ablations",), "Causal"),
    Section("trace", "Causal tracing", "Causal check (Meng et al. 2022).", fig_causal_trace, ("causal_trace",), "Causal"),
    Section("atp_trace", "Causal tracing by attribution patching",
            "Every restoration estimated from one forward and one backward pass (<code>trace --method atp|both</code>), "
            "beside exact patching where it ran; the caption gives its error.", fig_atp_trace, ("atp_agreement",),
            "Causal"),
    Section("atp_paths", "Path ablation by attribution patching",
            "Every head path and MLP at END removed alone (<code>ablate --method atp|both</code>), exact and estimated "
            "from gradients; the caption gives AtP's error.", fig_atp_paths, ("atp_path_agreement",), "Causal"),
    Section("extraction", "Attribute extraction rate", "Causal-side check (Geva et al. 2023).", fig_extraction_rate,
            ("extraction_rate",), "Causal"),
    Section("enrichment", "Subject enrichment", "Is the attribute already readable at the last subject token?",
            fig_enrichment, ("enrichment",), "Causal"),
    Section("noise", "Noise robustness", "Is the sum more robust than its parts?", fig_noise_robustness,
            ("noise_robustness",), "Causal"),
    Section("drilldown", "One prompt at a time", "Choose a prompt: its tokens, coloured by group, and the parts that "
            "write most to its correct attribute.", fig_drilldown, ("recall", "tokens", "attributions")),
)


CAUSAL_TABLES = tuple(name for section in SECTIONS if section.group == "Causal" for name in section.needs)


PLOTLY_CONFIG = {
    "displaylogo": False, "responsive": True, "scrollZoom": False,
    "modeBarButtonsToRemove": ["lasso2d", "select2d", "autoScale2d"],
    "toImageButtonOptions": {"format": "png", "scale": 2},
}


def _available(run: Run, needs: tuple[str, ...]) -> bool:
    return all(run.attributions_path.is_file() if name == "attributions" else run.has(name) for name in needs)


def render_html(run: Run) -> str:
    """report.html as a string: one file, plotly.js inlined once, nothing fetched."""
    esc = html.escape
    rendered, missing = [], []
    for section in SECTIONS:
        if not _available(run, section.needs):
            missing.append(section)
            continue
        tolerated = (FactscopeError, KeyError) if section.group == "Causal" else (FactscopeError,)
        try:
            fig = section.figure(run)
        except tolerated as err:  # a causal table in a format this version does not know: say so, render the rest
            missing.append(section)
            what = f"column {err} missing" if isinstance(err, KeyError) else str(err)
            rendered.append((section, f'<p class="note">Not available: {esc(what)}</p>'))
            continue
        rendered.append((section, figure_div(fig, section.id)))

    summary = run.summary
    model, dataset = summary.get("model", "?"), Path(str(summary.get("dataset", "?"))).name
    title = f"factscope · {model} on {dataset}"
    toc = ['<li><a href="#headline">Headline</a></li>', '<li><a href="#findings">Findings</a></li>',
           '<li><a href="#departures">Where this model departs from the paper</a></li>']
    toc += [f'<li><a href="#{s.id}">{esc(s.title)}</a></li>' for s, _ in rendered]
    toc.append('<li><a href="#about">About this run</a></li>')

    body = [_headline_html(run)]
    if run.has("mechanisms"):
        body.append(figure_div(fig_headline(run), "headline"))
    body.append("</section>")
    body.append(_findings_html(run))
    body.append(_departures_html(run))
    for section, content in rendered:
        body.append(f'<section id="{section.id}"><h2>{esc(section.title)}</h2><p class="intro">{section.intro}</p>'
                    f"{content}</section>")
    causal_missing = [name for name in CAUSAL_TABLES if not run.has(name)]
    body.append(_about_html(run, causal_missing))

    subtitle = f"Direct logit attribution by component and source token, after {PAPER}."
    return page_html(title, subtitle, "".join(toc), "".join(body))


def figure_div(fig, figure_id: str) -> str:
    """A figure for a page that inlines plotly.js once; its PNG button saves under the figure's own name."""
    config = {**PLOTLY_CONFIG, "toImageButtonOptions": {**PLOTLY_CONFIG["toImageButtonOptions"], "filename": figure_id}}
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{figure_id}", config=config)
    return f'<div class="figure" data-figure="{figure_id}">{div}</div>'


GENERATOR = 'name="generator" content="factscope'  # how `compare --overwrite` knows a page is factscope's


def page_html(title: str, subtitle: str, toc: str, body: str) -> str:
    """One self-contained page: plotly.js inlined once, nothing fetched (report.html, compare.html)."""
    from plotly.offline import get_plotlyjs

    esc = html.escape
    plotly_js = get_plotlyjs().replace("</script", "<\\/script")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta {GENERATOR} {esc(__version__)}">
<title>{esc(title)}</title>
<style>{CSS}</style>
<script type="text/javascript">window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>
<script type="text/javascript">{plotly_js}</script>
</head>
<body>
<header><h1>{esc(title)}</h1>
<p class="sub">{esc(subtitle)}</p></header>
<div class="layout">
<nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>
<main>
{body}
</main>
</div>
</body>
</html>
"""


def _headline_html(run: Run) -> str:
    esc, s = html.escape, run.summary
    cards = []

    def card(label: str, value: str, detail: str = "", ok: bool | None = None) -> None:
        mark = "" if ok is None else (' <span class="ok">✓</span>' if ok else ' <span class="bad">✗</span>')
        cards.append(f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{esc(value)}{mark}</div>'
                     f'<div class="detail">{esc(detail)}</div></div>')

    shape = f"{run.n_layers} layers × {run.n_heads} heads" if run.has("heads") else ""
    card("model", str(s.get("model", "?")), shape)
    n_relations = run.recall["relation"].nunique() if run.has("recall") else None
    card("dataset", Path(str(s.get("dataset", "?"))).name,
         f"{s.get('n_prompts', '?')} facts" + (f", {n_relations} relations" if n_relations else ""))
    if run.has("recall"):
        correct = int(run.recall["correct"].sum())
        card("recall@1", pct(correct / len(run.recall)), f"{correct} of {len(run.recall)} facts")
    if "n_analysed" in s:
        card("analysed", str(s["n_analysed"]), "known facts only" if s.get("known_only", True) else "all prompts")
    if "max_abs_reconstruction_error" in s:
        error, tolerance = s["max_abs_reconstruction_error"], s["tolerance"]
        card("Σ parts − model logit", f"{error:.1e}", f"max |error|, tolerance {tolerance:g}; per head "
             f"{s.get('max_abs_head_error', float('nan')):.1e}", ok=error <= tolerance)
    if "prepend_bos" in s:
        card("BOS", "prepended" if s["prepend_bos"] else "not prepended",
             "a BOS token starts every prompt" if s["prepend_bos"] else "prompts start with their first word")
    if run.has("heads"):
        counts = run.heads["class"].value_counts()
        card("head classes", " · ".join(f"{int(counts.get(c, 0))} {CLASS_LETTERS[c]}" for c in SHOWN_CLASSES),
             "subject · relation · mixed heads")
    if run.has("mechanisms"):
        shares = pooled_shares(run)
        top = shares["share"].idxmax()
        card("largest share", pct(shares.loc[top, "share"]), f"{MECHANISM_LABELS.get(top, top)}, of a − mean(R∖a)")
    legend = "".join(
        f'<span class="swatch" style="background:{CLASS_COLORS[c]}"></span>{c}' for c in CLASSES
    )
    return (f'<section id="headline"><h2>Headline</h2><div class="cards">{"".join(cards)}</div>'
            f'<p class="legend">Class colours used throughout: {legend}</p>')


def _findings_html(run: Run) -> str:
    items = "".join(
        f'<li data-finding="{f.key}"><b>{html.escape(FINDING_TITLES.get(f.key, f.key))}.</b> {html.escape(f.text)}</li>'
        for f in findings(run)
    )
    return (f'<section id="findings"><h2>Findings</h2><p class="intro">Written from the run\'s tables; every number '
            f"below is read from them.</p><ul class=\"findings\">{items or '<li>No analysis tables in this run.</li>'}</ul></section>")


def _departures_html(run: Run) -> str:
    rows = []
    for verdict in departures(run):
        badge = {"agrees": "agree", "departs": "depart", "inconclusive": "notrun", "not run": "notrun"}[verdict.status]
        rows.append(f'<tr data-check="{verdict.key}"><td><span class="badge {badge}">{html.escape(verdict.status)}</span></td>'
                    f"<td>{html.escape(verdict.claim)}</td><td>{html.escape(verdict.text)}</td></tr>")
    n_layers, n_heads = run.n_layers, run.n_heads
    scale = (f" This model has {n_layers} layers × {n_heads} heads; Pythia-2.8B has 32 × 32." if n_layers else "")
    return ('<section id="departures"><h2>Where this model departs from the paper (Pythia-2.8B)</h2>'
            f'<p class="intro">Each row is one of the paper\'s claims, checked on this run\'s tables.{html.escape(scale)} '
            '“not run” means the table needed for the check is not in the run directory.</p>'
            '<table class="checks"><thead><tr><th>verdict</th><th>the paper</th><th>this run</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></section>")


def _about_html(run: Run, causal_missing: list[str]) -> str:
    esc = html.escape
    files = sorted(p.name for p in run.path.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name != "report.html")
    rule = run.summary.get("head_class_rule", {})
    rule_text = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in rule.items())
    missing = (f"<p>Causal checks not in this run: {esc(', '.join(TABLES[name] for name in causal_missing))}.</p>"
               if causal_missing else "")
    return (
        '<section id="about"><h2>About this run</h2>'
        f"<p>Tables in the run directory: {esc(', '.join(files))}. Reload them in Python with "
        "<code>factscope.report.load_run(DIR)</code>; every figure here is a function of "
        "<code>factscope.report.figures_*</code> that takes that run and returns a plotly figure.</p>"
        + (f"<p>Head class rule: {esc(rule_text)}.</p>" if rule_text else "")
        + missing
        + "<p>DLA is a head's (or MLP's) direct contribution to the logit of a target at the last token (END), "
        "with the final norm's scale frozen at its clean value, so the parts add up exactly. <i>a</i> is the "
        "correct attribute and R_r the set of attributes of relation r; <i>a</i> − mean(R∖a) is how much a part "
        "favours the correct attribute over the relation's others. Static figures for papers are in "
        "<code>figures/</code>.</p>"
        f'<p class="small">factscope {esc(__version__)}</p></section>'
    )


CSS = """
:root { --fg:#1f1f1f; --muted:#5a5a5a; --line:#e3e3e3; --bg:#f6f6f4; }
* { box-sizing: border-box; }
body { margin:0; font-family: %s; color:var(--fg); background:var(--bg); line-height:1.55; font-size:16px; }
header { background:#1f2a36; color:white; padding:22px 32px 18px; }
header h1 { margin:0; font-size:26px; font-weight:650; letter-spacing:0.1px; }
header .sub { margin:6px 0 0; color:#cfd8e3; font-size:15px; }
.layout { display:grid; grid-template-columns: 250px minmax(0, 1fr); gap:28px; max-width:1480px; margin:0 auto; padding:24px 28px; }
nav.toc { position:sticky; top:16px; align-self:start; max-height:calc(100vh - 32px); overflow:auto;
  background:white; border:1px solid var(--line); border-radius:10px; padding:14px 16px; font-size:14.5px; }
nav.toc h2 { font-size:13px; text-transform:uppercase; letter-spacing:0.08em; color:var(--muted); margin:0 0 8px; }
nav.toc ol { margin:0; padding-left:20px; } nav.toc li { margin:3px 0; }
nav.toc a { color:#1f4e79; text-decoration:none; } nav.toc a:hover { text-decoration:underline; }
main section { background:white; border:1px solid var(--line); border-radius:10px; padding:18px 26px 20px; margin:0 0 24px; }
main h2 { font-size:22px; margin:0 0 6px; font-weight:650; }
.intro { color:var(--muted); margin:0 0 10px; max-width:980px; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(205px, 1fr)); gap:12px; margin:12px 0 10px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 14px; background:#fbfbfa; }
.card .label { font-size:12.5px; text-transform:uppercase; letter-spacing:0.06em; color:var(--muted); }
.card .value { font-size:22px; font-weight:650; margin-top:2px; word-break:break-word; }
.card .detail { font-size:13px; color:var(--muted); }
.ok { color:#009E73; } .bad { color:#D55E00; }
.legend { font-size:14px; color:var(--muted); }
.swatch { display:inline-block; width:12px; height:12px; border-radius:3px; margin:0 5px 0 12px; vertical-align:-1px; }
ul.findings { margin:8px 0 0; padding-left:22px; max-width:1020px; } ul.findings li { margin:0 0 10px; }
table.checks { border-collapse:collapse; width:100%%; font-size:15px; }
table.checks th { text-align:left; font-size:12.5px; text-transform:uppercase; letter-spacing:0.06em; color:var(--muted);
  border-bottom:2px solid var(--line); padding:6px 10px; }
table.checks td { border-bottom:1px solid var(--line); padding:8px 10px; vertical-align:top; }
table.checks td:first-child { white-space:nowrap; } table.checks td:nth-child(2) { width:32%%; color:var(--muted); }
.badge { display:inline-block; padding:1px 9px; border-radius:10px; font-size:13px; font-weight:600; }
.badge.agree { background:#d7efe6; color:#00573f; } .badge.depart { background:#fbe0cf; color:#8a3300; }
.badge.notrun { background:#ececec; color:#555; }
.figure { margin-top:6px; } .note { color:var(--muted); font-style:italic; }
code { font-family: %s; font-size:0.92em; background:#f1f1ef; padding:1px 4px; border-radius:4px; }
.small { font-size:13px; color:var(--muted); }
@media (max-width: 980px) { .layout { grid-template-columns: 1fr; } nav.toc { position:static; max-height:none; } }
""" % (FONT, MONO)


def write_report(run_dir: str | Path, pngs: bool = True) -> Path:
    """Write DIR/report.html (self-contained) and DIR/figures/*.png; return the path of report.html."""
    run = load_run(run_dir)
    target = run.path / REPORT
    atomic_write_text(target, render_html(run))
    if pngs:
        save_pngs(run, run.path / FIGURES)
    return target
