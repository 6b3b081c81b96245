"""`ablate --remote`'s sessions through nnsight: the mechanism grid and the noise check, each many edited passes in
one nnsight session (`lm.session`), so that no path vector, mean or residual leaves the server and only scores per
prompt come back; and path attribution patching (`--method atp|both`), a forward and a backward pass per chunk of
prompts in one session, only the estimates coming back (its exact check is the grid session's, one set per path).
Mixed into `nnsight_engine.NnsightEngine`, whose module paths and envoys they use.

The maths are `end_maths`', shared with the local edits (`causal.edits`): a head path's END vector from a pass's own
pattern and values (`head_out_map`, `head_paths_at_end`), its removal (`head_change`) or noise (`noisy_heads`,
`noisy_vector`), and what is measured (`answer_scores`, `noise_scores`). What the attention adds at END is edited
where TransformerLens's hook_attn_out reads it: the attention module's output (Llama), after its post-norm (Gemma 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int

from .errors import FactscopeError


class AblateSessions:
    """The sessions of `ablate`'s edited checks (a mixin of `NnsightEngine`)."""

    def ablation_grid(
        self, model, batch, sets: list, mode: str, ids: Int[torch.Tensor, "batch n"],
        valid: Float[torch.Tensor, "batch n"], effects: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """`causal.ablation.ablation_grid`'s passes in one nnsight session (no path vector or mean leaves the
        server): a clean pass (scores, the final norm's scale, in "mean" mode the END means of every path of
        `sets`, `causal.sites.PathSet`s without embedding), then per effect of `effects` ("total", "direct") one
        pass per set but the empty first. Head paths are `end_maths.head_paths_at_end` of each pass's own pattern
        and values; a total effect edits what the attention / MLP adds at END, a direct one adds the summed change
        after the last block and pins the final norm's scale (`end_maths.frozen_final_norm`). What comes back:
        `end_maths.answer_scores` with a − mean(R_r ∖ a), [pass, batch]: clean, then effect by effect the sets."""
        import nnsight

        end_maths = self._shipped_maths()
        _refuse_embed(sets)
        out_map, head_paths, change_of = end_maths.head_out_map, end_maths.head_paths_at_end, end_maths.head_change
        add, write, score = end_maths.add_at_end, end_maths.write_at_end, end_maths.answer_scores
        rms_scale_of, frozen_norm = end_maths.rms_scale, end_maths.frozen_final_norm
        lm, eps, d_head, norm_kind, recording = self.lm, self.eps, self.d_head, self.paths.norm, mode == "mean"
        layers, norm, lm_head = self.envoys["layers"], self.envoys["final_norm"], self.envoys["lm_head"]
        v_projs, o_projs, attns, mlps, post_norms = self.layer_envoys()
        n_layers, rows, ends = len(layers), torch.arange(len(batch)), batch.ends.cpu()
        onehot, answers, ids, valid = batch.onehot.cpu(), batch.answers.cpu(), ids.cpu(), valid.cpu()
        heads = [paths.heads.cpu() for paths in sets]
        head_layers = [set(paths.head_layers()) for paths in sets]
        mlp_layers = [set(paths.mlps) for paths in sets]
        all_heads, all_mlps = set().union(*head_layers), set().union(*mlp_layers)
        # the clean pass (no effect; set 0 is the empty set), then every edited one
        passes = [(None, 0)] + [(effect, s) for effect in effects for s in range(1, len(sets))]
        inputs = {"input_ids": batch.tokens.cpu(), "attention_mask": batch.mask.cpu()}
        with lm.session(remote=self.remote):
            out = nnsight.save({})
            means, scores = {}, {}
            for effect, s in passes:
                record = effect is None and recording
                with lm.trace(inputs, logits_to_keep=ends[:, None]):
                    changes = []  # a direct effect's, layer by layer (the layers may sit on several devices)
                    for layer in range(n_layers):
                        if (record and layer in all_heads) or layer in head_layers[s]:
                            v, attn_output = v_projs[layer].output, attns[layer].output
                            post_norm = (post_norms[layer].input[rows, ends], post_norms[layer].weight, eps,
                                         norm_kind) if post_norms else None  # Gemma: with this pass's END scale
                            to_resid, _ = out_map(o_projs[layer].weight, d_head, post_norm)
                            paths = head_paths(v, v_projs[layer].bias, attn_output[1][rows, :, ends], onehot, d_head,
                                               to_resid)
                            if record:
                                means[("head", layer)] = paths.mean(0)
                            else:
                                delta = change_of(paths, heads[s][layer].to(paths.device), means.get(("head", layer)))
                                if effect == "direct":
                                    changes.append(delta)
                                elif post_norms:
                                    post_norms[layer].output = add(post_norms[layer].output, rows, ends, delta)
                                else:  # the attention module's output is o_proj's, read after its pattern
                                    attns[layer].output = add(attn_output, rows, ends, delta)
                        if (record and layer in all_mlps) or layer in mlp_layers[s]:
                            x = mlps[layer].output
                            x_end = x[rows, ends].float()
                            if record:
                                means[("mlp", layer)] = x_end.mean(0)
                            else:
                                mean = means.get(("mlp", layer))
                                new = torch.zeros_like(x_end) if mean is None else mean.expand_as(x_end).clone()
                                if effect == "direct":
                                    changes.append(new - x_end)
                                else:
                                    mlps[layer].output = write(x, rows, ends, new)
                    if effect is None:
                        clean_scale = rms_scale_of(norm.input.detach(), eps)  # every position, as the local hook
                    if effect == "direct":
                        x, change = layers[-1].output, 0.0
                        for delta in changes:  # summed in the order the local editor sums them
                            change = change + delta.to(x.device)
                        layers[-1].output = add(x, rows, ends, change)
                        norm.output = frozen_norm(norm.input, clean_scale, norm.weight.detach(), norm_kind)
                    logits = lm_head.output[:, 0]
                    if effect is None:
                        out["model_dtype"] = logits[:0]
                    for key, value in score(logits.detach().float(), answers, ids, valid).items():
                        scores.setdefault(key, []).append(value)
            for key, values in scores.items():
                out[key] = torch.stack(values)
        return self._received(model, out)

    def noise_robustness(
        self, model, batch, conditions: list, scales: Sequence[float], draws: list[list[list[torch.Tensor]]],
        ids: Int[torch.Tensor, "batch target"], valid: Float[torch.Tensor, "batch target"],
    ) -> dict[str, torch.Tensor]:
        """`causal.noise.noise_robustness`'s passes in one nnsight session: a clean pass (the noise unit, the norm of
        END's residual after the last block, and the final norm's scale at END), then per condition
        (`causal.sites.PathSet`, no embedding), scale and seed one pass with noise on the condition's paths at END.
        `draws[c][s]` are seed s's unit Gaussians for condition c, drawn locally (`causal.edits.noise_draws`), in
        the order the layers run, the same at every scale; they are the only tensors sent besides the prompts and
        R_r (`ids`, a first; `valid`), and of a head layer's only the edited (head, group) pairs': the server puts
        them back among zeros, which the other pairs' zero weights cancel as they cancel the local draws. What comes
        back, [pass, batch]: `end_maths.noise_scores`."""
        import nnsight

        end_maths = self._shipped_maths()
        _refuse_embed(conditions)
        heads = [paths.heads.cpu() for paths in conditions]
        head_layers = [set(paths.head_layers()) for paths in conditions]
        mlp_layers = [set(paths.mlps) for paths in conditions]
        draws = [[_edited_draws(one, heads[c], head_layers[c], mlp_layers[c]) for one in per_seed]
                 for c, per_seed in enumerate(draws)]
        self.bytes_sent += sum(t.numel() * t.element_size() for per_seed in draws for one in per_seed for t in one)
        out_map, head_paths, add, write = (end_maths.head_out_map, end_maths.head_paths_at_end, end_maths.add_at_end,
                                           end_maths.write_at_end)
        sigma_of, noisy_heads, noisy_vector = end_maths.noise_sigma, end_maths.noisy_heads, end_maths.noisy_vector
        alone_logits, noise_scores, rms_scale_of = end_maths.alone_logits, end_maths.noise_scores, end_maths.rms_scale
        gain_of, lm, eps, d_head, norm_kind = end_maths.rms_gain, self.lm, self.eps, self.d_head, self.paths.norm
        layers, norm, lm_head = self.envoys["layers"], self.envoys["final_norm"], self.envoys["lm_head"]
        v_projs, o_projs, attns, mlps, post_norms = self.layer_envoys()
        n_layers, rows, ends = len(layers), torch.arange(len(batch)), batch.ends.cpu()
        onehot, answers, ids, valid = batch.onehot.cpu(), batch.answers.cpu(), ids.cpu(), valid.cpu()
        n_paths = [paths.n_paths for paths in conditions]
        inputs = {"input_ids": batch.tokens.cpu(), "attention_mask": batch.mask.cpu()}
        with lm.session(remote=self.remote):
            out = nnsight.save({})
            with lm.trace(inputs, logits_to_keep=ends[:, None]):
                unit = layers[-1].output[rows, ends].detach().float().norm(dim=-1)
                clean_scale = rms_scale_of(norm.input[rows, ends].detach(), eps)
                out["model_dtype"] = lm_head.output[:, 0][:0]
            gain, w_u = gain_of(norm.weight.detach(), eps, norm_kind), lm_head.weight.detach().T
            scores = {}
            for c, per_seed in enumerate(draws):  # `conditions` stays out: the server has no factscope class
                for scale in scales:
                    sigma = sigma_of(scale, unit, n_paths[c])
                    for seed_draws in per_seed:
                        with lm.trace(inputs, logits_to_keep=ends[:, None]):
                            alone, k = 0.0, 0  # the draws are taken in the order the layers run
                            for layer in range(n_layers):
                                if layer in head_layers[c]:
                                    v, attn_output = v_projs[layer].output, attns[layer].output
                                    post_norm = (post_norms[layer].input[rows, ends], post_norms[layer].weight, eps,
                                                 norm_kind) if post_norms else None
                                    to_resid, head_norm = out_map(o_projs[layer].weight, d_head, post_norm)
                                    paths = head_paths(v, v_projs[layer].bias, attn_output[1][rows, :, ends], onehot,
                                                       d_head, to_resid)
                                    edited = heads[c][layer] > 0
                                    z_draws = torch.zeros((*paths.shape[:3], d_head))
                                    z_draws[:, edited] = seed_draws[k]
                                    noise, alone = noisy_heads(paths, heads[c][layer], z_draws, to_resid, head_norm,
                                                               sigma, alone)
                                    k += 1
                                    if post_norms:
                                        post_norms[layer].output = add(post_norms[layer].output, rows, ends, noise)
                                    else:
                                        attns[layer].output = add(attn_output, rows, ends, noise)
                                if layer in mlp_layers[c]:
                                    x = mlps[layer].output
                                    new, alone = noisy_vector(x[rows, ends].float(), seed_draws[k], sigma, alone)
                                    k += 1
                                    mlps[layer].output = write(x, rows, ends, new)
                            logits = lm_head.output[:, 0].detach().float()
                            alone = alone_logits(alone, len(rows), gain.to(logits.device), clean_scale.to(logits.device),
                                                 w_u, ids)
                            for key, value in noise_scores(logits, alone, answers, ids, valid).items():
                                scores.setdefault(key, []).append(value)
            for key, values in scores.items():
                out[key] = torch.stack(values)
        return self._received(model, out)

    def path_atp(
        self, model, batches: list, others: list[tuple[torch.Tensor, torch.Tensor]], mode: str, group_index: list[int],
    ) -> dict[str, torch.Tensor]:
        """`causal.atp_paths.atp_path_effects`' passes in one nnsight session: per chunk (`batches`, `forward.Batch`
        each, with its R_r as `others` = (ids, valid)) a clean pass with a zero fp32 leaf added at END to what every
        attention adds (after Gemma's post-norm) and to every MLP's output (`causal.atp_paths._Probe`'s edit), a
        backward pass from `end_maths.target_metric` on the final norm's END output (the total effect's gradients
        at the leaves), and one from the metric through the final norm with its clean END scale frozen (the direct
        effect's, at END's last residual). The head paths' z by group (`end_maths.head_paths_z`, of the source
        groups `group_index`) is kept through the backward pass and mapped to the residual stream after it, layer by
        layer, so the server never holds every layer's path vectors at once. What comes back is
        `end_maths.path_changes`: per effect, per prompt, layer, head and kind the estimated change, and per prompt
        and layer the MLP's; no path vector, gradient or mean."""
        import nnsight

        end_maths = self._shipped_maths()
        out_map, paths_z, add, metric_of = end_maths.head_out_map, end_maths.head_paths_z, end_maths.add_at_end, end_maths.target_metric
        frozen_of, dots_of, changes_of = end_maths.frozen_norm_at_end, end_maths.path_dots, end_maths.path_changes
        rms_scale_of, gain_of = end_maths.rms_scale, end_maths.rms_gain
        lm, eps, d_head, norm_kind, mean = self.lm, self.eps, self.d_head, self.paths.norm, mode == "mean"
        layers, norm, lm_head = self.envoys["layers"], self.envoys["final_norm"], self.envoys["lm_head"]
        v_projs, o_projs, attns, mlps, post_norms = self.layer_envoys()
        n_layers, groups = len(layers), torch.tensor(group_index)
        chunks = [({"input_ids": batch.tokens.cpu(), "attention_mask": batch.mask.cpu()}, batch.ends.cpu(),
                   batch.onehot.cpu(), batch.answers.cpu(), ids.cpu(), valid.cpu()) for batch, (ids, valid) in zip(batches, others)]
        n = sum(len(batch) for batch in batches)
        with lm.session(remote=self.remote):
            out = nnsight.save({})
            dots, grads, sums = [], [], [None] * n_layers
            for inputs, ends, onehot, answers, ids, valid in chunks:
                rows = torch.arange(len(ends))
                with lm.trace(inputs, logits_to_keep=ends[:, None]):
                    z, post_in, mlp_end, leaves = [], [], [], []  # leaves: per layer (attention's, MLP's)
                    for layer in range(n_layers):
                        v, attn_output = v_projs[layer].output, attns[layer].output
                        z.append(paths_z(v, v_projs[layer].bias, attn_output[1][rows, :, ends], onehot, d_head))
                        written = post_norms[layer] if post_norms else attns[layer]
                        if post_norms:  # Gemma: what the attention adds is the post-norm's output
                            post_in.append(post_norms[layer].input[rows, ends].detach())
                            attn_output = post_norms[layer].output
                        x = attn_output[0] if isinstance(attn_output, tuple) else attn_output
                        attn_leaf = torch.zeros((len(rows), x.shape[-1]), device=x.device, requires_grad=True)
                        written.output = add(attn_output, rows, ends, attn_leaf)
                        x = mlps[layer].output
                        mlp_end.append(x[rows, ends].detach().float())
                        mlp_leaf = torch.zeros((len(rows), x.shape[-1]), device=x.device, requires_grad=True)
                        mlps[layer].output = add(x, rows, ends, mlp_leaf)
                        leaves.append((attn_leaf, mlp_leaf))
                    resid = layers[-1].output[rows, ends].detach().float()
                    scale = rms_scale_of(norm.input[rows, ends].detach(), eps)
                    normed = norm.output[rows, ends]
                    out["model_dtype"] = normed.detach()[:0]
                    w_u, b_u = lm_head.weight.T, lm_head.bias
                    total = metric_of(normed.float(), w_u, b_u, answers, ids, valid)
                    total_grads = []
                    # gradients come in the reverse of the forward order: the last layer's MLP first
                    with total.backward(inputs=[leaf for pair in leaves for leaf in pair]):
                        for attn_leaf, mlp_leaf in reversed(leaves):
                            total_grads.append((mlp_leaf.grad, attn_leaf.grad))
                    x = resid.requires_grad_(True)
                    weight = norm.weight.detach()
                    frozen = frozen_of(x, scale, gain_of(weight, eps, norm_kind), torch.zeros(weight.shape[0], device=weight.device))
                    direct = metric_of(frozen, w_u, b_u, answers, ids, valid)
                    direct_grads = []
                    with direct.backward(inputs=[x]):
                        direct_grads.append(x.grad)
                g_direct = direct_grads[0].detach().cpu()
                dots.append([]), grads.append([])
                for layer, (g_mlp, g_attn) in enumerate(reversed(total_grads)):
                    post_norm = (post_in[layer], post_norms[layer].weight, eps, norm_kind) if post_norms else None
                    to_resid, _ = out_map(o_projs[layer].weight, d_head, post_norm)
                    vectors = (to_resid(z[layer])[:, :, groups].cpu(), mlp_end[layer].cpu())
                    layer_grads = {"total": (g_attn.detach().float().cpu(), g_mlp.detach().float().cpu()),
                                   "direct": (g_direct, g_direct)}
                    dots[-1].append(dots_of(vectors, layer_grads))
                    grads[-1].append(layer_grads)
                    part = tuple(vector.sum(0) for vector in vectors)
                    sums[layer] = part if sums[layer] is None else (sums[layer][0] + part[0], sums[layer][1] + part[1])
            out.update(changes_of(dots, grads, sums, n, mean))
        return self._received(model, out)


def _edited_draws(draws: list[torch.Tensor], heads: Float[torch.Tensor, "layer head group"], head_layers: set[int],
                  mlps: set[int]) -> list[torch.Tensor]:
    """One noisy pass's draws (in the order its layers run) with each head layer's cut to its edited (head, group)
    pairs, [batch, pair, d_head]."""
    order: list[int | None] = []  # the head layer a draw is for, None for an MLP's
    for layer in range(heads.shape[0]):
        order += [layer] * (layer in head_layers) + [None] * (layer in mlps)
    return [draw if layer is None else draw[:, heads[layer] > 0] for layer, draw in zip(order, draws)]


def _refuse_embed(sets: list) -> None:
    if any(paths.embed for paths in sets):
        raise FactscopeError("the nnsight engine edits head paths and MLPs, not the embedding")
