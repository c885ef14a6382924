"""How long `channelscope neighbours` takes to compare every pair of a run's channels
(worker/neighbours.nearest), on random unit vectors of SmolLM2's width, five channels a neuron.

    .venv/bin/python bench/neighbours.py [--channels 50000] [--device cpu] [--out FILE]
    .venv/bin/python bench/neighbours.py --store postgresql://.../channelscope_bench

The work is N^2 d, so a whole SmolLM2 run at 5 channels (691,200 channels) is extrapolated from
N as (691,200 / N)^2; with --channels 691200 it is measured instead. Only the comparison is
timed. --store times the rest instead: `neighbours.build` on the store's first run (bench/web.py
build makes one of 1.1 M channels) with the comparison replaced by a random answer of the same
shape, so what is left is reading the vectors and writing the neighbours.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from channelscope.worker.neighbours import COUNT, nearest  # noqa: E402

D_MODEL, WHOLE_MODEL = 576, 30 * 3 * 1536 * 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=50_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--store", help="a database URL: time reading and writing instead")
    args = parser.parse_args()
    if args.store:
        return store(args.store)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    unit = torch.randn(args.channels, D_MODEL, generator=generator)
    unit = (unit / unit.norm(dim=1, keepdim=True)).to(device)
    owners = (torch.arange(args.channels) // 5).to(device)
    nearest(unit[:2048], owners[:2048], COUNT)  # warm-up (CUDA context, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    _, index = nearest(unit, owners, COUNT)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    assert (index >= 0).all()
    result = {
        "channels": args.channels,
        "d_model": D_MODEL,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 2),
        "channels_per_second": round(args.channels / seconds),
        "whole_smollm2_run_channels": WHOLE_MODEL,
        "whole_smollm2_run_minutes": round(seconds * (WHOLE_MODEL / args.channels) ** 2 / 60, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def store(url: str) -> None:
    from sqlalchemy import select

    from channelscope.core import db
    from channelscope.core import tables as T
    from channelscope.worker import neighbours

    def random_answer(unit, owners, count, on_block=None):
        n = unit.shape[0]
        return torch.rand(n, count), torch.randint(0, n, (n, count))

    neighbours.nearest = random_answer
    engine = db.make_engine(url)
    with db.session(engine) as session:
        run = session.scalars(select(T.Run).order_by(T.Run.id).limit(1)).one()
    found = neighbours.build(engine, run, torch.device("cpu"))
    print(json.dumps({"channels": found.channels, "seconds_without_the_comparison": round(found.seconds, 1)}))


if __name__ == "__main__":
    main()
