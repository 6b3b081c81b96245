"""The report's findings from the causal tables (`factscope ablate`, `factscope trace`): one sentence per table,
its numbers read from the table or from what the check summarised into summary.json["causal"]."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..causal_readings import HALVING_RULE, halved_reading, mlp0_split
from ..errors import FactscopeError
from ..rundir import SUMMARY, TABLES
from .prose import Finding, Verdict, interval_text, pct
from .style import BLOCKED_LABELS, MECHANISM_LABELS

if TYPE_CHECKING:
    from ..rundir import Run

WORST_WINDOW = "_worst_window"  # causal.knockout_summary names a blocked group's worst window "{group}_worst_window"
# fewer prompts than this and the ablation interaction, a difference of several means, gets no verdict: a chosen
# floor, not a computed bound (on 3 prompts it read "+nan … departs")
MIN_ABLATION_PROMPTS = 10
# the peak MLP window at the last subject token counts as carried by the MLPs above MLP0 where, without MLP0, it
# keeps more than this share of its effect (the whole interval above: agrees; below: departs; across: inconclusive)
KEPT_WITHOUT_MLP0 = 0.5


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
        entry = worst[blocked]
        picked = ""
        if _finite(entry.get("picked_rel_change_p_ci")) and _finite(entry.get("layer_ci")):
            # the worst of the windows, re-picked in every resample: the interval its pick deserves
            picked = (f" [95% CI {pct(entry['picked_rel_change_p_ci'][0])}, {pct(entry['picked_rel_change_p_ci'][1])}, the "
                      f"worst of {len(rows)} windows re-picked in every resample, centred on layers "
                      f"{entry['layer_ci'][0]:.0f}–{entry['layer_ci'][1]:.0f}]")
        parts.append(f"blocking END → {BLOCKED_LABELS.get(blocked, blocked)} in layers {entry['layers'][0]}–"
                     f"{entry['layers'][1]} changes p(a) by {pct(entry['rel_change_p'])}"
                     + (picked or interval_text(row, 'rel_change_p', '%')))
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
    split = mlp0_split(table)
    tail = f" {mlp0_sentence(split)}" if split is not None else ""
    return [Finding("causal_trace", f"Causal tracing (noise on the subject: p(a) {clean:.3f} → {corrupted:.3f}): "
                    + "; ".join(parts) + "." + tail)] if parts else []


def _ci(values, spec: str) -> str:
    """A [low, high] pair from summary.json as " [95% CI low, high]"; nothing where either end is missing."""
    if not _finite(values):
        return ""
    fmt = pct if spec == "%" else (lambda x: format(x, spec))
    return f" [95% CI {fmt(values[0])}, {fmt(values[1])}]"


def _finite(values) -> bool:
    return values is not None and len(values) == 2 and all(v is not None and np.isfinite(v) for v in values)


def _layers(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}–{last}"


def mlp0_sentence(split: dict) -> str:
    """MLP0 apart from the peak MLP window at the last subject token (`causal.trace.mlp0_split`), in one sentence:
    intervals re-pick the window's peak in every resample."""
    window, alone, without, best = split["window"], split["mlp0_alone"], split["without_mlp0"], split["best_single_layer"]
    first, last = without["layers"]
    rest = (f"{_layers(first, last)} without MLP0 recover Δp {without['effect']:+.3f}{_ci(without['effect_ci'], '+.3f')}"
            + (f" ({pct(without['kept_share'])} of the window{_ci(without['kept_share_ci'], '%')})"
               if without["kept_share"] is not None else "")
            if first <= last else "without MLP0 the window restores nothing")
    return (f"MLP0 apart: the MLP window that peaks at the last subject token ({_layers(*window['layers'])}) recovers Δp {window['effect']:+.3f}{_ci(window['effect_ci'], '+.3f')}; restoring "
            f"MLP0 alone recovers Δp {alone['effect']:+.3f}{_ci(alone['effect_ci'], '+.3f')} of it; {rest}. Of single "
            f"MLP layers, layer {best['layer']} recovers most (Δp {best['effect']:+.3f}{_ci(best['effect_ci'], '+.3f')}, "
            f"layer re-picked{_ci(best['layer_ci'], '.0f')}).")


