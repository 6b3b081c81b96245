"""The decomposition's pass through nnsight: the same END tensors the TransformerLens engine gives
(`forward.Engine`), read off the Hugging Face modules themselves, so that the pass can run on a machine that holds
the model (NDIF, through nnsight's remote execution) and send back only what the maths need.

Two ways to use it. As a `forward.Engine` (`__call__`), it saves the END activations (and the value vectors at every
key position) and the maths run here, over a local copy of the weights. With `project` (and `recall`), the maths that
read weights run inside the trace (`end_maths`), so a remote run needs no weights locally (`ConfigOnlyModel`) and
only small per-target tensors come back. `knockout` runs the attention knockout of `causal.knockout` the same way,
`causal_trace` one seed of causal tracing in one nnsight session (the restored states never leave the server), and
`trace_atp` its attribution patching (AtP, GradDrop) in one session, through nnsight's backward pass;
`ablate`'s mechanism grid, noise check and path AtP run as sessions too (`nnsight_ablate.AblateSessions`).
Only what is `.save()`d leaves the trace, and every request checks the dtype the model ran in against the run's.

Module paths differ by architecture; `ARCHITECTURES` maps a Hugging Face class name to them (with the RMSNorm
arithmetic and, for Gemma 3, the norms around attention and the MLP). Attention must be eager: the attention module
then returns its post-softmax probabilities as its second output, the same tensor TransformerLens's `hook_pattern`
holds, and adds the attention mask it receives to the scores, which is where a knockout cuts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from types import ModuleType

import torch
from jaxtyping import Bool, Float, Int

from . import end_maths, trace_maths
from .end_maths import rms_scale
from .errors import FactscopeError
from .forward import act_name
from .models import DTYPES, LoadedModel, load_hf_model
from .nnsight_ablate import AblateSessions

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class ModulePaths:
    """Where the decomposition's tensors live in one architecture, as attribute paths from the causal-LM wrapper
    (`layers`) or from one decoder layer (the rest but `embed`, `final_norm`, `lm_head`)."""

    embed: str
    layers: str
    v_proj: str  # output: [batch, pos, kv_head · d_head], the value vectors
    o_proj: str  # input: [batch, pos, head · d_head], TransformerLens's hook_z
    attn: str  # output[1]: [batch, head, query, key], the post-softmax probabilities (eager attention only)
    mlp_out: str  # output: what the MLP adds to the residual stream (after its post-norm where there is one)
    final_norm: str
    lm_head: str
    attn_post_norm: str | None = None  # input: o_proj's output, normalised before it joins the residual (Gemma)
    norm: str = "llama"  # the RMSNorms' arithmetic, a key of `end_maths.RMS_NORMS`


_LLAMA = ModulePaths(
    embed="model.embed_tokens", layers="model.layers", v_proj="self_attn.v_proj", o_proj="self_attn.o_proj",
    attn="self_attn", mlp_out="mlp", final_norm="model.norm", lm_head="lm_head",
)
# The Llama family first (what NDIF hosts); Mistral and Qwen2 share its module names and its residual layout.
# Gemma 3 (text) adds an RMSNorm after attention and around the MLP, and parametrises its norms as (1 + w); its
# embedding module returns the embeddings already scaled by √d_model, which is what joins the residual stream.
ARCHITECTURES: dict[str, ModulePaths] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Gemma3ForCausalLM": ModulePaths(
        embed="model.embed_tokens", layers="model.layers", v_proj="self_attn.v_proj", o_proj="self_attn.o_proj",
        attn="self_attn", mlp_out="post_feedforward_layernorm", final_norm="model.norm", lm_head="lm_head",
        attn_post_norm="post_attention_layernorm", norm="gemma",
    ),
}

# the activation kinds (`forward.act_name`) this engine can fill; anything else is refused by name
_PER_LAYER = ("v", "z", "pattern", "post_norm_scale", "mlp_out", "resid_post")
_GLOBAL = ("embed", "final_scale")


_LAYER_MODULES = ("v_proj", "o_proj", "attn", "mlp_out", "attn_post_norm")  # the per-layer fields of ModulePaths


def module_paths(architecture: str) -> ModulePaths:
    paths = ARCHITECTURES.get(architecture)
    if paths is None:
        raise FactscopeError(
            f"the nnsight engine does not know {architecture!r} yet (known: {', '.join(ARCHITECTURES)}); add its "
            "module paths to nnsight_engine.ARCHITECTURES"
        )
    return paths


def _module(root, path: str):
    return reduce(getattr, path.split("."), root)


class NnsightEngine(AblateSessions):
    """A `forward.Engine` over an nnsight `LanguageModel`. `remote`: False runs in this process; "local" runs the
    trace through nnsight's serialisation path (what a remote run sends) in this process; True sends it to NDIF."""

    def __init__(self, lm, remote: bool | str = False, eps: float | None = None):
        self.lm = lm
        architecture = (getattr(lm.config, "architectures", None) or [type(lm._model).__name__])[0]
        self.paths = module_paths(architecture)
        self.remote = remote
        self.requests = 0  # traces sent, for the cost report
        self.bytes_back = 0  # bytes of saved tensors received
        self.bytes_sent = 0  # bytes of tensors sent besides token ids (the noise draws of causal tracing and of the noise check)
        # the final norm's epsilon: TransformerLens's hook_scale is sqrt(mean(x²) + eps), recomputed here from the
        # norm's input at END, so nothing of vocabulary or position size comes back for it
        self.eps = float(eps if eps is not None else getattr(lm.config, "rms_norm_eps"))
        heads = lm.config.num_attention_heads
        self.d_head = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // heads
        paths = self.paths
        layers = _module(lm, paths.layers)
        self.envoys = {"embed": _module(lm, paths.embed), "layers": [layers[i] for i in range(len(layers))],
                       "final_norm": _module(lm, paths.final_norm), "lm_head": _module(lm, paths.lm_head)}
        for key in _LAYER_MODULES:
            path = getattr(paths, key)
            self.envoys[key] = [_module(block, path) for block in self.envoys["layers"]] if path else []

    def __call__(
        self,
        model: LoadedModel,
        tokens: Int[torch.Tensor, "batch pos"],
        mask: Int[torch.Tensor, "batch pos"],
        ends: Int[torch.Tensor, " batch"],
        names: Sequence[str],
    ) -> tuple[Float[torch.Tensor, "batch vocab"], dict[str, torch.Tensor]]:
        cfg = model.cfg
        wanted = _requested(names, cfg.n_layers, self.paths)
        saved = self.trace(tokens.cpu(), mask.cpu(), ends.cpu(), wanted, cfg.n_layers)
        self.requests += 1
        self.bytes_back += sum(t.numel() * t.element_size() for t in saved.values())
        device, batch = model.device, len(ends)
        end = {}
        for (kind, layer), tensor in saved.items():
            if kind == "logits":
                continue
            tensor = tensor.to(device)
            if kind == "v":
                tensor = tensor.view(batch, tensor.shape[1], -1, cfg.d_head)  # [batch, key, kv_head, d_head]
            elif kind == "z":
                tensor = tensor.view(batch, -1, cfg.d_head)  # [batch, head, d_head]
            elif kind in ("final_scale", "post_norm_scale"):  # the norm's input at END came back
                tensor = rms_scale(tensor, self.eps)
            end[act_name(kind, layer)] = tensor.float()
        return saved[("logits", None)].to(device).float(), end

    def trace(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        mask: Int[torch.Tensor, "batch pos"],
        ends: Int[torch.Tensor, " batch"],
        wanted: set[tuple[str, int | None]],
        n_layers: int,
    ) -> dict[tuple[str, int | None], torch.Tensor]:
        """One trace → the saved tensors by (kind, layer), unreshaped, in the model's dtype.

        Modules are read in the order the model runs them (nnsight refuses to go back), and the dict is created
        inside the trace with `nnsight.save`: on a remote run only saved objects come back.
        """
        import nnsight

        lm, rows = self.lm, torch.arange(len(ends))
        # every module is resolved here, outside the trace: the traced block is shipped by source with the names it
        # reads, and a factscope helper or dataclass in it would have to be importable on the server
        embed, layers, norm, lm_head = (self.envoys[key] for key in ("embed", "layers", "final_norm", "lm_head"))
        v_projs, o_projs, attns, mlps, post_norms = self.layer_envoys()
        inputs = {"input_ids": tokens, "attention_mask": mask}
        # logits_to_keep: the model unembeds END only, so no [batch, pos, vocab] tensor is ever built
        with lm.trace(inputs, logits_to_keep=ends[:, None], remote=self.remote):
            out = nnsight.save({})
            if ("embed", None) in wanted:
                out[("embed", None)] = embed.output[rows, ends]
            for layer in range(n_layers):
                if ("v", layer) in wanted:
                    out[("v", layer)] = v_projs[layer].output
                if ("z", layer) in wanted:
                    out[("z", layer)] = o_projs[layer].input[rows, ends]
                if ("pattern", layer) in wanted:
                    out[("pattern", layer)] = attns[layer].output[1][rows, :, ends]
                if ("post_norm_scale", layer) in wanted:
                    out[("post_norm_scale", layer)] = post_norms[layer].input[rows, ends]
                if ("mlp_out", layer) in wanted:
                    out[("mlp_out", layer)] = mlps[layer].output[rows, ends]
                if ("resid_post", layer) in wanted:
                    out[("resid_post", layer)] = layers[layer].output[rows, ends]
            if ("final_scale", None) in wanted:
                out[("final_scale", None)] = norm.input[rows, ends]
            out[("logits", None)] = lm_head.output[:, 0]
        return dict(out)

    def project(
        self,
        model,
        tokens: Int[torch.Tensor, "batch pos"],
        mask: Int[torch.Tensor, "batch pos"],
        ends: Int[torch.Tensor, " batch"],
        groups: Float[torch.Tensor, "batch pos group"],
        targets: Int[torch.Tensor, "batch target"],
        answers: Int[torch.Tensor, " batch"],
        known_only: bool,
    ) -> dict[str, torch.Tensor]:
        """One trace whose weight-dependent maths run inside it, where the weights are (`end_maths.project_end`):
        what comes back is `decompose.EndParts`, per head and group a logit per target, never a weight or a
        residual vector, so the client needs the tokenizer and config only (`model` is not read).

        Each layer's value vectors are reduced to the heads' END z by source group as soon as the layer has run, so
        the server holds [batch, head, group, d_head] per layer, not the values at every position."""
        import nnsight

        end_maths = self._shipped_maths()
        project_end, group_z = end_maths.project_end, end_maths.head_group_z_at_end
        lm, rows, eps, d_head, norm_kind = self.lm, torch.arange(len(ends)), self.eps, self.d_head, self.paths.norm
        embed, layers, norm, lm_head = (self.envoys[key] for key in ("embed", "layers", "final_norm", "lm_head"))
        v_projs, o_projs, attns, mlps, post_norms = self.layer_envoys()
        inputs = {"input_ids": tokens.cpu(), "attention_mask": mask.cpu()}
        with lm.trace(inputs, logits_to_keep=ends.cpu()[:, None], remote=self.remote):
            out = nnsight.save({})  # created inside the trace: on a remote run only saved objects come back
            acts = {"embed": embed.output[rows, ends], "z_by_group": [], "z": [], "post_norm_in": [], "mlp_out": [],
                    "resid_post": []}
            for layer in range(len(layers)):
                v = v_projs[layer].output
                acts["z"].append(o_projs[layer].input[rows, ends])
                pattern = attns[layer].output[1][rows, :, ends].detach().float()
                values = v.detach().view(v.shape[0], v.shape[1], -1, d_head).float()
                if v_projs[layer].bias is not None:  # counted with the attention bias, not with a source group
                    values = values - v_projs[layer].bias.detach().float().view(-1, d_head).to(values.device)
                acts["z_by_group"].append(group_z(pattern, values, groups.to(values.device)))
                if post_norms:
                    acts["post_norm_in"].append(post_norms[layer].input[rows, ends])
                acts["mlp_out"].append(mlps[layer].output[rows, ends])
                acts["resid_post"].append(layers[layer].output[rows, ends])
            acts["final_in"] = norm.input[rows, ends]
            acts["logits"] = lm_head.output[:, 0]
            out["model_dtype"] = acts["logits"][:0]  # no element: only its dtype comes back (`_ran_in`)
            weights = {"w_u": lm_head.weight.T, "b_u": lm_head.bias, "norm_weight": norm.weight, "eps": eps,
                       "norm": norm_kind, "w_o": [o.weight for o in o_projs], "b_o": [o.bias for o in o_projs],
                       "b_v": [v.bias for v in v_projs], "post_norm_weight": [n.weight for n in post_norms]}
            out.update(project_end(acts, weights, groups, targets, answers, known_only))
        return self._received(model, out)

    def recall(
        self, model, tokens: Int[torch.Tensor, "batch pos"], mask: Int[torch.Tensor, "batch pos"],
        ends: Int[torch.Tensor, " batch"], answers: Int[torch.Tensor, " batch"],
    ) -> dict[str, torch.Tensor]:
        """`end_maths.recall_stats` computed inside the trace: rank, probability, logit and top tokens per prompt
        come back, not the END logits over the vocabulary."""
        import nnsight

        end_maths = self._shipped_maths()
        stats, lm_head = end_maths.recall_stats, self.envoys["lm_head"]
        inputs = {"input_ids": tokens.cpu(), "attention_mask": mask.cpu()}
        with self.lm.trace(inputs, logits_to_keep=ends.cpu()[:, None], remote=self.remote):
            out = nnsight.save({})
            logits = lm_head.output[:, 0]
            out["model_dtype"] = logits[:0]
            out.update(stats(logits.detach().float(), answers))
        return self._received(model, out)

    def knockout(
        self, model, batch, query_is_end: Bool[torch.Tensor, "batch query"], keys: Bool[torch.Tensor, "batch key"],
        heads: Bool[torch.Tensor, "layer head"],
    ) -> dict[str, torch.Tensor]:
        """One pass of `batch` (`forward.Batch`) with END's attention to `keys` cut, before the softmax, in the
        chosen `heads` → `end_maths.answer_scores`. The cut is `end_maths.end_block`, the mask the local knockout
        applies to TransformerLens's scores, applied here to the additive attention mask each attention module
        receives (the scores plus −inf are −inf either way): no operation inside the attention code is named, so
        nothing depends on how transformers writes it. Layers without a chosen head are left alone."""
        import nnsight

        end_maths = self._shipped_maths()
        block, score = end_maths.end_block, end_maths.answer_scores
        attns, lm_head = self.envoys["attn"], self.envoys["lm_head"]
        query_is_end, keys, heads, answers = query_is_end.cpu(), keys.cpu(), heads.cpu(), batch.answers.cpu()
        inputs = {"input_ids": batch.tokens.cpu(), "attention_mask": batch.mask.cpu()}
        with self.lm.trace(inputs, logits_to_keep=batch.ends.cpu()[:, None], remote=self.remote):
            out = nnsight.save({})
            for layer in range(len(attns)):
                if heads[layer].any():
                    args, kwargs = attns[layer].inputs
                    mask = kwargs["attention_mask"]  # [batch, 1, query, key], added to the scores
                    cut = block(heads[layer], query_is_end, keys).to(mask.device)
                    attns[layer].inputs = (args, {**kwargs, "attention_mask": mask.masked_fill(cut, float("-inf"))})
            logits = lm_head.output[:, 0]
            out["model_dtype"] = logits[:0]
            out.update(score(logits.detach().float(), answers))
        return self._received(model, out)

    def causal_trace(
        self, model, batch, sites: list[tuple[str, int, int]],
        restorations: list[tuple[Int[torch.Tensor, " rows"], Int[torch.Tensor, " rows"], list[Int[torch.Tensor, " chunk"]]]],
        draws: Float[torch.Tensor, "subject_token d_model"], noise: float,
    ) -> dict[str, torch.Tensor]:
        """One seed of causal tracing (`causal.trace.trace_effects`) in one nnsight session, so that no residual
        state leaves the server: the clean pass (its p(a), the std of the subjects' embeddings, the states to
        restore), the corrupted pass (noise = `draws` × `noise` × that std on the subject, `trace_maths.scaled_noise`;
        `draws` are the subject positions' rows of the local draws, so both paths add the same noise), then one
        full-width pass per site and chunk of its restorations. A site is (kind, first, last) from
        `restorations.restored_blocks`: the blocks below `first` are skipped, the corrupted run's residual stream entering
        `first` standing in for what they hand on (the local passes start there), then each row gets its clean
        state back (`trace_maths.restore_rows`) at the input of block `first` (`resid`) or at the attention / MLP
        output of blocks first..last. Each site has its own restorations (prompts, positions, and their chunks as
        row indices): every (prompt, position) from the subject on for the trace, the sampled cells for AtP's exact
        check. What comes back: p_clean and p_corrupt per prompt, the std, and p(a) per restoration, site after
        site."""
        import nnsight

        tracing = self._shipped_maths(trace_maths)
        self.bytes_sent += draws.numel() * draws.element_size()
        restore, noised, add_noise = tracing.restore_rows, tracing.scaled_noise, tracing.add_noise
        score = self._shipped_maths().answer_scores
        # `self` stays out of the session: the block is shipped with what it names, and the server has no factscope
        lm, embed, layers, lm_head = self.lm, self.envoys["embed"], self.envoys["layers"], self.envoys["lm_head"]
        outputs = self._outputs()
        tokens, mask, ends, answers = batch.tokens.cpu(), batch.mask.cpu(), batch.ends.cpu(), batch.answers.cpu()
        subject = batch.subject.cpu()
        passes = []  # per site, per chunk: its rows' prompts, positions, width, and the rows
        for prompts, positions, chunks in restorations:
            prompts, positions = prompts.cpu(), positions.cpu()
            passes.append([(prompts[c], positions[c], int(ends[prompts[c]].max()) + 1, c) for c in (c.cpu() for c in chunks)])
        kinds = {kind for kind, _, _ in sites}
        with lm.session(remote=self.remote):
            out = nnsight.save({})
            with lm.trace({"input_ids": tokens, "attention_mask": mask}, logits_to_keep=ends[:, None]):
                clean_embed = embed.output
                clean = {}
                for layer in range(len(layers)):
                    for kind in ("attn", "mlp"):
                        if kind in kinds:
                            clean[(kind, layer)] = outputs[kind][layer].output
                    clean[("resid", layer)] = layers[layer].output
                logits = lm_head.output[:, 0]
                out["model_dtype"] = logits[:0]
                out["p_clean"] = score(logits.detach().float(), answers)["prob"]
            std = clean_embed.detach()[subject.to(clean_embed.device)].std()
            out["std"] = std.double()
            full = torch.zeros((*tokens.shape, draws.shape[-1]), dtype=draws.dtype)
            full[subject] = draws
            with lm.trace({"input_ids": tokens, "attention_mask": mask}, logits_to_keep=ends[:, None]):
                embed.output = add_noise(embed.output, noised(full, noise * float(std), subject))
                corrupt = [embed.output] + [layers[layer].output for layer in range(len(layers))]
                out["p_corrupt"] = score(lm_head.output[:, 0].detach().float(), answers)["prob"]
            restored = []
            for (kind, first, last), site_passes, (prompts, _, _) in zip(sites, passes, restorations):
                row = torch.empty(len(prompts))
                for p, i, width, c in site_passes:
                    inputs = {"input_ids": tokens[p, :width], "attention_mask": mask[p, :width]}
                    with lm.trace(inputs, logits_to_keep=ends[p][:, None]):
                        state = corrupt[first][p.to(corrupt[first].device), :width]
                        if kind == "resid":
                            state = restore(state, clean[("resid", first - 1)], p, i)
                        if first == 0:
                            embed.output = state
                        for layer in range(first):  # not run: what enters block `first` is `state`
                            layers[layer].skip(state)
                        if kind != "resid":
                            for layer in range(first, last + 1):
                                module = outputs[kind][layer]
                                module.output = restore(module.output, clean[(kind, layer)], p, i)
                        row[c] = score(lm_head.output[:, 0].detach().float(), answers[p])["prob"].cpu()
                restored.append(row)
            out["restored"] = torch.cat([torch.empty(0), *restored])  # no site: a check whose cells need no pass
        return self._received(model, out)

    def trace_atp(
        self, model, batch, chunks: list[Int[torch.Tensor, " chunk"]], draws: list[Float[torch.Tensor, "subject_token d_model"]],
        noise: float, kinds: Sequence[str], windows: dict[str, list[tuple[int, int]]], drops: tuple[int | None, ...],
        prompts: Int[torch.Tensor, " cells"], positions: Int[torch.Tensor, " cells"],
    ) -> dict[str, torch.Tensor]:
        """Attribution patching of causal tracing (`causal.atp.atp_trace`) in one nnsight session, full width: the
        clean pass (its p(a), the std of the subjects' embeddings, and the states to restore, which stay on the
        server), then per seed (`draws`, sent as `causal_trace` sends them) and chunk of prompts (`chunks`) the
        corrupted pass with its embeddings a leaf that needs a gradient, and per entry of `drops` one backward pass
        from Σ p(a), reading each layer's residual, MLP and attention output gradients in the order the pass reaches
        them (the last layer first); for a dropped layer the gradient that goes on through its attention and MLP
        outputs is set to zero after it is read (GradDrop's cut). Each kind's estimate is
        `trace_maths.restoration_estimates` (windows: per kind and layer the layers restored); with one entry of
        `drops` that estimate, with several Σ |estimate| / (L − 1). What comes back: p_clean per prompt, the std,
        p_corrupt per seed and prompt, and the estimate per seed, kind, layer and cell (`prompts`, `positions`)."""
        import nnsight

        tracing = self._shipped_maths(trace_maths)
        self.bytes_sent += sum(d.numel() * d.element_size() for d in draws)
        estimate_of, noised, add_noise = tracing.restoration_estimates, tracing.scaled_noise, tracing.add_noise
        score = self._shipped_maths().answer_scores
        lm, embed, layers, lm_head = self.lm, self.envoys["embed"], self.envoys["layers"], self.envoys["lm_head"]
        outputs = self._outputs()
        tokens, mask, ends, answers = batch.tokens.cpu(), batch.mask.cpu(), batch.ends.cpu(), batch.answers.cpu()
        subject, prompts, positions = batch.subject.cpu(), prompts.cpu(), positions.cpu()
        chunks = [(c, int(ends[c].max()) + 1) for c in (c.cpu() for c in chunks)]
        n_layers, graddrop = len(layers), len(drops) > 1
        # what the passes read, in the order the forward pass runs it (GradDrop also cuts at every attention and MLP
        # output), and per kind its states by layer; the session's statements stay one line each, as nnsight
        # finds a `with` block of a shipped session by its line
        restored = [(kind, layer) for layer in range(n_layers) for kind in outputs if kind in kinds]
        read = [(kind, layer) for layer in range(n_layers) for kind in outputs if kind in kinds or graddrop and kind != "resid"]
        by_kind = {kind: [(kind, layer) for layer in range(n_layers)] for kind in kinds}
        with lm.session(remote=self.remote):
            out = nnsight.save({})
            with lm.trace({"input_ids": tokens, "attention_mask": mask}, logits_to_keep=ends[:, None]):
                clean_embed = embed.output
                clean = {(kind, layer): outputs[kind][layer].output for kind, layer in restored}
                logits = lm_head.output[:, 0]
                out["model_dtype"] = logits[:0]
                out["p_clean"] = score(logits.detach().float(), answers)["prob"]
            std = clean_embed.detach()[subject.to(clean_embed.device)].std()
            out["std"] = std.double()
            estimates, p_corrupt = [], []
            for seed_draws in draws:
                full = torch.zeros((*tokens.shape, seed_draws.shape[-1]), dtype=seed_draws.dtype)
                full[subject] = seed_draws
                corruption = noised(full, noise * float(std), subject)
                effects = torch.zeros((len(kinds), n_layers, *tokens.shape))
                p_seed = torch.empty(len(ends))
                for c, width in chunks:
                    rows, inputs = torch.arange(len(c)), {"input_ids": tokens[c, :width], "attention_mask": mask[c, :width]}
                    with lm.trace(inputs, logits_to_keep=ends[c][:, None]):
                        x = add_noise(embed.output, corruption[c, :width]).detach().requires_grad_(True)
                        embed.output = x
                        acts = {(kind, layer): outputs[kind][layer].output for kind, layer in read}
                        p = lm_head.output[:, 0].float().softmax(-1)[rows, answers[c]]  # CPU indices: any device
                        p_seed[c] = p.detach().cpu()
                        deltas = {key: clean[key][c, :width].detach().float() - acts[key].detach().float() for key in restored}
                        for dropped in drops:
                            grads = {}
                            with p.sum().backward(retain_graph=True, inputs=[x]):
                                for kind, layer in reversed(read):  # the order the backward pass reaches them
                                    grads[(kind, layer)] = acts[(kind, layer)].grad
                                    if layer == dropped and kind != "resid":
                                        acts[(kind, layer)].grad = torch.zeros_like(grads[(kind, layer)])
                            for k, kind in enumerate(kinds):
                                estimate = estimate_of([deltas[key] for key in by_kind[kind]], [grads[key] for key in by_kind[kind]], windows[kind]).cpu()
                                if graddrop:
                                    effects[k][:, c, :width] += estimate.abs() / (n_layers - 1)
                                else:
                                    effects[k][:, c, :width] = estimate
                estimates.append(effects[:, :, prompts, positions])
                p_corrupt.append(p_seed)
            out["p_corrupt"] = torch.stack(p_corrupt)
            out["estimates"] = torch.stack(estimates)
        return self._received(model, out)

    def read_pass(
        self, model, batch, reads: Sequence[str], at: Int[torch.Tensor, " batch"], reduce: Callable[..., dict],
        **args,
    ) -> dict[str, torch.Tensor]:
        """One read-only pass of `batch` (`forward.Batch`) whose readings are reduced where the weights are. Per
        layer, the outputs `reads` names (keys of `_outputs`: "attn", "mlp", "resid") at position `at[i]` of
        prompt i, and the END logits ("logits"), go to `reduce(reads, lens, **args)`, an `end_maths` function,
        with the unembedding and the final norm as `end_maths.lens_logits` takes them: only what it returns comes
        back (`extraction_events`: a few booleans per prompt; `lens_ranks`: ranks), never a vocabulary-sized row."""
        import nnsight

        end_maths = self._shipped_maths()
        gain_of, eps, norm_kind = end_maths.rms_gain, self.eps, self.paths.norm
        layers, norm, lm_head = self.envoys["layers"], self.envoys["final_norm"], self.envoys["lm_head"]
        outputs = self._outputs()
        order = [read for read in outputs if read in reads]  # as the layer runs them: nnsight cannot go back
        rows, at = torch.arange(len(at)), at.cpu()
        inputs = {"input_ids": batch.tokens.cpu(), "attention_mask": batch.mask.cpu()}
        with self.lm.trace(inputs, logits_to_keep=batch.ends.cpu()[:, None], remote=self.remote):
            out = nnsight.save({})
            got = {read: [] for read in order}
            for layer in range(len(layers)):
                for read in order:
                    got[read].append(outputs[read][layer].output[rows, at])
            logits = lm_head.output[:, 0]
            out["model_dtype"] = logits[:0]
            got["logits"] = logits.detach().float()
            weight = norm.weight.detach()
            lens = {"w_u": lm_head.weight.T, "b_u": lm_head.bias, "gain": gain_of(weight, eps, norm_kind),
                    "bias": torch.zeros(weight.shape[0], device=weight.device), "eps": eps, "centres": False}
            out.update(reduce(got, lens, **args))
        return self._received(model, out)

    def _shipped_maths(self, module: ModuleType = end_maths) -> ModuleType:
        """`module` (`end_maths`, or `trace_maths` for causal tracing's sessions), registered to be pickled by value on
        a remote run: the server has torch and nnsight, not factscope, and the traced blocks call its functions."""
        import cloudpickle

        if self.remote:
            cloudpickle.register_pickle_by_value(module)
        return module

    def layer_envoys(self) -> tuple[list, ...]:
        """Per layer, the envoys of `_LAYER_MODULES` (v_proj, o_proj, attention, MLP output, attention post-norm;
        an empty list where the architecture has none)."""
        return tuple(self.envoys[key] for key in _LAYER_MODULES)

    def _outputs(self) -> dict[str, list]:
        """Per layer, the modules whose outputs TransformerLens calls attn_out (what the attention adds to the
        residual stream: after Gemma's post-norm), mlp_out and resid_post, in the order a layer runs them."""
        return {"attn": self.envoys["attn_post_norm"] or self.envoys["o_proj"], "mlp": self.envoys["mlp_out"],
                "resid": self.envoys["layers"]}

    def _received(self, model, out: dict) -> dict[str, torch.Tensor]:
        """What a request brought back, counted for the cost report, once the dtype the model ran in is checked
        against the one the run records (`model.dtype`, which also sets the tolerance the parts are checked at):
        a remote run cannot choose it, the server's deployment does."""
        saved = {name: value.cpu() for name, value in dict(out).items()}
        ran_in = _DTYPE_NAMES.get(saved.pop("model_dtype").dtype, "another dtype")
        if ran_in != model.dtype:
            where = "NDIF" if self.remote is True else "the nnsight engine"
            raise FactscopeError(f"{where} ran {model.name} in {ran_in}, not in {model.dtype} as this run records it; "
                                 "nothing was written")
        self.requests += 1
        self.bytes_back += sum(t.numel() * t.element_size() for t in saved.values())
        return saved


