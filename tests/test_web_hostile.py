"""Requests a hostile visitor sends, and what the app must not do with them: grow its page cache
without bound (junk query parameters, huge Host headers), let one visitor change the page that
everyone else is served (a forwarded scheme, a forged Host), or refuse HEAD where GET works."""

from __future__ import annotations

import html
import re
import socket
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from channelscope import cli
from channelscope.cli import serve
from channelscope.core import db
from channelscope.core import tables as T
from channelscope.core.config import config
from channelscope.method.weights import load_model
from channelscope.web.main import create_app
from channelscope.web.responses import IMMUTABLE
from channelscope.worker import overview
from tests.test_web import json_twin, pages_of


@pytest.fixture(scope="module")
def client(store):
    app = create_app(store.url)
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()


@pytest.fixture(scope="module")
def cached(tiny_folder, tmp_path_factory) -> SimpleNamespace:
    """A SQLite store with a page that goes into the page cache, absolute links and all: a
    neuron page pinned to its run, with the overview stored (tests/test_coverage.py)."""
    folder = tmp_path_factory.mktemp("hostile")
    url = f"sqlite:///{folder / 'store.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    overview.build(engine, load_model(tiny_folder), torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DATABASE_URL", url)
        env.setenv("CHANNELSCOPE_DATA_DIR", str(folder / "data"))
        config.cache_clear()
        args = ["decompose", tiny_folder, "--layers", "1", "--sides", "out", "--aligned", "1"]
        assert cli.main([*map(str, args), "--channels", "2", "--reference-count", "4"]) == 0
    config.cache_clear()
    torch.set_num_threads(threads)
    with db.session(engine) as session:
        (run,) = session.scalars(select(T.Run)).all()
        (shard,) = session.scalars(select(T.Shard)).all()
    engine.dispose()
    neuron = f"/m/tiny-llama/1/{shard.neurons[0]}"
    return SimpleNamespace(
        url=url,
        page=f"{neuron}?side=out&run={run.hash}",
        canonical=f"{neuron}?run={run.hash}",  # as the page names itself: its permalink
    )


@pytest.fixture(scope="module")
def cached_client(cached):
    app = create_app(cached.url)
    with TestClient(app) as c:
        assert c.get(cached.page).headers["cache-control"] == IMMUTABLE
        yield c
    app.state.engine.dispose()


