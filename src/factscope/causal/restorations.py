"""What a restoration of causal tracing is, for exact tracing (`trace`), its attribution patching (`atp`) and their
nnsight sessions alike: the noise on the subject, which layers and blocks a restoration at (kind, layer) puts back,
the (prompt, position) rows and their full-width chunks, and the restorations an nnsight engine runs in one session
(`engine_restorations`) with what such a session costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from ..data import Encoded
from ..trace_maths import scaled_noise
from ..forward import Batch
from .sites import layer_window


def subject_noise(
    batch: Batch, std: float, seed: int, d_model: int
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Gaussian noise of standard deviation `std` on the subject's positions (position 0 included when the subject
    starts the prompt, as in ROME), zero elsewhere; seeded, deterministic."""
    return scaled_noise(noise_draws(batch, seed, d_model), std, batch.subject)


def noise_draws(batch: Batch, seed: int, d_model: int) -> Float[torch.Tensor, "batch pos d_model"]:
    """The unit Gaussian draws of `subject_noise`, at every position (only the subject's are used)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((*batch.tokens.shape, d_model), generator=generator).to(batch.tokens.device)


# a restoration kind → the sublayer whose state it restores: besides the windows of Meng et al., one MLP layer alone
# (`mlp_single`) and the MLP window with MLP0 left out (`mlp_without_mlp0`), which tell MLP0 — whose clean output at
# a corrupted token largely undoes the embedding noise itself — from the MLPs above it
SUBLAYER = {"resid": "resid", "attn": "attn", "mlp": "mlp", "mlp_single": "mlp", "mlp_without_mlp0": "mlp"}


def restored_blocks(kind: str, layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """What a restoration at `layer` puts back, as blocks: a `resid` restoration sets the residual stream entering
    block `layer` + 1 (first = last = layer + 1); an `attn` / `mlp` restoration sets that sublayer's output in
    blocks first..last (`layer_window`); `mlp_single` the MLP output of block `layer` alone; `mlp_without_mlp0` the
    `mlp` window's blocks but block 0 (first > last, nothing restored, where the window is MLP0 alone). Either way
    the pass is the corrupted one below block `first`."""
    if kind == "resid":
        return layer + 1, layer + 1
    if kind == "mlp_single":
        return layer, layer
    first, last = layer_window(layer, window, n_layers)
    return (max(first, 1), last) if kind == "mlp_without_mlp0" else (first, last)


def restoration_site(kind: str, layer: int, window: int, n_layers: int) -> tuple[str, int, int]:
    """What a restoration is, whatever its kind is called: (sublayer, first, last) — two kinds that restore the same
    states (an `mlp_without_mlp0` window that never held MLP0 and its `mlp` window; `mlp_single` and a one-layer
    `mlp` window) are one site, run once (`trace_sites`)."""
    return (SUBLAYER[kind], *restored_blocks(kind, layer, window, n_layers))


def trace_sites(kinds: Sequence[str], window: int, n_layers: int) -> tuple[list[tuple[str, int]], list[int | None]]:
    """The restorations a trace runs for `kinds` × layers: one (kind, layer) per distinct site
    (`restoration_site`), in order, and for every (kind, layer) (kind-major) the index of the site it reads (None:
    an empty restoration, an effect of exactly zero)."""
    sites, index, of = [], {}, []
    for kind in kinds:
        for layer in range(n_layers):
            site = restoration_site(kind, layer, window, n_layers)
            if site[1] > site[2]:
                of.append(None)
                continue
            if site not in index:
                index[site] = len(sites)
                sites.append((kind, layer))
            of.append(index[site])
    return sites, of


def resumed_block(kind: str, layer: int, window: int, n_layers: int, sequential: bool) -> int:
    """The first block a resumed restoration pass runs (`resume`): the restoration's first block
    (`restored_blocks`), but one later for an MLP window with a block after its first, in a model whose blocks
    run attention then the MLP (`sequential`, a `resid_mid` between them). That block's attention reads only
    corrupted states and its MLP acts per position, so the residual leaving it is the corrupted one but at the
    restored position: the corrupted `resid_mid` plus the clean MLP output, the block's own addition."""
    first = restored_blocks(kind, layer, window, n_layers)[0]
    return first + 1 if sequential and SUBLAYER[kind] == "mlp" and first < n_layers - 1 else first


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """The layers whose states a restoration at `layer` puts back (first, last): the layer's own residual stream
    (`resid`), or the window of attention / MLP outputs around it."""
    return (layer, layer) if kind == "resid" else restored_blocks(kind, layer, window, n_layers)