@dataclass
class ConfigOnlyModel:
    """What a remote run holds locally in place of `models.LoadedModel`: the tokenizer and the config, no weight.
    It has the attributes the decomposition reads off a model when its engine projects (`decompose.ProjectingEngine`)."""

    name: str
    tokenizer: object
    prepend_bos: bool
    config: object
    dtype: str  # the dtype the server runs the model in (`remote.SERVED_DTYPE`; each request checks it)
    device: torch.device = torch.device("cpu")

    @property
    def weights_sha256(self) -> str:
        # the weights are the server's: what is recorded is where they come from, at the revision the config names
        return f"remote:{self.name}@{getattr(self.config, '_commit_hash', None) or 'unknown'}"

    @property
    def cfg(self):
        from types import SimpleNamespace

        c = self.config
        heads = c.num_attention_heads
        return SimpleNamespace(n_layers=c.num_hidden_layers, n_heads=heads, d_model=c.hidden_size,
                               d_head=getattr(c, "head_dim", None) or c.hidden_size // heads,
                               eps=c.rms_norm_eps, output_logits_soft_cap=getattr(c, "final_logit_softcapping", None))

    @property
    def max_tokens(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)


def config_only_model(name: str, config, tokenizer, dtype: str, prepend_bos: bool | None = None) -> ConfigOnlyModel:
    from .models import tokenizer_prepends_bos

    module_paths((getattr(config, "architectures", None) or ["?"])[0])  # refuse an unknown architecture up front
    prepend = tokenizer_prepends_bos(tokenizer) if prepend_bos is None else prepend_bos
    if prepend and tokenizer.bos_token_id is None:
        raise FactscopeError(f"model {name!r}: its tokenizer has no BOS token to prepend")
    return ConfigOnlyModel(name, tokenizer, prepend, config, dtype)


