"""The fixtures live in tests/fixtures/ and are loaded as plugins; this file also sorts the tests
by what they need, so `bin/test --fast` can leave out the slow kinds:

    postgres   needs the PostgreSQL server (a fixture of it, or a "postgresql" parameter)
    browser    drives headless Chromium
    fuzz       schemathesis against the OpenAPI schema
"""

import pytest

pytest_plugins = [
    "tests.fixtures.databases",
    "tests.fixtures.web_store",
    "tests.fixtures.browser",
    "tests.fixtures.cli",
]

POSTGRES_FIXTURES = {"postgres_url", "empty_postgres_url", "postgres_template"}


def pytest_configure(config):
    for name, meaning in [
        ("postgres", "needs the PostgreSQL server"),
        ("browser", "drives headless Chromium"),
        ("fuzz", "fuzzes the API from its OpenAPI schema"),
    ]:
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(item, "callspec", None)
        on_postgres = params is not None and "postgresql" in params.params.values()
        if on_postgres or POSTGRES_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.postgres)
