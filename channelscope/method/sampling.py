"""Which neurons an experiment looks at: random ones, and the most vocabulary-aligned ones (the
highest raw excess kurtosis of w @ U). One definition of each, so that the reports and the
benches mean the same thing by "random" and "aligned", and never pool the two."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from channelscope.method import rotate

# SmolLM2's 30 layers in thirds; a smaller model keeps the layers it has.
LAYER_GROUPS = {"early": range(0, 10), "middle": range(10, 20), "late": range(20, 30)}


@dataclass(frozen=True)
class Sampled:
    group: str  # a layer group, a layer ("layer 25") or "aligned"
    layer: int
    side: str
    neuron: int


def random_neurons(
    model, cells: dict[str, Sequence[int]], per_cell: int, generator: torch.Generator
) -> list[Sampled]:
    """`per_cell` distinct neurons per cell (a named set of layers) and side: a layer of the cell,
    then a neuron, each drawn uniformly. Cells without a layer of the model are skipped."""
    rows: list[Sampled] = []
    for group, layers in cells.items():
        layers = [layer for layer in layers if layer < model.n_layers]
        if not layers:
            continue
        for side in model.sides:
            taken: set[tuple[int, int]] = set()
            while len(taken) < min(per_cell, len(layers) * model.d_mlp):
                layer = layers[int(torch.randint(len(layers), (1,), generator=generator))]
                neuron = int(torch.randint(model.d_mlp, (1,), generator=generator))
                if (layer, neuron) not in taken:
                    taken.add((layer, neuron))
                    rows.append(Sampled(group, layer, side, neuron))
    return rows


def raw_kurtosis(model, layer: int, side: str, U: torch.Tensor | None = None) -> torch.Tensor:
    """The excess kurtosis of every neuron's own projection w @ U in one layer and side, [d_mlp]."""
    return rotate.excess_kurtosis(model.vectors(layer, side) @ (model.projection() if U is None else U))


def most_aligned(
    model, layers: Sequence[int], side: str, count: int, group: str = "aligned"
) -> list[Sampled]:
    """The `count` vectors of one side with the highest raw kurtosis over the given layers, most
    aligned first."""
    U = model.projection()
    scored = []
    for layer in layers:
        scored += [(float(k), layer, n) for n, k in enumerate(raw_kurtosis(model, layer, side, U))]
    return [Sampled(group, layer, side, neuron) for _, layer, neuron in sorted(scored, reverse=True)[:count]]
