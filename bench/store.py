"""Writing one layer's results into the channel store, against the time it took to compute them.

    .venv/bin/python bench/store.py [--postgres postgresql://postgres@127.0.0.1:5432/test]
                                    [--sample 64] [--sample-channels 5] [--out bench/results/store.json]

1. Compute: the engine's neuron-channels per second on real SmolLM2 neurons (`--sample` `out`
   neurons of layer 20, `--sample-channels` channels, through Decomposer.neurons as the worker
   calls it: solver plus every per-channel measure). The random-vector reference is built first
   and not timed. Extrapolated to one layer: 1,536 neurons x 3 sides x 50 channels.
2. Write: synthetic NeuronRecords of SmolLM2's shape (d_model 576, top-20 token lists, 50
   channels; masked-token lists and kurtosis histories as long, on average, as the sample's) for
   that layer, committed in shards of 64 neurons with their done marks exactly as a worker does
   (worker/compute.py commit_shard): COPY into a fresh PostgreSQL database, batched inserts into a
   fresh SQLite file (WAL). Only the commits are timed, not making the records.
3. Size: database bytes per 1,000 channels, from pg_total_relation_size of the shards, neurons,
   channels and channel_tokens tables (indexes included), and from the SQLite file's growth
   after a checkpoint (the model's vocabulary and U, stored once per model, are left out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import text

from channelscope.core import db
from channelscope.method import rotate
from channelscope.method.decomposer import TOP_K, ChannelRecord, Decomposer, NeuronRecord
from channelscope.method.weights import load_model
from channelscope.worker import plan, store

NEURONS, SIDES, CHANNELS, SHARD = 1536, ("out", "in", "gate"), 50, 64
LAYER = 20
STORE_TABLES = ("shards", "neurons", "channels", "channel_tokens")


def measure_compute(model, sample: int, channels: int) -> dict:
    settings = rotate.with_overrides(rotate.Settings(), channels=channels)
    with tempfile.TemporaryDirectory() as cache:
        decomposer = Decomposer(model, settings, reference_count=16, cache_dir=Path(cache))
        decomposer.neurons(LAYER, "out", [0, 1])  # warm-up: first calls compile and allocate
        start = time.perf_counter()
        records = decomposer.neurons(LAYER, "out", list(range(sample)))
        seconds = time.perf_counter() - start
    found = [ch for r in records for ch in r.channels]
    return {
        "neuron_channels": sample * channels,
        "seconds": seconds,
        "neuron_channels_per_s": sample * channels / seconds,
        "mean_masked": float(np.mean([len(ch.masked) for ch in found])),
        "mean_history": float(np.mean([len(ch.history) for ch in found])),
    }


def synthetic_shard(rng, layer: int, side: str, start: int, d: int, vocab: int, masked: int, history: int):
    def channel(k: int) -> ChannelRecord:
        return ChannelRecord(
            index=k,
            vector=rng.standard_normal(d).astype(np.float32),
            kurtosis=float(rng.uniform(3, 40)),
            skew=float(rng.normal(0, 5)),
            cos=float(rng.uniform(0.4, 0.9)),
            loss=float(rng.uniform(-0.9, -0.1)),
            masked=rng.choice(vocab, max(1, int(rng.poisson(masked))), replace=False).astype(np.int32),
            step=int(rng.integers(40, 100)),
            history=rng.uniform(0, 40, int(history)).tolist(),
            alpha=float(rng.uniform(0, 1)),
            faithfulness=float(rng.normal(2, 1)),
            faithfulness_percentile=float(rng.uniform(0, 100)),
            percentile_local=float(rng.uniform(0, 100)),
            generic=bool(rng.random() < 0.05),
            top_ids=rng.choice(vocab, TOP_K, replace=False).astype(np.int32),
            top_z=np.sort(rng.uniform(4, 20, TOP_K)).astype(np.float32)[::-1].copy(),
        )

    def neuron(i: int) -> NeuronRecord:
        curve = np.sort(rng.uniform(0, 1, CHANNELS)).tolist()
        return NeuronRecord(
            layer=layer,
            side=side,
            neuron=i,
            vector=rng.standard_normal(d).astype(np.float32),
            norm=float(rng.uniform(0.5, 2)),
            kurtosis=float(rng.uniform(0, 30)),
            skew=float(rng.normal()),
            top_ids=rng.choice(vocab, TOP_K, replace=False).astype(np.int32),
            top_z=rng.uniform(3, 10, TOP_K).astype(np.float32),
            bottom_ids=rng.choice(vocab, TOP_K, replace=False).astype(np.int32),
            bottom_z=rng.uniform(-10, -3, TOP_K).astype(np.float32),
            reconstruction=curve,
            reconstruction_baseline=curve,
            coverage=curve,
            best_percentile=float(rng.uniform(0, 100)),
            score=float(rng.uniform(0, 100)),
            channels=[channel(k) for k in range(CHANNELS)],
        )

    return [neuron(i) for i in range(start, start + SHARD)]


def measure_write(url: str, model, settings: dict, compute: dict, neurons: int, seed: int) -> dict:
    """One layer, shard by shard, into a migrated empty database at `url`."""
    db.upgrade(url)
    engine = db.make_engine(url)
    with db.session(engine) as session, session.begin():
        model_row = store.ensure_model(session, model)
        run = store.ensure_run(session, model_row, settings, 0)
    before = _size(engine, url)
    request = plan.Request([LAYER], list(SIDES), list(range(neurons)), SHARD)
    with db.session(engine) as session, session.begin():
        plan.add_shards(session, run, request)
    with db.session(engine) as session:
        shards = [(s.id, s.side, s.neuron_start) for s in plan.pending_shards(session, run.id)]
    rng = np.random.default_rng(seed)
    seconds, per_shard = 0.0, []
    for shard_id, side, start in shards:
        records = synthetic_shard(
            rng,
            LAYER,
            side,
            start,
            model.d_model,
            model.vocab_size,
            compute["mean_masked"],
            compute["mean_history"],
        )
        began = time.perf_counter()
        assert compute.commit_shard(engine, shard_id, records, seconds=1.0, worker="bench")
        per_shard.append(time.perf_counter() - began)
        seconds += per_shard[-1]
    after = _size(engine, url)
    with engine.connect() as connection:
        counts = {t: connection.execute(text(f'SELECT count(*) FROM "{t}"')).scalar() for t in STORE_TABLES}
    engine.dispose()
    channels = counts["channels"]
    return {
        "seconds": seconds,
        "median_shard_seconds": float(np.median(per_shard)),
        "rows": counts,
        "bytes": after - before,
        "bytes_per_1000_channels": (after - before) / channels * 1000,
    }


def _size(engine, url: str) -> int:
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            return sum(
                connection.execute(text("SELECT pg_total_relation_size(:t)"), {"t": t}).scalar()
                for t in STORE_TABLES
            )
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return Path(url.split("///", 1)[1]).stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sample", type=int, default=64)
    parser.add_argument("--sample-channels", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--neurons", type=int, default=NEURONS, help="of the layer, per side (a quick look: 128)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/store.json"))
    args = parser.parse_args()

    model = load_model("smollm2")
    compute = measure_compute(model, args.sample, args.sample_channels)
    layer_channels = args.neurons * len(SIDES) * CHANNELS
    compute["layer_seconds"] = layer_channels / compute["neuron_channels_per_s"]
    print(
        f"compute: {compute['neuron_channels_per_s']:.1f} neuron-channels/s, "
        f"one layer ~{compute['layer_seconds']:.0f} s"
    )

    settings = store.run_settings(
        rotate.with_overrides(rotate.Settings(), channels=CHANNELS), "unembedding", 64
    )
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            # Other work on the machine slows the compute figure, never the write figure's share.
            "load_average_1min": os.getloadavg()[0],
        },
        "layer": {
            "neurons": args.neurons,
            "sides": len(SIDES),
            "channels": layer_channels,
            "token_rows": layer_channels * TOP_K,
        },
        "compute": compute,
    }
    with tempfile.TemporaryDirectory() as folder:
        result["sqlite"] = measure_write(
            f"sqlite:///{folder}/bench.db", model, settings, compute, args.neurons, args.seed
        )
    print(f"sqlite: {result['sqlite']['seconds']:.1f} s")
    import psycopg

    name = f"cs_bench_{uuid.uuid4().hex[:8]}"
    base = args.postgres.rsplit("/", 1)[0]
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        result["postgresql"] = measure_write(
            f"{base}/{name}", model, settings, compute, args.neurons, args.seed
        )
    finally:
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"postgresql: {result['postgresql']['seconds']:.1f} s")
    for flavour in ("postgresql", "sqlite"):
        result[flavour]["write_over_compute"] = result[flavour]["seconds"] / compute["layer_seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