def last_resid(batch: Batch, rows: Restorations, p_clean: Float[torch.Tensor, " batch"],
               p_corrupt: Float[torch.Tensor, " batch"]) -> Float[torch.Tensor, " rows"]:
    """Restoring the residual stream after the last block: only END's own state reaches the logits, so the
    restored p is the clean p exactly at END and the corrupted p elsewhere (no pass)."""
    prompts = rows.prompts
    return torch.where(rows.positions == batch.ends[prompts], p_clean[prompts], p_corrupt[prompts])


def restoration_chunks(batch: Batch, rows: Restorations, max_rows: int) -> list[Int[torch.Tensor, " chunk"]]:
    """Full-width restoration passes: rows sorted by prompt length (longest first), `max_rows` per pass, so a pass
    is as wide as its longest prompt."""
    lengths = batch.ends[rows.prompts] + 1
    return list(torch.argsort(lengths, descending=True, stable=True).split(max_rows))


@dataclass
class Restorations:
    """(prompt, position) pairs to restore, one per row of the stacked passes."""

    prompts: Int[torch.Tensor, " rows"]
    positions: Int[torch.Tensor, " rows"]


def trace_rows(batch: Batch) -> Restorations:
    """The first subject token to END of every prompt. Earlier positions cannot see the noise (causal
    attention), so restoring them changes nothing; they are recorded as exact zeros."""
    prompts, positions = [], []
    for row, item in enumerate(batch.items):
        first = item.subject_positions[0]
        for pos in range(first, len(item.token_ids)):
            prompts.append(row)
            positions.append(pos)
    device = batch.tokens.device
    return Restorations(torch.tensor(prompts, device=device), torch.tensor(positions, device=device))


def engine_restorations(model, batch: Batch, engine, noise: float, seed: int,
                        jobs: Sequence[tuple[str, int, Restorations]], window: int, max_rows: int
                        ) -> tuple[dict[str, torch.Tensor], list[Float[torch.Tensor, " rows"]]]:
    """One seed's restorations of every (kind, layer, rows) job through `engine` (`NnsightEngine.causal_trace`,
    one session): each job is a site (`restored_blocks`) with its own rows, chunked as the full-width local passes
    chunk them (`restoration_chunks`), from the subject rows of the local draws; the residual after the last block
    needs no pass (`last_resid`). Returns what the session brought back (p_clean, p_corrupt, std) and p(a) per job
    and row."""
    n_layers = model.cfg.n_layers
    passing = [j for j, (kind, layer, _) in enumerate(jobs) if not (kind == "resid" and layer == n_layers - 1)]
    sites = [restoration_site(jobs[j][0], jobs[j][1], window, n_layers) for j in passing]
    restorations = [(jobs[j][2].prompts.cpu(), jobs[j][2].positions.cpu(), restoration_chunks(batch, jobs[j][2], max_rows))
                    for j in passing]
    draws = noise_draws(batch, seed, model.cfg.d_model)[batch.subject]
    got = engine.causal_trace(model, batch, sites, restorations, draws, noise)
    out: list = [None] * len(jobs)
    for j, probs in zip(passing, got["restored"].split([len(prompts) for prompts, _, _ in restorations])):
        out[j] = probs
    for j, (_, _, rows) in enumerate(jobs):
        if out[j] is None:
            out[j] = last_resid(batch, Restorations(rows.prompts.cpu(), rows.positions.cpu()), got["p_clean"], got["p_corrupt"])
    return got, out


def known_cells(known: list[Encoded]) -> tuple[int, int]:
    """The (prompt, position) cells a trace restores (the first subject token to END of every prompt) and the
    subject's tokens, which get noise: what a remote trace's costs are counted in."""
    return (sum(len(item.token_ids) - item.subject_positions[0] for item in known),
            sum(len(item.subject_positions) for item in known))


def restoration_session_cost(n_prompts: int, restored: int, subject_tokens: int, d_model: int) -> tuple[int, int, int]:
    """One session of `engine_restorations`: one request; back p_clean and p_corrupt per prompt (fp32), the std
    (fp64) and p(a) per restored cell (fp32); sent the seed's draws on the subject's tokens (fp32, d_model each)."""
    return 1, 2 * 4 * n_prompts + 8 + 4 * restored, subject_tokens * d_model * 4
