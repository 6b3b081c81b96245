"""Subject swap: rerun the decomposition with each subject replaced by another of its relation, and measure how far
each classified head's own parts move. A relation head should barely move; a subject head should."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from .data import Encoded, Fact, encode_all
from .decompose import decompose
from .errors import FactscopeError
from .forward import Engine, local_end_activations
from .mechanisms import head_name
from .models import LoadedModel
from .taxonomy import CLASS_SOURCES


def swap_subjects(facts: list[Fact]) -> dict[str, Fact]:
    """Each fact with its (last) subject mention replaced by the next different subject of its relation.

    The attribute is kept: R_r and the names of its targets then match the clean run target for target, and the
    vectors compared cover all of R_r, so no target is singled out. Relations with one subject are skipped.
    """
    subjects: dict[str, list[str]] = {}
    for fact in facts:
        subjects.setdefault(fact.relation, [])
        if fact.subject not in subjects[fact.relation]:
            subjects[fact.relation].append(fact.subject)
    swapped = {}
    for fact in facts:
        pool = subjects[fact.relation]
        if len(pool) < 2:
            continue
        donor = pool[(pool.index(fact.subject) + 1) % len(pool)]
        start, end = fact.subject_span
        swapped[fact.prompt_id] = replace(fact, subject=donor, prompt=fact.prompt[:start] + donor + fact.prompt[end:])
    return swapped


def subject_swap(model: LoadedModel, encoded: list[Encoded], heads: pd.DataFrame, batch_size: int = 16,
                 engine: Engine = local_end_activations, measured: set[str] | None = None) -> pd.DataFrame:
    """How far each classified head's own parts move when the subject is swapped for another of the relation.

    heads: per-head classes (layer, head, class), e.g. DIR/heads.csv. Pass the same facts the analysis used so
    R_r is the same. Per (head, source): `rel_change` = mean |Δ DLA| / mean |DLA| over prompts × R_r and
    `corr` = mean over prompts of the correlation across R_r of the clean and swapped DLA vectors. A relation
    head's RELATION part should barely move (rel_change ≪ 1, corr ≈ 1); a subject head's SUBJECT part should.
    `mean_abs_dla` is the part's mean |DLA| (what `swap_summary` weights by). measured: the prompt ids the
    statistics are taken over (the analysis's known facts: a head's DLA on a fact the model does not know is no
    mechanism of recall); every prompt is still decomposed, so R_r stays the analysis's. `engine` runs the two decompositions' passes (`decompose.decompose`), on NDIF with `analyze --remote --swap`.
    """
    swapped = swap_subjects([item.fact for item in encoded])
    clean = [item for item in encoded if item.fact.prompt_id in swapped]
    if not clean:
        raise FactscopeError("subject swap: no relation has two subjects to swap between")
    moved = encode_all([swapped[item.fact.prompt_id] for item in clean], model.tokenizer, model.prepend_bos)
    watched = _watched_parts(heads)
    before, after = (
        _watched_values(decompose(model, items, batch_size, known_only=False, engine=engine).attributions, watched)
        for items in (clean, moved)
    )
    if measured is not None:
        before = before[before.index.get_level_values("prompt_id").isin(measured)]
        if before.empty:
            raise FactscopeError("subject swap: no known fact has another subject of its relation to swap with")
    return _swap_stats(before, after.reindex(before.index), watched)


def _watched_parts(heads: pd.DataFrame) -> pd.DataFrame:
    """(layer, head, class, source) for each classified head's own parts."""
    rows = [
        (layer, head, name, source)
        for layer, head, name in heads[["layer", "head", "class"]].itertuples(index=False, name=None)
        for source in CLASS_SOURCES.get(name, ())
    ]
    return pd.DataFrame(rows, columns=["layer", "head", "class", "source"])


def _watched_values(attributions: pd.DataFrame, watched: pd.DataFrame) -> pd.Series:
    """Centred DLA of the watched parts (as the classes read them), indexed by (layer, head, source, prompt_id, target)."""
    attn = attributions[attributions["component"] == "attn"]
    rows = attn.merge(watched[["layer", "head", "source"]], on=["layer", "head", "source"])
    return rows.set_index(["layer", "head", "source", "prompt_id", "target"])["centred"].astype("float64")


def _swap_stats(before: pd.Series, after: pd.Series, watched: pd.DataFrame) -> pd.DataFrame:
    part = ["layer", "head", "source"]
    frame = pd.DataFrame({"before": before, "after": after}).reset_index()
    frame["change"] = (frame["after"] - frame["before"]).abs()
    frame["size"] = frame["before"].abs()
    by_prompt = frame.groupby([*part, "prompt_id"])
    centred_before = frame["before"] - by_prompt["before"].transform("mean")
    centred_after = frame["after"] - by_prompt["after"].transform("mean")
    moments = pd.DataFrame(
        {"cross": centred_before * centred_after, "var_before": centred_before**2, "var_after": centred_after**2}
    ).groupby([frame[name] for name in [*part, "prompt_id"]]).sum()
    corr = moments["cross"] / np.sqrt(moments["var_before"] * moments["var_after"])
    sums = frame.groupby(part)[["change", "size"]].mean()
    stats = pd.DataFrame(
        {
            "rel_change": sums["change"] / sums["size"],
            "mean_abs_dla": sums["size"],
            "corr": corr.replace([np.inf, -np.inf], np.nan).groupby(level=part).mean(),
            "n_prompts": frame.groupby(part)["prompt_id"].nunique(),
        }
    ).reset_index()
    stats = watched.merge(stats, on=part)
    stats.insert(2, "name", head_name(stats["layer"], stats["head"]))
    return stats
