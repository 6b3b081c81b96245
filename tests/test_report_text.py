"""The report's prose (`factscope.report.text`): every number in the findings and the verdicts on the paper's
claims is the tables' number; the hand-built model is described as it was built."""

from __future__ import annotations

import json

import pandas as pd
from report_runs import full_dir, full_run, handbuilt_dir  # noqa: F401 — fixtures

from factscope.report import departures, findings, write_report
from factscope.report.page import CAUSAL_TABLES
from factscope.report.text import FINDING_TITLES, pct
from factscope.report.text_causal import CAUSAL_FINDINGS
from factscope.rundir import Run, load_run


def finding(run: Run, key: str) -> str:
    return {f.key: f.text for f in findings(run)}[key]


def percent(x: float) -> str:
    return f"{round(100 * x):.0f}%"


def test_every_finding_has_a_title(full_run):
    keys = [f.key for f in findings(full_run)]
    assert {"knockout", "ablations", "causal_trace", "noise"} <= set(keys)
    assert set(keys) <= set(FINDING_TITLES)


def test_every_causal_table_has_a_finding():
    assert tuple(CAUSAL_FINDINGS) == CAUSAL_TABLES


def test_a_change_that_rounds_to_nothing_is_not_negative():
    assert pct(-0.004) == "0%" and pct(-0.006) == "-1%" and pct(0.4707) == "47%"


def test_findings_numbers_match_the_tables(full_dir, full_run):
    recall = pd.read_csv(full_dir / "recall.csv")
    text = finding(full_run, "recall")
    assert f"recalls {int(recall['correct'].sum())} of {len(recall)} facts" in text

    heads = pd.read_csv(full_dir / "heads.csv")
    mechanisms = pd.read_csv(full_dir / "mechanisms.csv")
    pooled = mechanisms[(mechanisms["relation"] == "all") & (mechanisms["metric"] == "logit_diff")].set_index("mechanism")
    text = finding(full_run, "classes")
    for name, mechanism in (("subject", "subject_heads"), ("relation", "relation_heads")):
        count = int((heads["class"] == name).sum())
        strongest = heads[heads["class"] == name].sort_values(f"{name}_dla", ascending=False)["name"].iloc[0]
        assert f"{count} {name} head{'' if count == 1 else 's'} ({strongest}" in text
        assert f"{percent(pooled.loc[mechanism, 'share'])} of it" in text
    centred = mechanisms[(mechanisms["relation"] == "all") & (mechanisms["metric"] == "centred_logit")].set_index("mechanism")
    # a share of "the logit" is of the centred logit: what raises every logit alike is no share of recall
    assert (f"MLPs supply {percent(pooled.loc['mlps', 'share'])} ({percent(centred.loc['mlps', 'share'])} of the "
            "centred logit of a)") in text
    assert f"averages {pooled['mean_value'].sum():.2f} logits" in text

    summary = json.loads((full_dir / "summary.json").read_text())
    text = finding(full_run, "exactness")
    assert f"{summary['max_abs_reconstruction_error']:.1e}" in text and f"{summary['max_abs_head_error']:.1e}" in text

    text = finding(full_run, "interference")
    assert f"on {percent(summary['interference']['sum_ranks_first'])} of prompts" in text
    assert f"On {percent(summary['interference']['only_sum_ranks_first'])} of prompts only the sum" in text

    mlp = pd.read_csv(full_dir / "mlp_boosting.csv").query("relation == 'all'")
    text = finding(full_run, "mlps")
    assert f"DLA to a {mlp['correct_dla'].sum():.2f} logits, breadth {mlp['breadth'].sum():.2f}" in text
    assert f"MLP {int(mlp.loc[mlp['correct_dla'].idxmax(), 'layer'])} ({mlp['correct_dla'].max():.2f} logits)" in text

    sweep = pd.read_csv(full_dir / "head_class_sweep.csv")
    at_z = sweep[sweep["z"] == summary["head_class_rule"]["z"]].query("`class` == 'subject'")["count"]
    assert f"subject {at_z.min()}–{at_z.max()}" in finding(full_run, "thresholds")

    swap = pd.read_csv(full_dir / "subject_swap.csv")
    strongest = heads[heads["class"] == "relation"].sort_values("relation_dla", ascending=False)["name"].iloc[0]
    change = swap[(swap["name"] == strongest) & (swap["source"] == "relation")]["rel_change"].iloc[0]
    assert f"The strongest relation head, {strongest}, changes by {change:.2f}" in finding(full_run, "subject_swap")

    knockout = pd.read_csv(full_dir / "knockout.csv").query("condition == 'window' and blocked == 'subject'")
    assert percent(knockout["rel_change_p"].min()) in finding(full_run, "knockout")


