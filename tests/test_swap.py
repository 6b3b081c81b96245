"""Subject swap: which parts move when the subject is exchanged for another of its relation."""

from factscope.data import load_facts
from factscope.mechanisms import classify_heads, head_dla, split_parts
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
