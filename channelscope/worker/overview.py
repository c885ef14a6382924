"""`channelscope overview`: the raw projection of every vector of a model, stored per layer and
side (tables.OverviewLayer), resumable: a layer and side is committed as soon as it is done, and
a second run computes only what is missing (or was stored by another OVERVIEW_VERSION)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import overview, rotate
from channelscope.method.weights import Model
from channelscope.worker import store


def missing_parts(session: Session, model_id: int, model: Model) -> list[tuple[int, str]]:
    have = set(
        session.execute(
            select(T.OverviewLayer.layer, T.OverviewLayer.side).where(
                T.OverviewLayer.model_id == model_id, T.OverviewLayer.version == overview.OVERVIEW_VERSION
            )
        ).all()
    )
    # `out` first, as everywhere: it is what a neuron writes.
    return [
        (layer, side)
        for side in sorted(model.sides, key=T.SIDE_ORDER.index)
        for layer in range(model.n_layers)
        if (layer, side) not in have
    ]


def build(
    engine: Engine, model: Model, device: torch.device, on_part: Callable[[int, int], None] | None = None
) -> int:
    """Compute and store every missing layer and side; returns how many were computed."""
    with db.session(engine) as session, session.begin():
        model_id = store.ensure_model(session, model).id
    with db.session(engine) as session:
        parts = missing_parts(session, model_id, model)
    done = 0

    def save(part: overview.LayerOverview) -> None:
        nonlocal done
        with db.session(engine) as session, session.begin():
            session.execute(
                delete(T.OverviewLayer).where(
                    T.OverviewLayer.model_id == model_id,
                    T.OverviewLayer.layer == part.layer,
                    T.OverviewLayer.side == part.side,
                )
            )
            session.add(
                T.OverviewLayer(
                    model_id=model_id,
                    layer=part.layer,
                    side=part.side,
                    version=overview.OVERVIEW_VERSION,
                    glitch_quantile=rotate.Settings().glitch_quantile,
                    vectors=T.pack(part.vectors, "float16"),
                    stats=T.pack(part.stats, "float32"),
                    top_ids=T.pack(part.top_ids, "int32"),
                    top_z=T.pack(part.top_z, "float32"),
                    bottom_ids=T.pack(part.bottom_ids, "int32"),
                    bottom_z=T.pack(part.bottom_z, "float32"),
                )
            )
        done += 1
        if on_part:
            on_part(done, len(parts))

    overview.model_overview(model, parts, device, save)
    return done


def raw_kurtosis(session: Session, model_id: int, layer: int, side: str) -> np.ndarray | None:
    """Each vector's stored raw kurtosis in one layer and side, [d_mlp], or None if not computed."""
    blob = session.scalar(
        select(T.OverviewLayer.stats).where(
            T.OverviewLayer.model_id == model_id, T.OverviewLayer.layer == layer, T.OverviewLayer.side == side
        )
    )
    if blob is None:
        return None
    return T.unpack(blob, "float32").reshape(len(T.OVERVIEW_STATS), -1)[T.OVERVIEW_STATS.index("kurtosis")]
