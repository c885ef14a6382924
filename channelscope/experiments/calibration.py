"""Is the neuron score calibrated? Random vectors that the reference never saw (another seed),
decomposed and scored exactly as a model's neurons are: their scores should sit around 50
(docs/method.md, "Neuron score"). A finding of the eval report, and a test on the tiny model."""

from __future__ import annotations

from channelscope.core.stats import interval, median, share
from channelscope.method import reference
from channelscope.method.decomposer import Decomposer

HELD_OUT = "held-out"  # the side name that seeds held-out random vectors (rotate.neuron_seed)


def held_out_scores(decomposer: Decomposer, count: int) -> list[float]:
    """The scores of `count` random unit vectors drawn with a seed the reference did not use."""
    seed = decomposer.seed + 1  # the reference's vectors come from decomposer.seed
    vectors = reference.random_unit_vectors(count, decomposer.model.d_model, seed)
    records = decomposer.vectors(vectors, [(-1, HELD_OUT, i) for i in range(count)])
    return [record.score for record in records]


def summary(scores: list[float]) -> dict:
    """Median with its bootstrap interval, and the shares at the two ends (each ~10 % when
    calibrated: a neuron scores >= 90 as often as a random vector does)."""
    low, high = interval(scores)
    return {
        "count": len(scores),
        "median": median(scores),
        "interval": [low, high],
        "share_at_least_90": share(s >= 90 for s in scores),
        "share_at_most_10": share(s <= 10 for s in scores),
    }
