"""Every neuron from the first minute, measured on SmolLM2 (issue 13):

    .venv/bin/python bench/coverage.py overview    # the whole model's raw projections, into a fresh SQLite
    .venv/bin/python bench/coverage.py on-demand   # first request to three sides' channels
    .venv/bin/python bench/coverage.py search      # raw search over every vector, 16 clients
        [--db /tmp/channelscope-coverage.db] [--out bench/results/coverage-*.json]

overview: `channelscope overview` (worker/overview.build) into a fresh SQLite file: seconds in
all and per layer side, and the bytes stored.
on-demand: the app as `channelscope serve` runs it (uvicorn, one process, on-demand on) over that
store; neuron pages of three neurons nobody computed, one after another: the seconds from the first
request to the page holding channels of all three sides. The first creates the model's default
run and computes its random-vector reference (once per run); the next two are what a visitor
waits for afterwards.
search: the same app with 16 clients on keep-alive connections, each sending its next request as
soon as the last is answered: /ping, then /search for tokens drawn uniformly from the scored
vocabulary (every search takes the exact product of a token's column of U with all 138,240
vectors), p50 and p99 and their ratio to /ping's p99 in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.web import _free_port, _phase  # noqa: E402
from channelscope.method.precision import cpu_model  # noqa: E402

DEFAULT_DB = Path("/tmp/channelscope-coverage.db")


def _machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def overview(db: Path) -> dict:
    import torch

    from channelscope.core import db as database
    from channelscope.method.weights import load_model
    from channelscope.worker import overview as build

    db.unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    database.upgrade(url)
    engine = database.make_engine(url)
    model = load_model("smollm2")
    times = []
    started = last = time.perf_counter()

    def on_part(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        times.append(now - last)
        last = now
        print(f"\r{done}/{total} layer sides, {now - started:.0f} s", end="", file=sys.stderr)

    build.build(engine, model, torch.device("cpu"), on_part)
    seconds = time.perf_counter() - started
    engine.dispose()
    print(file=sys.stderr)
    return {
        "seconds": round(seconds, 1),
        "layer_sides": len(times),
        "seconds_per_layer_side": {
            "min": round(min(times), 2),
            "median": round(sorted(times)[len(times) // 2], 2),
        },
        "bytes": db.stat().st_size,
    }


def _serve(db: Path, data: Path, on_demand: bool) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{db}",
        "CHANNELSCOPE_DATA_DIR": str(data),
        "CHANNELSCOPE_ON_DEMAND": "1" if on_demand else "0",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "channelscope.web.main:served_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
            return server, port
        except OSError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


def _json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as response:
        return json.loads(response.read())


def on_demand(db: Path, data: Path) -> dict:
    server, port = _serve(db, data, on_demand=True)
    model = _json(port, "/.json")["models"][0]["model"]["name"]
    waits = []
    try:
        for layer, neuron in [(25, 1000), (10, 500), (28, 1200)]:
            started = time.perf_counter()
            while True:
                sides = [
                    _json(port, f"/m/{model}/{layer}/{neuron}.json?side={side}")
                    for side in ("out", "in", "gate")
                ]
                if all(page["data"] for page in sides):
                    break
                time.sleep(0.5)
            waits.append(
                {"layer": layer, "neuron": neuron, "seconds": round(time.perf_counter() - started, 1)}
            )
            print(waits[-1], file=sys.stderr)
    finally:
        server.terminate()
        server.wait(10)
    return {"requests": waits, "note": "the first includes creating the default run and its reference"}


def search(db: Path, data: Path, clients: int, seconds: float) -> dict:
    import numpy as np

    from channelscope.method import rotate
    from channelscope.method.weights import load_model

    model = load_model("smollm2")
    U = model.projection()
    scored = (rotate.initial_token_weights(U, model.vocabulary.kinds, rotate.Settings()) == 1).numpy()
    rng = random.Random(0)
    candidates = [model.vocabulary.tokens[i] for i in np.nonzero(scored)[0]]
    terms = rng.sample(candidates, 200)
    server, port = _serve(db, data, on_demand=False)
    try:
        _json(port, "/search.json?" + urlencode({"token": terms[0], "exact": 1}))  # loads the vectors once
        paths = {
            "ping": lambda: "/ping",
            "search": lambda: "/search?" + urlencode({"token": rng.choice(terms)}),
        }

        async def measure() -> dict:
            return {name: await _phase(port, clients, seconds, 3.0, make) for name, make in paths.items()}

        results = asyncio.run(measure())
    finally:
        server.terminate()
        server.wait(10)
    results["search"]["ratio_p99_to_ping_p99"] = round(
        results["search"]["p99_ms"] / results["ping"]["p99_ms"], 2
    )
    return {"clients": clients, "seconds": seconds, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["overview", "on-demand", "search"])
    parser.add_argument("--db", type=Path, default=DEFAULT_DB)
    parser.add_argument("--data", type=Path, default=Path("/tmp/channelscope-coverage-data"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    before = _machine()
    if args.part == "overview":
        result = overview(args.db)
    elif args.part == "on-demand":
        result = on_demand(args.db, args.data)
    else:
        result = search(args.db, args.data, args.clients, args.seconds)
    report = {"part": args.part, "machine_before": before, "machine_after": _machine(), **result}
    out = args.out or ROOT / "bench" / "results" / f"coverage-{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
