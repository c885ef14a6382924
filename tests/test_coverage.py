"""Every neuron of the model, from the first minute: raw projections for all of them, and
channels on demand for a neuron no run has computed (SQLite: the web process's own thread;
PostgreSQL: procrastinate's on-demand queue and `channelscope worker`), with the crowd bounded."""

from __future__ import annotations

import signal
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.core.config import config
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import load_model
from channelscope.web import demand as D
from channelscope.web.main import create_app
from channelscope.worker import on_demand, overview
from tests.fixtures.cli import spawn, wait_for


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHANNELSCOPE_DATA_DIR", str(tmp_path / "data"))
    config.cache_clear()
    yield tmp_path / "data"
    config.cache_clear()


def with_overview(url: str, folder) -> None:
    engine = db.make_engine(url)
    overview.build(engine, load_model(folder), torch.device("cpu"))
    engine.dispose()


def page(client, url: str, status: int = 200):
    response = client.get(url)
    assert response.status_code == status, (url, response.status_code, response.text[-800:])
    return response


def test_every_neuron_has_a_page_with_its_raw_projection_before_any_run(database_url, tiny_folder, tmp_path):
    with_overview(database_url, tiny_folder)
    app = create_app(database_url)
    with TestClient(app) as client:
        for side in ("out", "in", "gate"):
            data = page(client, f"/m/tiny-llama/1/7.json?side={side}").json()
            assert data["data"] is None and data["run"] is None
            assert data["raw"]["source"] == "overview"
            assert data["channels_state"]["state"] == "off"  # this app computes nothing on request
        html = page(client, "/m/tiny-llama/1/7?side=gate").text
        assert "Raw projection" in html and "No run has computed this neuron" in html
        assert (
            page(client, "/m/tiny-llama/1/7/histogram.svg?side=gate")
            .headers["content-type"]
            .startswith("image/svg")
        )
        page(client, "/m/tiny-llama/1/128", 404)  # out of range stays a 404
        # The raw projection is the one a channel run records for the neuron.
        model = load_model(tiny_folder)
        settings = rotate.with_overrides(rotate.Settings(), channels=1, precision="fp32")
        (record,) = Decomposer(model, settings, reference_count=4, cache_dir=tmp_path).neurons(1, "gate", [7])
        raw = page(client, "/m/tiny-llama/1/7.json?side=gate").json()["raw"]
        assert [t["id"] for t in raw["top_tokens"]] == record.top_ids.tolist()
        assert raw["kurtosis"] == pytest.approx(record.kurtosis, abs=1e-4)
        # Neighbours are the next ids: every neuron has a page now.
        neighbours = page(client, "/m/tiny-llama/1/7.json").json()
        assert neighbours["previous_url"].startswith("/m/tiny-llama/1/6") and "/1/8" in neighbours["next_url"]
    app.state.engine.dispose()


def test_opening_an_uncomputed_neuron_computes_its_three_sides_on_demand(sqlite_url, tiny_gguf, data_dir):
    with_overview(sqlite_url, tiny_gguf)
    app = create_app(sqlite_url, on_demand=True)
    with TestClient(app) as client:
        first = page(client, "/m/tiny-llama/0/5.json").json()
        assert first["data"] is None and first["channels_state"]["state"] in ("queued", "computing")
        assert first["channels_state"]["refresh_seconds"]
        html = page(client, "/m/tiny-llama/0/5").text
        assert 'hx-trigger="every' in html and '<noscript><meta http-equiv="refresh"' in html
        done = wait_for(
            lambda: (found := page(client, "/m/tiny-llama/0/5.json").json())["data"] and found,
            240,
            "channels",
        )
        for side in ("gate", "in"):
            assert len(page(client, f"/m/tiny-llama/0/5.json?side={side}").json()["data"]["channels"]) == 5
    engine = app.state.engine
    with db.session(engine) as session:
        (run,) = session.scalars(select(T.Run)).all()
        shards = session.scalars(select(T.Shard)).all()
    # The model's default run (the one bin/up's slice uses), each side a one-neuron shard of the
    # on-demand tier, all three computed.
    assert run.channels == on_demand.DEFAULT_CHANNELS and run.seed == on_demand.DEFAULT_SEED
    assert done["run"]["hash"] == run.hash and run.settings["solver"] == "fast"
    assert sorted((s.side, s.neurons, s.done_at is not None) for s in shards) == [
        ("gate", [5], True), ("in", [5], True), ("out", [5], True)
    ]  # fmt: skip
    assert all(s.priority < 0 for s in shards)
    app.state.engine.dispose()


