"""Nearest channels elsewhere in the model, for a channel page.

Two sources, the first that has an answer:
- stored: `channelscope neighbours RUN` (worker/neighbours.py) computed every channel's nearest
  channels of the run, exactly, and stored them; one row read per page. The way for runs of any
  size; for a whole model (SmolLM2 at 5 channels: 691,200 channels) the only one.
- live: for runs up to MAX_CHANNELS channels (the README's default slice has ~4,000) the web
  process reads the run's channel vectors once, keeps them unit-normalised as float32 (138 MB on
  SmolLM2 at the cap), and answers each page with one matrix-vector product (a few ms), so a
  small run needs no extra step. While a run is still being computed the vectors are read again
  once the run has grown and the copy is a minute old.
A large run without a stored build says so, and names the command, instead of a partial answer.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from channelscope.core import tables as T
from channelscope.web import queries

MAX_CHANNELS = 60_000
KEEP_RUNS = 2  # runs whose vectors stay in memory at once
REFRESH_SECONDS = 60.0
SIDE_CODES = T.SIDE_CODES
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
_runs: OrderedDict[tuple[str, int], RunVectors] = OrderedDict()  # by database and run id


def _load(session: Session, run_id: int, neurons_done: int) -> RunVectors:
    rows = queries.run_channel_vectors(session, run_id)
    keys = np.array([(r.layer, SIDE_CODES[r.side], r.neuron, r.channel) for r in rows], dtype=np.int32)
    d = len(rows[0].vector) // 2 if rows else 0
    vectors = np.frombuffer(b"".join(r.vector for r in rows), dtype="<f2").reshape(len(rows), d)
    unit = vectors.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True).clip(1e-12)
    return RunVectors(neurons_done, time.monotonic(), keys.reshape(-1, 4), unit)


def _vectors(session: Session, run_id: int, neurons_done: int) -> RunVectors:
    key = (str(session.get_bind().url), run_id)  # run ids repeat across databases (tests hold several)
    with _lock:
        found = _runs.get(key)
        stale = found is not None and (
            found.neurons_done != neurons_done and time.monotonic() - found.loaded_at > REFRESH_SECONDS
        )
        if found is None or stale:
            found = _runs[key] = _load(session, run_id, neurons_done)
        _runs.move_to_end(key)
        while len(_runs) > KEEP_RUNS:
            _runs.popitem(last=False)
        return found


def nearest(
    session: Session,
    run_id: int,
    run_hash: str,
    neurons_done: int,
    channels_per_neuron: int,
    where: tuple[int, str, int, int],
    neuron_id: int,
    vector: bytes,
    count: int = 12,
) -> tuple[list[Neighbour], str]:
    """The `count` channels of other neurons with the highest cos to this channel vector, and a
    note saying how they were found (or why they were not). `where`: layer, side, neuron and
    channel index of the channel; neuron_id its neuron's row."""
    estimate = neurons_done * channels_per_neuron
    stored = queries.stored_neighbours(session, run_id, neuron_id, where[3])
    if stored is not None and stored.neighbours is not None:
        records = np.frombuffer(stored.neighbours, dtype=T.NEIGHBOUR)[:count]
        note = (
            f"Exact cos against all {stored.channels:,} channels of this run, computed "
            f"{T.utc(stored.created_at):%Y-%m-%d %H:%M} UTC by `channelscope neighbours`."
        )
        if estimate > stored.channels:
            note += f" The run has about {estimate:,} channels now; run it again to include them."
        return [
            Neighbour(
                int(r["layer"]),
                SIDE_NAMES[int(r["side"])],
                int(r["neuron"]),
                int(r["channel"]),
                float(r["cos"]),
            )
            for r in records
        ], note
    if estimate > MAX_CHANNELS:
        return [], (
            f"Not computed yet: this run has about {estimate:,} channels, more than the {MAX_CHANNELS:,} "
            f"this page compares live; `channelscope neighbours {run_hash}` computes and stores them."
        )
    run = _vectors(session, run_id, neurons_done)
    if not len(run.keys):
        return [], "No channels computed yet."
    v = T.channel_vector(vector)
    cos = run.unit @ (v / max(float(np.linalg.norm(v)), 1e-12))
    layer, side, neuron, _ = where
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
