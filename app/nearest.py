"""Nearest channels elsewhere in the model: exact cosine products against every channel of the
run, computed by the web process itself.

What was chosen, and why: a channel page asks for its neighbours among all of the run's channel
vectors. For runs up to MAX_CHANNELS channels (the README's default slice has ~4,000; a whole
layer at 5 channels ~23,000) the web process reads the run's channel vectors once, keeps them
unit-normalised as float32 (MAX_CHANNELS x d_model x 4 bytes: 138 MB on SmolLM2 at the cap),
and answers each page with one matrix-vector product (a few ms). There is no worker step and no
table to keep in step with the run: while a run is still being computed the vectors are read
again once the run has grown and the copy is a minute old. Larger runs would need a kept
nearest-neighbour index built by the worker after the run (faiss or usearch); that is not built,
and their channel pages say so instead of showing a partial answer.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from app import queries
from channelscope import tables as T

MAX_CHANNELS = 60_000
KEEP_RUNS = 2  # runs whose vectors stay in memory at once
REFRESH_SECONDS = 60.0
SIDE_CODES = {"gate": 0, "in": 1, "out": 2}
SIDE_NAMES = {v: k for k, v in SIDE_CODES.items()}


@dataclass
class RunVectors:
    neurons_done: int
    loaded_at: float
    keys: np.ndarray  # [M, 4] int32: layer, side code, neuron, channel
    unit: np.ndarray  # [M, d] float32, each row a unit vector


@dataclass
class Neighbour:
    layer: int
    side: str
    neuron: int
    channel: int
    cos: float


_lock = threading.Lock()
_runs: OrderedDict[int, RunVectors] = OrderedDict()


def _load(session: Session, run_id: int, neurons_done: int) -> RunVectors:
    rows = queries.run_channel_vectors(session, run_id)
    keys = np.array([(r.layer, SIDE_CODES[r.side], r.neuron, r.channel) for r in rows], dtype=np.int32)
    d = len(rows[0].vector) // 2 if rows else 0
    vectors = np.frombuffer(b"".join(r.vector for r in rows), dtype="<f2").reshape(len(rows), d)
    unit = vectors.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True).clip(1e-12)
    return RunVectors(neurons_done, time.monotonic(), keys.reshape(-1, 4), unit)


def _vectors(session: Session, run_id: int, neurons_done: int) -> RunVectors:
    with _lock:
        found = _runs.get(run_id)
        stale = found is not None and (
            found.neurons_done != neurons_done and time.monotonic() - found.loaded_at > REFRESH_SECONDS
        )
        if found is None or stale:
            found = _runs[run_id] = _load(session, run_id, neurons_done)
        _runs.move_to_end(run_id)
        while len(_runs) > KEEP_RUNS:
            _runs.popitem(last=False)
        return found


def nearest(
    session: Session,
    run_id: int,
    neurons_done: int,
    channels_per_neuron: int,
    where: tuple[int, str, int],
    vector: bytes,
    count: int = 12,
) -> tuple[list[Neighbour], str]:
    """The `count` channels of other neurons with the highest cos to this channel vector, and a
    note saying how they were found (or why they were not)."""
    estimate = neurons_done * channels_per_neuron
    if estimate > MAX_CHANNELS:
        return [], (
            f"Not computed: this run has about {estimate:,} channels, and exact products are only kept "
            f"for runs of up to {MAX_CHANNELS:,}."
        )
    run = _vectors(session, run_id, neurons_done)
    if not len(run.keys):
        return [], "No channels computed yet."
    v = T.unpack(vector, "float16").astype(np.float32)
    cos = run.unit @ (v / max(float(np.linalg.norm(v)), 1e-12))
    layer, side, neuron = where
    own = (run.keys[:, 0] == layer) & (run.keys[:, 1] == SIDE_CODES[side]) & (run.keys[:, 2] == neuron)
    cos[own] = -np.inf  # "elsewhere": not the neuron's own channels
    count = min(count, int((~own).sum()))
    if count <= 0:
        return [], "No other neuron has channels in this run yet."
    top = np.argpartition(-cos, count - 1)[:count]
    top = top[np.argsort(-cos[top], kind="stable")]
    out = [
        Neighbour(
            int(run.keys[i, 0]),
            SIDE_NAMES[int(run.keys[i, 1])],
            int(run.keys[i, 2]),
            int(run.keys[i, 3]),
            float(cos[i]),
        )
        for i in top
    ]
    return out, f"Exact cos against all {len(run.keys):,} channels of this run (channel vectors, all sides)."
