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

import functools
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


@functools.lru_cache(maxsize=256)
def random_max_abs_cos(d: int, m: int) -> float:
    """The expected highest |cos| between a uniformly random unit direction in d dimensions and m
    fixed unit vectors, taken as independent: what "nearest by |cos|" reaches by chance among
    that many channels. |cos| of a random direction with one vector has density proportional to
    (1 - t^2)^((d-3)/2) on [0, 1]; E[max] = integral of 1 - F(t)^m dt."""
    if d < 2 or m < 1:
        return 0.0
    t = np.linspace(0.0, 1.0, 200_001)
    with np.errstate(divide="ignore"):
        log_density = 0.5 * (d - 3) * np.log1p(-(t**2))
    density = np.exp(log_density - log_density[np.isfinite(log_density)].max())
    density[~np.isfinite(density)] = 0.0
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    cdf /= cdf[-1]
    tail = 1.0 - cdf**m
    return float(np.sum((tail[1:] + tail[:-1]) / 2) * (t[1] - t[0]))


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
) -> tuple[list[Neighbour], str, int]:
    """The `count` channels of other neurons with the highest |cos| to this channel vector (sign
    kept: a channel on the other tail of the same tokens is as near as one on this tail), and a
    note saying how they were found (or why they were not). `where`: layer, side, neuron and
    channel index of the channel; neuron_id its neuron's row. The third value is how many
    channels were candidates (0 when none were compared)."""
    estimate = neurons_done * channels_per_neuron
    stored = queries.stored_neighbours(session, run_id, neuron_id, where[3])
    if stored is not None and stored.neighbours is not None:
        records = np.frombuffer(stored.neighbours, dtype=T.NEIGHBOUR)[:count]
        note = (
            f"Exact |cos| against all {stored.channels:,} channels of this run, computed "
            f"{T.utc(stored.created_at):%Y-%m-%d %H:%M} UTC by `channelscope neighbours`."
        )
        if estimate > stored.channels:
            note += f" The run has about {estimate:,} channels now; run it again to include them."
        candidates = max(0, stored.channels - channels_per_neuron)
        return (
            [
                Neighbour(
                    int(r["layer"]),
                    SIDE_NAMES[int(r["side"])],
                    int(r["neuron"]),
                    int(r["channel"]),
                    float(r["cos"]),
                )
                for r in records
            ],
            note,
            candidates,
        )
    if estimate > MAX_CHANNELS:
        note = (
            f"Not computed yet: this run has about {estimate:,} channels, more than the {MAX_CHANNELS:,} "
            f"this page compares live; `channelscope neighbours {run_hash}` computes and stores them."
        )
        return [], note, 0
    run = _vectors(session, run_id, neurons_done)
    if not len(run.keys):
        return [], "No channels computed yet.", 0
    v = T.channel_vector(vector)
    cos = run.unit @ (v / max(float(np.linalg.norm(v)), 1e-12))
    layer, side, neuron, _ = where
    own = (run.keys[:, 0] == layer) & (run.keys[:, 1] == SIDE_CODES[side]) & (run.keys[:, 2] == neuron)
    score = np.abs(cos)
    score[own] = -np.inf  # "elsewhere": not the neuron's own channels
    count = min(count, int((~own).sum()))
    if count <= 0:
        return [], "No other neuron has channels in this run yet.", 0
    top = np.argpartition(-score, count - 1)[:count]
    top = top[np.argsort(-score[top], kind="stable")]
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
    note = f"Exact |cos| against all {len(run.keys):,} channels of this run (channel vectors, all sides)."
    return out, note, int((~own).sum())
