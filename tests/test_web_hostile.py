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

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import event

from channelscope.cli import serve
from channelscope.core.config import config
from channelscope.web.main import create_app
from tests.test_web import json_twin, pages_of


@pytest.fixture(scope="module")
def client(store):
    app = create_app(store.url)
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()


def pinned(store) -> str:
    """A page of the complete run A: immutable, so it goes into the page cache."""
    return f"/m/{store.model}/0/3?side=in&run={store.run_a}"


def canonical(store) -> str:
    """pinned(store) as the page names itself: its parameters sorted."""
    return f"/m/{store.model}/0/3?run={store.run_a}&side=in"


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
    paths = [*pages_of(store), *map(json_twin, pages_of(store)), pinned(store)]
    paths += ["/healthz", "/ping", "/static/channelscope.css", "/docs", "/openapi.json"]
    for path in paths:
        got = client.get(path, follow_redirects=False)
        head = client.head(path, follow_redirects=False)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b"", path
        for name in ("content-type", "content-length", "etag", "cache-control"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)


# --- the page cache's size and keys ---------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_the_page_cache_counts_its_keys_within_its_bytes(store):
    budget = 1_000_000
    app = create_app(store.url, page_cache_bytes=budget)
    with TestClient(app) as c:
        body = len(c.get(pinned(store)).content)
        for i in range(3 * budget // body):  # each Host a key of its own (the page's links use it)
            assert c.get(pinned(store), headers={"host": f"h{i}." + "x" * 15_000}).status_code == 200
    entries = app.state.pages.entries
    held = sum(len(key) + len(body) for key, (body, *_) in entries.items())
    assert len(entries) >= 10 and held <= budget, (len(entries), held)
    app.state.engine.dispose()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_unknown_query_parameters_neither_break_a_shared_link_nor_fill_the_cache(client, store):
    page = pinned(store)
    first = client.get(page + "&utm_source=newsletter")  # the first visitor's link decides the page
    assert first.status_code == 200
    entries = len(client.app.state.pages.entries)
    shared = [
        page,
        page + "&utm_source=other&fbclid=abc",
        page.replace("?side=in&run=", "?utm_medium=x&run=") + "&side=in",  # other order, same page
        *(page + f"&junk{i}=" + "j" * 60_000 for i in range(20)),
    ]
    with counted_queries(client.app) as queries:
        for url in shared:
            again = client.get(url)
            assert again.status_code == 200 and again.content == first.content
    assert queries == []  # every one served from the cache
    assert len(client.app.state.pages.entries) == entries
    assert og_url(first.text) == "http://testserver" + canonical(store)


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_oversized_headers_are_refused_with_431_before_the_app_reads_them(client, store):
    with counted_queries(client.app) as queries:
        many = {f"x-{i}": "v" * 100 for i in range(200)}
        oversized = [{"host": "h" * 50_000}, {"x-junk": "j" * 20_000}, many]
        for headers in oversized:
            response = client.get(f"/m/{store.model}/0/3?side=in", headers=headers)
            assert response.status_code == 431 and "Traceback" not in response.text
    assert queries == []
    assert client.get(f"/m/{store.model}/0/3?side=in", headers={"x-fine": "v" * 2000}).status_code == 200


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


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_forwarded_scheme_from_an_untrusted_address_cannot_poison_the_cached_page(store, monkeypatch):
    with served(monkeypatch, store.url) as base:
        poisoner = httpx.get(base + pinned(store), headers={"x-forwarded-proto": "https"})
        visitor = httpx.get(base + pinned(store))
    assert poisoner.status_code == visitor.status_code == 200
    for page in (poisoner.text, visitor.text):
        assert og_url(page) == base + canonical(store)
        assert permalink_box(page).startswith(base + "/")


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_trusted_proxy_sets_the_scheme_and_each_scheme_is_cached_apart(store, monkeypatch):
    with served(monkeypatch, store.url, CHANNELSCOPE_TRUSTED_PROXIES="127.0.0.1") as base:
        secure = httpx.get(base + pinned(store), headers={"x-forwarded-proto": "https"})
        plain = httpx.get(base + pinned(store))
    assert og_url(secure.text) == base.replace("http:", "https:") + canonical(store)
    assert og_url(plain.text) == base + canonical(store)


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_with_a_public_url_no_host_header_changes_a_page(store, monkeypatch):
    monkeypatch.setenv("CHANNELSCOPE_PUBLIC_URL", "https://channels.example.org/")
    config.cache_clear()
    app = create_app(store.url)
    try:
        with TestClient(app) as c:
            forged = c.get(pinned(store), headers={"host": "evil.example"})
            honest = c.get(pinned(store), headers={"host": "channels.example.org"})
    finally:
        config.cache_clear()
        app.state.engine.dispose()
    assert forged.content == honest.content
    assert og_url(honest.text) == "https://channels.example.org" + canonical(store)
    assert permalink_box(honest.text).startswith("https://channels.example.org/")
    assert "evil.example" not in forged.text
    assert len(app.state.pages.entries) == 1
