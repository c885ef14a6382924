"""The database engine and sessions, for the worker and the web app alike."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, exc, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from channelscope.core.config import config

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
IDLE_PING_SECONDS = 5.0
POOL_TIMEOUT_SECONDS = 5.0  # waiting for a free connection of the pool
# libpq's own limits, unless the URL sets them: a server that does not accept a connection, a
# peer that is gone while a connection idles (keepalives: found in 10 + 3 x 5 s) and data that
# stays unacknowledged (a link cut while a query runs) each end in an error, not a wait.
POSTGRESQL_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms
}


def normalise_url(url: str) -> str:
    """postgresql:// means psycopg 3 here (the driver installed), not psycopg2."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str | None = None, answer_seconds: float | None = None) -> Engine:
    """The engine of a URL (the configured database by default). answer_seconds: on
    PostgreSQL, a statement that gets no answer at all for this long has its connection cut
    (see `_cut_when_silent`); the web app sets it, commands whose statements may write for
    minutes do not."""
    url = normalise_url(url or config().database)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the worker
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    given = make_url(url).query
    connect_args = {k: v for k, v in POSTGRESQL_CONNECT_ARGS.items() if k not in given}
    engine = create_engine(
        url, pool_size=10, max_overflow=20, pool_timeout=POOL_TIMEOUT_SECONDS, connect_args=connect_args
    )
    silent = _cut_when_silent(engine, answer_seconds) if answer_seconds else None
    _ping_when_idle(engine, silent)
    return engine


class _Waiting:
    """The PostgreSQL connections waiting for an answer, each with the moment it gives up."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.until: dict[int, tuple[float, object]] = {}  # id(who waits) -> (deadline, psycopg connection)
        self.lock = threading.Lock()

    def start(self, who: object, connection) -> None:
        with self.lock:
            self.until[id(who)] = (time.monotonic() + self.seconds, connection)

    def end(self, who: object) -> None:
        with self.lock:
            self.until.pop(id(who), None)

    def overdue(self) -> list:
        """The connections past their deadline, each given once."""
        now = time.monotonic()
        with self.lock:
            late = [key for key, (deadline, _) in self.until.items() if deadline < now]
            return [self.until.pop(key)[1] for key in late]


def _cut_when_silent(engine: Engine, seconds: float) -> _Waiting:
    """A server that answers late is stopped by its statement_timeout; one that does not answer
    at all (a hung server or proxy, a stalled link that TCP still acknowledges) would hold the
    statement, its thread and its request for as long as the stall lasts. A watcher shuts down
    the socket of any statement that has had no answer for `seconds`: the driver's blocking read
    returns at once with a disconnect, the pool drops the connection, the request gets its 503."""
    waiting = _Waiting(seconds)

    # Keyed by the SQLAlchemy connection: handle_error is given that, not the cursor.
    @event.listens_for(engine, "before_cursor_execute")
    def _started(connection, cursor, *_):
        waiting.start(connection, cursor.connection)

    @event.listens_for(engine, "after_cursor_execute")
    def _answered(connection, *_):
        waiting.end(connection)

    @event.listens_for(engine, "handle_error")
    def _failed(context):
        if context.connection is not None:
            waiting.end(context.connection)

    def watch(ref: weakref.ref) -> None:
        while (found := ref()) is not None:
            late = found.overdue()
            del found  # the watcher ends once the engine (and with it `waiting`) is gone
            for connection in late:
                _shut_down(connection)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, args=(weakref.ref(waiting),), name="silent statements")
    watcher.daemon = True
    watcher.start()
    return waiting


def _shut_down(connection) -> None:
    """Shut down a psycopg connection's socket from outside (a duplicate descriptor, so libpq's
    own stays valid until it closes it)."""
    # Closed meanwhile: nothing to cut.
    with contextlib.suppress(Exception), socket.socket(fileno=os.dup(connection.pgconn.socket)) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)


def _ping_when_idle(engine: Engine, silent: _Waiting | None = None) -> None:
    """Like pool_pre_ping, but only for a connection that sat in the pool for a while: a
    database restart or a dropped link is found before a request uses the connection, and a
    busy site does not pay a round trip per request for it. A connection that dies while in
    use makes SQLAlchemy drop the whole pool, so the next request gets fresh ones either way."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection, record, _proxy):
        if time.monotonic() - record.info.get("idle_since", time.monotonic()) < IDLE_PING_SECONDS:
            return
        if silent:
            silent.start(dbapi_connection, dbapi_connection)
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise exc.DisconnectionError() from error  # the pool discards it and connects again
        finally:
            if silent:
                silent.end(dbapi_connection)


@lru_cache
def engine() -> Engine:
    return make_engine()


def session(bind: Engine | None = None) -> Session:
    return sessionmaker(bind=bind or engine(), expire_on_commit=False)()


def alembic_config(url: str | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url or config().database).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def upgrade_locked(url: str, engine: Engine) -> None:
    """Migrate to head; two commands starting at once on a fresh database must not both
    create it, so the migration runs under a lock: an advisory lock on PostgreSQL, a lock on a
    file beside the database on SQLite."""
    if engine.dialect.name != "postgresql":
        with sqlite_lock(engine, "migrate"):
            upgrade(url)
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(7012004)"))
        try:
            upgrade(url)
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(7012004)"))
            connection.commit()


@contextlib.contextmanager
def sqlite_lock(engine: Engine, purpose: str) -> Iterator[None]:
    """An exclusive lock on `<database>-<purpose>.lock` for the duration, waited for. The
    operating system lets go of it when its process ends, however it ends, so there is nothing
    to clean up after a crash. An in-memory database belongs to one process: no lock needed."""
    path = engine.url.database
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}-{purpose}.lock", "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


_claims: dict[str, int] = {}  # lock file -> descriptor, open for as long as the process runs
_claims_lock = threading.Lock()


@contextlib.contextmanager
def sqlite_claim(engine: Engine, number: int, wait: bool) -> Iterator[bool]:
    """Byte `number` of `<database>-claims.lock`, locked for the duration if it can be, at once
    or (`wait`) once its holder lets go: yields whether it is held. These are POSIX record
    locks: the operating system drops them when their process ends, however it ends, so the
    claims of a process that died are free again at once, with no timeout to wait out. They
    belong to a process (two threads of one never exclude each other), and closing any
    descriptor of the file would drop them all, so each process keeps one open. Other
    databases need none: yields True."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        yield True
        return
    with _claims_lock:
        if path not in _claims:
            _claims[path] = os.open(f"{path}-claims.lock", os.O_RDWR | os.O_CREAT, 0o644)
        descriptor = _claims[path]
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, number)
        held = True
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        held = False
    try:
        yield held
    finally:
        if held:
            fcntl.lockf(descriptor, fcntl.LOCK_UN, 1, number)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(bind: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with bind.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()
