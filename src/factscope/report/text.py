"""The report's prose, written from a run's tables: the findings, paragraph by paragraph, and the verdicts on the
paper's claims (`departures`). Every number in it is read from the tables (or from what a stage summarised into
summary.json); where a table is missing the text says the check was not run."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import bootstrap
from ..rundir import SUMMARY, TABLES
from ..taxonomy import HEAD_MECHANISM, PAPER_MECHANISMS
from ..mechanisms import swap_summary
from .figures_dla import lens_table
from .figures_heads import top_heads
from .prose import Finding, Verdict, interval_text, names_list, pct, plural, verb
from .style import MECHANISM_LABELS, SHOWN_CLASSES
from .text_causal import MIN_ABLATION_PROMPTS, ablation_effects, causal_findings, causal_verdicts

if TYPE_CHECKING:
    from ..rundir import Run

SWAP_MOVES = 0.5  # a relation head whose RELATION part changes by more than this under subject swap depends on the subject
ONLY_SUM_NONE = 0.05  # below this fraction of prompts, "only the sum ranks a first" counts as absent
# an interaction of removing every mechanism within this fraction of the summed single effects counts as additive
ADDITIVE = 0.25


def pooled_shares(run: Run, metric: str = "logit_diff") -> pd.DataFrame:
    """mechanisms.csv, relation "all", one metric, indexed by mechanism."""
    table = run.mechanisms
    return table[(table["relation"] == "all") & (table["metric"] == metric)].set_index("mechanism")


def share_interval(run: Run, mechanism: str, metric: str = "logit_diff") -> tuple[float | None, float | None]:
    """The bootstrap interval of a pooled share (mechanisms.csv share_low/high); (None, None) for runs without one."""
    shares = pooled_shares(run, metric)
    if "share_low" not in shares or mechanism not in shares.index:
        return None, None
    return float(shares.loc[mechanism, "share_low"]), float(shares.loc[mechanism, "share_high"])


def share_interval_text(low: float | None, high: float | None) -> str:
    return f" [95% CI {pct(low)} to {pct(high)}]" if low is not None else ""


def class_extraction(heads: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Mean specificity and breadth of each class's own part (a mixed head: both parts), from heads.csv."""
    out = {}
    for name, source in (("subject", "subject"), ("relation", "relation")):
        members = heads[heads["class"] == name]
        if len(members) and f"{source}_specificity" in members:
            measures = [m for m in ("specificity", "breadth", "to_a", "to_others") if f"{source}_{m}" in members]
            out[name] = {measure: float(members[f"{source}_{measure}"].mean()) for measure in measures}
    return out


def lens_milestones(run: Run) -> dict:
    """Pooled logit lens: first layer where the median rank of a is 1 and where mean p(a) exceeds 0.5."""
    table = lens_table(run)
    pooled = table[table["relation"] == "all"].sort_values("layer")
    top = pooled[pooled["median_rank"] <= 1]
    half = pooled[pooled["mean_prob"] > 0.5]
    return {
        "n_layers": int(pooled["layer"].max()) + 1,
        "rank1_layer": int(top["layer"].min()) if len(top) else None,
        "half_layer": int(half["layer"].min()) if len(half) else None,
        "final_prob": float(pooled["mean_prob"].iloc[-1]),
    }


