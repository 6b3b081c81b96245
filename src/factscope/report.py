"""The report of a finished run: `load_run(DIR)` gives its tables back, `write_report(DIR)` writes
DIR/report.html (one self-contained file: plotly.js inlined once, no network request) and DIR/figures/*.png.

Only saved tables are read, never a model, so a finished run renders (and re-renders) anywhere. Every number in
the generated text is read from those tables; where a table is missing the text says the check was not run.
The figures themselves are in `figures` (one function per figure, each returning a plotly Figure).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from . import figures as F
from .data import read_json
from .errors import FactscopeError
from .rundir import TABLES, Run, atomic_write_text, load_run

SWAP_MOVES = 0.5  # a relation head whose RELATION part changes by more than this under subject swap depends on the subject
ONLY_SUM_NONE = 0.05  # below this fraction of prompts, "only the sum ranks a first" counts as absent
PAPER = "Chughtai, Cooney & Nanda (2024), “Summing Up the Facts”, arXiv:2402.07321"


# ---------------------------------------------------------------------------------------------------------------
# Text written from the numbers


@dataclass
class Finding:
    key: str
    text: str


@dataclass
class Check:
    """One comparison with the paper: `status` is "agrees", "departs" or "not run"."""

    key: str
    claim: str
    status: str
    text: str


def pct(x: float) -> str:
    """A share as a whole percentage: 0.4707 → "47%"; a change that rounds to nothing is "0%", not "-0%"."""
    text = f"{x:.0%}"
    return "0%" if text == "-0%" else text


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def verb(count: int, stem: str) -> str:
    """Third person: "supply" → "supplies" for one subject, "supply" for several."""
    if count != 1:
        return stem
    return stem[:-1] + "ies" if stem.endswith("y") else stem + "s"


def names_list(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def pooled_shares(run: Run, metric: str = "logit_diff") -> pd.DataFrame:
    """mechanisms.csv, relation "all", one metric, indexed by mechanism."""
    table = run.mechanisms
    return table[(table["relation"] == "all") & (table["metric"] == metric)].set_index("mechanism")


def attention_share(shares: pd.DataFrame) -> float:
    heads = ("subject_heads", "relation_heads", "mixed_subject", "mixed_relation", "other_heads")
    return float(shares.reindex(list(heads))["share"].fillna(0).sum())


def class_extraction(heads: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Mean specificity and breadth of each class's own part (a mixed head: both parts), from heads.csv."""
    out = {}
    for name, source in (("subject", "subject"), ("relation", "relation")):
        members = heads[heads["class"] == name]
        if len(members) and f"{source}_specificity" in members:
            out[name] = {"specificity": float(members[f"{source}_specificity"].mean()),
                         "breadth": float(members[f"{source}_breadth"].mean())}
    return out


def lens_milestones(run: Run) -> dict:
    """Pooled logit lens: first layer where the median rank of a is 1 and where mean p(a) exceeds 0.5."""
    table = F.lens_table(run)
    pooled = table[table["relation"] == "all"].sort_values("layer")
    top = pooled[pooled["median_rank"] <= 1]
    half = pooled[pooled["mean_prob"] > 0.5]
    return {
        "n_layers": int(pooled["layer"].max()) + 1,
        "rank1_layer": int(top["layer"].min()) if len(top) else None,
        "half_layer": int(half["layer"].min()) if len(half) else None,
        "final_prob": float(pooled["mean_prob"].iloc[-1]),
    }


