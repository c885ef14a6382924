"""Do the eval report's numbers depend on the solver? The paper preset (docs/method.md, "The
paper preset") on a subsample of the report's neurons, beside the fast solver's channels of the
same neurons, measured the same way against the same reference (issue 16, item 7).

The paper preset's own reference would cost R x C runs of ~5,000 steps; its channels are scored
against the fast solver's reference instead. The percentiles then ask "is this channel more
faithful than random vectors' fast channels", the same question for both solvers."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch

from channelscope.method import measures
from channelscope.method.decomposer import Decomposer, NeuronRecord


def paper_twin(decomposer: Decomposer) -> Decomposer:
    """The decomposer with the paper preset's solver, everything else (U, precision, token
    weights, reference, direction pool, score scale) shared."""
    twin = copy.copy(decomposer)
    twin.settings = replace(decomposer.settings, solver="paper")
    return twin


def channel_numbers(record: NeuronRecord) -> dict:
    return {
        "loss": [ch.loss for ch in record.channels],
        "kurtosis": [ch.kurtosis for ch in record.channels],
        "cos": [ch.cos for ch in record.channels],
        "faithfulness": [ch.faithfulness for ch in record.channels],
        "percentile": [ch.faithfulness_percentile for ch in record.channels],
        "percentile_local": [ch.percentile_local for ch in record.channels],
        "generic": [ch.generic for ch in record.channels],
        "score": record.score,
        "steps": [ch.step for ch in record.channels],
    }


def compare(decomposer: Decomposer, coords: list[tuple[int, str, int]], fast: list[NeuronRecord],
            progress=None) -> list[dict]:  # fmt: skip
    """Per neuron: both solvers' numbers, and the mean matched |cos| between their channels'
    parts orthogonal to w (the seed-consistency matching)."""
    paper = paper_twin(decomposer).anywhere(coords, progress)
    out = []
    for (layer, side, neuron), a, b in zip(coords, fast, paper, strict=True):
        w = torch.from_numpy(a.vector).double()
        va = torch.stack([torch.from_numpy(ch.vector) for ch in a.channels]).double()
        vb = torch.stack([torch.from_numpy(ch.vector) for ch in b.channels]).double()
        _, _, cos = measures.matched_cosines(
            measures.residual_directions(w, va), measures.residual_directions(w, vb)
        )
        out.append(
            {
                "layer": layer,
                "side": side,
                "neuron": neuron,
                "fast": channel_numbers(a),
                "paper": channel_numbers(b),
                "matched_cos": float(np.mean(cos)),
            }
        )
    return out
