"""Each channel's nearest channels elsewhere in its run, computed once after the run and stored.

The web app answers a channel page of a small run (up to web.neighbours.MAX_CHANNELS channels) with
live products; a whole model is too big for that (SmolLM2 at 5 channels: 691,200 channels,
800 MB of vectors), so `channelscope neighbours` computes every channel's neighbours here.

Exact, not approximate: cos of every pair of unit channel vectors, in blocks, keeping a running
top-k per row. N^2 d multiply-adds is ~1 hour of this project's 2-core CPU for a whole SmolLM2
run and seconds on a GPU, against ~21 hours of decomposing it on the same CPU; an approximate
index (usearch's HNSW) took 77 s to add 100,000 random 576-d vectors here and found 39% of the
true top 20, so it would save little time and cost the answer's exactness (bench/README.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine

from channelscope.core import tables as T

COUNT = 12  # neighbours kept per channel (what a channel page lists)
ROWS, COLUMNS = 1024, 65536  # block of the cos matrix computed at once: 256 MB of float32


def nearest(
    unit: torch.Tensor,
    owners: torch.Tensor,
    count: int,
    rows: int = ROWS,
    columns: int = COLUMNS,
    on_block: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `unit` [N, d] (unit vectors), the `count` other rows with the highest
    |cos| (a channel and its mirror image name the same tokens on opposite tails), leaving out
    rows of the same owner (a channel's own neuron): (signed cos [N, count], index [N, count]),
    highest |cos| first; index -1 and cos -inf where fewer exist."""
    n = unit.shape[0]
    best_cos = torch.full((n, count), -torch.inf, device=unit.device)
    best_index = torch.full((n, count), -1, dtype=torch.long, device=unit.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        cos_kept, index_kept = best_cos[start:stop], best_index[start:stop]
        score_kept = cos_kept.abs().masked_fill(index_kept < 0, -torch.inf)
        for first in range(0, n, columns):
            last = min(first + columns, n)
            cos = unit[start:stop] @ unit[first:last].T
            score = cos.abs().masked_fill(owners[start:stop, None] == owners[None, first:last], -torch.inf)
            k = min(count, last - first)
            top_score, top_index = score.topk(k, dim=1)
            merged_score = torch.cat([score_kept, top_score], dim=1)
            merged_cos = torch.cat([cos_kept, cos.gather(1, top_index)], dim=1)
            merged_index = torch.cat([index_kept, top_index + first], dim=1)
            score_kept, order = merged_score.topk(count, dim=1)
            cos_kept, index_kept = merged_cos.gather(1, order), merged_index.gather(1, order)
        missing = score_kept == -torch.inf
        index_kept[missing], cos_kept[missing] = -1, -torch.inf
        best_cos[start:stop], best_index[start:stop] = cos_kept, index_kept
        if on_block is not None:
            on_block(stop - start)
    return best_cos, best_index


@dataclass
class Build:
    run_hash: str
    channels: int
    seconds: float
    device: str


KEY = np.dtype([(name, T.NEIGHBOUR[name]) for name in ("layer", "side", "neuron", "channel")])


def _channels(engine: Engine, run: T.Run) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The run's channels: neuron row ids, channel indices, KEY records and unit float32 vectors,
    read in parts (a whole model's rows as Python objects would take several GB)."""
    owners, indices, keys, vectors = [], [], [], []
    query = (
        select(
            T.Neuron.id, T.Neuron.layer, T.Neuron.side, T.Neuron.neuron, T.Channel.channel, T.Channel.vector
        )
        .join(T.Channel, T.Channel.neuron_id == T.Neuron.id)
        .where(T.Neuron.run_id == run.id)
        .order_by(T.Neuron.id, T.Channel.channel)
        .execution_options(yield_per=50_000)
    )
    with engine.connect() as connection:
        for part in connection.execute(query).partitions():
            owners.append(np.array([r.id for r in part], dtype=np.int64))
            indices.append(np.array([r.channel for r in part], dtype=np.int16))
            keys.append(
                np.array([(r.layer, T.SIDE_CODES[r.side], r.neuron, r.channel) for r in part], dtype=KEY)
            )
            block = np.frombuffer(b"".join(r.vector for r in part), dtype="<f2").reshape(len(part), -1)
            block = block.astype(np.float32)
            vectors.append(block / np.linalg.norm(block, axis=1, keepdims=True).clip(1e-12))
    if not owners:
        return np.zeros(0, np.int64), np.zeros(0, np.int16), np.zeros(0, KEY), np.zeros((0, 1), np.float32)
    return np.concatenate(owners), np.concatenate(indices), np.concatenate(keys), np.concatenate(vectors)


def build(
    engine: Engine,
    run: T.Run,
    device: torch.device,
    count: int = COUNT,
    on_block: Callable[[int, int], None] | None = None,
) -> Build:
    """Computes and stores the nearest channels of every channel the run has now, replacing an
    earlier build in one transaction (a reader sees the old answer or the new, never half)."""
    started = time.perf_counter()
    owners, indices, keys, unit = _channels(engine, run)
    n = len(owners)
    done = 0

    def block_done(size: int) -> None:
        nonlocal done
        done += size
        if on_block is not None:
            on_block(done, n)

    cos, index = nearest(
        torch.from_numpy(unit).to(device), torch.from_numpy(owners).to(device), count, on_block=block_done
    )
    cos, index = cos.cpu().numpy(), index.cpu().numpy()
    del unit
    records = np.zeros(index.shape, dtype=T.NEIGHBOUR)
    found = keys[index.clip(0)]
    for name in KEY.names:
        records[name] = found[name]
    records["cos"] = cos
    valid = (index >= 0).sum(axis=1)  # missing ones come last (cos -inf sorts after every real one)
    table = T.ChannelNeighbour.__table__
    with engine.begin() as connection:
        neuron_ids = select(T.Neuron.id).where(T.Neuron.run_id == run.id)
        connection.execute(delete(table).where(table.c.neuron_id.in_(neuron_ids)))
        connection.execute(delete(T.NeighbourBuild.__table__).where(T.NeighbourBuild.run_id == run.id))
        for first in range(0, n, 10_000):
            rows = range(first, min(first + 10_000, n))
            connection.execute(
                insert(table),
                [
                    {
                        "neuron_id": int(owners[i]),
                        "channel": int(indices[i]),
                        "neighbours": records[i, : valid[i]].tobytes(),
                    }
                    for i in rows
                ],
            )
        seconds = time.perf_counter() - started
        connection.execute(
            insert(T.NeighbourBuild.__table__),
            {
                "run_id": run.id,
                "channels": n,
                "count": count,
                "device": str(device),
                "seconds": seconds,
                "created_at": T.now(),
            },
        )
    return Build(run.hash, n, seconds, str(device))
