"""A database outage during requests: 503 pages, /healthz says so, and the app recovers by itself
once the database is back. The outage is real: the app talks to PostgreSQL through a TCP proxy
that the test closes (every open connection cut, new ones refused) and opens again."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
from fastapi.testclient import TestClient

from channelscope.core import db
from channelscope.web.main import create_app


class Proxy:
    """127.0.0.1:<port> -> target, until down(); up() listens on the same port again."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.port = 0
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would leave it accepting.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for s in self.connections:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.close()


# The outage is a PostgreSQL server going away; SQLite is a file inside this process.
@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_database_outage_gives_503_and_the_app_recovers(store):
    from sqlalchemy.engine import make_url

    url = make_url(db.normalise_url(store.url))
    proxy = Proxy((url.host, url.port or 5432))
    app = create_app(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    neuron = f"/m/{store.model}/1/1?side=in"
    pinned = f"/m/{store.model}/0/1?run={store.run_a}"
    with TestClient(app) as client:
        assert client.get(neuron).status_code == 200
        assert client.get(pinned).status_code == 200
        assert client.get("/healthz").json()["status"] == "ok"

        proxy.down()
        page = client.get(neuron)
        assert page.status_code == 503
        assert "database cannot be reached" in page.text and "Traceback" not in page.text
        assert page.headers["retry-after"] == "5"
        twin = client.get(neuron.replace("/1/1?", "/1/1.json?"))
        assert twin.status_code == 503 and twin.json()["status"] == 503
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["database"].startswith("unreachable")
        assert client.get("/search?token=the").status_code == 503
        assert client.get(pinned).status_code == 200  # an immutable page is still served from memory

        proxy.up()
        assert client.get(neuron).status_code == 200
        assert client.get("/healthz").json()["status"] == "ok"
    proxy.down()
    app.state.engine.dispose()


def test_healthz_reports_migrations_that_are_not_current(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0001")
    app = create_app(url)
    with TestClient(app) as client:
        health = client.get("/healthz")
        assert health.status_code == 503
        body = health.json()
        assert body["revision"] == "0001" and body["head"] != "0001"
        assert "run the migrations" in body["database"]
    app.state.engine.dispose()


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_a_connection_that_died_while_idle_is_replaced_at_checkout(store, monkeypatch):
    import psycopg
    from sqlalchemy import text

    engine = db.make_engine(store.url)
    with engine.connect() as connection:
        backend = connection.execute(text("SELECT pg_backend_pid()")).scalar()
    # Killed while it waits in the pool, as a database restart would.
    with psycopg.connect(store.url, autocommit=True) as killer:
        killer.execute("SELECT pg_terminate_backend(%s)", (backend,))
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)  # every pooled connection now counts as idle
    with engine.connect() as connection:
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar() != backend
    engine.dispose()
