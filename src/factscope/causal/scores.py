"""What every check measures at END, which prompts it runs on, and how it reports its passes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from jaxtyping import Float, Int

from ..data import Encoded
from ..end_maths import answer_scores
from ..forward import Batch, target_ids
from ..models import LoadedModel
from ..recall import recall

# called with 1 after each forward pass; each check's `*_passes` says how many there are
Progress = Callable[[int], None] | None


def tick(progress: Progress) -> None:
    if progress:
        progress(1)


def scores(
    logits: Float[torch.Tensor, "batch vocab"],
    batch: Batch,
    others: tuple[Int[torch.Tensor, "batch n"], Float[torch.Tensor, "batch n"]] | None = None,
) -> dict[str, np.ndarray]:
    """Per prompt: p(a), logit of a, top-1 correct (`end_maths.answer_scores`, which a remote pass computes where
    the model runs), and (with `others`) logit of a − mean logit of R_r \\ a."""
    return as_numpy(answer_scores(logits, batch.answers, *(others or ())))


def as_numpy(stats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {key: value.float().cpu().numpy() for key, value in stats.items()}


def model_lens(model: LoadedModel) -> dict:
    """The unembedding and the final norm as `end_maths.lens_logits` takes them (the nnsight engine fills the same
    dict on the server, from the modules' weights)."""
    gain, bias = model.final_norm
    return {"w_u": model.W_U, "b_u": model.b_U, "gain": gain, "bias": bias, "eps": model.cfg.eps,
            "centres": model.centres}


def other_targets(batch: Batch, targets: dict[str, dict[int, str]]) -> tuple[Int[torch.Tensor, "batch n"], Float[torch.Tensor, "batch n"]]:
    """R_r \\ a for every prompt as padded token ids with a validity mask, on the batch's device."""
    ids, valid = target_ids(batch.items, targets, with_answer=False)
    return ids.to(batch.tokens.device), valid.to(batch.tokens.device)


def finite_mean(values: np.ndarray) -> float:
    """The mean of the finite values (NaN when there is none): a − mean(R∖a) is NaN for one-attribute relations."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


KNOWN_BATCH = 32  # prompts per recall pass when the known facts are found


def known_facts(model: LoadedModel, encoded: list[Encoded], batch_size: int = KNOWN_BATCH, engine=None) -> list[Encoded]:
    """The prompts whose attribute is the model's top-1 next token: causal checks are about known facts.
    `engine`: an nnsight engine's recall (`recall.recall`), on NDIF for a remote run."""
    table = recall(model, encoded, batch_size=batch_size, engine=engine)
    return [item for item, correct in zip(encoded, table["correct"]) if correct]


def spread(encoded: list[Encoded], limit: int | None) -> list[Encoded]:
    """At most `limit` prompts, taken in turn from each relation (in dataset order), so a small sample still
    covers every relation."""
    if limit is None or limit >= len(encoded):
        return list(encoded)
    by_relation: dict[str, list[Encoded]] = {}
    for item in encoded:
        by_relation.setdefault(item.fact.relation, []).append(item)
    queues = list(by_relation.values())
    chosen = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)][:limit]
    order = {id(item): index for index, item in enumerate(encoded)}
    return sorted(chosen, key=lambda item: order[id(item)])
