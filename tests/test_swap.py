"""Subject swap: which parts move when the subject is exchanged for another of its relation."""

import pandas as pd
import pytest

from factscope.data import load_facts
from factscope.mechanisms import classify_heads, head_dla, split_parts, swap_summary
from factscope.swap import subject_swap, swap_subjects


def test_swap_subjects_replaces_the_last_mention_cyclically():
    facts = [fact for fact in load_facts() if fact.relation == "landmark_country"][:3]
    swapped = swap_subjects(facts)
    assert [swapped[f.prompt_id].subject for f in facts] == [facts[1].subject, facts[2].subject, facts[0].subject]
    first = swapped[facts[0].prompt_id]
    assert first.prompt == facts[0].prompt.replace(facts[0].subject, facts[1].subject)
    assert first.attribute == facts[0].attribute  # kept, so R_r and its target names stay the same
    assert swap_subjects(facts[:1]) == {}


def test_subject_swap_moves_subject_heads_not_relation_heads(handbuilt_run):
    model, encoded, result, _ = handbuilt_run
    heads, *_ = classify_heads(head_dla(split_parts(result.attributions)[0]))
    swap = subject_swap(model, encoded, heads).set_index("name")
    assert swap.loc["L0H1", "rel_change"] < 1e-4
    assert swap.loc["L0H0", "rel_change"] > 1.0
    assert set(swap.index) == {"L0H0", "L0H1"}  # negligible heads are not watched


def test_swap_is_measured_on_the_prompts_asked_for(handbuilt_run):
    model, encoded, result, _ = handbuilt_run
    heads, *_ = classify_heads(head_dla(split_parts(result.attributions)[0]))
    every = subject_swap(model, encoded, heads).set_index("name")
    some = {item.fact.prompt_id for item in encoded[::2]}
    measured = subject_swap(model, encoded, heads, measured=some).set_index("name")
    assert (measured["n_prompts"] <= len(some)).all() and (measured["n_prompts"] < every["n_prompts"]).any()
    assert measured.loc["L0H1", "rel_change"] < 1e-4 and measured.loc["L0H0", "rel_change"] > 1.0


def test_swap_summary_weights_heads_by_what_they_carry():
    stats = pd.DataFrame({
        "class": ["relation"] * 3, "source": ["relation"] * 3, "name": ["L1H0", "L1H1", "L1H2"],
        "rel_change": [1.0, 0.1, 0.1], "corr": [0.2, 0.9, 0.9], "mean_abs_dla": [2.0, 0.1, 0.1],
    })
    entry = swap_summary(stats)["relation/relation"]
    assert entry["rel_change_unweighted"] == pytest.approx(0.4)
    assert entry["rel_change"] == pytest.approx((2.0 * 1.0 + 0.2 * 0.1) / 2.2)  # the head that matters moves most
    assert entry["corr"] == pytest.approx((2.0 * 0.2 + 0.2 * 0.9) / 2.2) and entry["n_heads"] == 3
