"""The report's findings from the causal tables (`factscope ablate`, `factscope trace`): one sentence per table,
its numbers read from the table or from what the check summarised into summary.json["causal"]."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import FactscopeError
from ..rundir import SUMMARY, TABLES
from .prose import Finding, interval_text, pct
from .style import BLOCKED_LABELS, MECHANISM_LABELS

if TYPE_CHECKING:
    from ..rundir import Run

WORST_WINDOW = "_worst_window"  # causal.knockout_summary names a blocked group's worst window "{group}_worst_window"
# fewer prompts than this and the ablation interaction, a difference of several means, gets no verdict: a chosen
# floor, not a computed bound (on 3 prompts it read "+nan … departs")
MIN_ABLATION_PROMPTS = 10


def causal_findings(run: Run) -> list[Finding]:
    """One sentence per causal table present. The causal tables are young: a table whose columns are not the
    expected ones is reported as such instead of breaking the report."""
    out = []
    for name, write in CAUSAL_FINDINGS.items():
        if run.has(name):
            try:
                out += write(run)
            except KeyError as err:
                out.append(Finding(name, f"{TABLES[name]} does not have the expected column {err}; not summarised."))
            except FactscopeError as err:
                out.append(Finding(name, f"{err}; not summarised."))
    return out


def causal_summary(run: Run, check: str) -> dict:
    """What a causal command summarised into summary.json["causal"][check]: read, not recomputed, by the text."""
    entry = run.summary.get("causal", {}).get(check)
    if entry is None:
        raise FactscopeError(f"{SUMMARY} has no causal entry {check!r}")
    return entry


def _knockout_finding(run: Run) -> list[Finding]:
    worst = {key.removesuffix(WORST_WINDOW): entry for key, entry in causal_summary(run, "knockout").items()
             if key.endswith(WORST_WINDOW)}
    table = run.knockout
    windows = table[table["condition"] == "window"]
    parts = []
    for blocked in sorted(worst):
        rows = windows[windows["blocked"] == blocked]
        row = rows.loc[rows["rel_change_p"].idxmin()] if len(rows) else pd.Series(dtype=float)
        parts.append(f"blocking END → {BLOCKED_LABELS.get(blocked, blocked)} in layers {worst[blocked]['layers'][0]}–"
                     f"{worst[blocked]['layers'][1]} changes p(a) by {pct(worst[blocked]['rel_change_p'])}"
                     f"{interval_text(row, 'rel_change_p', '%')}")
    # the summary keeps the worst head set per blocked group; the table has every set, in the order they were run
    for _, row in table[table["condition"] == "heads"].iterrows():
        parts.append(f"blocking END → {BLOCKED_LABELS.get(row['blocked'], row['blocked'])} for the {row['n_heads']} "
                     f"{row['head_set'].replace('_', ' ')} only changes p(a) by {pct(row['rel_change_p'])}"
                     f"{interval_text(row, 'rel_change_p', '%')} (accuracy {pct(row['accuracy_after'])})")
    return [Finding("knockout", "Attention knockout: " + "; ".join(parts) + ".")] if parts else []


def ablation_effects(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """ablations.csv by effect ("total", "direct"); a table from before the direct effects is all total."""
    if "effect" not in table:
        return {"total": table}
    return {effect: rows.reset_index(drop=True) for effect, rows in table.groupby("effect", sort=False)}


def _ablation_finding(run: Run) -> list[Finding]:
    parts = []
    for effect, table in ablation_effects(run.ablations).items():
        everything = table[table["n_mechanisms"] == table["n_mechanisms"].max()].iloc[0]
        how = {"total": "as a total effect (the layers above react)",
               "direct": "as a direct effect (only their own contributions to END's final residual replaced)"}[effect]
        parts.append(
            f"{how}, removing {everything['mechanism_set']} changes a − mean(R∖a) by "
            f"{everything['delta_logit_diff']:+.2f}{interval_text(everything, 'delta_logit_diff', '+.2f')} logits against "
            f"{everything['sum_alone_delta_logit_diff']:+.2f} for the sum of single removals (interaction "
            f"{everything['interaction_logit_diff']:+.2f}{interval_text(everything, 'interaction_logit_diff', '+.2f')}); "
            f"accuracy {pct(table.iloc[0]['accuracy'])} → {pct(everything['accuracy'])}{interval_text(everything, 'accuracy', '%')}"
        )
    return [Finding("ablations", "Ablation: " + "; ".join(parts) + ".")]


def _trace_finding(run: Run) -> list[Finding]:
    table = run.causal_trace
    parts = []
    for kind, token in (("mlp", "last_subject"), ("attn", "last_token"), ("resid", "last_subject")):
        rows = table[(table["kind"] == kind) & (table["token"] == token)]
        if len(rows):
            peak = rows.loc[rows["indirect_effect"].idxmax()]
            layers = (f" [95% CI layers {peak['peak_layer_low']:.0f}–{peak['peak_layer_high']:.0f}]"
                      if np.isfinite(peak.get("peak_layer_low", np.nan)) else "")
            parts.append(f"{kind} at the {token.replace('_', ' ')} peaks at layer {int(peak['layer'])}{layers} "
                         f"(Δp(a) {peak['indirect_effect']:+.3f}{interval_text(peak, 'peak_effect', '+.3f')})")
    clean, corrupted = float(table["p_clean"].iloc[0]), float(table["p_corrupted"].iloc[0])
    return [Finding("causal_trace", f"Causal tracing (noise on the subject: p(a) {clean:.3f} → {corrupted:.3f}): "
                    + "; ".join(parts) + ".")] if parts else []


def _extraction_finding(run: Run) -> list[Finding]:
    table = run.extraction_rate
    best = table.loc[table["extraction_rate"].idxmax()]
    normed = ""
    if "extraction_rate_normed" in table:
        top = table.loc[table["extraction_rate_normed"].idxmax()]
        normed = (f" Through the final norm instead, that sublayer's rate is {pct(best['extraction_rate_normed'])}, the "
                  f"highest {pct(top['extraction_rate_normed'])} ({top['sublayer']}, layer {int(top['layer'])}).")
    return [Finding("extraction_rate", (
        f"Attribute extraction (sublayer outputs projected with the unembedding matrix, as Geva et al.): the highest "
        f"rate is {pct(best['extraction_rate'])} for the {best['sublayer']} sublayer of layer {int(best['layer'])}." + normed
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
    largest = table["noise_scale"].max()
    top = table[table["noise_scale"] == largest].set_index("mechanism")
    if "alone_first_among_r" not in table:
        return [Finding("noise", (
            f"Noise robustness at scale {largest:g}: accuracy "
            + ", ".join(f"{MECHANISM_LABELS.get(m, m)} {pct(a)}" for m, a in top["accuracy"].items()) + "."
        ))]
    singles = top.drop(index="all", errors="ignore")
    unit = "END's clean residual norm" if "noise_unit" in table else "the noise unit"
    return [Finding("noise", (
        f"Noise robustness (additive parts predict that noise on one mechanism costs the full model far less than it "
        f"costs that mechanism alone): with noise of {largest:g}× {unit} on one mechanism, the full model still ranks a "
        "first among R_r on "
        + ", ".join(f"{pct(row['first_among_r'])} against {pct(row['alone_first_among_r'])} for "
                    f"{MECHANISM_LABELS.get(m, m)} alone"
                    + (f" (margin {pct(row['margin'])}{interval_text(row, 'margin', '%')})" if "margin" in row else "")
                    for m, row in singles.iterrows())
        + (f"; with noise on all of them, on {pct(top.loc['all', 'first_among_r'])}" if "all" in top.index else "")
        + "."
    ))]


def agreement_caption(table: pd.DataFrame, unit: str) -> str:
    """atp_agreement.csv / atp_path_agreement.csv's rows over all cells, in a sentence each: no AtP figure without
    its error against exact patching (GradDrop's too, where `trace --graddrop` ran it)."""
    overall = table[table["kind"] == "all"]
    estimators = overall["estimator"] if "estimator" in overall else pd.Series("atp", index=overall.index)
    number = lambda value: "n/a" if pd.isna(value) else f"{value:.2f}"  # noqa: E731
    sentences = []
    for (_, row), estimator in zip(overall.iterrows(), estimators):
        scope = f"a seeded sample of {int(row['n_cells'])} cells patched exactly" if bool(row["sampled"]) else f"all {int(row['n_cells'])} cells"
        name = "AtP" if estimator == "atp" else "AtP* GradDrop (unsigned)"
        sentences.append(f"{name} against exact patching on {scope} (prompt by prompt): Pearson {number(row['pearson'])}, "
                         f"Spearman {number(row['spearman'])}, top-{int(row['top_k'])} overlap {row['top_k_overlap']:.0%}; "
                         f"{int(row['false_negatives'])} of {int(row['n_exact_above'])} exact effects ≥ {row['threshold']:g} "
                         f"{unit} estimated at less than half (false negatives).")
    return " ".join(sentences)


def _atp_trace_finding(run: Run) -> list[Finding]:
    return [Finding("atp_trace", "Causal tracing by attribution patching (trace --method atp|both). "
                    + agreement_caption(run.atp_agreement, "in p"))]


def _atp_paths_finding(run: Run) -> list[Finding]:
    return [Finding("atp_paths", "Single path ablations by attribution patching (ablate --method atp|both; total "
                    "effects). " + agreement_caption(run.atp_path_agreement, "logits of a − mean(R∖a)"))]


# causal table → the finding written from it, in the order the findings list them
CAUSAL_FINDINGS = {
    "knockout": _knockout_finding, "ablations": _ablation_finding, "causal_trace": _trace_finding,
    "atp_agreement": _atp_trace_finding, "atp_path_agreement": _atp_paths_finding,
    "extraction_rate": _extraction_finding, "enrichment": _enrichment_finding, "noise_robustness": _noise_finding,
}
