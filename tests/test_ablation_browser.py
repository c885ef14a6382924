"""The ablation controls in a real browser (Debian's Chromium through Playwright): on the neuron
page, switching a channel off shows its result in place (htmx), and with JavaScript off the same
form submits to the ablation page, whose result changes with the toggles."""

import pytest

from channelscope.core import db
from tests.fixtures.ablation_store import LAYER, fill_store, make_app
from tests.fixtures.browser import serving

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gguf):
    folder = tmp_path_factory.mktemp("ablation-browser")
    url = f"sqlite:///{folder / 'store.db'}"
    db.upgrade(url)
    run = fill_store(url, tiny_gguf, folder)
    app = make_app(url, [tiny_gguf.parent])
    app.state.data_dir = folder  # where fill_store's activation pass left its per-token sums
    with serving(app) as base:
        yield base, run
    app.state.engine.dispose()


def check(page, channel: int) -> None:
    """Tick a channel's toggle, opening the folded generic / below-cut-off list if it is there."""
    box = page.locator(f"form.ablation-form input[name=channels][value='{channel}']")
    if not box.is_visible():
        page.locator("form.ablation-form details summary").first.click()
    box.check()


def _selectivity(page) -> str:
    return page.locator("#ablation-result .selectivity").first.inner_text()


def test_with_javascript_a_toggle_updates_the_result_in_place(server, browser):
    base, run = server
    page = browser.new_page()
    page.goto(f"{base}/m/tiny-llama/{LAYER}/0?run={run}")
    form = page.locator("form.ablation-form")
    assert form.count() == 1
    assert page.locator("#ablation-result .selectivity").count() == 0  # nothing ablated yet
    check(page, 0)
    page.wait_for_selector("#ablation-result .selectivity", timeout=30_000)
    assert "/ablate?" in page.url and "channels=0" in page.url  # the permalink was pushed
    assert page.locator("h1").inner_text().startswith(f"Layer {LAYER}, neuron 0")  # still the neuron page
    first = _selectivity(page)
    assert "S at weight level" in first and "random-direction baseline" in first
    assert page.locator("#ablation-result .strip .tok").count() > 5  # the real model ran on the prompt

    check(page, 1)
    page.wait_for_function(
        "() => document.querySelector('#ablation-result .applied')?.innerText.includes('channel 1')",
        timeout=30_000,
    )
    assert "channels=0" in page.url and "channels=1" in page.url
    page.close()


def test_ticking_several_toggles_in_a_row_asks_once_and_says_what_a_first_run_waits_for(server, browser):
    base, run = server
    page = browser.new_page()
    asked = []
    page.on("request", lambda r: asked.append(r.url) if "/ablate" in r.url else None)
    page.goto(f"{base}/m/tiny-llama/{LAYER}/0?run={run}")
    assert "loads the model" in page.locator("#ablation-busy").inner_text()
    boxes = page.locator("form.ablation-form input[name=channels]")
    if not boxes.nth(2).is_visible():  # the third may be folded (generic or below the cut-off)
        page.locator("form.ablation-form details summary").first.click()
    for i in range(3):
        boxes.nth(i).check()
    page.wait_for_selector("#ablation-result .selectivity", timeout=30_000)
    assert len(asked) == 1, asked  # debounced: one preview after the last tick, not three
    page.close()


def test_without_javascript_the_form_submits_to_the_ablation_page(server, browser):
    base, run = server
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{base}/m/tiny-llama/{LAYER}/0?run={run}")
    check(page, 0)
    page.locator("form.ablation-form button[type=submit]").click()
    page.wait_for_url("**/ablate?**")
    assert "ablation" in page.locator("h1").inner_text()
    applied = page.locator("#ablation-result .applied").inner_text()
    assert "channel 0" in applied and "channel 2" not in applied
    assert page.locator("#ablation-result .strip .tok").count() > 5

    check(page, 2)
    page.locator("form.ablation-form button[type=submit]").click()
    page.wait_for_function("() => location.search.includes('channels=2')")
    applied = page.locator("#ablation-result .applied").inner_text()
    assert "channel 0" in applied and "channel 2" in applied
    context.close()


def test_the_pinned_neuron_page_pulls_in_its_channels_test_on_text(server, browser):
    """A pinned page is cached for good, so the test at every position (which a later pass may
    change) is fetched from the revalidated text page into it, not rendered into it."""
    base, run = server
    page = browser.new_page()
    served = page.goto(f"{base}/m/tiny-llama/{LAYER}/0?run={run}")
    assert "random sets (median)" not in served.text()  # not in the page's own bytes: fetched into it
    page.locator(".on-text").scroll_into_view_if_needed()
    page.wait_for_selector(".on-text #every-position, .on-text h2", timeout=30_000)
    rows = page.locator(".on-text tbody tr")
    assert rows.count() == 3 * 3  # three sides x three channels
    assert "5 % of channels pass by chance" in page.locator(".on-text").inner_text()
    page.close()
