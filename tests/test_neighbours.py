"""Nearest channels computed by the worker (`channelscope neighbours`) and read by channel pages,
on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from channelscope import cli
from channelscope.core import db
from channelscope.core import tables as T
from channelscope.web import neighbours as live
from channelscope.web.main import create_app
from channelscope.worker import neighbours


def _brute_force(unit: np.ndarray, owners: np.ndarray, count: int) -> np.ndarray:
    """Highest |cos| first: a channel's mirror image (cos near -1) is its nearest."""
    score = np.abs(unit @ unit.T)
    score[owners[:, None] == owners[None, :]] = -np.inf
    return np.argsort(-score, axis=1, kind="stable")[:, :count]


def test_blocks_give_the_same_neighbours_as_one_product():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    owners = np.arange(300) // 3  # three channels per neuron, never each other's neighbours
    cos, index = neighbours.nearest(torch.from_numpy(unit), torch.from_numpy(owners), 7, rows=64, columns=50)
    expected = _brute_force(unit, owners, 7)
    assert (index.numpy() == expected).all()
    assert np.allclose(cos.numpy(), np.take_along_axis(unit @ unit.T, expected, axis=1), atol=1e-5)


def test_a_mirror_image_is_the_nearest_channel_and_keeps_its_sign():
    unit = torch.tensor([[1.0, 0.0], [-0.99, 0.141], [0.5, 0.866], [0.0, 1.0]])
    unit = unit / unit.norm(dim=1, keepdim=True)
    cos, index = neighbours.nearest(unit, torch.arange(4), 2, rows=2, columns=3)
    assert index[0].tolist() == [1, 2] and cos[0, 0] < -0.98  # highest |cos|, sign kept


def test_the_random_baseline_of_nearest_channels_matches_sampling():
    rng = np.random.default_rng(1)
    d, m = 64, 500
    channels = rng.standard_normal((m, d))
    channels /= np.linalg.norm(channels, axis=1, keepdims=True)
    draws = rng.standard_normal((400, d))
    draws /= np.linalg.norm(draws, axis=1, keepdims=True)
    sampled = np.abs(draws @ channels.T).max(axis=1).mean()
    assert live.random_max_abs_cos(d, m) == pytest.approx(sampled, rel=0.03)
    assert live.random_max_abs_cos(d, 1) == pytest.approx(np.abs(draws @ channels[0]).mean(), rel=0.1)


def test_fewer_candidates_than_asked_are_marked_missing():
    unit = torch.eye(4)
    cos, index = neighbours.nearest(unit, torch.tensor([0, 0, 1, 1]), 3)
    assert (index[:, 2] == -1).all() and torch.isinf(cos[:, 2]).all()
    assert set(index[0, :2].tolist()) == {2, 3}  # only the other neuron's channels


def _run(url: str, run_hash: str) -> T.Run:
    engine = db.make_engine(url)
    with db.session(engine) as session:
        found = session.scalars(select(T.Run).where(T.Run.hash == run_hash)).one()
    engine.dispose()
    return found


def test_stored_neighbours_are_exact_and_a_rebuild_replaces_them(store):
    engine = db.make_engine(store.url)
    run = _run(store.url, store.run_a)
    first = neighbours.build(engine, run, torch.device("cpu"), count=5)
    again = neighbours.build(engine, run, torch.device("cpu"), count=5)
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
        stored = {
            (r.neuron_id, r.channel): np.frombuffer(r.neighbours, dtype=T.NEIGHBOUR)
            for r in session.scalars(select(T.ChannelNeighbour))
        }
        builds = session.scalar(select(func.count()).select_from(T.NeighbourBuild))
    assert first.channels == again.channels == len(rows) == len(stored) and builds == 1
    vectors = np.stack([T.channel_vector(r.vector) for r in rows])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = _brute_force(unit, np.array([r.id for r in rows]), 5)
    for i, r in enumerate(rows):
        got = stored[(r.id, r.channel)]
        want = [rows[j] for j in expected[i]]
        assert [(g["layer"], g["neuron"], g["channel"]) for g in got] == [
            (w.layer, w.neuron, w.channel) for w in want
        ]
        assert [live.SIDE_NAMES[int(g["side"])] for g in got] == [w.side for w in want]
        assert np.allclose(got["cos"], unit[i] @ unit[expected[i]].T, atol=1e-5)
    engine.dispose()


def test_a_channel_page_of_a_large_run_reads_stored_neighbours(store, monkeypatch):
    monkeypatch.setattr(live, "MAX_CHANNELS", 0)  # every run counts as too large to compare live
    run = _run(store.url, store.run_b)
    app = create_app(store.url)
    page = f"/m/{store.model}/1/2/out/0.json?run={store.run_b}"
    with TestClient(app) as client:
        before = client.get(page).json()
        assert before["nearest"] == [] and f"channelscope neighbours {store.run_b}" in before["nearest_note"]

        assert cli.main(["neighbours", store.run_b[:6]]) == 0
        after = client.get(page).json()
        assert len(after["nearest"]) == min(12, _other_channels(store.url, run))
        assert "computed" in after["nearest_note"] and "channelscope neighbours" in after["nearest_note"]
        assert all(n["neuron"] != 2 for n in after["nearest"])  # elsewhere: not its own neuron
        assert [abs(n["cos"]) for n in after["nearest"]] == sorted(
            (abs(n["cos"]) for n in after["nearest"]), reverse=True
        )
        baseline = after["nearest_baseline"]
        assert 0 < baseline < 1 and f"{baseline:.3f}" in client.get(page.replace(".json", "")).text
        html = client.get(page.replace(".json", "")).text
        assert after["nearest"][0]["url"] in html
    app.state.engine.dispose()


def _other_channels(url: str, run: T.Run) -> int:
    """Channels of the run's neurons other than the page's (all are neighbours if under 12)."""
    engine = db.make_engine(url)
    with db.session(engine) as session:
        total = session.scalar(
            select(func.count())
            .select_from(T.Channel)
            .join(T.Neuron, T.Neuron.id == T.Channel.neuron_id)
            .where(T.Neuron.run_id == run.id)
        )
    engine.dispose()
    return total - 3  # the neuron's own three channels


@pytest.fixture(autouse=True)
def _database_url(store, monkeypatch):
    """The CLI reads DATABASE_URL from the environment."""
    from channelscope.core.config import config

    monkeypatch.setenv("DATABASE_URL", store.url)
    config.cache_clear()
    yield
    config.cache_clear()
