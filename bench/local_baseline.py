"""The faithfulness percentile against random directions at the same cosine to *this* w (issue
16, item 1), beside the isotropic one the pages show, on SmolLM2's most vocabulary-aligned
vectors and on random ones, in separate rows.

    .venv/bin/python bench/local_baseline.py [--layers 25,28] [--side out] [--aligned 16]
        [--random 16] [--channels 5] [--pool reference|gaussian] [--out bench/results/local-baseline.json]

The aligned vectors are the highest raw kurtosis of those layers (method/sampling.most_aligned),
the random ones drawn uniformly with seed 1 (not the evaluation's seed 0 sample). Each channel
gets both percentiles; medians and shares carry 95 % bootstrap intervals (core/stats.interval).
The question the issue asks: do channels flagged generic fall below a median of 75 under the
per-neuron baseline while unflagged ones keep 80 or more?
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from channelscope.core.config import config  # noqa: E402
from channelscope.core.stats import interval, median, share  # noqa: E402
from channelscope.method import measures, rotate, sampling  # noqa: E402
from channelscope.method.decomposer import Decomposer  # noqa: E402
from channelscope.method.precision import cpu_model  # noqa: E402
from channelscope.method.weights import load_model, smollm2_path  # noqa: E402


def channels_of(decomposer: Decomposer, rows, pool) -> list[dict]:
    records = decomposer.anywhere([(r.layer, r.side, r.neuron) for r in rows])
    out = []
    for row, record in zip(rows, records, strict=True):
        w = torch.from_numpy(record.vector)
        z_w = decomposer.proj.forward(w.unsqueeze(0).to(decomposer.device), exact=True)[0].cpu()
        zs_w = rotate.z_scores(z_w.unsqueeze(0), decomposer.scored.cpu())[0]
        cosines = torch.tensor([ch.cos for ch in record.channels])
        draws = measures.faithfulness_at_cosines(w, z_w, zs_w, cosines, pool, decomposer.scored.cpu())
        for ch, row_draws in zip(record.channels, draws, strict=True):
            out.append(
                {
                    "group": row.group,
                    "layer": row.layer,
                    "side": row.side,
                    "neuron": row.neuron,
                    "kurtosis_w": record.kurtosis,
                    "channel": ch.index,
                    "cos": ch.cos,
                    "generic": ch.generic,
                    "faithfulness": ch.faithfulness,
                    "percentile_isotropic": ch.faithfulness_percentile,
                    "percentile_local": measures.percentile(ch.faithfulness, row_draws.numpy()),
                    "random_direction_faithfulness_median": float(row_draws.median()),
                }
            )
    return out


def summary(channels: list[dict]) -> list[dict]:
    rows = []
    for group in ("aligned", "random"):
        for label, keep in (("flagged generic", True), ("not flagged", False), ("all", None)):
            cell = [c for c in channels if c["group"] == group and (keep is None or c["generic"] == keep)]
            entry = {"group": group, "channels": label, "n": len(cell)}
            for column in ("percentile_isotropic", "percentile_local"):
                values = [c[column] for c in cell]
                entry[column] = median(values)
                entry[column + "_interval"] = interval(values)
                entry[column + "_share_90"] = share(v >= 90 for v in values)
            rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="25,28")
    parser.add_argument("--side", default="out")
    parser.add_argument("--aligned", type=int, default=16)
    parser.add_argument("--random", type=int, default=16)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--pool", choices=["reference", "gaussian"], default="reference",
        help="random directions' residual parts: the reference's channels (sparse), or Gaussian",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "local-baseline.json")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    model = load_model(smollm2_path())
    settings = rotate.with_overrides(rotate.Settings(), channels=args.channels, precision=args.precision)
    started = time.perf_counter()
    decomposer = Decomposer(model, settings, cache_dir=config().data_dir / "references")
    if args.pool == "reference":
        pool = decomposer.directions  # what the worker uses: the reference's channels
    else:
        gaussian = torch.randn(256, model.d_model, generator=torch.Generator().manual_seed(0))
        pool = measures.direction_pool(
            gaussian, lambda x: (x.to(decomposer.device) @ decomposer.proj.exact).cpu()
        )
    aligned = sampling.most_aligned(model, layers, args.side, args.aligned)
    generator = torch.Generator().manual_seed(1)
    chosen = {(r.layer, r.neuron) for r in aligned}
    random_rows = [
        r
        for r in sampling.random_neurons(model, {"random": layers}, args.random + len(chosen), generator)
        if r.side == args.side and (r.layer, r.neuron) not in chosen
    ][: args.random]
    channels = channels_of(decomposer, aligned, pool) + channels_of(decomposer, random_rows, pool)
    result = {
        "command": " ".join(["bench/local_baseline.py", *sys.argv[1:]]),
        "cpu": cpu_model(),
        "model": model.name,
        "layers": layers,
        "side": args.side,
        "channels_per_vector": args.channels,
        "precision": decomposer.settings.precision,
        "pool": args.pool,
        "directions": int(pool.directions.shape[0]),
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary(channels),
        "channels": channels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for row in result["summary"]:
        print(
            f"{row['group']:8} {row['channels']:16} n={row['n']:3}  "
            f"isotropic {row['percentile_isotropic']:5.1f} {row['percentile_isotropic_interval']}  "
            f"local {row['percentile_local']:5.1f} "
            f"{row['percentile_local_interval']}"
        )


if __name__ == "__main__":
    main()
