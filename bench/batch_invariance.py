"""A neuron's channels against its batch, on the CPU, at SmolLM2's shapes.

    .venv/bin/python bench/batch_invariance.py [--neurons 64] [--label after]

The same layer-25 `out` neurons (their vectors as the model hands them over: a transposed
view), 2 channels each, decomposed in batches of 8 and in one batch of all of them, at fp32 and
bf16. Counts the neurons whose channels are bit-identical both ways, and the largest difference
and smallest cosine between the two runs' channels; and the time of a small batch (one
neuron's three sides, 5 channels, as an on-demand request computes them), which pays for the
fixed 64-row products. docs/method.md, "Determinism".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from channelscope.method import rotate
from channelscope.method.decomposer import keep_freed_memory
from channelscope.method.precision import cpu_model
from channelscope.method.weights import load_model

LAYER, SIDE, CHANNELS = 25, "out", 2


def three_sides(model, U, m0, precision: str, layer: int = 10, neuron: int = 500) -> float:
    s = rotate.Settings(channels=5, precision=precision)
    sides = ("gate", "in", "out")
    w = torch.stack([model.vectors(layer, side)[neuron] for side in sides])
    seeds = [rotate.neuron_seed(0, layer, side, neuron) for side in sides]
    proj = rotate.Projection(U, precision)
    rotate.decompose(w[:1], proj, m0, seeds[:1], rotate.with_overrides(s, channels=1))  # warm-up
    start = time.perf_counter()
    rotate.decompose(w, proj, m0, seeds, s)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=64)
    parser.add_argument("--label", default="after")
    args = parser.parse_args()
    keep_freed_memory()
    model = load_model("smollm2")
    U = model.projection()
    w = model.vectors(LAYER, SIDE)[: args.neurons]
    seeds = [rotate.neuron_seed(0, LAYER, SIDE, i) for i in range(args.neurons)]
    result = {
        "label": args.label,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "neurons": args.neurons,
    }
    m0 = rotate.initial_token_weights(U, model.vocabulary.kinds, rotate.Settings())  # no precision in it
    for precision in ("fp32", "bf16"):
        s = rotate.Settings(channels=CHANNELS, precision=precision)
        runs = {}
        for batch in (8, args.neurons):
            start = time.perf_counter()
            found = rotate.decompose(w, rotate.Projection(U, precision), m0, seeds, s, batch_size=batch)
            runs[batch] = (
                torch.stack([torch.stack([ch.vector for ch in chs]) for chs in found]),
                time.perf_counter() - start,
            )
        (small, _), (whole, _) = runs[8], runs[args.neurons]  # [n, C, d] each
        same = [torch.equal(a, b) for a, b in zip(small, whole, strict=True)]
        result[precision] = {
            "bit_identical_neurons": sum(same),
            "max_abs_difference": float((small - whole).abs().max()),
            "min_cosine": float(rotate.cosine(small.flatten(0, 1), whole.flatten(0, 1)).min()),
            "seconds": {str(batch): seconds for batch, (_, seconds) in runs.items()},
        }
        print(precision, json.dumps(result[precision]), flush=True)
    result["three_sides_5_channels_seconds"] = {p: three_sides(model, U, m0, p) for p in ("bf16", "fp32")}
    print(json.dumps(result["three_sides_5_channels_seconds"]))
    out = Path(f"bench/results/batch-invariance-cpu-{args.label}.json")
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
