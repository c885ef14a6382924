"""Which layers, neurons and sides a model has: the one range check that the CLI, the planner,
the model readers and the web pages make, each raising its own kind of error with the message."""

from __future__ import annotations

from collections.abc import Iterable


def out_of_range(
    model: str,
    n_layers: int,
    d_mlp: int,
    sides: Iterable[str],
    *,
    layer: int | None = None,
    neuron: int | None = None,
    side: str | None = None,
) -> str | None:
    """What is wrong with the given coordinates of `model`, as one line for a person, or None."""
    sides = tuple(sides)
    if layer is not None and not 0 <= layer < n_layers:
        return f"layer {layer} is out of range: {model} has layers 0-{n_layers - 1}"
    if neuron is not None and not 0 <= neuron < d_mlp:
        return f"neuron {neuron} is out of range: {model} has neurons 0-{d_mlp - 1} in each layer"
    if side is not None and side not in sides:
        return f"unknown side {side!r}: {model} has sides {', '.join(sides)}"
    return None