def test_the_crowd_is_bounded_one_job_per_neuron_a_cap_and_a_limit_per_client(
    sqlite_url, tiny_gguf, monkeypatch
):
    engine = db.make_engine(sqlite_url)
    demand = D.Demand(engine, enabled=True, device="cpu", cache_dir=tiny_gguf.parent)
    demand.thread = SimpleNamespace()  # nothing computes here: only what is queued is looked at
    model_row = SimpleNamespace(sha256="ab" * 32, source=str(tiny_gguf))
    # However many ask, one job per neuron.
    assert [demand.ask(model_row, 0, 1, f"client {i}").state for i in range(5)] == ["queued"] * 5
    assert demand.todo.qsize() == 1
    # A client asking for many neurons quickly is told to wait.
    asked = [demand.ask(model_row, 1, n, "eager") for n in range(D.PER_CLIENT + 1)]
    assert [a.state for a in asked[:-1]] == ["queued"] * D.PER_CLIENT
    assert asked[-1].state == "limited" and asked[-1].retry_after
    # And a full queue turns everyone away.
    monkeypatch.setattr(D, "MAX_QUEUED", demand.todo.qsize())
    full = demand.ask(model_row, 0, 99, "patient")
    assert full.state == "full" and full.retry_after
    assert demand.todo.qsize() == 1 + D.PER_CLIENT
    engine.dispose()


def test_a_client_over_its_limit_gets_429_with_retry_after_and_the_page(sqlite_url, tiny_gguf, monkeypatch):
    with_overview(sqlite_url, tiny_gguf)
    monkeypatch.setattr(D, "PER_CLIENT", 1)
    app = create_app(sqlite_url, on_demand=True)
    app.state.demand.thread = SimpleNamespace()  # queue only
    with TestClient(app) as client:
        page(client, "/m/tiny-llama/0/1.json")
        limited = page(client, "/m/tiny-llama/0/2", 429)
        assert limited.headers["retry-after"] == "60" and "Raw projection" in limited.text
        page(client, "/m/tiny-llama/0/1.json")  # asking again for the same neuron is free
    app.state.engine.dispose()


