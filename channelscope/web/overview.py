"""The stored raw projections (worker/overview.py) as the web process holds them: each layer
side's arrays read once and kept (they never change for one model file and OVERVIEW_VERSION),
and all of a model's vectors stacked for raw token search, built from those on first search."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from channelscope.core import tables as T
from channelscope.method import overview

_lock = threading.Lock()
# Kept per database and model file: the same file can have an overview in one store and not yet
# in another (the tests' stores, a staging database).
_layers: dict[tuple[str, str, int, str], LayerArrays] = {}
_models: dict[tuple[str, str], ModelVectors] = {}


@dataclass(frozen=True)
class LayerArrays:
    vectors: torch.Tensor  # float16 [d_mlp, d]
    stats: dict[str, np.ndarray]  # T.OVERVIEW_STATS -> [d_mlp]
    top_ids: np.ndarray  # [d_mlp, K]
    top_z: np.ndarray
    bottom_ids: np.ndarray
    bottom_z: np.ndarray


def _database(session: Session) -> str:
    return session.get_bind().url.render_as_string(hide_password=True)


def _read(row) -> LayerArrays:
    d_mlp = len(T.unpack(row.stats, "float32")) // len(T.OVERVIEW_STATS)
    stats = T.unpack(row.stats, "float32").reshape(len(T.OVERVIEW_STATS), d_mlp)
    return LayerArrays(
        vectors=torch.from_numpy(T.unpack(row.vectors, "float16").reshape(d_mlp, -1).copy()),
        stats=dict(zip(T.OVERVIEW_STATS, stats, strict=True)),
        top_ids=T.unpack(row.top_ids, "int32").reshape(d_mlp, -1),
        top_z=T.unpack(row.top_z, "float32").reshape(d_mlp, -1),
        bottom_ids=T.unpack(row.bottom_ids, "int32").reshape(d_mlp, -1),
        bottom_z=T.unpack(row.bottom_z, "float32").reshape(d_mlp, -1),
    )


def _query(model_id: int, layer: int | None = None, side: str | None = None):
    query = select(T.OverviewLayer).where(
        T.OverviewLayer.model_id == model_id, T.OverviewLayer.version == overview.OVERVIEW_VERSION
    )
    if layer is not None:
        query = query.where(T.OverviewLayer.layer == layer, T.OverviewLayer.side == side)
    return query


def layer(session: Session, model_row: Row, layer: int, side: str) -> LayerArrays | None:
    """One layer side's raw projections, or None where the overview has not reached it yet (a
    miss is not kept: it may be computed a minute later)."""
    key = (_database(session), model_row.sha256, layer, side)
    found = _layers.get(key)
    if found is None:
        row = session.scalar(_query(model_row.id, layer, side))
        if row is None:
            return None
        with _lock:
            found = _layers.setdefault(key, _read(row))
    return found


@dataclass(frozen=True)
class ModelVectors:
    """Every vector of a model with its layer, side and neuron, for raw token search."""

    keys: np.ndarray  # int32 [n, 3]: layer, side code (T.SIDE_CODES), neuron
    vectors: torch.Tensor  # float16 [n, d]
    mean: torch.Tensor  # float32 [n]
    std: torch.Tensor


def model_vectors(session: Session, model_row: Row) -> ModelVectors | None:
    """All layer sides of the model's overview stacked (160 MB for SmolLM2), or None until the
    overview is complete (search over part of a model would silently miss the rest)."""
    key = (_database(session), model_row.sha256)
    found = _models.get(key)
    if found is not None:
        return found
    sides = model_row.sides.split(",")
    rows = session.scalars(_query(model_row.id)).all()
    if len(rows) < model_row.n_layers * len(sides):
        return None
    with _lock:
        if key not in _models:
            parts = sorted(((r.layer, T.SIDE_CODES[r.side]), _read(r)) for r in rows)
            keys = np.concatenate(
                [
                    np.stack(
                        [
                            np.full(len(a.top_ids), lay),
                            np.full(len(a.top_ids), code),
                            np.arange(len(a.top_ids)),
                        ],
                        1,
                    )
                    for (lay, code), a in parts
                ]
            ).astype(np.int32)
            _models[key] = ModelVectors(
                keys=keys,
                vectors=torch.cat([a.vectors for _, a in parts]),
                mean=torch.from_numpy(np.concatenate([a.stats["mean"] for _, a in parts])),
                std=torch.from_numpy(np.concatenate([a.stats["std"] for _, a in parts])),
            )
    return _models[key]


def raw_hits(
    vectors: ModelVectors, columns: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the raw z of some tokens (columns [d, k] of U) reaches |z| >= threshold, exact (one
    product with every vector): (indices into vectors.keys, token positions in columns, z)."""
    z = overview.raw_z(vectors.vectors, vectors.mean, vectors.std, torch.from_numpy(columns)).numpy()
    rows, tokens = np.nonzero(np.abs(z) >= threshold)
    return rows, tokens, z[rows, tokens]


_summaries: dict[tuple[str, str], dict[tuple[int, str], tuple[float, float, int]]] = {}


def layer_summary(session: Session, model_row: Row) -> dict[tuple[int, str], tuple[float, float, int]]:
    """(layer, side) -> mean and max raw kurtosis and the number of vectors, for the model
    page's heatmaps: only the stats column is read, and a complete overview is kept."""
    key = (_database(session), model_row.sha256)
    found = _summaries.get(key)
    if found is not None:
        return found
    rows = session.execute(
        select(T.OverviewLayer.layer, T.OverviewLayer.side, T.OverviewLayer.stats).where(
            T.OverviewLayer.model_id == model_row.id, T.OverviewLayer.version == overview.OVERVIEW_VERSION
        )
    ).all()
    kurtosis = T.OVERVIEW_STATS.index("kurtosis")
    summary = {}
    for r in rows:
        values = T.unpack(r.stats, "float32").reshape(len(T.OVERVIEW_STATS), -1)[kurtosis]
        summary[r.layer, r.side] = (float(values.mean()), float(values.max()), len(values))
    if len(summary) == model_row.n_layers * len(model_row.sides.split(",")):
        _summaries[key] = summary
    return summary
