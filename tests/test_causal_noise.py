"""Noise robustness: no noise is the clean model, the mechanism alone is its DLA sum, the noise has the requested
size in the common unit, and seeds repeat."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from causal_helpers import attributions, own_target, per_prompt, tiny

from factscope.causal.edits import Noise, edit_hooks, noise_draws
from factscope.causal.noise import Clean, noise_passes, noise_robustness, noisy_pass
from factscope.causal.scores import scores
from factscope.causal.sites import HeadPath, MlpPath, parse
from factscope.data import relation_targets
from factscope.end_maths import first_among_targets
from factscope.forward import make_batch, target_ids


def test_noise_robustness(model_dirs):
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded)
    clean = scores(batch.logits(model), batch)
    mechanisms = {"subject": [HeadPath(2, head, "subject") for head in range(4)], "mlp": [MlpPath(1), MlpPath(2)]}
    calls = []
    table = noise_robustness(model, encoded, mechanisms, scales=(0.0, 2.0), seeds=(0, 1), progress=calls.append)
    assert sum(calls) == noise_passes(len(mechanisms), scales=(0.0, 2.0), seeds=(0, 1))
    assert list(table["mechanism"]) == ["subject", "subject", "mlp", "mlp", "all", "all"]
    at_zero = table[table["noise_scale"] == 0]
    assert np.allclose(at_zero["mean_logit"], float(clean["logit"].mean()), atol=1e-6, rtol=0)
    noisy = table[table["noise_scale"] == 2.0]
    assert (noisy["mean_logit"] != at_zero["mean_logit"].to_numpy()).all()
    assert table[["first_among_r", "alone_first_among_r"]].stack().between(0, 1).all() and (table["noise_unit"] == "end_resid_norm").all()
    # without noise the full model's first among R_r is the clean model's, whatever the mechanism
    assert at_zero["first_among_r"].nunique() == 1
    again = noise_robustness(model, encoded, mechanisms, scales=(0.0, 2.0), seeds=(0, 1))
    pd.testing.assert_frame_equal(table, again)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_the_mechanism_alone_without_noise_is_its_dla_sum(model_dirs, family):
    model, encoded = tiny(model_dirs, family)
    batch = make_batch(model, encoded)
    paths = [HeadPath(1, head, "subject") for head in range(model.cfg.n_heads)] + [MlpPath(0), MlpPath(2)]
    clean, path_set = Clean(model, batch), parse(model, paths)
    ids, _ = target_ids(batch.items, relation_targets(encoded), with_answer=True)
    logits, alone = noisy_pass(model, batch, path_set, 0.0, noise_draws(model, batch, path_set, 0), clean, ids)
    torch.testing.assert_close(logits, batch.logits(model), atol=1e-5, rtol=0)
    dla = own_target(attributions(model_dirs, family))
    expected = per_prompt(dla[(dla["component"] == "attn") & (dla["layer"] == 1) & (dla["source"] == "subject")], encoded)
    expected += per_prompt(dla[(dla["component"] == "mlp") & dla["layer"].isin([0, 2])], encoded)
    torch.testing.assert_close(alone[:, 0].cpu(), expected, atol=1e-4, rtol=0)  # column 0 is a itself


def test_first_among_targets():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 0.0], [2.0, 5.0, 5.0]])
    valid = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert np.array_equal(first_among_targets(logits, valid).numpy(), [1.0, 0.0, np.nan], equal_nan=True)


def test_noise_has_the_requested_size(model_dirs):
    """All the noise on a mechanism's paths together has squared norm (scale × END's clean final residual norm)²
    in expectation, however many paths share it and whatever their own sizes (heads: through the head's own
    output map; MLPs: in the residual stream)."""
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded)
    clean = Clean(model, batch)
    paths = parse(model, [HeadPath(2, head, "all") for head in range(4)] + [MlpPath(1)])
    ratios = []

    class Spy(Noise):
        squared = 0.0

        def head(self, layer, out_end, paths_, weights, head_map):
            noisy = super().head(layer, out_end, paths_, weights, head_map)
            self.squared = self.squared + (noisy - out_end).pow(2).sum(-1)
            return noisy

        def vector(self, key, x_end):
            noisy = super().vector(key, x_end)
            self.squared = self.squared + (noisy - x_end).pow(2).sum(-1)
            return noisy

    for seed in range(30):
        spy = Spy(2.0, noise_draws(model, batch, paths, seed), clean.unit, paths.n_paths)
        batch.logits(model, edit_hooks(model, batch, paths, spy))
        ratios.append(spy.squared / (2.0 * clean.unit) ** 2)
    assert float(torch.cat(ratios).mean()) == pytest.approx(1.0, abs=0.1)
