"""A small channel store for the web tests, filled by hand from the tiny model the way the worker
fills a real one (worker/store.py), on SQLite and on PostgreSQL.

    run A  seed 0, 3 channels: layers 0 and 1, sides gate/in/out, neurons 0-4   (complete)
    run B  seed 1, 3 channels: layer 1 `out`, neurons 0-4, plus a shard of layer 1 `gate` not
           done yet                                                             (incomplete, newer)

Channel 0 of run A's layer 1 `out` neuron 0 gets the tiny vocabulary's four hostile tokens as its
top tokens (and the neuron as its top tokens too), so every page that shows tokens shows them.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny
from sqlalchemy import select, update

from channelscope.core import db
from channelscope.core import tables as T

NEURONS = list(range(5))
CHANNELS = 3


@dataclass
class Store:
    url: str
    flavour: str
    model: str
    run_a: str
    run_b: str
    hostile_ids: list[int]
    tokens: list[str]


@functools.cache
def _decomposed(gguf: str, cache_dir: str):
    """Records of both runs, computed once per test process (the solver is the slow part)."""
    from channelscope.method import rotate
    from channelscope.method.decomposer import Decomposer
    from channelscope.method.weights import load_model

    model = load_model(gguf)
    settings = rotate.with_overrides(rotate.Settings(), channels=CHANNELS)
    out = {}
    for seed, parts in ((0, [(layer, side) for layer in (0, 1) for side in model.sides]), (1, [(1, "out")])):
        decomposer = Decomposer(model, settings, reference_count=8, seed=seed, cache_dir=Path(cache_dir))
        records = {part: decomposer.neurons(part[0], part[1], NEURONS) for part in parts}
        out[seed] = (decomposer, records)
    return model, settings, out


def fill(url: str, gguf: Path, cache_dir: Path, flavour: str) -> Store:
    from channelscope.worker import store

    model, settings, runs = _decomposed(str(gguf), str(cache_dir))
    engine = db.make_engine(url)
    hashes = {}
    with db.session(engine) as session:
        model_row = store.ensure_model(session, model)
        for seed, (decomposer, records) in runs.items():
            reference = store.ensure_reference(
                session, model_row, decomposer.reference_key, decomposer.reference
            )
            run = store.ensure_run(
                session, model_row, store.run_settings(settings, "unembedding", 8), seed, reference
            )
            hashes[seed] = run.hash
            for (layer, side), part in records.items():
                shard = T.Shard(
                    run_id=run.id,
                    layer=layer,
                    side=side,
                    neuron_start=0,
                    neuron_stop=len(NEURONS),
                    done_at=T.now(),
                )
                session.add(shard)
                session.flush()
                store.write_neurons(session, run, shard, part)
            if seed == 1:  # a shard the worker has not finished: run B is incomplete
                session.add(T.Shard(run_id=run.id, layer=1, side="gate", neuron_start=0, neuron_stop=5))
            session.commit()
        hostile = [model.vocabulary.tokens.index(t) for t in tiny.HOSTILE]
        run_a = session.scalar(select(T.Run).where(T.Run.hash == hashes[0]))
        neuron = session.scalar(
            select(T.Neuron).where(
                T.Neuron.run_id == run_a.id, T.Neuron.layer == 1, T.Neuron.side == "out", T.Neuron.neuron == 0
            )
        )
        for rank, token_id in enumerate(hostile):
            session.execute(
                update(T.ChannelToken)
                .where(T.ChannelToken.neuron_id == neuron.id, T.ChannelToken.channel == 0)
                .where(T.ChannelToken.rank == rank)
                .values(token_id=token_id)
            )
        neuron.top_tokens = [[t, 9.0 - i] for i, t in enumerate(hostile)] + neuron.top_tokens[len(hostile) :]
        session.commit()
    engine.dispose()
    return Store(url, flavour, model.name, hashes[0], hashes[1], hostile, model.vocabulary.tokens)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request, tiny_gguf, tmp_path_factory) -> Store:
    """A filled store per test module and database: the web tests only read it."""
    cache_dir = tmp_path_factory.getbasetemp() / "references"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('web') / 'store.db'}"
        db.upgrade(url)
        yield fill(url, tiny_gguf, cache_dir, "sqlite")
        return
    from conftest import ADMIN_URL, _admin, _with_database

    template = request.getfixturevalue("postgres_template")
    name = f"cs_web_{uuid.uuid4().hex[:8]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield fill(_with_database(ADMIN_URL, name), tiny_gguf, cache_dir, "postgresql")
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
