"""The worker's measures, taken from the projections the solver made, batched over neurons,
against the same measures recomputed the old way: one neuron at a time, from a fresh w @ U and
c @ U (docs/method.md, "Measures from the solver's projections")."""

import numpy as np
import pytest
import torch

from channelscope.method import measures, rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import load_model


def test_measures_from_the_solvers_projections_equal_the_old_way(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    settings = rotate.with_overrides(rotate.Settings(), channels=3, precision="fp32")
    decomposer = Decomposer(model, settings, reference_count=4, cache_dir=tmp_path, batch_size=4)
    records = decomposer.neurons(1, "out", list(range(7)))  # two batches, the second of 3
    proj, scored = decomposer.proj, decomposer.scored
    for record in records:
        w = torch.from_numpy(record.vector)
        z_w = proj.forward(w[None], exact=True)[0]
        zs_w = rotate.z_scores(z_w[None], scored)[0]
        vectors = torch.stack([torch.from_numpy(ch.vector) for ch in record.channels])
        z_c = proj.forward(vectors, exact=True)
        zs_c = rotate.z_scores(z_c, scored)
        assert record.kurtosis == pytest.approx(float(rotate.excess_kurtosis(z_w)), rel=1e-5)
        assert record.skew == pytest.approx(float(rotate.skewness(z_w)), rel=1e-5, abs=1e-6)
        top, top_z = measures.top_tokens(zs_w, scored, 1.0)
        assert record.top_ids.tolist() == top.tolist()
        assert np.allclose(record.top_z, top_z.numpy(), rtol=1e-5)
        bottom, _ = measures.top_tokens(zs_w, scored, -1.0)
        assert record.bottom_ids.tolist() == bottom.tolist()
        masked = [torch.from_numpy(ch.masked).long() for ch in record.channels]
        assert record.coverage == pytest.approx(measures.vocabulary_coverage(zs_w, scored, masked), rel=1e-5)
        for k, ch in enumerate(record.channels):
            sign = measures.tail_sign(ch.skew)
            top, top_z = measures.top_tokens(zs_c[k], scored, sign)
            assert ch.top_ids.tolist() == top.tolist()
            assert np.allclose(ch.top_z, top_z.numpy(), rtol=1e-5)
            assert ch.faithfulness == pytest.approx(float(measures.faithfulness(zs_w, top, sign)), rel=1e-5)
            assert ch.alpha == pytest.approx(measures.alpha_star(z_w, z_c[k], zs_c[k], scored), abs=1.5e-3)