def test_departures_follow_the_numbers(full_dir, full_run):
    verdicts = {v.key: v for v in departures(full_run)}
    assert {v.status for v in verdicts.values()} <= {"agrees", "departs", "inconclusive", "not run"}
    mechanisms = pd.read_csv(full_dir / "mechanisms.csv")
    pooled = mechanisms[(mechanisms["relation"] == "all") & (mechanisms["metric"] == "logit_diff")].set_index("mechanism")
    boost = full_run.summary["mlp_relation_boost"]
    low, high = boost["fraction_ci"]
    if boost["fraction"] is None:  # a random tiny model's MLPs may write nothing positive to a: nothing to judge
        assert verdicts["mlp_breadth"].status == "not run"
    else:
        assert verdicts["mlp_breadth"].status == ("agrees" if low >= 0.5 else "departs" if high < 0.5 else "inconclusive")
        assert f"a fraction of {boost['fraction']:.2f}" in verdicts["mlp_breadth"].text
    paper = pooled.drop(index=["other_heads", "embed_bias"])  # the catch-all is no mechanism of the paper
    negative = paper[paper["mean_value"] < 0]
    # a departure needs a negative share whose interval stays below zero; a negative point estimate alone is noise
    expected = ("departs" if (negative["share_high"] < 0).any() else "inconclusive" if len(negative)
                or (paper["share_low"] < 0).any() else "agrees")
    assert verdicts["destructive"].status == expected
    largest = pooled["share"].idxmax()
    low, high = pooled.loc[largest, ["share_low", "share_high"]]
    dominance = "inconclusive" if low <= 0.8 <= high else "departs" if pooled.loc[largest, "share"] > 0.8 else "agrees"
    assert verdicts["dominance"].status == dominance and "95% CI" in verdicts["dominance"].text
    summary = full_run.summary["interference"]
    assert verdicts["only_sum"].status == ("departs" if summary["only_sum_ranks_first"] < 0.05 else "agrees")
    total = pd.read_csv(full_dir / "ablations.csv").query("effect == 'total'")
    everything = total.loc[total["n_mechanisms"].idxmax()]
    band = 0.25 * abs(everything["sum_alone_delta_logit_diff"])
    low, high = everything["interaction_logit_diff_low"], everything["interaction_logit_diff_high"]
    additivity = "agrees" if -band < low and high < band else "departs" if low > band or high < -band else "inconclusive"
    assert verdicts["ablation"].status == additivity and "total effects" in verdicts["ablation"].text
    assert verdicts["swap"].status in ("agrees", "departs")


def test_the_handbuilt_model_is_described_as_it_was_built(handbuilt_dir):
    """One subject head (L0H0) and one relation head (L0H1) that ignores the subject, by construction."""
    run = load_run(handbuilt_dir)
    text = finding(run, "classes")
    assert "1 subject head (L0H0) supplies 100% of it" in text
    assert "1 relation head (L0H1)" in text
    assert "recalls 12 of 12 facts (100%)" in finding(run, "recall")
    verdicts = {v.key: v for v in departures(run)}
    # 12 facts: too few for a verdict, whatever the numbers say — and what they say is kept in the text
    assert all(v.status in ("inconclusive", "not run") for v in verdicts.values())
    assert verdicts["swap"].status == "inconclusive" and "L0H1" in verdicts["swap"].text
    assert 'the numbers alone would say "agrees"' in verdicts["swap"].text and "(n = 12 prompts" in verdicts["swap"].text
    assert 'would say "agrees"' in verdicts["specificity"].text
    assert 'would say "departs"' in verdicts["mixed"].text  # none built
    path = write_report(handbuilt_dir)
    assert "L0H0" in path.read_text(encoding="utf-8")