def findings(run: Run) -> list[Finding]:
    """The findings paragraph by paragraph; each sentence only states what a table holds."""
    out: list[Finding] = []
    summary = run.summary
    model = summary.get("model", "the model")
    if run.has("recall"):
        recall = run.recall
        by_relation = recall.groupby("relation")["correct"].mean().sort_values(kind="stable")
        correct, n = int(recall["correct"].sum()), len(recall)
        analysed = summary.get("n_analysed")
        scope = "the facts it knows" if summary.get("known_only", True) else "every prompt, known or not"
        spread = (
            f"best: {by_relation.index[-1]} {pct(by_relation.iloc[-1])}; worst: {by_relation.index[0]} {pct(by_relation.iloc[0])}"
            if by_relation.iloc[-1] > by_relation.iloc[0] else f"{pct(by_relation.iloc[0])} on every relation"
        )
        out.append(Finding("recall", (
            f"{model} recalls {correct} of {n} facts ({pct(correct / n)}) at top-1 across {len(by_relation)} relations "
            f"({spread}). {analysed} prompts are analysed: {scope}."
        )))
    if "max_abs_reconstruction_error" in summary:
        out.append(Finding("exactness", (
            f"The decomposition is exact: on every analysed prompt the parts add up to the model's own logit within "
            f"{summary['max_abs_reconstruction_error']:.1e} (tolerance {summary['tolerance']:g}), and each head's "
            f"per-source split matches its DLA computed from hook_z within {summary['max_abs_head_error']:.1e}."
        )))
    if run.has("heads") and run.has("mechanisms"):
        out += _class_findings(run)
    if "interference" in summary:
        out.append(_interference_finding(summary["interference"]))
    if run.has("heads"):
        extraction = class_extraction(run.heads)
        if extraction:
            parts = [
                f"{name} heads' {name.upper()} parts raise a by {e['specificity']:.3f} logits more than the mean other "
                f"attribute of R_r (specificity) while raising R_r by {e['breadth']:.3f} on average (breadth)"
                for name, e in extraction.items()
            ]
            out.append(Finding("specificity", "Specificity against breadth: " + "; ".join(parts) + "."))
    if run.has("mlp_boosting"):
        mlp = run.mlp_boosting[run.mlp_boosting["relation"] == "all"]
        peak = mlp.loc[mlp["correct_dla"].idxmax()]
        out.append(Finding("mlps", (
            f"MLPs at END, summed over layers: DLA to a {mlp['correct_dla'].sum():.2f} logits, breadth "
            f"{mlp['breadth'].sum():.2f}, specificity {mlp['specificity'].sum():.2f}; the largest DLA to a is MLP "
            f"{int(peak['layer'])} ({peak['correct_dla']:.2f} logits)."
        )))
    if run.has("logit_lens") and run.has("recall"):
        lens = lens_milestones(run)
        rank1 = (f"the median rank of a reaches 1 after layer {lens['rank1_layer']}" if lens["rank1_layer"] is not None
                 else "the median rank of a never reaches 1")
        half = (f"mean p(a) first exceeds 0.5 after layer {lens['half_layer']}" if lens["half_layer"] is not None
                else "mean p(a) never exceeds 0.5")
        out.append(Finding("logit_lens", (
            f"Logit lens at END ({lens['n_layers']} layers): {rank1}; {half}; after the last layer it is "
            f"{lens['final_prob']:.2f}."
        )))
    if run.has("class_sweep"):
        out.append(_sweep_finding(run))
    if run.has("subject_swap"):
        out.append(_swap_finding(run))
    out += _causal_findings(run)
    return out