def _extraction_finding(run: Run) -> list[Finding]:
    table = run.extraction_rate
    best = table.loc[table["extraction_rate"].idxmax()]
    if best["extraction_rate"] <= 0:
        return [Finding("extraction_rate", (
            "Attribute extraction (sublayer outputs projected with the unembedding matrix, as Geva et al.): no "
            "sublayer's output names the prediction at any layer (0% everywhere): there is no best layer."))]
    sublayer = table[table["sublayer"] == best["sublayer"]]
    picked = ""
    if "best_layer_low" in best and np.isfinite(best["best_layer_low"]):
        picked = (f" [95% CI {pct(best['best_rate_low'])}, {pct(best['best_rate_high'])}, the best of {len(sublayer)} layers "
                  f"re-picked in every resample, at layers {best['best_layer_low']:.0f}–{best['best_layer_high']:.0f}]")
    normed = ""
    if "extraction_rate_normed" in table:
        top = table.loc[table["extraction_rate_normed"].idxmax()]
        normed = (f" Through the final norm instead, that sublayer's rate is {pct(best['extraction_rate_normed'])}, the "
                  f"highest {pct(top['extraction_rate_normed'])} ({top['sublayer']}, layer {int(top['layer'])}).")
    any_layer = ""
    if "any_layer_rate" in table:
        per_sublayer = table.groupby("sublayer")[["any_layer_rate", "any_layer_rate_low", "any_layer_rate_high"]].first()
        any_layer = " Per example, as Geva et al. count it (the prediction named by that sublayer at some layer): " + ", ".join(
            f"{name} {pct(row['any_layer_rate'])}"
            + (f" [95% CI {pct(row['any_layer_rate_low'])}, {pct(row['any_layer_rate_high'])}]"
               if np.isfinite(row["any_layer_rate_low"]) else "")
            for name, row in per_sublayer.iterrows()) + " of prompts."
    return [Finding("extraction_rate", (
        f"Attribute extraction (sublayer outputs projected with the unembedding matrix, as Geva et al.): the highest "
        f"rate is {pct(best['extraction_rate'])}{picked} for the {best['sublayer']} sublayer of layer {int(best['layer'])}."
        + any_layer + normed
    ))]


