"""Each channel's nearest channels elsewhere in its run, computed once after the run and stored.

The web app answers a channel page of a small run (up to app.nearest.MAX_CHANNELS channels) with
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

from channelscope import db
from channelscope import tables as T

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
    cos, leaving out rows of the same owner (a channel's own neuron): (cos [N, count], index
    [N, count]), best first; index -1 and cos -inf where fewer exist."""
    n = unit.shape[0]
    best_cos = torch.full((n, count), -torch.inf, device=unit.device)
    best_index = torch.full((n, count), -1, dtype=torch.long, device=unit.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        cos_kept, index_kept = best_cos[start:stop], best_index[start:stop]
        for first in range(0, n, columns):
            last = min(first + columns, n)
            cos = unit[start:stop] @ unit[first:last].T
            cos[owners[start:stop, None] == owners[None, first:last]] = -torch.inf
            k = min(count, last - first)
            top_cos, top_index = cos.topk(k, dim=1)
            merged_cos = torch.cat([cos_kept, top_cos], dim=1)
            merged_index = torch.cat([index_kept, top_index + first], dim=1)
            cos_kept, order = merged_cos.topk(count, dim=1)
            index_kept = merged_index.gather(1, order)
        index_kept[cos_kept == -torch.inf] = -1
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
    with db.session(engine) as session:
        rows = session.execute(
            select(
                T.Neuron.id,
                T.Neuron.layer,
                T.Neuron.side,
                T.Neuron.neuron,
                T.Channel.channel,
                T.Channel.vector,
            )
            .join(T.Channel, T.Channel.neuron_id == T.Neuron.id)
            .where(T.Neuron.run_id == run.id)
            .order_by(T.Neuron.id, T.Channel.channel)
        ).all()
    n = len(rows)
    if n:
        vectors = np.stack([T.unpack(r.vector, "float16") for r in rows]).astype(np.float32)
        unit = torch.from_numpy(vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12))
        owners = torch.tensor([r.id for r in rows])
        done = 0

        def block_done(size: int) -> None:
            nonlocal done
            done += size
            if on_block is not None:
                on_block(done, n)

        cos, index = nearest(unit.to(device), owners.to(device), count, on_block=block_done)
        cos, index = cos.cpu().numpy(), index.cpu().numpy()
        keys = np.array(
            [(r.layer, T.SIDE_CODES[r.side], r.neuron, r.channel) for r in rows],
            dtype=[("layer", "<i2"), ("side", "<i1"), ("neuron", "<i4"), ("channel", "<i2")],
        )
    blobs = []
    for i, r in enumerate(rows):
        found = index[i] >= 0
        records = np.empty(int(found.sum()), dtype=T.NEIGHBOUR)
        for name in ("layer", "side", "neuron", "channel"):
            records[name] = keys[name][index[i][found]]
        records["cos"] = cos[i][found]
        blobs.append({"neuron_id": r.id, "channel": r.channel, "neighbours": records.tobytes()})
    with db.session(engine) as session, session.begin():
        neuron_ids = select(T.Neuron.id).where(T.Neuron.run_id == run.id)
        session.execute(delete(T.ChannelNeighbour).where(T.ChannelNeighbour.neuron_id.in_(neuron_ids)))
        session.execute(delete(T.NeighbourBuild).where(T.NeighbourBuild.run_id == run.id))
        for first in range(0, len(blobs), 10_000):
            session.execute(insert(T.ChannelNeighbour), blobs[first : first + 10_000])
        seconds = time.perf_counter() - started
        session.add(
            T.NeighbourBuild(run_id=run.id, channels=n, count=count, device=str(device), seconds=seconds)
        )
    return Build(run.hash, n, seconds, str(device))
