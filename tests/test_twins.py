"""Every page's JSON twin carries everything the HTML shows: each number in the page's text and
each link into the site can be found in (or counted from) the twin. Charts are drawn from the
twin's numbers and are left out; so is text written in the templates themselves."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from channelscope.web.main import create_app
from tests.test_web import json_twin, pages_of

pytestmark = pytest.mark.parametrize("store", ["sqlite"], indirect=True)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:\.\d+)?%?(?![\w])")
HREF = re.compile(r'href="(/[^"]*)"')


@pytest.fixture(scope="module")
def client(store):
    app = create_app(store.url)
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()


def shown_text(page: str) -> str:
    """What a reader sees: no charts (drawn from the twin's numbers), scripts, styles or head."""
    page = re.sub(r"(?s)<svg.*?</svg>|<script.*?</script>|<style.*?</style>|<head>.*?</head>", " ", page)
    return html.unescape(re.sub(r"(?s)<[^>]+>", " ", page))


def contents(obj, numbers: set, strings: set) -> None:
    """Every number, list length and string of a JSON value."""
    if isinstance(obj, str):
        strings.add(obj)
        numbers.update(float(x) for x in re.findall(r"\d+(?:\.\d+)?", obj))
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, int | float):
        numbers.add(float(obj))
    elif isinstance(obj, dict):
        for value in obj.values():
            contents(value, numbers, strings)
    else:
        numbers.add(float(len(obj)))
        for value in obj:
            contents(value, numbers, strings)


def template_text() -> str:
    return "".join(path.read_text() for path in TEMPLATES.glob("*.html"))


def explained(shown: str, numbers: set) -> bool:
    """A shown number is explained by a twin's number at the precision shown (percent too)."""
    percent = shown.endswith("%")
    text = shown.rstrip("%").replace("−", "-")
    value = float(text)
    half = 0.5 * 10 ** -(len(text.split(".")[1]) if "." in text else 0) + 1e-9
    return any(abs(value - x) <= half or (percent and abs(value - 100 * x) <= half) for x in numbers)


def test_every_number_and_link_of_a_page_is_in_its_json_twin(client, store):
    literal = template_text()
    ablation = f"/m/{store.model}/1/0/ablate?run={store.run_a}&side=out&channels=0"
    for url in [*pages_of(store), ablation]:
        page = client.get(url)
        twin = client.get(json_twin(url))
        assert page.status_code == twin.status_code == 200, url
        numbers: set[float] = set()
        strings: set[str] = set()
        contents(twin.json(), numbers, strings)
        unexplained = [
            n for n in NUMBER.findall(shown_text(page.text)) if not explained(n, numbers) and n not in literal
        ]
        assert not unexplained, (url, unexplained)
        for href in {html.unescape(h) for h in HREF.findall(page.text)}:
            path = href.partition("?")[0]
            token_search = path == "/search" and "exact=1" in href
            own_twin = href == json_twin(url)
            asset = path.startswith("/static/")  # the stylesheet, versioned by the markup hash
            assert href in strings or own_twin or token_search or asset or f'href="{href}"' in literal, (
                url,
                href,
            )