FINDING_TITLES = {
    "recall": "Recall", "exactness": "Exactness", "classes": "Head classes and their shares",
    "interference": "Interference", "specificity": "Specificity", "mlps": "MLP boosting", "logit_lens": "Logit lens",
    "thresholds": "Thresholds", "subject_swap": "Subject swap", "knockout": "Knockout", "ablations": "Ablation",
    "causal_trace": "Causal tracing", "atp_trace": "AtP (tracing)", "atp_paths": "AtP (paths)",
    "extraction_rate": "Extraction", "enrichment": "Enrichment", "noise": "Noise",
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
    out += causal_findings(run)
    return out


def _class_findings(run: Run) -> list[Finding]:
    heads = run.heads
    diff, logit = pooled_shares(run, "logit_diff"), pooled_shares(run, "centred_logit")

    def of_logit(mechanism: str) -> str:
        # runs from before the centred metric have only the uncentred logit, which is no share of recall: say nothing
        return f" ({pct(logit.loc[mechanism, 'share'])} of the centred logit of a)" if mechanism in logit.index else ""

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
    for name in ("subject", "relation"):
        mechanism, count = HEAD_MECHANISM[name, name], int(counts.get(name, 0))
        if count:
            sentences.append(
                f"{plural(count, f'{name} head')} ({names_list(top_heads(heads, name))}) {verb(count, 'supply')} "
                f"{pct(diff.loc[mechanism, 'share'])} of it{of_logit(mechanism)};"
            )
    if counts.get("mixed", 0):
        mixed = diff.loc["mixed_subject", "share"] + diff.loc["mixed_relation", "share"]
        sentences.append(
            f"{plural(int(counts['mixed']), 'mixed head')} ({names_list(top_heads(heads, 'mixed'))}) "
            f"{verb(int(counts['mixed']), 'supply')} {pct(mixed)} "
            f"(SUBJECT part {pct(diff.loc['mixed_subject', 'share'])}, RELATION part "
            f"{pct(diff.loc['mixed_relation', 'share'])});"
        )
    if "end_heads" in diff.index:
        sentences.append(
            f"every head's END←END part (END re-reading its own residual, which the paper counts in RELATION) "
            f"supplies {pct(diff.loc['end_heads', 'share'])}{of_logit('end_heads')};"
        )
    sentences.append(
        f"MLPs supply {pct(diff.loc['mlps', 'share'])}{of_logit('mlps')}; the other "
        f"head parts (negligible heads, BOS/first-token/prefix parts, off-class parts) "
        f"{pct(diff.loc['other_heads', 'share'])}; embeddings and biases {pct(diff.loc['embed_bias', 'share'])}."
    )
    if "paper_class" in heads:
        paper = heads["paper_class"].value_counts()
        sentences.append(
            f"With END counted in RELATION, as the paper counts it, the same rule finds {int(paper.get('subject', 0))} "
            f"subject, {int(paper.get('relation', 0))} relation and {int(paper.get('mixed', 0))} mixed heads."
        )
    robustness = _count_robustness(run.summary)
    if robustness:
        sentences.append(robustness)
    return [Finding("classes", " ".join(sentences))]


FRAGILE_COUNT = 0.5  # a class count whose interval is wider than half the count is called fragile
CARRIED = 0.5  # the three largest heads of a class supplying more than this fraction of its share: carried by few


def _count_robustness(summary: dict) -> str:
    """How firm the class counts are (their bootstrap intervals) against how firm the shares are (what the three
    largest heads of a class carry): counts move with every head near τ, a share carried by few heads does not."""
    classes = summary.get("head_classes", {})
    shown = [name for name in ("subject", "relation", "mixed") if "count_ci" in classes.get(name, {})]
    if not shown:
        return ""  # a run from before the count intervals
    spans = ", ".join(f"{name} {classes[name]['count_ci'][0]}–{classes[name]['count_ci'][1]}" for name in shown)
    fragile = [name for name in shown
               if classes[name]["count_ci"][1] - classes[name]["count_ci"][0] > FRAGILE_COUNT * max(classes[name]["count"], 1)]
    text = (f"Over {bootstrap.unit_text(summary.get('intervals'))}, the class counts range {spans}: "
            + (f"the {' and '.join(fragile)} count{'s are' if len(fragile) > 1 else ' is'} fragile (interval wider "
               f"than half the count)" if fragile else "no count's interval is wider than half the count"))
    carriers = [(name, classes[name].get("top_carriers_fraction")) for name in ("subject", "relation")]
    carriers = [(name, value) for name, value in carriers if value is not None]
    if carriers:
        text += "; the shares rest on few heads: " + ", ".join(
            f"the three largest {name} heads carry {pct(value)} of their class's a − mean(R∖a)" for name, value in carriers)
        few = [name for name, value in carriers if value > CARRIED]
        text += (f", so the {' and '.join(few)} share{'s' if len(few) > 1 else ''} would hardly move with heads near "
                 "the threshold" if few else ", spread over many heads")
    return text + "."


def _interference_finding(interference: dict) -> Finding:
    alone = interference.get("alone_ranks_first", {})
    best = sorted(((v, k) for k, v in alone.items() if v is not None), reverse=True)[:3]
    best_text = ", ".join(f"{MECHANISM_LABELS.get(k, k)} {pct(v)}" for v, k in best)
    largest = interference.get("largest_share", {})
    dominant = interference.get("dominant", [])
    destructive = interference.get("destructive", [])
    text = (
        f"The sum of all parts ranks a first among R_r on {pct(interference['sum_ranks_first'])} of prompts; "
        f"single mechanisms alone do so on up to {best_text}. On {pct(interference['only_sum_ranks_first'])} of "
        f"prompts only the sum ranks a first. The largest pooled share is "
        f"{MECHANISM_LABELS.get(largest.get('mechanism'), largest.get('mechanism'))} ({pct(largest.get('share', 0))}); "
        + (f"{', '.join(MECHANISM_LABELS.get(d, d) for d in dominant)} exceed"
           if dominant else "no mechanism exceeds")
        + f" {pct(interference['dominance_threshold'])} of the pooled total, and on {pct(interference['prompts_dominated'])}"
        f" of prompts a single mechanism carries more than {pct(interference['dominance_threshold'])} of that prompt's"
        " a − mean(R∖a). "
        + (f"Destructive on average: {', '.join(MECHANISM_LABELS.get(d, d) for d in destructive)}."
           if destructive else "No mechanism is destructive on average.")
    )
    return Finding("interference", text)


def _sweep_finding(run: Run) -> Finding:
    sweep, rule = run.class_sweep, run.summary.get("head_class_rule", {})
    z = rule.get("z", float(sweep["z"].median()))
    rows = sweep[np.isclose(sweep["z"], z)]
    ks = sorted(rows["k"].unique())
    ranges = []
    for name in SHOWN_CLASSES:
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
    names = top_heads(run.heads, "relation", 1) if run.has("heads") else []
    return names[0] if names else None


def _swap_finding(run: Run) -> Finding:
    swap = run.subject_swap
    summary = swap_summary(swap)
    weighted = "mean_abs_dla" in swap  # tables from before the weights have only the plain mean
    parts = [
        f"{key.split('/')[0]} heads' {key.split('/')[1].upper()} parts change by {entry['rel_change']:.2f} of their "
        f"size (corr {entry['corr']:.2f}" + (f"; unweighted {entry['rel_change_unweighted']:.2f})" if weighted else ")")
        for key, entry in summary.items()
    ]
    text = ("Subject swap (each subject replaced by another of its relation, on the known facts"
            + (", means over heads weighted by each part's mean |DLA|" if weighted else "") + "): "
            + "; ".join(parts) + ".")
    head = strongest_relation_head(run)
    row = swap[(swap["name"] == head) & (swap["source"] == "relation")] if head else swap.iloc[:0]
    if len(row):
        text += f" The strongest relation head, {head}, changes by {row['rel_change'].iloc[0]:.2f}."
    return Finding("subject_swap", text)


def departures(run: Run) -> list[Verdict]:
    """Where this model agrees with or departs from the paper's account (Pythia-2.8B), check by check."""
    verdicts: list[Verdict] = []
    summary = run.summary
    interference = summary.get("interference")
    have_shares = run.has("mechanisms")

    # 1. relation heads do not depend on the subject
    claim = "Relation heads extract attributes of the relation whatever the subject."
    head = strongest_relation_head(run)
    if not run.has("subject_swap"):
        verdicts.append(Verdict("swap", claim, "not run", f"Not checked: no {TABLES['subject_swap']} (run `factscope analyze --swap`)."))
    elif head is None:
        verdicts.append(Verdict("swap", claim, "not run", "Not checked: the model has no relation head."))
    else:
        swap = run.subject_swap
        row = swap[(swap["name"] == head) & (swap["source"] == "relation")]
        rel = swap_summary(swap).get("relation/relation", {}).get("rel_change", float("nan"))
        if row.empty:
            verdicts.append(Verdict("swap", claim, "not run", f"Not checked: {TABLES['subject_swap']} has no row for {head}."))
        else:
            change = float(row["rel_change"].iloc[0])
            moves = change > SWAP_MOVES
            verdicts.append(Verdict("swap", claim, "departs" if moves else "agrees", (
                f"The strongest relation head, {head}, changes its RELATION DLA by {change:.2f} of its size when the "
                f"subject is swapped ({'more' if moves else 'less'} than {SWAP_MOVES:g}); relation heads on average "
                f"by {rel:.2f} (weighted by |DLA|)."
                + (" Here relation heads depend on the subject." if moves else "")
            )))

    # 3. constructive interference: the sum is needed
    claim = "The mechanisms constructively interfere: together they rank the correct attribute first."
    if interference:
        only = interference.get("only_sum_ranks_first")
        best = max((v for v in interference["alone_ranks_first"].values() if v is not None), default=float("nan"))
        best_name = max(interference["alone_ranks_first"], key=lambda k: interference["alone_ranks_first"][k] or -1)
        if only is None:
            verdicts.append(Verdict("only_sum", claim, "not run", "Not checked: no relation has a second attribute to rank against."))
        else:
            absent = only < ONLY_SUM_NONE
            verdicts.append(Verdict("only_sum", claim, "departs" if absent else "agrees", (
                f"The sum ranks a first on {pct(interference['sum_ranks_first'])} of prompts, but only the sum (no "
                f"single mechanism) does so on {pct(only)}: "
                + (f"on every other prompt where the sum ranks a first, some single mechanism alone already does "
                   f"({MECHANISM_LABELS.get(best_name, best_name)} alone on {pct(best)} of prompts), so the "
                   "mechanisms are redundant rather than needed together."
                   if absent else "on those prompts the mechanisms are needed together.")
            )))
    else:
        verdicts.append(Verdict("only_sum", claim, "not run", f"Not checked: {SUMMARY} has no interference entry."))

    # 4. no single mechanism dominates
    claim = "No single mechanism dominates."
    if interference:
        dominant = interference.get("dominant", [])
        largest, threshold = interference["largest_share"], interference["dominance_threshold"]
        low, high = share_interval(run, largest["mechanism"])
        status = "departs" if dominant else "agrees"
        if low is not None and low <= threshold <= high:  # the interval straddles the line: noise could decide it
            status = "inconclusive"
        verdicts.append(Verdict("dominance", claim, status, (
            f"Largest pooled share: {MECHANISM_LABELS.get(largest['mechanism'], largest['mechanism'])} "
            f"{pct(largest['share'])}{share_interval_text(low, high)} (threshold {pct(threshold)}); on "
            f"{pct(interference['prompts_dominated'])} of prompts one mechanism alone exceeds it."
        )))

    # 5. destructive parts: of the paper's mechanisms, not of the catch-all of every other head part
    claim = "The mechanisms add up constructively on the correct attribute."
    if have_shares:
        verdicts.append(_destructive_verdict(claim, run))

    # 6. subject heads specific, relation heads broad: on prompts that did not choose the heads
    claim = "Subject heads are specific to the correct attribute; relation heads boost many attributes of R."
    breadth = summary.get("breadth_held_out")
    if breadth and breadth["subject"].get("fraction") is not None and breadth["relation"].get("fraction") is not None:
        verdicts.append(_breadth_verdict(claim, breadth))
    elif breadth:
        verdicts.append(Verdict("specificity", claim, "not run", "Not checked: on held-out halves the model lacks "
                                "subject or relation heads writing a."))
    else:
        verdicts.append(Verdict("specificity", claim, "not run", f"Not checked: {SUMMARY} has no held-out breadth "
                                "(a run from before it: rerun `factscope analyze`)."))

    # 7. mixed heads exist
    claim = "Mixed heads read from both SUBJECT and RELATION."
    if run.has("heads"):
        count = int((run.heads["class"] == "mixed").sum())
        verdicts.append(Verdict("mixed", claim, "agrees" if count else "departs",
                            f"{count} mixed heads at the chosen thresholds." if count else "No mixed head at the chosen thresholds."))

    # 8. MLP boosting is broad
    claim = "MLPs boost the attributes of the relation (broadly, not only the correct one)."
    verdicts.append(_mlp_boost_verdict(claim, summary.get("mlp_relation_boost")))

    # 9. additivity under ablation
    claim = "The mechanisms are additive: removing several does what removing each does, summed."
    needed = {"n_mechanisms", "mechanism_set", "sum_alone_delta_logit_diff", "interaction_logit_diff"}
    if run.has("ablations") and not needed <= set(run.ablations.columns):
        verdicts.append(Verdict("ablation", claim, "not run", f"Not checked: {TABLES['ablations']} lacks "
                            f"{', '.join(sorted(needed - set(run.ablations.columns)))}."))
    elif run.has("ablations") and run.ablations["n_mechanisms"].max() < 2:
        verdicts.append(Verdict("ablation", claim, "not run", "Not checked: the taxonomy found only one mechanism to remove."))
    elif run.has("ablations"):
        verdicts.append(_additivity_verdict(claim, ablation_effects(run.ablations)))
    else:
        verdicts.append(Verdict("ablation", claim, "not run", f"Not checked: no {TABLES['ablations']} (causal checks not run)."))
    analysed = (summary.get("n_analysed"), summary.get("intervals", {}).get("n_relations"))
    ablated = analysed
    if run.has("ablations") and "n_prompts" in run.ablations:
        ablated = (int(run.ablations["n_prompts"].min()),
                   int(run.ablations["n_relations"].iloc[0]) if "n_relations" in run.ablations else None)
    # 10–11 (additivity under noise; MLP enrichment beyond MLP0) state their own samples
    return [sized(verdict, *(ablated if verdict.key == "ablation" else analysed)) for verdict in verdicts] + causal_verdicts(run)


MIN_VERDICT_PROMPTS = 30  # below this many prompts (or bootstrap.MIN_RELATIONS relations) no verdict is firm


def sized(verdict: Verdict, n_prompts: int | None, n_relations: int | None) -> Verdict:
    """The verdict with the sample it rests on stated, and made inconclusive where the sample is below
    `MIN_VERDICT_PROMPTS` prompts or `bootstrap.MIN_RELATIONS` relations: 17 prompts over 9 relations, or 100 prompts
    of 2 relations, cannot tell this model's mechanisms from the facts chosen."""
    if verdict.status == "not run" or n_prompts is None:
        return verdict
    relations = f", {plural(n_relations, 'relation')}" if n_relations is not None else ""
    text = f"{verdict.text} (n = {plural(n_prompts, 'prompt')}{relations})"
    small = n_prompts < MIN_VERDICT_PROMPTS or (n_relations is not None and n_relations < bootstrap.MIN_RELATIONS)
    if small and verdict.status in ("agrees", "departs"):
        return Verdict(verdict.key, verdict.claim, "inconclusive", (
            f"{text}. Too small a sample for a verdict (at least {MIN_VERDICT_PROMPTS} prompts over "
            f"{bootstrap.MIN_RELATIONS} relations): the numbers alone would say \"{verdict.status}\"."))
    return Verdict(verdict.key, verdict.claim, verdict.status, text)


def _destructive_verdict(claim: str, run: Run) -> Verdict:
    """Destructive interference among the paper's mechanisms (`taxonomy.PAPER_MECHANISMS`): departs where some
    negative share's interval stays below zero, inconclusive where a share's interval reaches below zero without
    staying there, agrees where every interval is positive. The catch-all `other_heads` (negligible heads, sink and
    label reads, off-class parts) is reported beside it, as no mechanism of the paper."""
    shares = pooled_shares(run)
    paper = shares[shares.index.isin(PAPER_MECHANISMS)]
    negative = paper[paper["mean_value"] < 0]
    context = " ".join(
        f"{MECHANISM_LABELS.get(m, m)} (no mechanism of the paper): {pct(row['share'])}"
        f"{share_interval_text(*share_interval(run, m))}." for m, row in shares.iterrows()
        if m not in PAPER_MECHANISMS and row["mean_value"] < 0)
    context = f" {context}" if context else ""
    if len(negative):
        parts = ", ".join(
            f"{MECHANISM_LABELS.get(m, m)} {row['mean_value']:+.2f} logits ({pct(row['share'])}"
            f"{share_interval_text(*share_interval(run, m))}, negative on {pct(row['negative_fraction'])} of prompts)"
            for m, row in negative.iterrows()
        )
        # a departure only where some negative share's interval stays below zero (or a run has no intervals)
        highs = [share_interval(run, m)[1] for m in negative.index]
        certain = any(high is None or high < 0 for high in highs)
        return Verdict("destructive", claim, "departs" if certain else "inconclusive", f"Destructive on average: {parts}.{context}")
    lows = [share_interval(run, m)[0] for m in paper.index]
    straddles = any(low is not None and low < 0 for low in lows)
    return Verdict("destructive", claim, "inconclusive" if straddles else "agrees",
                   "Every mechanism of the paper contributes positively on average"
                   + (", but some interval reaches below zero." if straddles else ".") + context)


def _mlp_boost_verdict(claim: str, boost: dict | None) -> Verdict:
    """MLPs boost the relation's attributes: their other-attribute fraction (`mechanisms.mlp_relation_boost`)
    wholly at or above the bar agrees, wholly below departs, across it is inconclusive."""
    if not boost or boost.get("fraction") is None:
        return Verdict("mlp_breadth", claim, "not run", f"Not checked: {SUMMARY} has no MLP boosting entry (a run "
                       "from before it, no relation with a second attribute, or MLPs that do not write a).")
    low, high = boost["fraction_ci"]
    side = _side(low, high, boost["bar"])
    return Verdict("mlp_breadth", claim, {"above": "agrees", "below": "departs"}.get(side, "inconclusive"), (
        f"Summed over layers, the MLPs at END write {boost['to_a']:.2f} logits to a and {boost['to_others']:.2f} "
        f"to the average other attribute of R_r: a fraction of {boost['fraction']:.2f}{_ci_text(low, high)} "
        f"(broad: at least {boost['bar']:g})"
        + {"above": ": broad boosting.", "below": ": the MLPs write a far more than the rest of R_r."}.get(
            side, ": the interval crosses the bar, this sample cannot tell.")
    ))


def _side(low: float | None, high: float | None, bar: float) -> str:
    """Where an interval lies against a bar: "above" (wholly at or above), "below" (wholly below) or "across"."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "across"
    return "above" if low >= bar else "below" if high < bar else "across"


def _ci_text(low: float | None, high: float | None) -> str:
    return f" [95% CI {low:.2f}, {high:.2f}]" if low is not None and high is not None else ""


def _breadth_verdict(claim: str, breadth: dict) -> Verdict:
    """Subject heads specific (their other-attribute fraction wholly below the bar), relation heads broad (wholly
    at or above it), both measured on held-out halves (`mechanisms.held_out_breadth`): agrees when both hold,
    departs when either interval lies wholly on the wrong side, inconclusive otherwise."""
    bar = breadth["bar"]
    subject, relation = breadth["subject"], breadth["relation"]
    subject_side, relation_side = _side(*subject["fraction_ci"], bar), _side(*relation["fraction_ci"], bar)
    if subject_side == "below" and relation_side == "above":
        status = "agrees"
    elif subject_side == "above" or relation_side == "below":
        status = "departs"
    else:
        status = "inconclusive"

    def described(name: str, entry: dict) -> str:
        in_sample = entry.get("fraction_in_sample")
        return (f"{name} heads write the average other attribute of R_r {entry['fraction']:.2f}"
                f"{_ci_text(*entry['fraction_ci'])} of what they write a"
                + (f" ({in_sample:.2f} in-sample)" if in_sample is not None else ""))

    return Verdict("specificity", claim, status, (
        f"On prompts that did not choose the heads (halves within each relation): {described('subject', subject)}; "
        f"{described('relation', relation)}. Broad means at least {bar:g} (1: indifferent among R_r)."
        + {"agrees": "", "departs": " One class lies wholly on the wrong side of the bar.",
           "inconclusive": " An interval crosses the bar: this sample cannot tell."}[status]
    ))


def _additivity_verdict(claim: str, effects: dict[str, pd.DataFrame]) -> Verdict:
    """The paper's claim is about what removing mechanisms does to the model: removing several does what removing
    each does, summed. That is a claim about TOTAL effects (the layers above react), judged by the interaction of
    removing all of them, effect(all) − Σ effect(alone), against `ADDITIVE` of the summed single effects, with its
    bootstrap interval: additive where the whole interval lies inside ±ADDITIVE·|Σ|, non-additive where it lies
    wholly outside, inconclusive where it crosses the band's edge. Direct effects of disjoint paths add up by
    construction, so their interaction is reported as a sanity check of the edits, never as evidence."""
    table = effects["total"]
    everything = table[table["n_mechanisms"] == table["n_mechanisms"].max()].iloc[0]
    summed, interaction = float(everything["sum_alone_delta_logit_diff"]), float(everything["interaction_logit_diff"])
    n_prompts = int(table["n_prompts"].min()) if "n_prompts" in table else 0
    if n_prompts < MIN_ABLATION_PROMPTS or not (math.isfinite(summed) and math.isfinite(interaction)):
        why = (f"too few prompts ({n_prompts}; a verdict needs at least {MIN_ABLATION_PROMPTS})"
               if n_prompts < MIN_ABLATION_PROMPTS else "the interaction is not a number")
        return Verdict("ablation", claim, "inconclusive", f"Inconclusive: {why}; rerun `factscope ablate --overwrite` on more known facts.")
    band = ADDITIVE * abs(summed)
    low, high = everything.get("interaction_logit_diff_low", np.nan), everything.get("interaction_logit_diff_high", np.nan)
    if not (np.isfinite(low) and np.isfinite(high)):  # a table from before the intervals: the point estimate alone
        low = high = interaction
    status = "agrees" if -band < low and high < band else "departs" if low > band or high < -band else "inconclusive"
    relative = abs(interaction) / abs(summed) if summed else math.inf
    text = (f"Removing {everything['mechanism_set']} (total effects, the layers above reacting) changes a − mean(R∖a) "
            f"by {everything['delta_logit_diff']:+.2f} logits against {summed:+.2f} for the single removals summed: "
            f"interaction {interaction:+.2f}{interval_text(everything, 'interaction_logit_diff', '+.2f')}, "
            f"{relative:.0%} of the summed effects ({'within' if status == 'agrees' else 'beyond' if status == 'departs' else 'crossing'}"
            f" the ±{ADDITIVE:.0%} band)."
            + {"agrees": "", "departs": " Removing them together does not do what removing each does, summed.",
               "inconclusive": " The interval crosses the band's edge: this sample cannot tell."}[status])
    if "direct" in effects:
        direct = effects["direct"]
        whole = direct[direct["n_mechanisms"] == direct["n_mechanisms"].max()].iloc[0]
        text += (f" Sanity check, not evidence: as direct effects (only their own contributions to END replaced), "
                 f"which add up by construction for disjoint paths, the interaction is "
                 f"{whole['interaction_logit_diff']:+.2f}{interval_text(whole, 'interaction_logit_diff', '+.2f')}.")
    return Verdict("ablation", claim, status, text)
