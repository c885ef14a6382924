"""Fast solver against the paper preset on SmolLM2, and the engine's throughput.

    .venv/bin/python bench/solver.py [--per-cell 16] [--seed 2026] [--out bench/results/solver.json]

1. Parity: first channels of neurons sampled from early (0-9), middle (10-19) and late (20-29)
   layers, all three sides (`per-cell` neurons per group x side). The paper preset runs to its
   own stop rule (fp32, as published); the fast solver runs with its defaults. A neuron is at
   parity when the fast channel's loss is within 1e-3 of the preset's, or lower. Both losses are
   evaluated the same way, in fp32, under the same token weights.
2. Throughput: one layer's batch (256 neurons, `out`, 3 channels, decompose() as the worker
   runs it) at bf16 and fp32, with the GEMM FLOP/s of the same shapes and precision measured in
   the same run, so the roofline fraction is a ratio of two numbers from one machine state.
3. Projection to all of SmolLM2-135M: 30 layers x 1,536 neurons x 3 sides x 50 channels.
4. Parity on every channel (`--part channels`): the preset decomposes a held-out sample into
   `--channels` channels (fp32, cached in bench/results/solver-channels-<seed>.pt, since it does
   not depend on the fast solver); then for each channel index k the fast solver gets the same
   u0 and the preset's token weights after channels 0..k-1, so both solve the same problem.
   Per k: same channel (cos >= 0.99), loss within 1e-3 or lower, a different basin (cos < 0.99
   and a loss more than 1e-3 higher), and collapses (unweighted excess kurtosis below 3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from channelscope.core import stats
from channelscope.method import rotate
from channelscope.method.decomposer import keep_freed_memory, pick_device
from channelscope.method.precision import cpu_model
from channelscope.method.sampling import LAYER_GROUPS, random_neurons
from channelscope.method.weights import load_model

FULL_MODEL_VECTORS = 30 * 1536 * 3
FULL_MODEL_CHANNELS = 50


def sample(model, per_cell: int, seed: int):
    drawn = random_neurons(model, LAYER_GROUPS, per_cell, torch.Generator().manual_seed(seed))
    rows = [{"group": s.group, "layer": s.layer, "side": s.side, "neuron": s.neuron} for s in drawn]
    return rows, torch.stack([model.vectors(s.layer, s.side)[s.neuron] for s in drawn])


def first_channels(solver: str, w, U, m, u0, settings):
    proj = rotate.Projection(U, settings.precision)
    synchronize(U.device)
    start = time.perf_counter()
    found = rotate.SOLVERS[solver](w, proj, m, u0, settings)
    synchronize(U.device)
    seconds = time.perf_counter() - start
    z = found.vector @ U  # fp32, for both solvers
    loss = rotate.loss(z, m, found.vector, w, settings)
    return found, loss, proj.passes, seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_flops(U: torch.Tensor, dtype: torch.dtype, rows: int = 256, repeats: int = 10) -> float:
    a, b = torch.randn(rows, U.shape[0], device=U.device).to(dtype), U.to(dtype)
    a @ b
    synchronize(U.device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(U.device)
    return 2 * rows * U.shape[0] * U.shape[1] * repeats / (time.perf_counter() - start)


def throughput(model, U, m0, precision: str, neurons: int = 256, channels: int = 3) -> dict:
    settings = rotate.with_overrides(rotate.Settings(), channels=channels, precision=precision)
    w = model.vectors(25, "out")[:neurons].to(U.device)
    seeds = [rotate.neuron_seed(0, 25, "out", i) for i in range(neurons)]
    proj = rotate.Projection(U, precision)
    synchronize(U.device)
    start = time.perf_counter()
    rotate.decompose(w, proj, m0, seeds, settings, batch_size=neurons)
    synchronize(U.device)
    seconds = time.perf_counter() - start
    flops_per_pass = 2 * U.shape[0] * U.shape[1]
    engine = proj.passes * flops_per_pass / seconds
    gemm = gemm_flops(U, torch.bfloat16 if precision == "bf16" else torch.float32)
    return {
        "precision": precision,
        "neurons": neurons,
        "channels": channels,
        "seconds": seconds,
        "passes_per_channel": proj.passes / (neurons * channels),
        "neuron_channels_per_s": neurons * channels / seconds,
        "neuron_steps_per_s": proj.passes / 2 / seconds,  # a step = loss + gradient = 2 passes
        "engine_gflops": engine / 1e9,
        "gemm_gflops": gemm / 1e9,
        "roofline_fraction": engine / gemm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=16, help="neurons per layer group and side")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=Path("bench/results/solver.json"))
    parser.add_argument(
        "--part",
        choices=["parity", "throughput", "all", "channels"],
        default="all",
        help="parts to (re)measure",
    )
    parser.add_argument("--channels", type=int, default=5, help="channels per neuron (--part channels)")
    parser.add_argument("--device", default="auto", help="cpu, cuda ... (default: cuda when present)")
    parser.add_argument("--batch", type=int, default=256, help="neurons in the throughput batch")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a fast-solver setting for --part channels, e.g. fast_explore_steps=80 (repeatable)",
    )
    args = parser.parse_args()
    keep_freed_memory()

    model = load_model("smollm2")
    device = pick_device(args.device)
    U = model.projection().to(device)
    fast, paper = rotate.Settings(channels=1), rotate.with_overrides(rotate.PAPER, channels=1)
    m0 = rotate.initial_token_weights(U, model.vocabulary.kinds, fast)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["machine"] = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if args.part == "channels":
        result["channels"] = every_channel(model, U, m0, args)
    if args.part in ("parity", "all"):
        result.update(parity(model, U, m0, fast, paper, args))
    if args.part in ("throughput", "all"):
        print("throughput ...", flush=True)
        rates = [throughput(model, U, m0, precision, args.batch) for precision in ("bf16", "fp32")]
        result["throughput"] = rates
        result["full_model_hours"] = {
            r["precision"]: FULL_MODEL_VECTORS * FULL_MODEL_CHANNELS / r["neuron_channels_per_s"] / 3600
            for r in rates
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


def parity(model, U, m0, fast, paper, args) -> dict:
    rows, w = sample(model, args.per_cell, args.seed)
    w = w.to(U.device)
    n = len(rows)
    m = m0.expand(n, -1).clone()
    u0 = torch.stack(
        [
            torch.randn(
                w.shape[1],
                generator=torch.Generator().manual_seed(
                    rotate.neuron_seed(0, r["layer"], r["side"], r["neuron"])
                ),
            )
            for r in rows
        ]
    ).to(U.device)
    print(f"{n} neurons; fast solver ...", flush=True)
    fast_found, fast_loss, fast_passes, fast_seconds = first_channels("fast", w, U, m, u0, fast)
    print(f"  {fast_seconds:.1f} s, {fast_passes / n:.0f} passes per neuron; paper preset ...", flush=True)
    paper_found, paper_loss, paper_passes, paper_seconds = first_channels("paper", w, U, m, u0, paper)
    print(f"  {paper_seconds:.1f} s, {paper_passes / n:.0f} passes per neuron", flush=True)
    at_parity = fast_loss <= paper_loss + 1e-3
    for i, row in enumerate(rows):
        row.update(
            paper_loss=float(paper_loss[i]),
            fast_loss=float(fast_loss[i]),
            paper_steps=int(paper_found.steps[i]),
            fast_steps=int(fast_found.steps[i]),
            cos_between=float(rotate.cosine(fast_found.vector[i], paper_found.vector[i])),
            parity=bool(at_parity[i]),
        )
    by_cell = {}
    for row in rows:
        key = f"{row['group']}/{row['side']}"
        hit, total = by_cell.get(key, (0, 0))
        by_cell[key] = (hit + row["parity"], total + 1)

    return {
        "neurons": n,
        "parity": {
            "at_parity": int(at_parity.sum()),
            "fraction": float(at_parity.float().mean()),
            "fast_lower_by_more_than_1e-3": int((fast_loss < paper_loss - 1e-3).sum()),
            "mean_loss_fast": float(fast_loss.mean()),
            "mean_loss_paper": float(paper_loss.mean()),
            "by_group_and_side": {k: f"{h}/{t}" for k, (h, t) in by_cell.items()},
        },
        "passes_per_neuron": {"fast": fast_passes / n, "paper": paper_passes / n},
        "pass_ratio": fast_passes / paper_passes,
        "seconds": {"fast": fast_seconds, "paper": paper_seconds},
        "paper_steps": {"mean": float(paper_found.steps.float().mean()), "max": int(paper_found.steps.max())},
        "rows": rows,
    }


def token_weights(m0, masked: list[torch.Tensor], s: rotate.Settings):
    """The token weights after the given channels claimed their tokens, as decompose sets them."""
    m = m0.clone()
    for ids in masked:
        m[ids] = torch.clamp(m[ids], max=s.mask_weight)
    return m


def _number(name: str, value: str) -> int | float:
    """A numeric fast-solver setting from --set, typed as its default (bool("False") would be True)."""
    default = getattr(rotate.Settings, name)
    if isinstance(default, bool) or not isinstance(default, int | float):
        raise SystemExit(f"--set {name}: only numeric settings can be set here")
    return type(default)(value)


def every_channel(model, U, m0, args) -> dict:
    rows, w = sample(model, args.per_cell, args.seed)
    w, n, C = w.to(U.device), len(rows), args.channels
    seeds = [rotate.neuron_seed(0, r["layer"], r["side"], r["neuron"]) for r in rows]
    paper = rotate.with_overrides(rotate.PAPER, channels=C)
    overrides = {name: _number(name, value) for name, value in (x.split("=", 1) for x in args.set)}
    fast = rotate.with_overrides(rotate.Settings(channels=C, precision="fp32"), **overrides)
    cache = args.out.parent / f"solver-channels-{args.seed}.pt"
    if cache.exists():
        preset = torch.load(cache)
    else:
        print(f"{n} neurons x {C} channels, paper preset ...", flush=True)
        start = time.perf_counter()
        found = rotate.decompose(w, rotate.Projection(U, "fp32"), m0, seeds, paper, batch_size=n)
        preset = {
            "seconds": time.perf_counter() - start,
            "vectors": torch.stack([torch.stack([ch.vector for ch in chs]) for chs in found]),  # [n, C, d]
            "masked": [[ch.masked for ch in chs] for chs in found],
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(preset, cache)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    per_channel, seconds, passes = [], 0.0, 0
    for k in range(C):
        u0 = torch.stack([torch.randn(w.shape[1], generator=g) for g in generators]).to(U.device)
        m = torch.stack([token_weights(m0, preset["masked"][i][:k], fast) for i in range(n)])  # [n, V]
        proj = rotate.Projection(U, fast.precision)
        start = time.perf_counter()
        found = rotate.fast_channel(w, proj, m, u0, fast)
        seconds, passes = seconds + time.perf_counter() - start, passes + proj.passes
        theirs = preset["vectors"][:, k].to(U.device)  # [n, d]
        mine_loss = rotate.loss(found.vector @ U, m, found.vector, w, fast)
        their_loss = rotate.loss(theirs @ U, m, theirs, w, fast)
        cos = rotate.cosine(found.vector, theirs)
        same, close = cos >= 0.99, mine_loss <= their_loss + 1e-3
        kurt = rotate.excess_kurtosis(found.vector @ U)
        per_channel.append(
            {
                "channel": k,
                "same_channel": float(same.float().mean()),
                "loss_within_1e-3_or_lower": float(close.float().mean()),
                "loss_within_1e-3_or_lower_count": int(close.sum()),
                "loss_within_1e-3_or_lower_interval": stats.interval(close.tolist(), stats.share),
                "different_basin": float((~same & ~close).float().mean()),
                "collapses_fast": int((kurt < 3).sum()),
                "collapses_preset": int((rotate.excess_kurtosis(theirs @ U) < 3).sum()),
                "mean_loss_fast": float(mine_loss.mean()),
                "mean_loss_preset": float(their_loss.mean()),
            }
        )
        print(json.dumps(per_channel[-1]), flush=True)
    return {
        "seed": args.seed,
        "neurons": n,
        "channels": C,
        "rule": "channel k: both solvers from the same u0, under the preset's masks of channels 0..k-1",
        "fast_settings": overrides,
        "per_channel": per_channel,
        "seconds": {"fast": seconds, "paper": preset["seconds"]},
        "fast_passes_per_channel": passes / (n * C),
    }


if __name__ == "__main__":
    main()