def _enrichment_finding(run: Run) -> list[Finding]:
    table = run.enrichment.sort_values("layer")
    best = table.loc[table["median_rank_a"].idxmin()]
    entry = run.summary.get("causal", {}).get("enrichment", {})
    traced = ""
    if "mlp_trace_peak_layer" in entry:
        traced = (f" Causal tracing's MLP windows at that token peak at layer {entry['mlp_trace_peak_layer']}"
                  f"{_ci(entry.get('mlp_trace_peak_layer_ci'), '.0f')} (Δp {entry['mlp_trace_peak_effect']:+.3f}"
                  f"{_ci(entry.get('mlp_trace_peak_effect_ci'), '+.3f')}, re-picked in every resample)"
                  + (f"; restoring MLP0 alone recovers Δp {entry['mlp0']['mlp0_alone']['effect']:+.3f} of that window's "
                     f"{entry['mlp0']['window']['effect']:+.3f}, the window without MLP0 Δp "
                     f"{entry['mlp0']['without_mlp0']['effect']:+.3f}" if "mlp0" in entry else "") + ".")
    return [Finding("enrichment", (
        f"Subject enrichment: at the last subject token the median rank of a is lowest ({best['median_rank_a']:g}) "
        f"after layer {int(best['layer'])}." + traced
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
    if "halved_scale" in table:
        return [Finding("noise", _noise_at_halved(table, unit))]
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


def noise_readings(table: pd.DataFrame) -> dict[str, dict]:
    """Each single mechanism's reading at the scale `HALVING_RULE` picks (`causal.noise.halved_reading`), in the
    table's order; "all" is no test of additivity and is left out."""
    return {mechanism: halved_reading(rows) for mechanism, rows in table.groupby("mechanism", sort=False)
            if mechanism != "all"}


def _noise_at_halved(table: pd.DataFrame, unit: str) -> str:
    parts = []
    for mechanism, reading in noise_readings(table).items():
        label = MECHANISM_LABELS.get(mechanism, mechanism)
        where = (f"{reading['halved_scale']:g}× {unit}" + (
            f" [95% CI {reading['halved_scale_ci'][0]:g}–{reading['halved_scale_ci'][1]:g}×]" if _finite(reading["halved_scale_ci"]) else "")
            if reading["accuracy_halved"] else f"{reading['halved_scale']:g}× (accuracy never halves on the grid: its largest scale)")
        parts.append(
            f"noise on {label}: at {where} (accuracy {pct(reading.get('clean_accuracy', float('nan')))} → "
            f"{pct(reading.get('accuracy', float('nan')))}) the full model ranks a first among R_r on "
            f"{pct(reading.get('first_among_r', float('nan')))} against {pct(reading.get('alone_first_among_r', float('nan')))} "
            f"for {label} alone, margin {pct(reading['margin_at_halved'])}{_ci(reading['margin_at_halved_ci'], '%')}; "
            f"the area between the curves from 0 to that scale, per unit of scale, {pct(reading['margin_area'])}"
            f"{_ci(reading['margin_area_ci'], '%')}")
    readings = list(noise_readings(table).values())
    chance = readings[0]["chance_first_among_r"] if readings else None
    largest = table["noise_scale"].max()
    top = table[(table["noise_scale"] == largest) & (table["mechanism"] != "all")]
    low, high = pct(top["first_among_r"].min()), pct(top["first_among_r"].max())
    return ("Noise robustness (additive parts predict that noise on one mechanism costs the full model far less than it "
            f"costs that mechanism alone), read at a scale fixed by a rule stated in advance — {HALVING_RULE} — with "
            "intervals in which the scale is re-picked in every resample: " + "; ".join(parts)
            + (f". By chance a is first among R_r on {pct(chance)}" if chance is not None else "")
            + f"; at the grid's largest scale, {largest:g}×, the full model does so on {low if low == high else f'{low}–{high}'}"
            " whatever the mechanism.")


def causal_verdicts(run: Run) -> list[Verdict]:
    """The verdicts the causal tables bear on: additivity under noise (`noise_verdict`) and whether the MLP
    enrichment at the last subject token is more than MLP0 (`mlp0_verdict`); "not run" where the table is
    missing."""
    out = []
    if run.has("noise_robustness"):
        out.append(noise_verdict(run.noise_robustness))
    else:
        out.append(Verdict("noise", NOISE_CLAIM, "not run", f"Not checked: no {TABLES['noise_robustness']} (run `factscope ablate`)."))
    if run.has("causal_trace"):
        out.append(mlp0_verdict(run.causal_trace))
    else:
        out.append(Verdict("mlp0", MLP0_CLAIM, "not run", f"Not checked: no {TABLES['causal_trace']} (run `factscope trace`)."))
    return out


NOISE_CLAIM = "Additive parts: noise on one mechanism costs the full model far less than it costs that mechanism alone."
MLP0_CLAIM = ("Factual recall is enriched at the last subject token by early-to-middle MLPs (Meng et al. 2022), not by "
              "MLP0 undoing the noise alone.")


def noise_verdict(table: pd.DataFrame) -> Verdict:
    """Judged per single mechanism at the scale `HALVING_RULE` picks: the margin (full model minus the mechanism
    alone, a first among R_r) agrees where its re-picked interval lies above 0, departs where it lies below 0, and
    is inconclusive where it crosses 0 — or where the area between the curves up to that scale says the opposite
    (its interval wholly on the other side of 0), or where the full model is at chance at every noisy scale of the
    grid (there is nothing to read). The whole: departs if any mechanism departs, agrees if every one agrees,
    inconclusive otherwise."""
    if "halved_scale" not in table or "alone_first_among_r" not in table:
        return Verdict("noise", NOISE_CLAIM, "inconclusive", f"Inconclusive: {TABLES['noise_robustness']} predates the "
                       "scale rule and its intervals; rerun `factscope ablate --overwrite`.")
    readings = noise_readings(table)
    if not readings:
        return Verdict("noise", NOISE_CLAIM, "not run", "Not checked: noise on every path at once only, which is no test.")
    statuses, parts = {}, []
    for mechanism, reading in readings.items():
        label = MECHANISM_LABELS.get(mechanism, mechanism)
        margin, area = reading["margin_at_halved_ci"], reading["margin_area_ci"]
        if not reading["informative"]:
            status, why = "inconclusive", "the full model is at chance at every noisy scale"
        elif not _finite(margin):
            status, why = "inconclusive", "the margin has no interval"
        else:
            status = "agrees" if margin[0] > 0 else "departs" if margin[1] < 0 else "inconclusive"
            why = {"agrees": "above 0", "departs": "below 0", "inconclusive": "crosses 0"}[status]
            if _finite(area) and ((status == "agrees" and area[1] < 0) or (status == "departs" and area[0] > 0)):
                status, why = "inconclusive", "the area between the curves says the opposite"
        statuses[mechanism] = status
        parts.append(f"{label} at {reading['halved_scale']:g}×: margin {pct(reading['margin_at_halved'])}"
                     f"{_ci(margin, '%')}, area {pct(reading['margin_area'])}{_ci(area, '%')} — {status} ({why})")
    values = set(statuses.values())
    overall = "departs" if "departs" in values else "agrees" if values == {"agrees"} else "inconclusive"
    return Verdict("noise", NOISE_CLAIM, overall, (
        f"Read at the scale the rule picks ({HALVING_RULE}); a mechanism agrees where the re-picked interval of the "
        "margin lies above 0, departs below, inconclusive across 0 or where the model is at chance at every noisy "
        "scale: " + "; ".join(parts) + "."))


def mlp0_verdict(table: pd.DataFrame) -> Verdict:
    """Judged on the peak MLP window at the last subject token: the share of its effect kept without MLP0
    (re-picked interval, `causal.trace.mlp0_split`) agrees above `KEPT_WITHOUT_MLP0`, departs below, inconclusive
    across it — or where the window's own effect interval reaches 0 or below (no enrichment to apportion)."""
    split = mlp0_split(table)
    if split is None:
        return Verdict("mlp0", MLP0_CLAIM, "inconclusive", f"Inconclusive: {TABLES['causal_trace']} has no single-layer "
                       "MLP restorations or windows without MLP0; rerun `factscope trace --overwrite`.")
    effect, share = split["window"]["effect_ci"], split["without_mlp0"]["kept_share_ci"]
    if not _finite(effect) or effect[0] <= 0:
        status, why = "inconclusive", "the window's own effect is not clearly above 0"
    elif not _finite(share):
        status, why = "inconclusive", "the share has no interval"
    else:
        status = "agrees" if share[0] > KEPT_WITHOUT_MLP0 else "departs" if share[1] < KEPT_WITHOUT_MLP0 else "inconclusive"
        why = {"agrees": "above", "departs": "below", "inconclusive": "across"}[status] + f" {pct(KEPT_WITHOUT_MLP0)}"
    return Verdict("mlp0", MLP0_CLAIM, status, (
        f"{mlp0_sentence(split)} Rule: the window, without MLP0, keeps more than {pct(KEPT_WITHOUT_MLP0)} of its effect "
        f"(interval wholly above: agrees; wholly below: departs; across: inconclusive) — here {why}."))


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
