"""Mechanism taxonomy: the class rule on synthetic tables, the exact mechanism partition on real decompositions of
tiny models, and a hand-built model whose subject head and relation head the classifier must find."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

import handbuilt
from factscope.data import encode_all, load_facts
from factscope.decompose import decompose
from factscope.errors import FactscopeError
from factscope.taxonomy import TOLERANCE
from factscope.mechanisms import (
    CLASSES,
    MECHANISMS,
    ClassRule,
    class_sweep,
    class_counts,
    classify_heads,
    head_dla,
    interference,
    mechanism_parts,
    mechanism_shares,
    robust_threshold,
    split_parts,
    summarize,
)
from factscope.models import load_model

THRESHOLD = 0.1


# ---------------------------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize(
    ("s", "r", "expected"),
    [
        (5.0, 0.2, "subject"),  # both significant, S ≥ 10 R
        (0.2, 5.0, "relation"),  # both significant, R ≥ 10 S
        (1.0, 0.5, "mixed"),  # both significant, neither dominates
        (1.0, 0.05, "subject"),  # only S significant
        (1.0, -3.0, "subject"),  # only S significant: a negative R is never significant
        (0.05, 1.0, "relation"),  # only R significant
        (0.05, 0.05, "negligible"),
        (-2.0, -2.0, "negligible"),
    ],
)
def test_rule_branches(s, r, expected):
    assert ClassRule().classify([s], [r], THRESHOLD).tolist() == [expected]


def test_rule_k_is_the_dominance_ratio():
    assert ClassRule(k=2).classify([1.0], [0.5], THRESHOLD).tolist() == ["subject"]
    assert ClassRule(k=2.1).classify([1.0], [0.5], THRESHOLD).tolist() == ["mixed"]


finite = st.floats(min_value=-10, max_value=10, allow_nan=False)


@given(s=finite, r=finite, threshold=st.floats(min_value=0, max_value=5), k=st.floats(min_value=1, max_value=50))
def test_rule_is_symmetric_and_never_calls_a_head_with_r_above_s_a_subject_head(s, r, threshold, k):
    rule = ClassRule(k=k)
    mirror = {"subject": "relation", "relation": "subject", "mixed": "mixed", "negligible": "negligible"}
    forward, backward = rule.classify([s], [r], threshold)[0], rule.classify([r], [s], threshold)[0]
    assert backward == mirror[forward]
    if r >= s:
        assert forward != "subject"


@pytest.mark.parametrize("s, r, expected", [
    (0.050, 0.047, "mixed"),  # only S crosses τ = 0.048, but R/S = 0.94: nothing dominates (was "subject")
    (0.047, 0.050, "mixed"),  # its mirror (was "relation")
    (0.050, 0.004, "subject"),  # S ≥ 10·R: subject, whether or not R crosses τ
    (0.004, 0.050, "relation"),
    (0.050, -0.30, "subject"),  # a head that lowers a through its relation part
    (0.040, 0.030, "negligible"),  # neither crosses τ
])
def test_dominance_decides_the_class_whichever_side_crosses_the_threshold(s, r, expected):
    assert ClassRule(k=10).classify([s], [r], 0.048)[0] == expected


def test_class_counts_carry_intervals_and_what_the_top_heads_carry():
    rng = np.random.default_rng(2)
    relations = [f"r{k}" for k in range(6) for _ in range(10)]
    values = {(0, 0): [(1.0 + e, 0.0) for e in rng.normal(0, 0.2, 60)],
              (0, 1): [(0.0, 1.0 + e) for e in rng.normal(0, 0.2, 60)],
              # a borderline head: significant on some relations only, so its class moves between resamples
              (0, 2): [(0.0, 0.05 if (k // 10) % 2 else 0.0) for k in range(60)],
              **{(1, h): [(e, f) for e, f in rng.normal(0, 0.002, (60, 2))] for h in range(30)}}
    result = classify_heads(per_prompt_table(values, relations))
    for name, (low, high) in result.count_intervals.items():
        assert low <= high and isinstance(low, int)
    assert result.count_intervals["subject"] == [1, 1]  # the clear subject head is always there
    counts = class_counts(result.heads.assign(subject_specificity=result.heads["subject_dla"],
                                              relation_specificity=result.heads["relation_dla"]),
                          result.count_intervals)
    assert counts["subject"]["count_ci"] == [1, 1] and counts["subject"]["top_carriers_fraction"] == pytest.approx(1.0)


def test_one_scale_for_both_sources():
    """The review's case: R's bulk is wider than S's, and a head with R > S missed R's own bar — one τ for both."""
    rng = np.random.default_rng(0)
    subject_bulk, relation_bulk = rng.normal(0, 0.002, 200), rng.normal(0, 0.015, 200)
    subject = np.concatenate([subject_bulk, [0.018]])
    relation = np.concatenate([relation_bulk, [0.041]])
    rule = ClassRule()
    threshold = rule.threshold(subject, relation)
    assert robust_threshold(pd.Series(subject_bulk), 3) < threshold < robust_threshold(pd.Series(relation_bulk), 3)
    # per-source bars would pass S (0.018 > S's bar) and not R (0.041 < R's bar): a "subject head" with R > S
    assert robust_threshold(pd.Series(subject), 3) < 0.018 and robust_threshold(pd.Series(relation), 3) > 0.041
    assert rule.classify(subject[-1:], relation[-1:], threshold).tolist() in (["relation"], ["mixed"])


def test_bootstrap_intervals_cover_the_means_and_are_reproducible():
    rng = np.random.default_rng(1)
    values = {(0, 0): [(1.0 + e, 0.0) for e in rng.normal(0, 0.3, 40)],  # a clear subject head
              (0, 1): [(0.0, 1.0 + e) for e in rng.normal(0, 0.3, 40)],  # a clear relation head
              **{(1, h): [(e, f) for e, f in rng.normal(0, 0.01, (40, 2))] for h in range(30)}}
    per_prompt = per_prompt_table(values, ["r"] * 40)
    heads, *_ = classify_heads(per_prompt)
    again, *_ = classify_heads(per_prompt)
    pd.testing.assert_frame_equal(heads, again)  # seeded
    assert (heads["subject_dla_low"] <= heads["subject_dla"]).all() and (heads["subject_dla"] <= heads["subject_dla_high"]).all()
    clear = heads.set_index("name").loc[["L0H0", "L0H1"]]
    assert (clear["class_agreement"] == 1.0).all() and clear["class"].tolist() == ["subject", "relation"]
    other, *_ = classify_heads(per_prompt, seed=1)
    assert not np.allclose(other["subject_dla_low"], heads["subject_dla_low"])  # the seed is what fixes them


@pytest.mark.parametrize("rule", [dict(k=0.5), dict(z=-1), dict(floor=-0.1)])
def test_rule_rejects_meaningless_parameters(rule):
    with pytest.raises(FactscopeError):
        ClassRule(**rule)


def test_threshold_is_robust_to_the_heads_it_should_find():
    bulk = pd.Series(np.random.default_rng(0).normal(0.0, 0.01, 200))
    few = pd.concat([bulk, pd.Series([5.0, 3.0, 2.0])])
    many = pd.concat([bulk, pd.Series([5.0, 3.0, 2.0] * 5)])
    assert 0.02 < robust_threshold(bulk, 3) < 0.04  # about three standard deviations of the bulk
    assert robust_threshold(few, 3) == pytest.approx(robust_threshold(bulk, 3), abs=0.005)
    assert robust_threshold(many, 3) < 0.05  # a mean + 3 std rule would be above 2 here


def test_floor_keeps_numerical_zeros_out_when_all_other_heads_are_zero():
    means = pd.DataFrame({"subject_dla": [2.0, 1e-9, 0.0, 0.0], "relation_dla": [0.0, 0.0, 0.0, -1e-9]})
    threshold = ClassRule().threshold(means["subject_dla"], means["relation_dla"])
    assert threshold == TOLERANCE
    classes = ClassRule().classify(means["subject_dla"], means["relation_dla"], threshold)
    assert classes.tolist() == ["subject", "negligible", "negligible", "negligible"]


def per_prompt_table(heads: dict[tuple[int, int], list[tuple[float, float]]], relations: list[str]) -> pd.DataFrame:
    """heads: (layer, head) → per prompt (S, R); prompt i belongs to relations[i]."""
    rows = [
        {"prompt_id": f"p{i}", "relation": relations[i], "layer": layer, "head": head,
         "subject_dla": s, "relation_dla": r, "end_dla": 0.0, "other_dla": 0.0}
        for (layer, head), values in heads.items() for i, (s, r) in enumerate(values)
    ]
    return pd.DataFrame(rows)


def quiet_heads(n: int, n_prompts: int) -> dict:
    return {(1, h): [(0.0, 0.0)] * n_prompts for h in range(n)}


def test_stability_over_prompts_and_relations():
    table = per_prompt_table(
        {
            (0, 0): [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (0.0, 0.0)],  # subject on 3 of 4 prompts, both relations
            (0, 1): [(0.0, 2.0), (0.0, 2.0), (0.0, 0.0), (0.0, 0.0)],  # relation head of relation r1 only
            **quiet_heads(20, 4),
        },
        ["r1", "r1", "r2", "r2"],
    )
    heads, by_relation, *_ = classify_heads(table)
    named = heads.set_index("name")
    assert named.loc["L0H0", "class"] == "subject"
    assert named.loc["L0H0", "stability"] == 0.75 and named.loc["L0H0", "relation_stability"] == 1.0
    assert named.loc["L0H1", "class"] == "relation"
    assert named.loc["L0H1", "stability"] == 0.5 and named.loc["L0H1", "relation_stability"] == 0.5
    assert (named.drop(["L0H0", "L0H1"])["class"] == "negligible").all()
    assert (named.drop(["L0H0", "L0H1"])["stability"] == 1.0).all()
    per_relation = by_relation.set_index(["relation", "name"])["class"]
    assert per_relation[("r1", "L0H1")] == "relation" and per_relation[("r2", "L0H1")] == "negligible"


def test_k_sweep_moves_heads_from_subject_to_mixed():
    ratios = [1.2, 2.5, 4, 8, 15, 30, 100]  # S / R of seven heads where both are significant
    table = per_prompt_table({(0, h): [(ratio, 1.0)] for h, ratio in enumerate(ratios)} | quiet_heads(30, 1), ["r"])
    heads, *_ = classify_heads(table)
    sweep = class_sweep(heads, ks=[1.5, 3, 10, 50], zs=[3]).pivot(index="k", columns="class", values="count")
    assert sweep["subject"].tolist() == [6, 5, 3, 1]
    assert sweep["mixed"].tolist() == [1, 2, 4, 6]
    assert (sweep["negligible"] == 30).all() and (sweep["relation"] == 0).all()
    assert set(sweep.columns) == set(CLASSES)


# ---------------------------------------------------------------------------------------------------------------
# Additivity on synthetic parts


def synthetic_parts(parts: dict[tuple, dict[str, float]], correct: str = "a") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One prompt; parts: (component, layer, head, source) → {target: DLA}; returns (attn, rest) like read_parts."""
    rows = []
    for (component, layer, head, source), values in parts.items():
        total = sum(values.values())
        for target, value in values.items():
            others = (total - value) / (len(values) - 1)
            rows.append({"prompt_id": "p", "relation": "r", "target": target, "is_correct_target": target == correct,
                         "component": component, "layer": layer, "head": head, "source": source,
                         "value": value, "centred": value, "logit_diff": value - others})
    table = pd.DataFrame(rows)
    return split_parts(table)


