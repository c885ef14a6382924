"""bin/screenshots.py, README's screenshots of a neuron page, on the test store. A module of its
own: it starts Playwright itself, which cannot run beside another module's browser fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.browser import CHROMIUM
from tests.fixtures.databases import unavailable

pytestmark = [pytest.mark.browser, pytest.mark.parametrize("store", ["sqlite"], indirect=True)]


def test_the_screenshot_command_draws_the_best_neuron_at_desktop_and_phone_width(
    store, tmp_path, monkeypatch
):
    if not os.path.exists(CHROMIUM):
        unavailable(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    import runpy
    import sys

    from channelscope.core.config import config

    monkeypatch.setenv("DATABASE_URL", store.url)
    monkeypatch.setattr(sys, "argv", ["screenshots.py", "--out", str(tmp_path)])
    config.cache_clear()
    try:
        script = runpy.run_path(str(Path(__file__).parents[1] / "bin" / "screenshots.py"))
        script["main"]()
    finally:
        config.cache_clear()
    for name, width in (("desktop", 1280), ("phone", 390 * 2)):
        png = (tmp_path / f"neuron-{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == width