def test_on_postgresql_a_request_is_one_job_that_any_worker_takes(
    postgres_url, tiny_gguf, tmp_path, data_dir
):
    with_overview(postgres_url, tiny_gguf)
    app = create_app(postgres_url, on_demand=True)
    engine = app.state.engine
    with TestClient(app) as client:
        for _ in range(3):
            assert page(client, "/m/tiny-llama/1/9.json").json()["channels_state"]["state"] == "queued"
        with engine.connect() as connection:
            jobs = connection.exec_driver_sql(
                "SELECT task_name, queue_name, priority, status::text FROM procrastinate_jobs"
            ).all()
        assert [tuple(j) for j in jobs] == [("channelscope.neuron", "on-demand", 1000, "todo")]
        log = tmp_path / "worker.log"
        worker = spawn(postgres_url, tmp_path / "worker", log, "worker", "--model", tiny_gguf.parent)
        try:
            wait_for(
                lambda: page(client, "/m/tiny-llama/1/9.json").json()["data"], 240, "channels", worker, log
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        assert len(page(client, "/m/tiny-llama/1/9.json?side=in").json()["data"]["channels"]) == 5
    with db.session(engine) as session:
        assert session.scalar(select(func.count()).select_from(T.Neuron)) == 3
    app.state.engine.dispose()


def test_search_finds_exactly_the_vectors_whose_raw_projection_puts_the_token_far_out(
    database_url, tiny_folder
):
    with_overview(database_url, tiny_folder)
    model = load_model(tiny_folder)
    U = model.projection()
    scored = rotate.initial_token_weights(U, model.vocabulary.kinds, rotate.Settings()) == 1
    # The independent computation: every vector's z-scores, fp32, straight from the model file.
    zs = {
        (layer, side): rotate.z_scores(model.vectors(layer, side) @ U, scored)
        for layer in range(model.n_layers)
        for side in model.sides
    }
    counts = sum((z.abs() >= 4).sum(0) for z in zs.values())
    token = int(torch.argmax(torch.where(scored, counts, -1)))
    expected = sorted(
        (
            (-abs(float(z[n, token])), layer, side, n)
            for (layer, side), z in zs.items()
            for n in range(model.d_mlp)
            if abs(float(z[n, token])) >= 4.0
        )  # fmt: skip
    )
    assert len(expected) >= 2
    app = create_app(database_url)
    with TestClient(app) as client:
        text = model.vocabulary.tokens[token]
        data = page(client, "/search.json?" + urlencode({"token": text, "exact": 1, "limit": 200})).json()
        assert data["hits"] == [] and data["raw_note"] is None  # no channels anywhere, every raw projection
        found = [(h["layer"], h["side"], h["neuron"]) for h in data["raw_hits"]]
        # Exactly those vectors; strongest first up to float16 rounding of the stored vectors.
        assert set(found) == {(layer, side, n) for _, layer, side, n in expected}
        assert [abs(h["token"]["z"]) for h in data["raw_hits"]] == sorted(
            (abs(h["token"]["z"]) for h in data["raw_hits"]), reverse=True
        )
        for h in data["raw_hits"]:
            assert h["token"]["z"] == pytest.approx(
                float(zs[h["layer"], h["side"]][h["neuron"], token]), abs=2e-2
            )
        # One at a time, the pages follow each other with no hit twice or lost.
        seen, url = [], "/search.json?" + urlencode({"token": text, "exact": 1, "limit": 1})
        while url:
            part = page(client, url).json()
            seen += [(h["layer"], h["side"], h["neuron"]) for h in part["raw_hits"]]
            url = part["raw_next_url"] and part["raw_next_url"].replace("/search?", "/search.json?")
        assert seen == found
        html = page(client, "/search?" + urlencode({"token": text, "exact": 1})).text
        assert "Raw projections" in html and f"/m/tiny-llama/{found[0][0]}/{found[0][2]}" in html
    app.state.engine.dispose()


def test_the_default_slice_and_the_layer_and_model_pages_show_every_neuron(
    database_url, tiny_folder, run_cli
):
    with_overview(database_url, tiny_folder)
    args = ["decompose", tiny_folder, "--layers", "0-1", "--aligned", "2", "--random", "2", "--channels", "2"]
    assert run_cli(database_url, *args, "--reference-count", "4") == 0
    engine = db.make_engine(database_url)
    with db.session(engine) as session:
        shards = session.scalars(select(T.Shard).order_by(T.Shard.priority, T.Shard.id)).all()
    # Per layer side one shard of the 2 most aligned, one of 2 random others: aligned first.
    assert len(shards) == 12 and all(s.done_at is not None and s.size == 2 for s in shards)
    assert [s.priority < -20 for s in shards] == [True] * 6 + [False] * 6
    model = load_model(tiny_folder)
    for s in shards[:6]:
        kurtosis = rotate.excess_kurtosis(model.vectors(s.layer, s.side) @ model.projection())
        assert set(s.neurons) == set(torch.topk(kurtosis, 2).indices.tolist())
    app = create_app(database_url)
    with TestClient(app) as client:
        rows = page(client, "/m/tiny-llama/1.json?limit=500").json()["rows"]
        assert len(rows) == model.d_mlp and all(r["raw_tokens"] for r in rows)
        with_channels = {r["neuron"] for r in rows if r["has_channels"]}
        out = {n for s in shards if (s.layer, s.side) == (1, "out") for n in s.neurons}
        assert with_channels == out
        assert [r["has_channels"] for r in rows[:4]] == [True] * 4  # rows without a percentile go last
        by_kurtosis = page(client, "/m/tiny-llama/1.json?sort=kurtosis&limit=500").json()["rows"]
        values = [r["kurtosis"] for r in by_kurtosis]
        assert values == sorted(values, reverse=True)
        # Keyset pages over all neurons, rows with and without channels, none twice or lost.
        seen, url = [], "/m/tiny-llama/1.json?limit=50"
        while url:
            part = page(client, url).json()
            seen += [r["neuron"] for r in part["rows"]]
            url = part["next_url"] and part["next_url"].replace("/m/tiny-llama/1?", "/m/tiny-llama/1.json?")
        assert seen == [r["neuron"] for r in rows]
        cells = page(client, "/m/tiny-llama.json").json()["cells"]
        assert {(c["layer"], c["side"], c["vectors"], c["neurons"]) for c in cells} == {
            (layer, side, model.d_mlp, 4) for layer in (0, 1) for side in model.sides
        }
        landed = {
            client.get("/m/tiny-llama/random", follow_redirects=False).headers["location"] for _ in range(20)
        }
        assert len(landed) > 10  # uniform over every vector, not the next computed neuron
    app.state.engine.dispose()
    engine.dispose()


def test_a_pinned_neuron_page_served_as_immutable_never_changes_as_its_run_grows(
    sqlite_url, tiny_folder, run_cli
):
    with_overview(sqlite_url, tiny_folder)
    small = ["--channels", "2", "--reference-count", "4"]
    assert (
        run_cli(
            sqlite_url, "decompose", tiny_folder, "--layers", "1", "--sides", "out", "--aligned", "1", *small
        )
        == 0
    )
    engine = db.make_engine(sqlite_url)
    with db.session(engine) as session:
        (run,) = session.scalars(select(T.Run)).all()
        (shard,) = session.scalars(select(T.Shard)).all()
    url = f"/m/tiny-llama/1/{shard.neurons[0]}?run={run.hash}"

    def fetch(target: str, **headers):
        app = create_app(sqlite_url)  # a fresh process's view: nothing from an earlier cache
        with TestClient(app) as client:
            response = client.get(target, headers=headers)
        app.state.engine.dispose()
        return response

    first = fetch(url)
    assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert "http://evil.example/" in fetch(url, host="evil.example").text  # rendered for that host alone
    # The run grows: a neuron asked for on a page, and a wider slice of the same run.
    assert run_cli(sqlite_url, "decompose", tiny_folder, "--layers", "0-1", "--aligned", "3", *small) == 0
    with db.session(engine) as session:
        assert session.scalar(select(func.count()).select_from(T.Run)) == 1
        assert session.scalar(select(func.count()).select_from(T.Neuron)) > 1
    again = fetch(url)
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    # The pages that follow the run's growth are never cached for good.
    for changing in (f"/m/tiny-llama?run={run.hash}", f"/m/tiny-llama/1?run={run.hash}", "/"):
        assert fetch(changing).headers["cache-control"] == "no-cache", changing
    engine.dispose()
