"""End-to-end engine efficiency on this machine (issue 12's goal E), one run:

    CHANNELSCOPE_THREADS=2 .venv/bin/python bench/engine.py [--label after] [--neurons 64] \
        [--channels 5] [--precision fp32]

The worker's decompose of `--neurons` vectors (layer 25, `out`) into `--channels` channels at
`--precision` (fp32 by default, as the issue's E is defined; bf16 where the machine's `auto`
picks it), measures and the shard's commit to a fresh SQLite store included, timed after a warm-up
(compilation, allocation) and with the random-vector reference built before (4 vectors; it is
no part of a shard). Then

    E = neuron-channels x 140 passes x FLOP per pass / wall time / best GEMM rate,

the GEMM rate being the best [rows, d] x [d, V] product at that precision (64 or 256 rows) measured before
and after in the same process. 140 is the issue's fixed count, so a solver that needs fewer
passes scores higher; `E_actual` counts the passes the solver really made. The whole model
(30 layers x 1,536 neurons x 3 sides) at this rate is extrapolated. Run it with PYTHONPATH at
another checkout to measure that code the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from channelscope.core import db
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer, keep_freed_memory
from channelscope.method.precision import cpu_model
from channelscope.method.weights import load_model
from channelscope.worker import compute, plan, store

LAYER, SIDE, PASSES = 25, "out", 140
WHOLE_MODEL_VECTORS = 30 * 1536 * 3


def gemm_rate(U: torch.Tensor, repeats: int = 5) -> float:
    best = 0.0
    for rows in (64, 256):
        a = torch.randn(rows, U.shape[0]).to(U.dtype)
        a @ U
        start = time.perf_counter()
        for _ in range(repeats):
            a @ U
        best = max(best, 2 * rows * U.shape[0] * U.shape[1] * repeats / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--neurons", type=int, default=64)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/engine-<label>.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("CHANNELSCOPE_THREADS", "0")) or os.cpu_count())
    keep_freed_memory()
    model = load_model("smollm2")
    settings = rotate.with_overrides(rotate.Settings(), channels=args.channels, precision=args.precision)
    U = model.projection().to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    gemm = [gemm_rate(U)]
    with tempfile.TemporaryDirectory() as tmp:
        decomposer = Decomposer(model, settings, reference_count=4, cache_dir=Path(tmp))
        decomposer.neurons(LAYER, SIDE, [1000, 1001])  # warm-up: compilation, allocation
        url = f"sqlite:///{tmp}/engine.db"
        db.upgrade(url)
        engine = db.make_engine(url)
        with db.session(engine) as session, session.begin():
            model_row = store.ensure_model(session, model)
            run = store.ensure_run(session, model_row, store.run_settings(settings, "unembedding", 4), 0)
            plan.add_shards(
                session, run, plan.Request([LAYER], [SIDE], list(range(args.neurons)), args.neurons)
            )
        with db.session(engine) as session:
            (shard_id,) = [s.id for s in plan.pending_shards(session, run.id)]
        passes = decomposer.proj.passes
        start = time.perf_counter()
        records = decomposer.neurons(LAYER, SIDE, list(range(args.neurons)))
        solved = time.perf_counter() - start
        assert compute.commit_shard(engine, shard_id, records, seconds=solved, worker="bench")
        wall = time.perf_counter() - start
        passes = decomposer.proj.passes - passes
        engine.dispose()
    gemm.append(gemm_rate(U))
    flop_per_pass = 2 * U.shape[0] * U.shape[1]
    neuron_channels = args.neurons * args.channels
    best = max(gemm)
    result = {
        "label": args.label,
        "cpu": cpu_model(),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "compile": os.environ.get("CHANNELSCOPE_COMPILE", "1"),
        "neurons": args.neurons,
        "channels": args.channels,
        "wall_seconds": wall,
        "decompose_seconds": solved,
        "write_seconds": wall - solved,
        "gemm_gflops": [g / 1e9 for g in gemm],
        "passes_per_channel": passes / neuron_channels,
        "E": neuron_channels * PASSES * flop_per_pass / wall / best,
        "E_actual": passes * flop_per_pass / wall / best,
        "whole_model_hours_5_channels": WHOLE_MODEL_VECTORS * 5 / (neuron_channels / wall) / 3600,
    }
    out = args.out or Path(f"bench/results/engine-{args.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