def _class_findings(run: Run) -> list[Finding]:
    heads = run.heads
    diff, logit = pooled_shares(run, "logit_diff"), pooled_shares(run, "logit")
    rule = run.summary.get("head_class_rule", {})
    counts = heads["class"].value_counts()
    total = float(diff["mean_value"].sum())
    n_prompts = int(diff["n_prompts"].max())
    sentences = [
        f"Of {len(heads)} heads ({run.n_layers} layers × {run.n_heads}), {int(counts.get('subject', 0))} are subject "
        f"heads, {int(counts.get('relation', 0))} relation heads, {int(counts.get('mixed', 0))} mixed and "
        f"{int(counts.get('negligible', 0))} negligible (k = {rule.get('k', float('nan')):g}, "
        f"z = {rule.get('z', float('nan')):g}). Against a − mean(R∖a), which averages {total:.2f} logits over "
        f"{n_prompts} prompts:"
    ]
    for name, mechanism in (("subject", "subject_heads"), ("relation", "relation_heads")):
        count = int(counts.get(name, 0))
        if count:
            sentences.append(
                f"{plural(count, f'{name} head')} ({names_list(F.top_heads(heads, name))}) {verb(count, 'supply')} "
                f"{pct(diff.loc[mechanism, 'share'])} of it ({pct(logit.loc[mechanism, 'share'])} of the logit of a);"
            )
    if counts.get("mixed", 0):
        mixed = diff.loc["mixed_subject", "share"] + diff.loc["mixed_relation", "share"]
        sentences.append(
            f"{plural(int(counts['mixed']), 'mixed head')} ({names_list(F.top_heads(heads, 'mixed'))}) "
            f"{verb(int(counts['mixed']), 'supply')} {pct(mixed)} "
            f"(SUBJECT part {pct(diff.loc['mixed_subject', 'share'])}, RELATION part "
            f"{pct(diff.loc['mixed_relation', 'share'])});"
        )
    sentences.append(
        f"MLPs supply {pct(diff.loc['mlps', 'share'])} ({pct(logit.loc['mlps', 'share'])} of the logit); the other "
        f"head parts (negligible heads, BOS/prefix parts, off-class parts) {pct(diff.loc['other_heads', 'share'])}; "
        f"embeddings and biases {pct(diff.loc['embed_bias', 'share'])}."
    )
    return [Finding("classes", " ".join(sentences))]


def _interference_finding(interference: dict) -> Finding:
    alone = interference.get("alone_ranks_first", {})
    best = sorted(((v, k) for k, v in alone.items() if v is not None), reverse=True)[:3]
    best_text = ", ".join(f"{F.MECHANISM_LABELS.get(k, k)} {pct(v)}" for v, k in best)
    largest = interference.get("largest_share", {})
    dominant = interference.get("dominant", [])
    destructive = interference.get("destructive", [])
    text = (
        f"The sum of all parts ranks a first among R_r on {pct(interference['sum_ranks_first'])} of prompts; "
        f"single mechanisms alone do so on up to {best_text}. On {pct(interference['only_sum_ranks_first'])} of "
        f"prompts only the sum ranks a first. The largest pooled share is "
        f"{F.MECHANISM_LABELS.get(largest.get('mechanism'), largest.get('mechanism'))} ({pct(largest.get('share', 0))}); "
        + (f"{', '.join(F.MECHANISM_LABELS.get(d, d) for d in dominant)} exceed"
           if dominant else "no mechanism exceeds")
        + f" {pct(interference['dominance_threshold'])} of the pooled total, and on {pct(interference['prompts_dominated'])}"
        f" of prompts a single mechanism carries more than {pct(interference['dominance_threshold'])} of that prompt's"
        " a − mean(R∖a). "
        + (f"Destructive on average: {', '.join(F.MECHANISM_LABELS.get(d, d) for d in destructive)}."
           if destructive else "No mechanism is destructive on average.")
    )
    return Finding("interference", text)


