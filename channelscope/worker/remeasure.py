"""`channelscope measures RUN`: bring a run's stored measures up to measures.MEASURES_VERSION
without recomputing a channel. The run's hash, its channels and its token index stay as they
are; each neuron side gets what the newer measures add (version 2: every channel's percentile
against random directions at the same cosine to w; version 3: the calibrated neuron score;
docs/method.md) and its version raised, in
batches that commit on their own, so a killed backfill goes on where it stopped.

The numbers equal what the worker computes for a new neuron: the same stored w, the same stored
cos and faithfulness, the same direction pool (seeded), the same scored tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sqlalchemy import Engine, func, select, update

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.core.stats import finite_or
from channelscope.method import measures, rotate
from channelscope.method.decomposer import Decomposer
from channelscope.worker import compute

BATCH = 256  # neuron sides per transaction


def pending(engine: Engine, run: T.Run) -> int:
    with db.session(engine) as session:
        return session.scalar(
            select(func.count())
            .select_from(T.Neuron)
            .where(T.Neuron.run_id == run.id, T.Neuron.measures_version < measures.MEASURES_VERSION)
        )


def backfill(
    engine: Engine,
    run: T.Run,
    decomposer: Decomposer,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Every neuron side of the run below the current measures version, brought up to it.
    Returns how many were."""
    scored = decomposer.scored.cpu()
    done = 0
    while True:
        with db.session(engine) as session, session.begin():
            rows = session.execute(
                select(T.Neuron.id, T.Neuron.vector, T.Neuron.best_percentile, T.Neuron.measures_version)
                .where(T.Neuron.run_id == run.id, T.Neuron.measures_version < measures.MEASURES_VERSION)
                .order_by(T.Neuron.id)
                .limit(BATCH)
            ).all()
            if not rows:
                return done
            ids = [row.id for row in rows]
            # version 3: the score, from the stored best percentile alone (one UPDATE by primary key)
            session.execute(
                update(T.Neuron),
                [
                    {
                        "id": row.id,
                        "score": finite_or(
                            measures.neuron_score(row.best_percentile, decomposer.score_scale), None
                        ),
                    }
                    for row in rows
                ],
            )
            old = [row for row in rows if row.measures_version < 2]
            if old:
                _percentiles_local(session, decomposer, old, scored)
            session.execute(
                update(T.Neuron)
                .where(T.Neuron.id.in_(ids))
                .values(measures_version=measures.MEASURES_VERSION)
            )
        done += len(ids)
        if on_batch:
            on_batch(done)


def _percentiles_local(session, decomposer: Decomposer, rows, scored: torch.Tensor) -> None:
    """Version 2: every channel's percentile against directions at the same cosine to w."""
    channels: dict[int, list] = {}
    for ch in session.execute(
        select(T.Channel.neuron_id, T.Channel.channel, T.Channel.cos, T.Channel.faithfulness)
        .where(T.Channel.neuron_id.in_([row.id for row in rows]))
        .order_by(T.Channel.neuron_id, T.Channel.channel)
    ).all():
        channels.setdefault(ch.neuron_id, []).append(ch)
    w = torch.from_numpy(np.stack([T.neuron_vector(row.vector) for row in rows]))  # [B, d]
    z_w = decomposer.proj.forward(w.to(decomposer.device), exact=True).cpu()  # [B, V]
    zs_w = rotate.z_scores(z_w, scored)
    for n, row in enumerate(rows):
        found = channels.get(row.id, [])
        if not found:
            continue
        cosines = torch.tensor([ch.cos for ch in found], dtype=torch.float64)
        draws = measures.faithfulness_at_cosines(
            w[n], z_w[n], zs_w[n], cosines, decomposer.directions, scored
        )
        for ch, row_draws in zip(found, draws, strict=True):
            session.execute(
                update(T.Channel)
                .where(T.Channel.neuron_id == row.id, T.Channel.channel == ch.channel)
                .values(
                    percentile_local=finite_or(measures.percentile(ch.faithfulness, row_draws.numpy()), None)
                )
            )


def decomposer_for(engine: Engine, run: T.Run, model, device: str, cache_dir) -> Decomposer:
    """U, the scored tokens and the direction pool of the run's settings. Any algorithm version
    will do: measures read stored vectors, they do not rerun the solver."""
    with db.session(engine) as session:
        return compute.run_decomposer(session, run, model, device, cache_dir)
