"""Measures version 2 (the percentile against random directions at the same cosine to w) and 3
(the calibrated neuron score) are stored with every new neuron, and `channelscope measures RUN`
brings a run measured before them up to date without recomputing a channel: the same numbers as a
fresh computation, the run's hash and channels untouched, resumable, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import measures, rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import load_model
from channelscope.web.main import create_app
from channelscope.worker import remeasure, store
from tests.fixtures.writing import write_run

NEURONS = [0, 1, 2, 3, 4]


def _state(engine):
    with db.session(engine) as session:
        channels = session.execute(
            select(
                T.Channel.neuron_id, T.Channel.channel, T.Channel.vector, T.Channel.percentile_local
            ).order_by(T.Channel.neuron_id, T.Channel.channel)
        ).all()
        neurons = session.execute(
            select(T.Neuron.measures_version, T.Neuron.score).order_by(T.Neuron.id)
        ).all()
        hashes = session.scalars(select(T.Run.hash)).all()
    return channels, neurons, hashes


@pytest.mark.parametrize("flavour", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_run_measured_before_version_2_is_backfilled_to_what_the_worker_computes(
    flavour, request, tiny_gguf, tmp_path, monkeypatch
):
    url = request.getfixturevalue("sqlite_url" if flavour == "sqlite" else "postgres_url")
    model = load_model(tiny_gguf)
    settings = rotate.with_overrides(rotate.Settings(), channels=3)
    decomposer = Decomposer(model, settings, reference_count=8, cache_dir=tmp_path)
    records = [r for side in model.sides for r in decomposer.neurons(1, side, NEURONS)]
    engine = db.make_engine(url)
    run_hash = write_run(
        engine, model, store.run_settings(settings, "unembedding", 8), 0, records, decomposer=decomposer
    )
    fresh, neurons, hashes = _state(engine)
    assert {n.measures_version for n in neurons} == {measures.MEASURES_VERSION} and all(
        ch.percentile_local is not None for ch in fresh
    )
    assert all(0 <= n.score <= 100 for n in neurons) and len({n.score for n in neurons}) > 1
    assert any(ch.percentile_local < 50 for ch in fresh) and any(ch.percentile_local > 50 for ch in fresh)

    # The run as a version-1 worker left it.
    with db.session(engine) as session, session.begin():
        session.execute(update(T.Channel).values(percentile_local=None))
        session.execute(update(T.Neuron).values(measures_version=1, score=None))
    app = create_app(url)
    with TestClient(app) as client:
        old = client.get(f"/m/{model.name}/1/0.json?run={run_hash}").json()["data"]
        assert old["measures_version"] == 1 and old["channels"][0]["percentile_local"] is None
        assert "not measured" in client.get(f"/m/{model.name}/1/0/out/0?run={run_hash}").text

    run = _run(engine, run_hash)
    assert remeasure.pending(engine, run) == len(records)
    monkeypatch.setattr(remeasure, "BATCH", 4)

    def killed(done):
        raise KeyboardInterrupt

    fresh_decomposer = remeasure.decomposer_for(engine, run, model, "cpu", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        remeasure.backfill(engine, run, fresh_decomposer, killed)
    assert remeasure.pending(engine, run) == len(records) - 4  # the first batch is committed
    assert remeasure.backfill(engine, run, fresh_decomposer) == len(records) - 4
    assert remeasure.pending(engine, run) == 0

    after, after_neurons, after_hashes = _state(engine)
    assert after_hashes == hashes and [tuple(n) for n in after_neurons] == [tuple(n) for n in neurons]
    for a, b in zip(fresh, after, strict=True):
        assert (a.neuron_id, a.channel, a.vector) == (b.neuron_id, b.channel, b.vector)  # channels untouched
        assert b.percentile_local == pytest.approx(a.percentile_local, abs=1e-9)
    with TestClient(create_app(url)) as client:
        new = client.get(f"/m/{model.name}/1/0.json?run={run_hash}").json()["data"]
        assert new["measures_version"] == 3 and new["channels"][0]["percentile_local"] is not None
        with db.session(engine) as session:
            stored = session.scalar(
                select(T.Neuron.score).where(
                    T.Neuron.layer == 1, T.Neuron.side == "out", T.Neuron.neuron == 0
                )
            )
        assert new["score"] == stored is not None

    # A run at version 2 gets its scores and keeps its percentiles against directions at the same cosine.
    with db.session(engine) as session, session.begin():
        session.execute(update(T.Neuron).values(measures_version=2, score=None))
        session.execute(update(T.Channel).values(percentile_local=-1.0))
    assert remeasure.backfill(engine, run, fresh_decomposer) == len(records)
    channels, neurons_again, _ = _state(engine)
    assert [tuple(n) for n in neurons_again] == [tuple(n) for n in neurons]
    assert {ch.percentile_local for ch in channels} == {-1.0}
    engine.dispose()


def _run(engine, run_hash):
    with db.session(engine) as session:
        run = session.scalar(select(T.Run).where(T.Run.hash == run_hash))
        session.expunge(run)
        return run