def _sweep_finding(run: Run) -> Finding:
    sweep, rule = run.class_sweep, run.summary.get("head_class_rule", {})
    z = rule.get("z", float(sweep["z"].median()))
    rows = sweep[np.isclose(sweep["z"], z)]
    ks = sorted(rows["k"].unique())
    ranges = []
    for name in ("subject", "relation", "mixed"):
        counts = rows[rows["class"] == name]["count"]
        ranges.append(f"{name} {int(counts.min())}–{int(counts.max())}")
    k = rule.get("k", ks[len(ks) // 2])
    at_k = sweep[np.isclose(sweep["k"], k)]
    zs = sorted(at_k["z"].unique())
    z_ranges = []
    for name in ("subject", "relation"):
        counts = at_k[at_k["class"] == name]["count"]
        z_ranges.append(f"{name} {int(counts.min())}–{int(counts.max())}")
    return Finding("thresholds", (
        f"Thresholds: for k from {ks[0]:g} to {ks[-1]:g} at z = {z:g} the class counts range over "
        f"{', '.join(ranges)}; for z from {zs[0]:g} to {zs[-1]:g} at k = {k:g}: {', '.join(z_ranges)}."
    ))


def strongest_relation_head(run: Run) -> str | None:
    names = F.top_heads(run.heads, "relation", 1) if run.has("heads") else []
    return names[0] if names else None


def _swap_finding(run: Run) -> Finding:
    swap = run.subject_swap
    grouped = swap.groupby(["class", "source"])[["rel_change", "corr"]].mean()
    parts = [
        f"{name} heads' {source.upper()} parts change by {row['rel_change']:.2f} of their size (corr {row['corr']:.2f})"
        for (name, source), row in grouped.iterrows()
    ]
    text = "Subject swap (each subject replaced by another of its relation): " + "; ".join(parts) + "."
    head = strongest_relation_head(run)
    row = swap[(swap["name"] == head) & (swap["source"] == "relation")] if head else swap.iloc[:0]
    if len(row):
        text += f" The strongest relation head, {head}, changes by {row['rel_change'].iloc[0]:.2f}."
    return Finding("subject_swap", text)


def _causal_findings(run: Run) -> list[Finding]:
    """One sentence per causal table present. The causal tables are young: a table whose columns are not the
    expected ones is reported as such instead of breaking the report."""
    out = []
    for name, write in (("knockout", _knockout_finding), ("ablations", _ablation_finding),
                        ("causal_trace", _trace_finding), ("extraction_rate", _extraction_finding),
                        ("enrichment", _enrichment_finding), ("noise_robustness", _noise_finding)):
        if run.has(name):
            try:
                out += write(run)
            except KeyError as err:
                out.append(Finding(name, f"{TABLES[name]} does not have the expected column {err}; not summarised."))
    return out


def _knockout_finding(run: Run) -> list[Finding]:
    table = run.knockout
    windows = table[table["condition"] == "window"] if "condition" in table else table
    parts = []
    for blocked, rows in windows.groupby("blocked"):
        worst = rows.loc[rows["rel_change_p"].idxmin()]
        parts.append(f"blocking END → {blocked} in layers {int(worst['first_layer'])}–{int(worst['last_layer'])} "
                     f"changes p(a) by {pct(worst['rel_change_p'])}")
    heads = table[table["condition"] == "heads"] if "condition" in table else table.iloc[:0]
    for row in heads.itertuples():
        parts.append(f"blocking END → {row.blocked} for the {row.n_heads} {row.head_set.replace('_', ' ')} only changes "
                     f"p(a) by {pct(row.rel_change_p)} (accuracy {pct(row.accuracy_after)})")
    return [Finding("knockout", "Attention knockout: " + "; ".join(parts) + ".")] if parts else []


def _ablation_finding(run: Run) -> list[Finding]:
    table = run.ablations
    everything = table[table["n_mechanisms"] == table["n_mechanisms"].max()].iloc[0]
    return [Finding("ablations", (
        f"Ablation: removing {everything['mechanism_set']} changes a − mean(R∖a) by "
        f"{everything['delta_logit_diff']:+.2f} logits against {everything['sum_alone_delta_logit_diff']:+.2f} for "
        f"the sum of single removals (interaction {everything['interaction_logit_diff']:+.2f}); accuracy "
        f"{pct(table.iloc[0]['accuracy'])} → {pct(everything['accuracy'])}."
    ))]


def _trace_finding(run: Run) -> list[Finding]:
    table = run.causal_trace
    parts = []
    for kind, token in (("mlp", "last_subject"), ("attn", "last_token"), ("resid", "last_subject")):
        rows = table[(table["kind"] == kind) & (table["token"] == token)]
        if len(rows):
            peak = rows.loc[rows["indirect_effect"].idxmax()]
            parts.append(f"{kind} at the {token.replace('_', ' ')} peaks at layer {int(peak['layer'])} "
                         f"(Δp(a) {peak['indirect_effect']:+.3f})")
    clean, corrupted = float(table["p_clean"].iloc[0]), float(table["p_corrupted"].iloc[0])
    return [Finding("causal_trace", f"Causal tracing (noise on the subject: p(a) {clean:.3f} → {corrupted:.3f}): "
                    + "; ".join(parts) + ".")] if parts else []


def _extraction_finding(run: Run) -> list[Finding]:
    table = run.extraction_rate
    best = table.loc[table["extraction_rate"].idxmax()]
    return [Finding("extraction_rate", (
        f"Attribute extraction: the highest rate is {pct(best['extraction_rate'])} for the {best['sublayer']} "
        f"sublayer of layer {int(best['layer'])}."
    ))]


def _enrichment_finding(run: Run) -> list[Finding]:
    table = run.enrichment.sort_values("layer")
    best = table.loc[table["median_rank_a"].idxmin()]
    return [Finding("enrichment", (
        f"Subject enrichment: at the last subject token the median rank of a is lowest ({best['median_rank_a']:g}) "
        f"after layer {int(best['layer'])}."
    ))]


def _noise_finding(run: Run) -> list[Finding]:
    table = run.noise_robustness
    top = table[table["noise_scale"] == table["noise_scale"].max()].set_index("mechanism")["accuracy"]
    return [Finding("noise", (
        f"Noise robustness at scale {table['noise_scale'].max():g}: accuracy "
        + ", ".join(f"{F.MECHANISM_LABELS.get(m, m)} {pct(a)}" for m, a in top.items()) + "."
    ))]


def departures(run: Run) -> list[Check]:
    """Where this model agrees with or departs from the paper's account (Pythia-2.8B), check by check."""
    checks: list[Check] = []
    summary = run.summary
    interference = summary.get("interference")
    have_shares = run.has("mechanisms")

    # 1. relation heads do not depend on the subject
    claim = "Relation heads extract attributes of the relation whatever the subject."
    head = strongest_relation_head(run)
    if not run.has("subject_swap"):
        checks.append(Check("swap", claim, "not run", "Not checked: no subject_swap.csv (run `factscope analyze --swap`)."))
    elif head is None:
        checks.append(Check("swap", claim, "not run", "Not checked: the model has no relation head."))
    else:
        swap = run.subject_swap
        row = swap[(swap["name"] == head) & (swap["source"] == "relation")]
        rel = swap[(swap["class"] == "relation") & (swap["source"] == "relation")]["rel_change"]
        if row.empty:
            checks.append(Check("swap", claim, "not run", f"Not checked: subject_swap.csv has no row for {head}."))
        else:
            change = float(row["rel_change"].iloc[0])
            moves = change > SWAP_MOVES
            checks.append(Check("swap", claim, "departs" if moves else "agrees", (
                f"The strongest relation head, {head}, changes its RELATION DLA by {change:.2f} of its size when the "
                f"subject is swapped ({'more' if moves else 'less'} than {SWAP_MOVES:g}); relation heads on average "
                f"by {rel.mean():.2f}."
                + (" Here relation heads depend on the subject." if moves else "")
            )))

    # 2. MLPs against attention
    claim = "Three of the four mechanisms are attention heads; MLPs boost relation attributes."
    if have_shares:
        shares = pooled_shares(run)
        mlp, attention = float(shares.loc["mlps", "share"]), attention_share(shares)
        more = mlp > attention
        checks.append(Check("mlp_vs_attention", claim, "departs" if more else "agrees", (
            f"MLPs at END supply {pct(mlp)} of a − mean(R∖a), all attention heads together {pct(attention)}"
            + (": the MLPs carry more than the heads." if more else ".")
        )))
    else:
        checks.append(Check("mlp_vs_attention", claim, "not run", "Not checked: no mechanisms.csv."))

    # 3. constructive interference: the sum is needed
    claim = "The mechanisms constructively interfere: together they rank the correct attribute first."
    if interference:
        only = interference.get("only_sum_ranks_first")
        best = max((v for v in interference["alone_ranks_first"].values() if v is not None), default=float("nan"))
        best_name = max(interference["alone_ranks_first"], key=lambda k: interference["alone_ranks_first"][k] or -1)
        if only is None:
            checks.append(Check("only_sum", claim, "not run", "Not checked: no relation has a second attribute to rank against."))
        else:
            absent = only < ONLY_SUM_NONE
            checks.append(Check("only_sum", claim, "departs" if absent else "agrees", (
                f"The sum ranks a first on {pct(interference['sum_ranks_first'])} of prompts, but only the sum (no "
                f"single mechanism) does so on {pct(only)}: "
                + (f"on every other prompt where the sum ranks a first, some single mechanism alone already does "
                   f"({F.MECHANISM_LABELS.get(best_name, best_name)} alone on {pct(best)} of prompts), so the "
                   "mechanisms are redundant rather than needed together."
                   if absent else "on those prompts the mechanisms are needed together.")
            )))
    else:
        checks.append(Check("only_sum", claim, "not run", "Not checked: summary.json has no interference entry."))

    # 4. no single mechanism dominates
    claim = "No single mechanism dominates."
    if interference:
        dominant = interference.get("dominant", [])
        largest = interference["largest_share"]
        checks.append(Check("dominance", claim, "departs" if dominant else "agrees", (
            f"Largest pooled share: {F.MECHANISM_LABELS.get(largest['mechanism'], largest['mechanism'])} "
            f"{pct(largest['share'])} (threshold {pct(interference['dominance_threshold'])}); on "
            f"{pct(interference['prompts_dominated'])} of prompts one mechanism alone exceeds it."
        )))

    # 5. destructive parts
    claim = "The mechanisms add up constructively on the correct attribute."
    if have_shares:
        shares = pooled_shares(run)
        negative = shares[shares["mean_value"] < 0]
        if len(negative):
            parts = ", ".join(
                f"{F.MECHANISM_LABELS.get(m, m)} {row['mean_value']:+.2f} logits ({pct(row['share'])}, negative on "
                f"{pct(row['negative_fraction'])} of prompts)" for m, row in negative.iterrows()
            )
            checks.append(Check("destructive", claim, "departs", f"Destructive on average: {parts}."))
        else:
            checks.append(Check("destructive", claim, "agrees", "Every mechanism's mean contribution is positive or zero."))

    # 6. subject heads specific, relation heads broad
    claim = "Subject heads are specific to the correct attribute; relation heads boost many attributes of R."
    extraction = class_extraction(run.heads) if run.has("heads") else {}
    if {"subject", "relation"} <= extraction.keys():
        ratio = {name: e["specificity"] / e["breadth"] if e["breadth"] > 0 else math.inf for name, e in extraction.items()}
        agrees = ratio["subject"] > ratio["relation"]
        checks.append(Check("specificity", claim, "agrees" if agrees else "departs", (
            f"Specificity / breadth: subject heads {ratio['subject']:.1f}, relation heads {ratio['relation']:.1f} "
            f"({'subject heads more specific' if agrees else 'relation heads are at least as specific as subject heads'})."
        )))
    else:
        checks.append(Check("specificity", claim, "not run", "Not checked: the model lacks subject or relation heads."))

    # 7. mixed heads exist
    claim = "Mixed heads read from both SUBJECT and RELATION."
    if run.has("heads"):
        count = int((run.heads["class"] == "mixed").sum())
        checks.append(Check("mixed", claim, "agrees" if count else "departs",
                            f"{count} mixed heads at the chosen thresholds." if count else "No mixed head at the chosen thresholds."))

    # 8. MLP boosting is broad
    claim = "MLPs boost the attributes of the relation (broadly, not only the correct one)."
    if run.has("mlp_boosting"):
        mlp = run.mlp_boosting[run.mlp_boosting["relation"] == "all"]
        breadth, specificity = float(mlp["breadth"].sum()), float(mlp["specificity"].sum())
        broad = breadth > specificity
        checks.append(Check("mlp_breadth", claim, "agrees" if broad else "departs", (
            f"Summed over layers, MLP breadth {breadth:.2f} against specificity {specificity:.2f} logits"
            + (": broad boosting." if broad else ": the MLPs are more specific than broad.")
        )))

    # 9. additivity under ablation
    claim = "The mechanisms are additive: removing several does what removing each does, summed."
    needed = {"n_mechanisms", "mechanism_set", "sum_alone_delta_logit_diff", "interaction_logit_diff"}
    if run.has("ablations") and not needed <= set(run.ablations.columns):
        checks.append(Check("ablation", claim, "not run", f"Not checked: ablations.csv lacks "
                            f"{', '.join(sorted(needed - set(run.ablations.columns)))}."))
    elif run.has("ablations") and run.ablations["n_mechanisms"].max() < 2:
        checks.append(Check("ablation", claim, "not run", "Not checked: the taxonomy found only one mechanism to remove."))
    elif run.has("ablations"):
        table = run.ablations
        everything = table[table["n_mechanisms"] == table["n_mechanisms"].max()].iloc[0]
        summed, interaction = float(everything["sum_alone_delta_logit_diff"]), float(everything["interaction_logit_diff"])
        relative = abs(interaction) / abs(summed) if summed else math.inf
        checks.append(Check("ablation", claim, "agrees" if relative < 0.25 else "departs", (
            f"Removing {everything['mechanism_set']}: interaction {interaction:+.2f} logits, {relative:.0%} of the "
            f"summed single effects ({summed:+.2f})."
        )))
    else:
        checks.append(Check("ablation", claim, "not run", "Not checked: no ablations.csv (causal checks not run)."))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# The HTML


@dataclass
class Section:
    id: str
    title: str
    intro: str  # HTML
    figure: object  # Run -> go.Figure
    needs: tuple[str, ...]
    group: str = "DLA"


SECTIONS = (
    Section("recall", "Recall by relation", "Which facts the model knows (recall@1). Only these are analysed unless "
            "the run used <code>--all-prompts</code>.", F.fig_recall, ("recall",), "Overview"),
    Section("signature", "The signature view",
            "The paper's picture: every attention head as a point, its mean DLA to the correct attribute <i>a</i> "
            "read from the SUBJECT tokens (x) against that read from the RELATION tokens (y). Hover a point for its "
            "name, how stable its class is across prompts and relations, and the attributes it boosts most; the dropdown "
            "spreads out the crowd of small heads near zero.",
            F.fig_signature, ("heads",)),
    Section("heatmap", "Heads, layer by layer",
            "The same DLA as a layer × head map, for all sources and split by source. Letters mark the classes.",
            F.fig_heatmap, ("heads",)),
    Section("shares", "Mechanism shares by relation",
            "How much of <i>a</i> − mean(R∖a) each mechanism supplies, per relation. The dropdown switches to the "
            "logit of <i>a</i> itself.", F.fig_mechanism_shares, ("mechanisms",)),
    Section("lens", "Logit lens", "When does the answer become readable at END?", F.fig_logit_lens,
            ("logit_lens", "recall")),
    Section("specificity", "Specificity", "Subject heads should write the subject's own attribute; relation heads "
            "every attribute of the relation. Choose a relation in the dropdown.", F.fig_specificity,
            ("heads", "recall", "attributions")),
    Section("mlps", "MLP boosting", "What each MLP layer writes at END: to <i>a</i>, to the whole of R_r, and to "
            "<i>a</i> over the rest.", F.fig_mlp_boosting, ("mlp_boosting",)),
    Section("ksweep", "Threshold sweep", "The critique of the paper: the line between head classes is arbitrary. "
            "Here is how the counts move with it.", F.fig_k_sweep, ("class_sweep",)),
    Section("swap", "Subject swap", "Rerun with each subject replaced by another of the same relation.",
            F.fig_subject_swap, ("subject_swap",)),
    Section("knockout", "Attention knockout", "Causal check (Geva et al. 2023).", F.fig_knockout, ("knockout",), "Causal"),
    Section("ablations", "Ablations", "Causal check of additivity.", F.fig_ablations, ("ablations",), "Causal"),
    Section("trace", "Causal tracing", "Causal check (Meng et al. 2022).", F.fig_causal_trace, ("causal_trace",), "Causal"),
    Section("extraction", "Attribute extraction rate", "Causal-side check (Geva et al. 2023).", F.fig_extraction_rate,
            ("extraction_rate",), "Causal"),
    Section("enrichment", "Subject enrichment", "Is the attribute already readable at the last subject token?",
            F.fig_enrichment, ("enrichment",), "Causal"),
    Section("noise", "Noise robustness", "Is the sum more robust than its parts?", F.fig_noise_robustness,
            ("noise_robustness",), "Causal"),
    Section("drilldown", "One prompt at a time", "Choose a prompt: its tokens, coloured by group, and the parts that "
            "write most to its correct attribute.", F.fig_drilldown, ("recall", "tokens", "attributions")),
)
CAUSAL_TABLES = ("knockout", "ablations", "causal_trace", "extraction_rate", "enrichment", "noise_robustness")
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
        body.append(figure_div(F.fig_headline(run), "headline"))
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
<meta name="generator" content="factscope {esc(__version__)}">
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
        card("head classes", " · ".join(f"{int(counts.get(c, 0))} {F.CLASS_LETTERS[c]}" for c in ("subject", "relation", "mixed")),
             "subject · relation · mixed heads")
    if run.has("mechanisms"):
        shares = pooled_shares(run)
        top = shares["share"].idxmax()
        card("largest share", pct(shares.loc[top, "share"]), f"{F.MECHANISM_LABELS.get(top, top)}, of a − mean(R∖a)")
    legend = "".join(
        f'<span class="swatch" style="background:{F.CLASS_COLORS[c]}"></span>{c}' for c in ("subject", "relation", "mixed", "negligible")
    )
    return (f'<section id="headline"><h2>Headline</h2><div class="cards">{"".join(cards)}</div>'
            f'<p class="legend">Class colours used throughout: {legend}</p>')


FINDING_TITLES = {
    "recall": "Recall", "exactness": "Exactness", "classes": "Head classes and their shares",
    "interference": "Interference", "specificity": "Specificity", "mlps": "MLP boosting", "logit_lens": "Logit lens",
    "thresholds": "Thresholds", "subject_swap": "Subject swap", "knockout": "Knockout", "ablations": "Ablation",
    "causal_trace": "Causal tracing", "extraction_rate": "Extraction", "enrichment": "Enrichment", "noise": "Noise",
}


def _findings_html(run: Run) -> str:
    items = "".join(
        f'<li data-finding="{f.key}"><b>{html.escape(FINDING_TITLES.get(f.key, f.key))}.</b> {html.escape(f.text)}</li>'
        for f in findings(run)
    )
    return (f'<section id="findings"><h2>Findings</h2><p class="intro">Written from the run\'s tables; every number '
            f"below is read from them.</p><ul class=\"findings\">{items or '<li>No analysis tables in this run.</li>'}</ul></section>")


def _departures_html(run: Run) -> str:
    rows = []
    for check in departures(run):
        badge = {"agrees": "agree", "departs": "depart", "not run": "notrun"}[check.status]
        rows.append(f'<tr data-check="{check.key}"><td><span class="badge {badge}">{html.escape(check.status)}</span></td>'
                    f"<td>{html.escape(check.claim)}</td><td>{html.escape(check.text)}</td></tr>")
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
        "<code>factscope.report.load_run(DIR)</code>; every figure here is a function of <code>factscope.figures</code>"
        " that takes that run and returns a plotly figure.</p>"
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
""" % (F.FONT, F.MONO)


def write_report(run_dir: str | Path, pngs: bool = True) -> Path:
    """Write DIR/report.html (self-contained) and DIR/figures/*.png; return the path of report.html."""
    run = load_run(run_dir)
    target = run.path / "report.html"
    atomic_write_text(target, render_html(run))
    if pngs:
        F.save_pngs(run, run.path / "figures")
    return target
