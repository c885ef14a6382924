"""How long the ablation page's pieces take on SmolLM2 (issue 6: a 64-token forward pass must
return well under a second on 2 CPU cores). Figures go in bench/README.md, "Ablation".

    .venv/bin/python bench/ablation.py [--tokens 64] [--repeats 10] [--threads N]  # results/ablation.json

Times, median of the repeats: the plain forward pass of a 64-token prompt; the hooked pass of
the ablation page (2 rows on a read side; 2 + MODEL_DRAWS_OUT random draws on `out`); the whole model part of
a request (ablation_effect, S and its baseline included); one alpha* grid refit (1,000 x V).
The machine's load average is printed beside them: other work on the same cores slows all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from channelscope.method import ablation, intervention, measures, rotate  # noqa: E402
from channelscope.method.decomposer import keep_freed_memory  # noqa: E402
from channelscope.method.weights import load_model, smollm2_path  # noqa: E402
from channelscope.web.ablation import MODEL_DRAWS_OUT  # noqa: E402  (the page's own count)

TEXT = (
    "The capital of France is Paris. The capital of Japan is Tokyo, and the capital of Italy is Rome. "
    "She went to the market and bought apples, pears and bread, then walked home along the river while "
    "the rain fell on the old stone bridges of the city."
)


def timed(work, repeats: int) -> float:
    work()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def one_layer(lm, model, ids, U, scored, layer: int, neuron: int, repeats: int) -> dict[str, float]:
    w = model.vectors(layer, "out")[neuron]
    g = torch.Generator().manual_seed(0)
    c = w + 0.8 * w.norm() * torch.nn.functional.normalize(torch.randn(w.shape[0], generator=g), dim=0)
    c = c / c.norm() * w.norm()
    zs = rotate.z_scores((c @ U).unsqueeze(0), scored)[0]
    T = (torch.topk(zs, 20).indices, torch.ones(20))
    draws = ablation.random_draws(w, c.unsqueeze(0), [20], U, scored, MODEL_DRAWS_OUT, g)
    delta = -0.5 * c
    random_deltas = ablation.apply(w, draws.directions, [0.5]) - w
    two = torch.stack([torch.zeros_like(delta), delta])
    rows_out = torch.cat([two, random_deltas])
    # Active positions as on the page: above the 90th percentile (here of this prompt itself).
    activation = intervention.forward(lm, ids, layer, "out", neuron, two[:1]).activation[0]
    threshold = float(torch.quantile(activation, 0.9))
    rows = {
        f"layer {layer}: hooked forward, 2 rows (read side)": timed(
            lambda: intervention.forward(lm, ids, layer, "gate", neuron, two), repeats
        ),
        f"layer {layer}: hooked forward, {len(rows_out)} rows (out: + {MODEL_DRAWS_OUT} random draws)": timed(
            lambda: intervention.forward(lm, ids, layer, "out", neuron, rows_out), repeats
        ),
    }
    for side in ("gate", "out"):
        rows[f"layer {layer}: ablation_effect, side {side} (S and baseline included)"] = timed(
            lambda side=side: intervention.ablation_effect(
                lm, ids, layer, side, neuron, delta, random_deltas, T, draws.targets, scored, threshold
            ),
            repeats,
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ablation.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()

    started = time.perf_counter()
    lm = intervention.load_language_model(smollm2_path())
    load_s = time.perf_counter() - started
    model = load_model(smollm2_path())
    ids = (lm.encode(TEXT) * 4)[: args.tokens]
    U = model.projection()
    scored = rotate.initial_token_weights(U, model.vocabulary.kinds, rotate.Settings()) == 1
    rows = {}
    with torch.inference_mode():
        batch = torch.tensor([ids])
        rows["plain forward, 1 row"] = timed(
            lambda: lm.model.base_model(input_ids=batch, use_cache=False), args.repeats
        )
    # Layer 2 is the worst case (the rows share only two layers), layer 25 a typical late one.
    for layer in (2, 25):
        rows.update(one_layer(lm, model, ids, U, scored, layer, 7, args.repeats))
    w, c = model.vectors(25, "out")[7], model.vectors(25, "out")[8]
    zs = rotate.z_scores((c @ U).unsqueeze(0), scored)[0]
    rows["alpha* refit (grid of 1,000 x V)"] = timed(
        lambda: measures.alpha_star(w @ U, c @ U, zs, scored), max(3, args.repeats // 3)
    )

    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    print(
        f"SmolLM2-135M, {len(ids)}-token prompt, torch {torch.__version__}, {threads} threads, "
        f"load average {load:.1f} (1 min), model load {load_s:.1f} s"
    )
    print("| step | median |\n|---|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1000:.0f} ms |")
    result = {
        "tokens": len(ids),
        "threads": threads,
        "load_average_1min": round(load, 2),
        "model_load_s": round(load_s, 2),
        "median_ms": {name: round(seconds * 1000, 1) for name, seconds in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
