"""Noise robustness: no noise is the clean model, the noise has the requested size, and seeds repeat."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from causal_helpers import tiny

from factscope.causal.edits import Noise, edit_hooks
from factscope.causal.noise import noise_passes, noise_robustness
from factscope.causal.scores import scores
from factscope.causal.sites import HeadPath, MlpPath, parse
from factscope.forward import make_batch


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
    again = noise_robustness(model, encoded, mechanisms, scales=(0.0, 2.0), seeds=(0, 1))
    pd.testing.assert_frame_equal(table, again)


def test_noise_has_the_requested_size(model_dirs):
    """Noise on a path has squared norm scale² × the path's squared norm in expectation (heads: through the
    head's own output map; MLPs: in the residual stream)."""
    model, encoded = tiny(model_dirs, "llama")
    batch = make_batch(model, encoded)
    paths = parse(model, [HeadPath(2, head, "all") for head in range(4)] + [MlpPath(1)])
    ratios = {"head": [], "mlp": []}

    class Spy(Noise):
        def head(self, layer, out_end, paths_, weights, head_map):
            noisy = super().head(layer, out_end, paths_, weights, head_map)
            expected = self.scale**2 * (paths_ * weights[..., None]).pow(2).sum((1, 2, 3))
            ratios["head"].append((noisy - out_end).pow(2).sum(-1) / expected)
            return noisy

        def vector(self, key, x_end):
            noisy = super().vector(key, x_end)
            ratios["mlp"].append((noisy - x_end).pow(2).sum(-1) / (self.scale**2 * x_end.pow(2).sum(-1)))
            return noisy

    for seed in range(30):
        batch.logits(model, edit_hooks(model, batch, paths, Spy(2.0, seed)))
    assert float(torch.cat(ratios["head"]).mean()) == pytest.approx(1.0, abs=0.1)
    assert float(torch.cat(ratios["mlp"]).mean()) == pytest.approx(1.0, abs=0.1)
