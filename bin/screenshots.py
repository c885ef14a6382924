"""README's screenshots of a neuron page, at desktop and phone width, regenerated from the
database the site reads (DATABASE_URL, else data/channelscope.db): the app is served on loopback
in this process and Debian's Chromium (the browser tests' one) draws the page through Playwright.

    .venv/bin/python bin/screenshots.py [PATH] [--out docs/screenshots]

PATH is a page such as /m/smollm2-135m-instruct/25/15?run=...; without it, the neuron of the
newest run whose best channel has the highest faithfulness percentile, pinned to that run."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from channelscope.web.main import create_app

CHROMIUM = "/usr/bin/chromium"
SIZES = {"desktop": (1280, 900), "phone": (390, 844)}  # CSS pixels; the phone at 2x device pixels


@contextlib.contextmanager
def serving(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _json(base: str, path: str) -> dict:
    path, _, query = path.partition("?")
    with urllib.request.urlopen(f"{base}{path}.json" + (f"?{query}" if query else "")) as response:
        return json.load(response)


def best_neuron(base: str) -> str:
    """The newest run's layer side with the most channels above the cut-off, then its neuron
    with the best faithfulness percentile, pinned to the run."""
    home = _json(base, "/")
    model = next(m for m in home["models"] if m["runs"])
    run = model["runs"][0]["hash"]
    page = _json(base, f"{model['model']['url']}?run={run}")
    cells = [c for c in page["cells"] if c["neurons"]]
    cell = max(cells, key=lambda c: (c["best_percentile"] or 0, c["mean_channels"] or 0))
    rows = [r for r in _json(base, cell["url"])["rows"] if r["has_channels"]]
    return rows[0]["url"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="the page to draw (default: the best neuron)")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    app = create_app()
    with serving(app) as base, sync_playwright() as p:
        path = args.path or best_neuron(base)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        for name, (width, height) in SIZES.items():
            context = browser.new_context(
                viewport={"width": width, "height": height}, device_scale_factor=2 if name == "phone" else 1
            )
            page = context.new_page()
            page.goto(base + path)
            page.wait_for_load_state("networkidle")
            target = args.out / f"neuron-{name}.png"
            page.screenshot(path=str(target), full_page=False)
            print(f"{target}  ({width} px wide: {path})")
            context.close()
        browser.close()
    app.state.engine.dispose()


if __name__ == "__main__":
    main()