HEADS = pd.DataFrame({"layer": [0, 0, 0], "head": [0, 1, 2], "class": ["subject", "relation", "negligible"]})


def test_only_the_sum_ranks_the_attribute_first():
    attn, rest = synthetic_parts(
        {
            ("attn", 0, 0, "subject"): {"a": 1.0, "b": 1.5, "c": 0.0},  # alone: b first
            ("attn", 0, 1, "relation"): {"a": 1.0, "b": 0.0, "c": 1.5},  # alone: c first
            ("attn", 0, 2, "relation"): {"a": -0.05, "b": 0.0, "c": 0.0},  # a negligible head that hurts a
            ("mlp", 0, -1, "all"): {"a": 0.0, "b": 0.0, "c": 0.0},
            ("embed", -1, -1, "all"): {"a": 0.3, "b": 0.3, "c": 0.3},
        }
    )
    parts = mechanism_parts(attn, rest, HEADS)
    shares = mechanism_shares(parts)
    stats = interference(parts, shares)
    assert stats["sum_ranks_first"] == 1.0 and stats["only_sum_ranks_first"] == 1.0
    assert all(value == 0.0 for value in stats["alone_ranks_first"].values())
    assert stats["destructive"] == ["other_heads"] and stats["dominant"] == []
    diff = shares.query("relation == 'all' and metric == 'logit_diff'").set_index("mechanism")
    assert diff.loc["subject_heads", "mean_value"] == pytest.approx(0.25)
    assert diff.loc["other_heads", "mean_value"] == pytest.approx(-0.05)
    assert diff.loc["embed_bias", "mean_value"] == pytest.approx(0.0)
    assert diff.loc["mixed_subject", "mean_value"] == 0.0  # absent mechanisms are explicit zeros