@contextmanager
def counted_queries(app):
    seen: list[str] = []

    def listener(conn, cursor, statement, *args):
        seen.append(statement)

    event.listen(app.state.engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(app.state.engine, "before_cursor_execute", listener)


def og_url(page: str) -> str:
    return html.unescape(re.search(r'<meta property="og:url" content="([^"]*)"', page).group(1))


def permalink_box(page: str) -> str:
    box = re.search(r'id="permalink" class="permalink-url" readonly value="([^"]*)"', page)
    return html.unescape(box.group(1))


# --- HEAD -----------------------------------------------------------------------------------------


def test_head_answers_wherever_get_does_with_the_same_headers_and_no_body(client, store):
    cached = f"/m/{store.model}/0/4/histogram.svg?run={store.run_a}&side=in"  # the 2nd time: a hit
    paths = [*pages_of(store), *map(json_twin, pages_of(store)), cached, cached]
    paths += ["/healthz", "/ping", "/static/channelscope.css", "/docs", "/openapi.json"]
    for path in paths:
        got = client.get(path, follow_redirects=False)
        head = client.head(path, follow_redirects=False)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b"", path
        for name in ("content-type", "content-length", "etag", "cache-control"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)


# --- the page cache's size and keys ---------------------------------------------------------------


def test_the_page_cache_counts_its_keys_within_its_bytes(cached):
    budget = 1_000_000
    app = create_app(cached.url, page_cache_bytes=budget)
    with TestClient(app) as c:
        body = len(c.get(cached.page).content)
        for i in range(3 * budget // body):  # each Host a key of its own (the page's links use it)
            assert c.get(cached.page, headers={"host": f"h{i}." + "x" * 15_000}).status_code == 200
    entries = app.state.pages.entries
    held = sum(len(key) + len(body) for key, (body, *_) in entries.items())
    assert len(entries) >= 10 and held <= budget, (len(entries), held)
    app.state.engine.dispose()


def test_unknown_query_parameters_neither_break_a_shared_link_nor_fill_the_cache(cached, cached_client):
    page, client = cached.page, cached_client
    first = client.get(page + "&utm_source=newsletter")  # the first visitor's link decides the page
    assert first.status_code == 200
    entries = len(client.app.state.pages.entries)
    shared = [
        page,
        page + "&utm_source=other&fbclid=abc",
        page.replace("?side=out&run=", "?utm_medium=x&run=") + "&side=out",  # other order, same page
        *(page + f"&junk{i}=" + "j" * 60_000 for i in range(20)),
    ]
    with counted_queries(client.app) as queries:
        for url in shared:
            again = client.get(url)
            assert again.status_code == 200 and again.content == first.content
    assert queries == []  # every one served from the cache
    assert len(client.app.state.pages.entries) == entries
    assert og_url(first.text) == "http://testserver" + cached.canonical


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_oversized_headers_are_refused_with_431_before_the_app_reads_them(client, store):
    page = f"/m/{store.model}/0/3?side=in"
    with counted_queries(client.app) as queries:
        many = {f"x-{i}": "v" * 100 for i in range(200)}
        for headers in ({"host": "h" * 50_000}, {"x-junk": "j" * 20_000}, many):
            response = client.get(page, headers=headers)
            assert response.status_code == 431 and "Traceback" not in response.text
    assert queries == []
    assert client.get(page, headers={"x-fine": "v" * 2000}).status_code == 200


# --- forwarded headers and the public URL ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(monkeypatch, url: str, **environment: str):
    """The app as `channelscope serve` runs it (uvicorn with serve's options), in a thread."""
    monkeypatch.setenv("DATABASE_URL", url)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config.cache_clear()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(**serve.server_options("127.0.0.1", port, 1)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        config.cache_clear()


def test_a_forwarded_scheme_from_an_untrusted_address_cannot_poison_the_cached_page(cached, monkeypatch):
    with served(monkeypatch, cached.url) as base:
        poisoner = httpx.get(base + cached.page, headers={"x-forwarded-proto": "https"})
        visitor = httpx.get(base + cached.page)
    assert poisoner.status_code == visitor.status_code == 200
    assert visitor.headers["cache-control"] == IMMUTABLE
    for page in (poisoner.text, visitor.text):
        assert og_url(page) == base + cached.canonical
        assert permalink_box(page).startswith(base + "/")


def test_a_trusted_proxy_sets_the_scheme_and_each_scheme_is_cached_apart(cached, monkeypatch):
    with served(monkeypatch, cached.url, CHANNELSCOPE_TRUSTED_PROXIES="127.0.0.1") as base:
        secure = httpx.get(base + cached.page, headers={"x-forwarded-proto": "https"})
        plain = httpx.get(base + cached.page)
    assert og_url(secure.text) == base.replace("http:", "https:") + cached.canonical
    assert og_url(plain.text) == base + cached.canonical


def test_with_a_public_url_no_host_header_changes_a_page(cached, monkeypatch):
    monkeypatch.setenv("CHANNELSCOPE_PUBLIC_URL", "https://channels.example.org/")
    config.cache_clear()
    app = create_app(cached.url)
    try:
        with TestClient(app) as c:
            forged = c.get(cached.page, headers={"host": "evil.example"})
            honest = c.get(cached.page, headers={"host": "channels.example.org"})
    finally:
        config.cache_clear()
        app.state.engine.dispose()
    assert forged.content == honest.content
    assert og_url(honest.text) == "https://channels.example.org" + cached.canonical
    assert permalink_box(honest.text).startswith("https://channels.example.org/")
    assert "evil.example" not in forged.text
    assert len(app.state.pages.entries) == 1
