"""Intervals that respect how prompts cluster: two-stage resampling over relations, prompts alone below
MIN_RELATIONS (and recorded as such)."""

import numpy as np
import pytest

from factscope import bootstrap


def _clustered_values(n_relations: int, per_relation: int = 20, spread: float = 1.0, seed: int = 0):
    """Each relation's prompts sit near its own level: the between-relation spread dominates."""
    rng = np.random.default_rng(seed)
    levels = rng.normal(0.0, spread, n_relations)
    relations = np.repeat([f"r{k}" for k in range(n_relations)], per_relation)
    values = np.repeat(levels, per_relation) + rng.normal(0.0, 0.05, len(relations))
    return values, relations


def test_weights_are_means_and_two_stage_weights_keep_relations_whole():
    values, relations = _clustered_values(8)
    weights = bootstrap.resample_weights(len(values), relations=relations)
    assert weights.shape == (bootstrap.N_RESAMPLES, len(values)) and np.allclose(weights.sum(1), 1.0)
    # a relation is drawn k times → its prompts carry k·m draws: some resamples leave a whole relation out
    by_relation = np.stack([weights[:, relations == name].sum(1) for name in np.unique(relations)], axis=1)
    assert (by_relation == 0).any(axis=1).mean() > 0.5
    # the centre is the pooled mean: resampled means scatter around it
    assert np.mean(weights @ values) == pytest.approx(values.mean(), abs=0.05)


def test_relation_intervals_widen_when_relations_differ():
    values, relations = _clustered_values(8)
    low_p, high_p = bootstrap.mean_interval(values)
    low_r, high_r = bootstrap.mean_interval(values, relations=relations)
    assert high_r - low_r > 2 * (high_p - low_p)  # 160 prompts are 8 relations, not 160 independent facts
    assert low_r < values.mean() < high_r


def test_relation_intervals_are_no_wider_when_relations_agree():
    rng = np.random.default_rng(3)
    relations = np.repeat([f"r{k}" for k in range(8)], 20)
    values = rng.normal(0.0, 1.0, len(relations))  # no relation effect at all
    low_p, high_p = bootstrap.mean_interval(values)
    low_r, high_r = bootstrap.mean_interval(values, relations=relations)
    assert (high_r - low_r) == pytest.approx(high_p - low_p, rel=0.35)


def test_too_few_relations_fall_back_to_prompts_and_say_so():
    values, relations = _clustered_values(bootstrap.MIN_RELATIONS - 1)
    assert bootstrap.mean_interval(values, relations=relations) == bootstrap.mean_interval(values)
    record = bootstrap.record(bootstrap.count_relations(relations))
    assert record["unit"] == "prompt" and bootstrap.TOO_FEW in record["note"]
    assert bootstrap.TOO_FEW in bootstrap.unit_text(record)
    enough = bootstrap.record(bootstrap.MIN_RELATIONS)
    assert enough["unit"] == "relation, then prompt" and "note" not in enough
    assert "over relations, then prompts" in bootstrap.unit_text(enough)


def test_nan_values_drop_with_their_relations_and_intervals_are_seeded():
    values, relations = _clustered_values(6)
    holed = values.copy()
    holed[::7] = np.nan
    kept = np.isfinite(holed)
    assert bootstrap.mean_interval(holed, relations=relations) == bootstrap.mean_interval(values[kept], relations=relations[kept])
    assert bootstrap.mean_interval(values, relations=relations) == bootstrap.mean_interval(values, relations=relations)
    assert bootstrap.mean_interval(values, relations=relations, seed=1) != bootstrap.mean_interval(values, relations=relations)
    assert bootstrap.mean_interval([1.0], relations=["a"]) == [None, None]