def test_one_mechanism_dominates():
    attn, rest = synthetic_parts(
        {
            ("attn", 0, 0, "subject"): {"a": 3.0, "b": 0.0, "c": 0.0},
            ("attn", 0, 1, "relation"): {"a": 0.2, "b": 0.1, "c": 0.0},
            ("mlp", 3, -1, "all"): {"a": 0.0, "b": 0.0, "c": 0.0},
        }
    )
    parts = mechanism_parts(attn, rest, HEADS)
    stats = interference(parts, mechanism_shares(parts))
    assert stats["dominant"] == ["subject_heads"] and stats["prompts_dominated"] == 1.0
    assert stats["alone_ranks_first"]["subject_heads"] == 1.0 and stats["only_sum_ranks_first"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The partition is exact on real decompositions


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_mechanisms_sum_exactly_to_the_logit(model_dirs, family):
    model = load_model(str(model_dirs[family]))
    encoded = encode_all(load_facts(), model.tokenizer, model.prepend_bos)[::4]
    result = decompose(model, encoded, known_only=False)
    attn, rest = split_parts(result.attributions)
    heads, *_ = classify_heads(head_dla(attn))
    assert set(heads["class"]) <= set(CLASSES) and len(heads) == model.cfg.n_layers * model.cfg.n_heads
    heads["class"] = [CLASSES[i % len(CLASSES)] for i in range(len(heads))]  # random heads: give every class some
    parts = mechanism_parts(attn, rest, heads)
    assert set(parts["mechanism"]) == set(MECHANISMS)

    summed = ["value", "centred", "logit_diff"]
    correct = parts[parts["is_correct_target"]].groupby("prompt_id")[summed].sum()
    every_part = pd.concat([attn, rest]).query("is_correct_target").groupby("prompt_id")[summed].sum()
    pd.testing.assert_frame_equal(correct, every_part.loc[correct.index], rtol=0, atol=1e-9)  # nothing lost or doubled
    model_logit = result.recall.set_index("prompt_id")["logit"]
    assert np.abs(correct["value"] - model_logit.loc[correct.index]).max() < TOLERANCE
    # a − mean(R \ a) from the summed logits equals the sum of the mechanisms' logit_diff
    totals = parts.groupby(["prompt_id", "target", "is_correct_target"])["value"].sum().reset_index()
    others = totals[~totals["is_correct_target"]].groupby("prompt_id")["value"].mean()
    assert np.abs(correct["logit_diff"] - (correct["value"] - others.loc[correct.index])).max() < 1e-6

    shares = mechanism_shares(parts)
    assert set(shares["metric"]) == {"logit", "centred_logit", "logit_diff"}
    assert np.allclose(shares.groupby(["relation", "metric"])["share"].sum(), 1.0)
    # the centred shares are of the logit less its vocabulary mean: their total is the mean centred logit
    pooled = shares.query("relation == 'all' and metric == 'centred_logit'")
    assert pooled["mean_value"].sum() == pytest.approx(correct["centred"].mean(), abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# The key test: a model whose subject head and relation head are set by hand


def test_handbuilt_model_knows_its_facts(handbuilt_run):
    _, encoded, result, _ = handbuilt_run
    assert result.recall["correct"].all() and len(result.recall) == len(encoded)


def test_classifier_finds_exactly_the_handbuilt_heads(handbuilt_run):
    _, _, _, run = handbuilt_run
    summary = summarize(run)
    heads = pd.read_csv(run / "heads.csv").set_index("name")
    assert heads.loc["L0H0", "class"] == "subject"
    assert heads.loc["L0H1", "class"] == "relation"
    assert (heads.drop(["L0H0", "L0H1"])["class"] == "negligible").all()
    assert (heads[["stability", "relation_stability"]] == 1.0).all().all()
    assert heads.loc["L0H2", "other_dla"] > 0.5  # a large DLA, but from the label: not a class of its own
    # a head reading END is counted under `end`: no class of its own, a relation head the paper's way
    assert heads.loc["L0H3", "end_dla"] > 0.5 and abs(heads.loc["L0H3", "relation_dla"]) < 1e-3
    assert heads.loc["L0H3", "paper_class"] == "relation" and heads.loc["L0H1", "paper_class"] == "relation"
    assert summary["head_classes_paper"] == {"subject": 1, "relation": 2, "mixed": 0, "negligible": 1}
    assert {name: entry["top"] for name, entry in summary["head_classes"].items() if name != "negligible"} == {
        "subject": ["L0H0"], "relation": ["L0H1"], "mixed": [],
    }
    # the subject head is specific, the relation head broad
    assert heads.loc["L0H0", "subject_specificity"] > 3 * heads.loc["L0H0", "subject_breadth"] > 0
    assert abs(heads.loc["L0H1", "relation_specificity"]) < 1e-3 < heads.loc["L0H1", "relation_breadth"]
    # broad in absolute terms: the relation head writes the other attributes of R_r as much as a
    assert heads.loc["L0H1", "relation_to_others"] == pytest.approx(heads.loc["L0H1", "relation_to_a"], abs=1e-3)
    assert heads.loc["L0H0", "subject_to_a"] > 3 * abs(heads.loc["L0H0", "subject_to_others"])
    json.dumps(summary)  # summary.json can hold it


def test_handbuilt_outputs(handbuilt_run):
    _, _, _, run = handbuilt_run
    summary = summarize(run)
    diff_shares = summary["mechanism_shares"]["logit_diff"]
    assert diff_shares["subject_heads"] == pytest.approx(1.0, abs=1e-6)  # only the subject head tells a from R_r
    # the END head's write is the same for every attribute: some of the logit, none of a − mean(R∖a)
    assert summary["mechanism_shares"]["logit"]["end_heads"] > 0.05 and abs(diff_shares["end_heads"]) < 1e-6
    assert summary["interference"]["alone_ranks_first"]["subject_heads"] == 1.0
    # held out: the relation head writes every attribute of R_r alike, the subject head a alone
    held = summary["breadth_held_out"]
    assert held["relation"]["fraction"] == pytest.approx(1.0, abs=1e-3)
    assert abs(held["subject"]["fraction"]) < 0.05
    assert held["relation"]["fraction_ci"][0] <= held["relation"]["fraction"] <= held["relation"]["fraction_ci"][1]
    assert summary["mlp_relation_boost"]["fraction"] is None  # the built MLP writes nothing: no boosting to judge
    assert summary["interference"]["alone_ranks_first"]["relation_heads"] == 0.0  # a tie over R_r ranks nothing
    sweep = pd.read_csv(run / "head_class_sweep.csv")
    assert (sweep.groupby(["k", "z"])["count"].sum() == 4).all()
    mlp = pd.read_csv(run / "mlp_boosting.csv")
    assert (mlp[["correct_dla", "breadth", "specificity"]] == 0).all().all()  # the MLP is zero
