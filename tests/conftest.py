"""Shared fixtures: tiny models built here, and fresh databases on SQLite and PostgreSQL.

PostgreSQL tests use the server at TEST_DATABASE_URL (default: the local one at 127.0.0.1:5432);
each test gets a database of its own, created from a migrated template and dropped afterwards.
Where the server cannot be reached the tests skip, except with CI=true, where they fail."""

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str):
    """Skip where a service is missing, but never silently in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a skipped test is a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny.write_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return tiny.write_gguf(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def _admin():
    import psycopg

    url = ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        unavailable(f"PostgreSQL at {ADMIN_URL} is not reachable: {str(error).splitlines()[0]}")


@pytest.fixture(scope="session")
def postgres_template():
    """A migrated database that per-test databases are copied from (CREATE DATABASE ... TEMPLATE)."""
    from channelscope.core import db

    name = f"cs_template_{uuid.uuid4().hex[:8]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db.upgrade(_with_database(ADMIN_URL, name))
    yield name
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_template):
    """A fresh, migrated PostgreSQL database for one test."""
    name = f"cs_test_{uuid.uuid4().hex[:8]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"')
    yield _with_database(ADMIN_URL, name)
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_postgres_url():
    """A fresh PostgreSQL database with no schema at all (for migration tests)."""
    name = f"cs_empty_{uuid.uuid4().hex[:8]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield _with_database(ADMIN_URL, name)
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path):
    from channelscope.core import db

    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    """Each test that takes this runs twice: on a fresh SQLite file and a fresh PostgreSQL database."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
