"""The database engine and sessions, for the worker and the web app alike."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.orm import Session, sessionmaker

from channelscope.core.config import config

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
IDLE_PING_SECONDS = 5.0


def normalise_url(url: str) -> str:
    """postgresql:// means psycopg 3 here (the driver installed), not psycopg2."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str | None = None) -> Engine:
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
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
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
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise exc.DisconnectionError() from error  # the pool discards it and connects again


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
    create it, so on PostgreSQL the migration runs under an advisory lock."""
    if engine.dialect.name != "postgresql":
        upgrade(url)
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(7012004)"))
        try:
            upgrade(url)
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(7012004)"))
            connection.commit()


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
