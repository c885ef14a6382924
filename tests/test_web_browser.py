"""The browser journeys, in headless Chromium (Debian's package, driven by Playwright):
home -> model -> layer -> neuron -> channel -> search -> back via a copied permalink, with
JavaScript and without it; and hostile token strings that never run (no dialog ever opens)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from channelscope.web.main import create_app
from tests.fixtures.browser import serving

pytestmark = [pytest.mark.browser, pytest.mark.parametrize("store", ["sqlite"], indirect=True)]


@pytest.fixture(scope="module")
def server(store):
    app = create_app(store.url)
    with serving(app) as base:
        yield base, store
    app.state.engine.dispose()


def _watch(page) -> dict:
    """Records every dialog (an alert from a token would be one) and every page error."""
    seen = {"dialogs": [], "errors": []}

    def on_dialog(dialog):
        seen["dialogs"].append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    return seen


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "no-js"])
def test_journey_home_model_layer_neuron_channel_search_and_back_by_permalink(server, browser, javascript):
    base, filled = server
    context = browser.new_context(java_script_enabled=javascript)
    if javascript:
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = context.new_page()
    seen = _watch(page)

    page.goto(base + "/")
    assert page.locator("h1").inner_text() == "Models"
    page.get_by_role("link", name=filled.model, exact=True).click()  # -> model
    assert page.locator("h1").inner_text() == filled.model
    assert page.locator("figure.plot > svg").count() == 2  # the layer x side heatmaps (legend swatches aside)
    page.get_by_role("link", name="layer 1 out", exact=True).click()  # -> layer
    assert page.locator("h1").inner_text() == "Layer 1"
    page.locator("table.neurons tbody tr td:first-child a").first.click()  # -> neuron
    assert page.locator("h1").inner_text().startswith("Layer 1, neuron ")
    neuron_heading = page.locator("h1").inner_text()
    assert page.locator("nav.tabs a.active").inner_text() == "out"
    assert page.locator("img[src*='histogram.svg']").evaluate("img => img.complete && img.naturalWidth > 0")

    if javascript:  # the copy button puts the permalink on the clipboard
        page.locator("button.copy").click()
        permalink = page.evaluate("navigator.clipboard.readText()")
        assert page.locator("button.copy").inner_text() == "copied"
    else:  # no button without JavaScript; the permalink field is there to select and copy
        assert page.locator("button.copy").is_hidden()
        permalink = page.locator("#permalink").input_value()
    assert permalink.startswith(base) and "run=" in permalink

    page.locator("table.channel-table tbody tr td:first-child a").first.click()  # -> channel
    assert page.locator("h1").inner_text().startswith("Channel 0")
    assert page.locator("ol.tokens li").count() == 100
    token = page.locator("ol.tokens li .chip").first.get_attribute("title")
    assert token.startswith("token ")

    search_box = page.locator("header form.quick-search input[name=token]")  # -> search
    search_box.fill("the")
    search_box.press("Enter")
    page.wait_for_url("**/search?token=the")
    assert page.locator("h1").inner_text() == "Search channels by token"
    assert "Matched" in page.locator("main").inner_text()
    if javascript:  # htmx autocomplete under the search box
        box = page.locator("form.search input[name=token]")
        box.fill("")
        box.press_sequentially("th", delay=50)
        page.wait_for_selector("#suggestions ul.suggestions li a", timeout=5000)

    page.goto(permalink)  # back, via the permalink copied on the neuron page
    assert page.locator("h1").inner_text() == neuron_heading
    assert page.locator("section.run").inner_text().startswith("Pinned to run")
    assert page.locator("nav.tabs a.active").inner_text() == "out"
    assert seen == {"dialogs": [], "errors": []}
    context.close()


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "no-js"])
def test_hostile_tokens_never_run_in_the_browser(server, browser, javascript):
    base, filled = server
    context = browser.new_context(java_script_enabled=javascript)
    page = context.new_page()
    seen = _watch(page)
    page.goto(f"{base}/m/{filled.model}/1/0?run={filled.run_a}")
    row = page.locator("table.channel-table tbody tr").first
    if row.locator("details.fold").count():  # folded (its percentile is below half): open it
        row.locator("details.fold summary").click(position={"x": 2, "y": 5})
    chips = row.locator(".chip")
    texts = [chips.nth(i).inner_text() for i in range(4)]
    # Shown as text, visibly: spaces as middle dots, invisible characters as escapes.
    assert texts == ["<script>alert(1)</script>", '"><img·src=x·onerror=alert(1)>', "\\u202e", "\\x00"]
    assert page.locator("main img[src='x']").count() == 0
    page.locator("table.channel-table tbody tr td:first-child a").first.click()
    page.goto(base + "/search?" + urlencode({"token": "<script>alert(1)</script>", "min_kurtosis": -100}))
    assert "<script>alert(1)</script>" in page.locator("main").inner_text()
    page.goto(base + "/m/" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert page.locator("h1").inner_text().startswith(("404", "422"))  # the %2F makes it a "layer"
    assert seen["dialogs"] == []
    context.close()


def test_folded_channels_open_with_one_click_without_javascript(server, browser):
    base, filled = server
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{base}/m/{filled.model}/0/2?run={filled.run_a}&min_kurtosis=1000")
    folded = page.locator("details.fold").first
    assert folded.locator(".chips").is_hidden()
    folded.locator("summary").click(position={"x": 2, "y": 5})  # the marker, not the link in it
    assert folded.locator(".chips").is_visible()
    context.close()


def test_the_address_bar_names_the_run_the_page_shows(server, browser):
    base, filled = server
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{base}/m/{filled.model}/1/0")
    assert "run=" in page.url
    page.reload()
    assert page.locator("section.run").inner_text().startswith("Pinned to run")
    context.close()
