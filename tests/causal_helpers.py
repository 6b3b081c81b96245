"""Shared by the causal tests: tiny models with a dozen facts each (loaded once per process), their
decompositions, and ways to read decompose's attributions next to a pass's logits."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd
import torch

from factscope.data import encode_all, load_facts
from factscope.decompose import decompose
from factscope.forward import Batch
from factscope.models import load_model

N_FACTS = 12


def tiny(model_dirs: dict[str, Path], family: str):
    """A tiny model of `family` and its encoded facts: landmarks and one more relation, so R_r has several
    attributes and prompts differ in length."""
    return _tiny(str(model_dirs[family]))


@cache
def _tiny(path: str):
    model = load_model(path, prepend_bos=True)
    facts = load_facts()
    facts = facts[:8] + [f for f in facts if f.relation != facts[0].relation][:4]
    return model, encode_all(facts[:N_FACTS], model.tokenizer, model.prepend_bos)


def attributions(model_dirs: dict[str, Path], family: str) -> pd.DataFrame:
    return _attributions(str(model_dirs[family]))


@cache
def _attributions(path: str) -> pd.DataFrame:
    model, encoded = _tiny(path)
    return decompose(model, encoded, known_only=False).attributions


def own_target(table: pd.DataFrame) -> pd.DataFrame:
    """decompose's attributions to each prompt's own attribute token."""
    return table[table["is_correct_target"]]


def per_prompt(frame: pd.DataFrame, encoded) -> torch.Tensor:
    values = frame.groupby("prompt_id")["value"].sum()
    return torch.tensor(values.loc[[item.fact.prompt_id for item in encoded]].to_numpy(), dtype=torch.float32)


def answer_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return logits[batch.rows, batch.answers].cpu()
