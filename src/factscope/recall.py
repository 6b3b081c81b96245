"""Does the model know the fact? Rank, probability and logit of the attribute's first token at END."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pandas as pd
import torch

from .data import Encoded
from .forward import prompt_end_logits
from .models import LoadedModel

TOP_K = 5


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def recall(
    model: LoadedModel,
    encoded: list[Encoded],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """One row per prompt: `prompt_id, relation, subject, prompt, attribute, rank, prob, logit, correct, ...`."""
    rows = []
    for batch in chunks(encoded, batch_size):
        logits = prompt_end_logits(model, [item.token_ids for item in batch])
        rows.extend(recall_rows(model, batch, logits))
        if progress:
            progress(len(batch))
    return pd.DataFrame(rows)


def recall_rows(model: LoadedModel, batch: list[Encoded], logits: torch.Tensor) -> list[dict]:
    # logits: [batch, vocab]
    probs = logits.softmax(dim=-1)
    top = logits.topk(TOP_K, dim=-1).indices
    out = []
    for row, item in enumerate(batch):
        target = item.attribute_token
        logit = logits[row, target]
        out.append(
            {
                "prompt_id": item.fact.prompt_id,
                "relation": item.fact.relation,
                "subject": item.fact.subject,
                "prompt": item.fact.prompt,
                "attribute": item.fact.attribute,
                "attribute_token": model.tokenizer.decode([target]),
                "multi_token_attribute": item.multi_token,
                "rank": int((logits[row] > logit).sum()) + 1,
                "prob": float(probs[row, target]),
                "logit": float(logit),
                "correct": bool(top[row, 0] == target),
                "top5": " | ".join(model.tokenizer.decode([t]) for t in top[row].tolist()),
                "n_tokens": len(item.token_ids),
            }
        )
    return out


def accuracy_table(table: pd.DataFrame) -> pd.DataFrame:
    """correct@1 per relation and overall (`relation == "all"`), with mean probability of the attribute."""
    per_relation = table.groupby("relation", sort=True).agg(
        n=("correct", "size"), correct=("correct", "sum"), mean_prob=("prob", "mean")
    )
    overall = pd.DataFrame(
        {"n": [len(table)], "correct": [int(table["correct"].sum())], "mean_prob": [table["prob"].mean()]},
        index=pd.Index(["all"], name="relation"),
    )
    result = pd.concat([per_relation, overall])
    result["accuracy"] = result["correct"] / result["n"]
    return result.reset_index()
