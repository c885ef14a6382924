"""Channels on demand in a real browser (Debian's Chromium through Playwright): a neuron no run
has computed opens at once with its raw projection, and its channels fill in by themselves,
with JavaScript (htmx polls the page) and without it (a refresh the page asks for)."""

import pytest
import torch

from channelscope.core import db
from channelscope.core.config import config
from channelscope.method.weights import load_model
from channelscope.web.main import create_app
from channelscope.worker import overview
from tests.fixtures.browser import serving

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gguf):
    folder = tmp_path_factory.mktemp("on-demand-browser")
    url = f"sqlite:///{folder / 'store.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    overview.build(engine, load_model(tiny_gguf), torch.device("cpu"))
    engine.dispose()
    mp = pytest.MonkeyPatch()
    mp.setenv("CHANNELSCOPE_DATA_DIR", str(folder / "data"))
    config.cache_clear()
    app = create_app(url, on_demand=True)
    with serving(app) as base:
        yield base
    app.state.engine.dispose()
    mp.undo()
    config.cache_clear()


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "no-js"])
def test_a_neuron_without_channels_opens_at_once_and_fills_in_by_itself(server, browser, javascript):
    context = browser.new_context(java_script_enabled=javascript)
    page = context.new_page()
    neuron = 11 if javascript else 12
    page.goto(f"{server}/m/tiny-llama/1/{neuron}")
    assert "Raw projection" in page.content()
    assert page.locator(".channels-state").count() == 1  # no channels yet: where they stand
    # Filled in without anyone clicking: the channels table appears in the same tab.
    page.locator("table.channel-table").wait_for(timeout=180_000)
    assert page.locator("table.channel-table tbody tr").count() == 5
    assert page.url.endswith(f"/m/tiny-llama/1/{neuron}")
    context.close()
