"""Channels on demand: a neuron someone opened before any run computed it.

The run is the one of the model's default settings (DEFAULT_CHANNELS channels, the fast solver,
seed 0, the precision that run already has), of this ALGORITHM_VERSION, created if there is none:
the run `bin/up` computes its default slice in, so on-demand neurons share its permalinks. The
neuron's three sides are planned as one-neuron shards of tier ON_DEMAND (before everything
queued; a pending shard that holds the neuron already is moved up instead) and computed at once,
in one batch, by whoever takes the request: the web process's own background thread on SQLite,
any `channelscope worker` (or running `decompose`) on PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine, select

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer, pick_device
from channelscope.method.weights import Model, load_model
from channelscope.worker import compute, plan, store

DEFAULT_CHANNELS = 5  # the channels per vector of the default slice (bin/up) and of pages' requests
DEFAULT_SEED = 0
DEFAULT_PROJECTION = "unembedding"
DEFAULT_REFERENCE_COUNT = 64

_models: dict[str, Model] = {}
_lock = threading.Lock()  # one computation at a time per process: they share the solver's memory


def default_settings() -> rotate.Settings:
    return rotate.with_overrides(rotate.Settings(), channels=DEFAULT_CHANNELS)


def _model(source: str, sha256: str) -> Model:
    if sha256 not in _models:
        model = load_model(source)
        if model.sha256 != sha256:
            raise plan.JobError(f"{source} is no longer the model that was stored (sha256 differs)")
        _models[sha256] = model
    return _models[sha256]


def compute_neuron(
    engine: Engine,
    source: str,
    sha256: str,
    layer: int,
    neuron: int,
    *,
    device: str,
    cache_dir: Path,
    worker: str,
) -> str:
    """Plan and compute one neuron's three sides in the default run; returns the run's hash."""
    with _lock:
        model = _model(source, sha256)
        settings = plan.resolved_settings(
            engine, model, default_settings(), DEFAULT_PROJECTION, DEFAULT_REFERENCE_COUNT, DEFAULT_SEED,
            pick_device(device),
        )  # fmt: skip
        stored = store.run_settings(settings, DEFAULT_PROJECTION, DEFAULT_REFERENCE_COUNT)
        run_hash = store.run_hash(model.sha256, stored, DEFAULT_SEED)
        decomposer = compute.DECOMPOSERS.current[2] if _current(run_hash) else None
        if decomposer is None:
            compute.seed_reference_of_settings(engine, model, stored, DEFAULT_SEED, cache_dir)
            decomposer = Decomposer(
                model, settings, projection=DEFAULT_PROJECTION, device=device, cache_dir=cache_dir,
                reference_count=DEFAULT_REFERENCE_COUNT, seed=DEFAULT_SEED,
            )  # fmt: skip
        picks = tuple(plan.Pick(layer, side, (neuron,), plan.ON_DEMAND) for side in model.sides)
        run, _ = plan.open_run(
            engine, model, decomposer, stored, DEFAULT_SEED, plan.Request([layer], [], [], picks=picks)
        )
        compute.DECOMPOSERS.add(run.hash, model, decomposer)
        shard_ids = pending_shards_of(engine, run.id, layer, neuron)
        compute.compute_together(engine, shard_ids, decomposer, worker=worker)
        return run.hash


def _current(run_hash: str) -> bool:
    current = compute.DECOMPOSERS.current
    return current is not None and current[0] == run_hash


def pending_shards_of(engine: Engine, run_id: int, layer: int, neuron: int) -> list[int]:
    """The run's pending shards that hold this neuron, on any side, moved to the front of the
    queue (their priority set to the on-demand tier)."""
    with db.session(engine) as session, session.begin():
        shards = session.scalars(
            select(T.Shard).where(
                T.Shard.run_id == run_id,
                T.Shard.layer == layer,
                T.Shard.done_at.is_(None),
                T.Shard.neuron_start <= neuron,
                T.Shard.neuron_stop > neuron,
            )
        ).all()
        holding = [s for s in shards if neuron in T.shard_neurons(s)]
        for shard in holding:
            shard.priority = min(shard.priority, plan.ON_DEMAND + plan.SIDE_PRIORITY[shard.side])
        return [s.id for s in holding]
