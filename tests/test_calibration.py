"""The neuron score is calibrated: random vectors that the reference never saw score around 50,
while the best percentile it is built from reads far higher for the same vectors (a maximum over
channels). Tiny model, real solver."""

import numpy as np
import torch

from channelscope.experiments import calibration
from channelscope.method import measures, reference, rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import load_model


def test_held_out_random_vectors_score_about_50(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    settings = rotate.with_overrides(rotate.Settings(), channels=4, precision="fp32")
    decomposer = Decomposer(model, settings, reference_count=48, cache_dir=tmp_path)
    assert decomposer.score_scale.shape == (48,)

    scores = calibration.held_out_scores(decomposer, 48)
    found = calibration.summary(scores)
    low, high = found["interval"]
    assert low <= 50 <= high, found
    assert 0 < found["share_at_least_90"] < 0.3 and 0 < found["share_at_most_10"] < 0.3, found
    # The uncalibrated statistic of the same vectors is what the score corrects.
    records = decomposer.vectors(
        reference.random_unit_vectors(48, model.d_model, decomposer.seed + 1),
        [(-1, calibration.HELD_OUT, i) for i in range(48)],
    )
    assert np.median([r.best_percentile for r in records]) > 65
    assert [r.score for r in records] == scores  # the same vectors, the same seeds


def test_a_neuron_better_than_every_random_vector_scores_100_and_a_worse_one_0():
    scale = np.array([20.0, 50.0, 50.0, 80.0])
    assert measures.neuron_score(100.0, scale) == 100.0
    assert measures.neuron_score(0.0, scale) == 0.0
    assert measures.neuron_score(50.0, scale) == 50.0  # ties count half


def test_the_held_out_scale_leaves_each_vector_out_of_its_own_percentiles():
    # Two channels per vector; vector 0's faithfulness is the best at both indices.
    count, per, d = 6, 2, 8
    faith = np.tile(np.arange(count, dtype=float)[::-1, None], (1, per))
    vectors = reference.random_unit_vectors(count, d, 3)
    channels = reference.random_unit_vectors(count * per, d, 4)
    ref = reference.Reference(faith, faith, torch.zeros(0, d), [], channels)
    best = reference.held_out_best(ref, vectors)
    # Vector 0 beats all 5 others (100), vector 5 none (0): itself is not among them.
    assert best[0] == 100.0 and best[-1] == 0.0
