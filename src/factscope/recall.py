"""Does the model know the fact? Rank, probability and logit of the attribute's first token at END."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pandas as pd
import torch
from jaxtyping import Float

from .data import Encoded
from .end_maths import RECALL_TOP_K as TOP_K, recall_stats
from .forward import pad_batch, pad_id, prompt_end_logits
from .models import LoadedModel



def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def recall(
    model: LoadedModel,
    encoded: list[Encoded],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    engine=None,
) -> pd.DataFrame:
    """One row per prompt: `prompt_id, relation, subject, prompt, attribute, rank, prob, logit, correct, ...`.
    `engine`: one with a `recall(model, tokens, mask, ends, answers)` method (`nnsight_engine.NnsightEngine`, on NDIF)
    computes the statistics where the model runs; `model` then needs only its tokenizer."""
    rows = []
    for batch in chunks(encoded, batch_size):
        if engine is None:
            logits = prompt_end_logits(model, [item.token_ids for item in batch])
            rows.extend(recall_rows(model, batch, logits))
        else:
            tokens, mask, ends = pad_batch([item.token_ids for item in batch], pad_id(model.tokenizer))
            answers = torch.tensor([item.attribute_token for item in batch], dtype=torch.long)
            rows.extend(recall_rows_from_stats(model.tokenizer, batch, engine.recall(model, tokens, mask, ends, answers)))
        if progress:
            progress(len(batch))
    return pd.DataFrame(rows)


def recall_rows(model: LoadedModel, batch: list[Encoded], logits: Float[torch.Tensor, "batch vocab"]) -> list[dict]:
    answers = torch.tensor([item.attribute_token for item in batch], dtype=torch.long)
    return recall_rows_from_stats(model.tokenizer, batch, recall_stats(logits, answers))


def recall_rows_from_stats(tokenizer, batch: list[Encoded], stats: dict[str, torch.Tensor]) -> list[dict]:
    """The rows from `end_maths.recall_stats` (rank, prob, logit, top tokens): all that a remote pass sends back
    for recall, instead of the END logits over the whole vocabulary."""
    out = []
    for row, item in enumerate(batch):
        top = stats["top"][row].tolist()
        out.append(
            {
                "prompt_id": item.fact.prompt_id,
                "relation": item.fact.relation,
                "subject": item.fact.subject,
                "prompt": item.fact.prompt,
                "attribute": item.fact.attribute,
                "attribute_token": tokenizer.decode([item.attribute_token]),
                "multi_token_attribute": item.multi_token,
                "rank": int(stats["rank"][row]),
                "prob": float(stats["prob"][row]),
                "logit": float(stats["logit"][row]),
                "correct": top[0] == item.attribute_token,
                "top5": " | ".join(tokenizer.decode([t]) for t in top),
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