def _requested(names: Sequence[str], n_layers: int, paths: ModulePaths) -> set[tuple[str, int | None]]:
    """act_names → (kind, layer) pairs; a name this engine cannot fill is an error, not a silent gap."""
    per_layer = [kind for kind in _PER_LAYER if kind != "post_norm_scale" or paths.attn_post_norm]
    known = {act_name(kind): (kind, None) for kind in _GLOBAL}
    known |= {act_name(kind, layer): (kind, layer) for kind in per_layer for layer in range(n_layers)}
    missing = [name for name in names if name not in known]
    if missing:
        raise FactscopeError(f"the nnsight engine cannot provide {', '.join(missing)} (this architecture needs a "
                             "term it does not read)")
    return {known[name] for name in names}


def wrap(hf_model, tokenizer):
    """An nnsight LanguageModel over an already loaded Hugging Face model, with eager attention (so the attention
    module returns its probabilities)."""
    import nnsight

    hf_model.set_attn_implementation("eager")
    with warnings.catch_warnings():
        # nnsight 0.8 prefers TransformersModel(repo_id, ...); LanguageModel is what takes a loaded model and what
        # NDIF's documentation uses, and it still works
        warnings.filterwarnings("ignore", message="LanguageModel is deprecated")
        return nnsight.LanguageModel(hf_model, tokenizer=tokenizer)


def local_engine(name: str, dtype: str = "float32", remote: bool | str = False) -> NnsightEngine:
    """The nnsight engine over a fresh copy of a model factscope can load (TransformerBridge rewires the modules of
    the model it wraps, so the engine cannot share it). `remote="local"` exercises the serialisation path."""
    if dtype not in DTYPES:
        raise FactscopeError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    hf_model, tokenizer = load_hf_model(name, dtype=DTYPES[dtype])
    return NnsightEngine(wrap(hf_model, tokenizer), remote=remote)
