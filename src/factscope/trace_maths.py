"""Causal tracing's maths over every position, as plain torch functions that run wherever the weights are: the
noise on the subject, the restoration of clean states, and attribution patching's estimate of a restoration. The
local passes (`causal.trace`, `causal.atp`) call them in this process, the nnsight sessions
(`nnsight_engine.NnsightEngine.causal_trace`, `trace_atp`) inside the session on the machine that holds the model,
so both add the same noise and restore the same states. Shipped by source like `end_maths`, under the same
constraints: torch only, nothing of factscope's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from jaxtyping import Bool, Float, Int


def scaled_noise(
    draws: Float[torch.Tensor, "batch pos d_model"], scale: float, subject: Bool[torch.Tensor, "batch pos"]
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Causal tracing's corruption: unit Gaussian `draws` × `scale` on the subject's positions, zero elsewhere
    (`causal.restorations.subject_noise` here; `NnsightEngine.causal_trace` on the server, from the same draws)."""
    return draws * scale * subject.to(draws.device)[..., None]


def add_noise(x: Float[torch.Tensor, "batch pos d_model"],
              noise: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
    """The corrupted embeddings: the noise (fp32) cast to the residual stream's dtype, then added, so that a bf16
    model's blocks get bf16 (and every path adds the same numbers)."""
    return x + noise.to(x.device, x.dtype)


def restore_rows(
    x: Float[torch.Tensor, "rows pos d_model"],
    clean: Float[torch.Tensor, "batch pos d_model"],
    prompts: Int[torch.Tensor, " rows"],
    positions: Int[torch.Tensor, " rows"],
) -> Float[torch.Tensor, "rows pos d_model"]:
    """A restoration of causal tracing: row r of `x` (a corrupted state, one row per restoration) gets the clean
    run's state of prompt `prompts[r]` at `positions[r]`, and nothing else changes."""
    prompts, positions = prompts.to(x.device), positions.to(x.device)
    x = x.clone()
    x[torch.arange(len(prompts), device=x.device), positions] = clean[prompts, positions].to(x.device)
    return x


def restoration_estimates(
    deltas: list[Float[torch.Tensor, "rows pos d_model"]], grads: list[Float[torch.Tensor, "rows pos d_model"]],
    windows: list[tuple[int, int]],
) -> Float[torch.Tensor, "layer rows pos"]:
    """Attribution patching of one kind of causal-tracing restoration (`causal.atp`), for the local pass and the
    nnsight session alike: per layer (clean − corrupted) · ∂p/∂state summed over d_model (`deltas`, fp32, and
    `grads`, one per layer), then per restored window (first, last) the sum of its layers' estimates, on the first
    layer's device (on a server the layers may sit on several GPUs)."""
    device = deltas[0].device
    single = torch.stack([(delta * grad.to(delta.device).float()).sum(-1).to(device) for delta, grad in zip(deltas, grads)])
    return torch.stack([single[first : last + 1].sum(0) for first, last in windows])
