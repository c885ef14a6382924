"""The web app under load, on a synthetic store of more than a million channels on PostgreSQL.

    .venv/bin/python bench/web.py build   # once: ~1.1 M channels, ~22 M token-index rows (minutes)
    .venv/bin/python bench/web.py run     # the measurement, a few minutes
    .venv/bin/python bench/web.py split   # where a page's time goes: build and render, in-process
    .venv/bin/python bench/web.py stall   # /ping, a static file and cached pages while the database hangs
        [--url postgresql://postgres@127.0.0.1:5432/channelscope_bench] [--clients 16]
        [--seconds 20] [--out bench/results/web.json]

build: SmolLM2's real vocabulary and U (so search and pages see real tokens), and one complete run
of synthetic rows shaped like the worker's: every neuron of the model (30 layers x 3 sides x
1,536) with 8 channels each = 1,105,920 channels and 20 top tokens per channel in the token
index. Rows are random, not the solver's; token ids are drawn with a heavy head (a few tokens sit
in the top lists of ~10^5 channels, as the generic fragments do) so search meets both popular and
rare tokens. Rows go in with binary COPY built from numpy arrays, indexes afterwards. The model's
overview (`channelscope overview`) too: without it a pinned neuron page is not immutable, and
`pinned` would measure an uncached page.

run: the app (`uvicorn channelscope.web.main:create_app --factory`, one process) on loopback, and 16 clients
with keep-alive connections, each sending its next request as soon as the last one is answered,
for `--seconds` per endpoint after a warm-up:
  trivial    /ping (no database)
  pinned     a neuron page with ?run= of the complete run: one of 200 shared permalinks, each
             requested once before timing, so served from the page cache as a shared link is
  unpinned   a neuron page without ?run=, a random neuron each time (so nothing is cached)
  search     /search?token=..., tokens drawn the way they occur in the index (popular ones often)
Latencies are per request, from sending to the last byte. Goals, as ratios to the trivial
endpoint's p99 in the same run: pinned <= 2, unpinned <= 15, search <= 5.

stall: the same server, talking to PostgreSQL through a TCP proxy in this process
(tests/fixtures/proxy.py). Each of /ping, /static/channelscope.css and a pinned page (cached) is
measured as above, first normally, then with the proxy paused (connections stay open, nothing is
forwarded: a hung server) while as many other clients ask for unpinned neuron pages, which wait
on the database until their own timeouts end them. Goal: each endpoint's p99 during the stall at
most 3x its normal p99, and under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/channelscope_bench"
LAYERS, NEURONS, SIDES, D_MODEL = 30, 1536, ("gate", "in", "out"), 576
CHANNELS, TOP_K, SHARD = 8, 20, 256
HISTORY, MASKED = 40, 12  # kurtosis values recorded per channel, tokens claimed per channel
GOALS = {"pinned": 2.0, "unpinned": 15.0, "search": 5.0}
RESULTS = ROOT / "bench" / "results"


# --- build -------------------------------------------------------------------------------------------

PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
PGCOPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def binary_rows(fields: list[tuple[str, str]], values: dict[str, np.ndarray], n: int) -> bytes:
    """Rows in PostgreSQL's binary COPY format, built as one numpy record array: every field here
    is fixed-width, so each row is (field count, then length and big-endian value per field)."""
    layout = [("count", ">i2")]
    for name, kind in fields:
        layout += [(f"length_{name}", ">i4"), (name, kind)]
    rows = np.empty(n, dtype=np.dtype(layout))
    rows["count"] = len(fields)
    for name, kind in fields:
        rows[f"length_{name}"] = np.dtype(kind).itemsize
        rows[name] = values[name]
    return rows.tobytes()


def token_sampler(rng: np.random.Generator, vocab: int, scored: np.ndarray):
    """Token ids with a heavy head: rank r of a fixed random order is drawn with density ~ r^-2/3
    (the ten most popular tokens make ~6% of all top-list entries)."""
    order = rng.permutation(np.flatnonzero(scored))

    def draw(shape) -> np.ndarray:
        u = rng.random(shape)
        return order[np.minimum((u**3 * len(order)).astype(np.int64), len(order) - 1)]

    return draw


def _pairs(ids, zs) -> str:
    """A neuron's top or bottom tokens as the worker stores them: [[id, z], ...]."""
    return json.dumps([[int(t), round(float(z), 4)] for t, z in zip(ids, zs, strict=True)])


def _secondary_ddl(cursor, tables: list[str]) -> tuple[list[str], list[str]]:
    """The DROP and CREATE statements of these tables' indexes and constraints (bar the primary
    keys' own tables' NOT NULLs), so the bulk load runs without them."""
    drops, creates = [], []
    for table in tables:
        cursor.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = %s::regclass AND contype IN ('f', 'p') ORDER BY contype DESC",
            (table,),
        )
        for name, definition in cursor.fetchall():
            drops.append(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"')
            creates.insert(0, f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}')
        cursor.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass)",
            (table, table),
        )
        for name, definition in cursor.fetchall():
            drops.append(f'DROP INDEX "{name}"')
            creates.append(definition)
    # Primary keys first, then indexes, then foreign keys (they need the referenced keys).
    creates.sort(key=lambda s: 0 if "PRIMARY KEY" in s else 2 if "FOREIGN KEY" in s else 1)
    return drops, creates


def build(url: str, channels: int, seed: int) -> None:
    import psycopg
    import torch
    from sqlalchemy import select

    from channelscope.core import db
    from channelscope.core import tables as T
    from channelscope.method import rotate
    from channelscope.method.weights import load_model
    from channelscope.worker import overview, store

    admin = url.rsplit("/", 1)[0] + "/postgres"
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    db.upgrade(url)
    started = time.perf_counter()
    model = load_model("smollm2")
    rng = np.random.default_rng(seed)
    engine = db.make_engine(url)
    with db.session(engine) as session:
        model_row = store.ensure_model(session, model)
        settings = store.run_settings(
            rotate.with_overrides(rotate.Settings(), channels=channels), "unembedding", 0
        )
        settings["synthetic"] = "bench/web.py: random rows shaped like the worker's, not the solver's"
        run = store.ensure_run(session, model_row, settings, seed)
        session.add_all(
            T.Shard(
                run_id=run.id,
                layer=layer,
                side=side,
                neuron_start=start,
                neuron_stop=start + SHARD,
                size=SHARD,
                done_at=T.now(),
                seconds=0.0,
                worker="bench/web.py",
            )  # fmt: skip
            for layer in range(LAYERS)
            for side in SIDES
            for start in range(0, NEURONS, SHARD)
        )
        session.commit()
        run_id, vocab = run.id, model_row.vocab_size
        shard_ids = {
            (r.layer, r.side, r.neuron_start): r.id
            for r in session.execute(select(T.Shard).where(T.Shard.run_id == run_id)).scalars()
        }
    overview.build(engine, model, torch.device("cpu"))
    engine.dispose()
    scored = np.array([k == "normal" for k in model.vocabulary.kinds])
    draw = token_sampler(rng, vocab, scored)
    print(f"model and run stored ({time.perf_counter() - started:.0f} s)", flush=True)

    psql = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(psql) as connection, connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
        cursor.execute("SET maintenance_work_mem = '1GB'")
        drops, creates = _secondary_ddl(cursor, ["channel_neighbours", "channel_tokens", "channels"])
        for statement in drops:
            cursor.execute(statement)

        # neurons: 138,240 rows with JSON columns, through psycopg's own COPY rows.
        columns = (
            "run_id", "shard_id", "layer", "side", "neuron", "vector", "norm", "kurtosis", "skew",
            "top_tokens", "bottom_tokens", "reconstruction", "reconstruction_baseline", "coverage",
            "best_percentile", "best_kurtosis", "channel_count", "generic_count",
        )  # fmt: skip
        quoted = ", ".join(f'"{c}"' for c in columns)
        with cursor.copy(f"COPY neurons ({quoted}) FROM STDIN") as copy:
            for layer in range(LAYERS):
                for side in SIDES:
                    for neuron in range(NEURONS):
                        vector = rng.standard_normal(D_MODEL).astype("<f4") * 0.05
                        top = np.sort(rng.uniform(3, 14, TOP_K))[::-1]
                        recon = np.sort(rng.uniform(0.5, 0.99, channels))
                        copy.write_row((
                            run_id, shard_ids[(layer, side, neuron - neuron % SHARD)], layer, side, neuron,
                            vector.tobytes(), float(np.linalg.norm(vector)), float(rng.lognormal(1, 1)),
                            float(rng.normal()),
                            _pairs(draw(TOP_K), top),
                            _pairs(draw(TOP_K), -top),
                            json.dumps([round(float(x), 6) for x in recon]),
                            json.dumps([round(float(x), 6) for x in recon * 0.98]),
                            json.dumps([round(float(x), 6) for x in recon * 0.5]),
                            float(rng.uniform(0, 100)), float(rng.uniform(3, 60)),
                            int(rng.integers(0, channels + 1)), int(rng.integers(0, 3)),
                        ))  # fmt: skip
        connection.commit()
        cursor.execute(
            "SELECT id, layer, side, neuron FROM neurons WHERE run_id = %s ORDER BY layer, side, neuron",
            (run_id,),
        )
        ids = cursor.fetchall()
        print(f"{len(ids):,} neurons ({time.perf_counter() - started:.0f} s)", flush=True)

        # channels and the token index, in blocks of one layer side, as numpy-built binary COPY.
        channel_fields = [
            ("neuron_id", ">i4"), ("channel", ">i2"), ("vector", f"({D_MODEL * 2},)u1"), ("kurtosis", ">f8"),
            ("skew", ">f8"), ("cos", ">f8"), ("loss", ">f8"), ("masked", f"({MASKED * 4},)u1"),
            ("step", ">i4"), ("history", f"({HISTORY * 4},)u1"), ("alpha", ">f8"), ("faithfulness", ">f8"),
            ("faithfulness_percentile", ">f8"), ("generic", "?"),
        ]  # fmt: skip
        channel_columns = ", ".join(f'"{n}"' for n, _ in channel_fields)
        total_channels = 0
        for block in range(0, len(ids), NEURONS):
            rows = ids[block : block + NEURONS]
            side = rows[0][2]
            n = len(rows) * channels
            neuron_ids = np.repeat(np.array([r[0] for r in rows], dtype=np.int64), channels)
            index = np.tile(np.arange(channels), len(rows))
            kurtosis = np.sort(rng.lognormal(2.2, 0.8, (len(rows), channels)), axis=1)[:, ::-1].reshape(-1)
            percentile = np.round(rng.uniform(0, 100, n) * 2) / 2  # ties, as real percentiles have
            generic = rng.random(n) < 0.1
            history = np.sort(rng.uniform(0, 30, (n, HISTORY)), axis=1)  # kurtosis rising as it converges
            values = {
                "neuron_id": neuron_ids,
                "channel": index,
                "vector": rng.standard_normal((n, D_MODEL)).astype("<f2").view(np.uint8).reshape(n, -1),
                "kurtosis": kurtosis,
                "skew": rng.uniform(0.5, 8, n),
                "cos": rng.uniform(0.5, 0.95, n),
                "loss": -rng.uniform(0.3, 0.8, n),
                "masked": draw((n, MASKED)).astype("<i4").view(np.uint8).reshape(n, -1),
                "step": rng.integers(20, 100, n),
                "history": history.astype("<f4").view(np.uint8).reshape(n, -1),
                "alpha": rng.uniform(0, 1, n),
                "faithfulness": rng.normal(2, 1, n),
                "faithfulness_percentile": percentile,
                "generic": generic,
            }  # fmt: skip
            with cursor.copy(f"COPY channels ({channel_columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(PGCOPY_HEADER + binary_rows(channel_fields, values, n) + PGCOPY_TRAILER)
            m = n * TOP_K
            token_fields = [
                ("neuron_id", ">i4"), ("channel", ">i2"), ("rank", ">i2"), ("token_id", ">i4"), ("z", ">f8"),
                ("run_id", ">i4"), ("layer", ">i4"), ("side", f"S{len(side)}"), ("neuron", ">i4"),
                ("kurtosis", ">f8"), ("faithfulness_percentile", ">f8"), ("generic", "?"),
            ]  # fmt: skip
            tokens = {
                "neuron_id": np.repeat(neuron_ids, TOP_K),
                "channel": np.repeat(index, TOP_K),
                "rank": np.tile(np.arange(TOP_K), n),
                "token_id": draw(m),
                "z": np.sort(rng.uniform(3, 15, (n, TOP_K)), axis=1)[:, ::-1].reshape(-1),
                "run_id": np.full(m, run_id),
                "layer": np.full(m, rows[0][1]),
                "side": np.full(m, side.encode()),
                "neuron": np.repeat(np.array([r[3] for r in rows]), channels * TOP_K),
                "kurtosis": np.repeat(kurtosis, TOP_K),
                "faithfulness_percentile": np.repeat(percentile, TOP_K),
                "generic": np.repeat(generic, TOP_K),
            }
            token_columns = ", ".join(f'"{name}"' for name, _ in token_fields)
            with cursor.copy(f"COPY channel_tokens ({token_columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(PGCOPY_HEADER + binary_rows(token_fields, tokens, m) + PGCOPY_TRAILER)
            connection.commit()
            total_channels += n
            if block // NEURONS % 10 == 9:
                print(f"{total_channels:,} channels ({time.perf_counter() - started:.0f} s)", flush=True)
        print(f"{total_channels:,} channels, {total_channels * TOP_K:,} token rows; indexing", flush=True)
        for statement in creates:
            cursor.execute(statement)
            connection.commit()
        connection.autocommit = True
        cursor.execute("VACUUM ANALYZE")
    print(f"built {url} in {time.perf_counter() - started:.0f} s", flush=True)


# --- run ---------------------------------------------------------------------------------------------


async def _request(reader, writer, path: str) -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _client(port: int, next_path, until: float, warm_until: float, latencies: list, errors: list):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while (now := time.perf_counter()) < until:
        path = next_path()
        status = await _request(reader, writer, path)
        elapsed = time.perf_counter() - now
        if status != 200:
            errors.append((status, path))
        if now >= warm_until:
            latencies.append(elapsed)
    writer.close()


async def _phase(port: int, clients: int, seconds: float, warmup: float, next_path) -> dict:
    latencies: list[float] = []
    errors: list = []
    start = time.perf_counter()
    await asyncio.gather(
        *(
            _client(port, next_path, start + warmup + seconds, start + warmup, latencies, errors)
            for _ in range(clients)
        )
    )
    ms = np.array(latencies) * 1000
    return {
        "requests": len(ms),
        "per_second": round(len(ms) / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(database_url: str, quiet: bool = False):
    """The app as one uvicorn process on loopback until the block ends; yields its port. quiet:
    without its stderr (during a stall, a warning line for every page that gave up)."""
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": database_url}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "channelscope.web.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env, stderr=subprocess.DEVNULL if quiet else None,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(10)


def _shared_permalinks(base: str, run_hash: str, rng: random.Random) -> list[str]:
    return [
        f"{base}/{rng.randrange(LAYERS)}/{rng.randrange(NEURONS)}?side={rng.choice(SIDES)}&run={run_hash}"
        for _ in range(200)
    ]


async def _open_once(port: int, paths: list[str]) -> None:
    """Each path requested once: a pinned page is in the page cache afterwards."""
    for path in paths:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _request(reader, writer, path)
        writer.close()


def _machine(load_before) -> dict:
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def run(url: str, clients: int, seconds: float, warmup: float, out: Path) -> dict:
    import psycopg

    load_before = os.getloadavg()  # other work on the machine shares its two cores

    with psycopg.connect(url) as connection:
        model, run_hash = connection.execute(
            "SELECT m.name, r.hash FROM runs r JOIN models m ON m.id = r.model_id ORDER BY r.id LIMIT 1"
        ).fetchone()
        channels = connection.execute("SELECT count(*) FROM channels").fetchone()[0]
        # Search terms drawn as tokens occur in the index: 200 rows sampled uniformly.
        token_ids = [
            r[0]
            for r in connection.execute(
                "SELECT token_id FROM channel_tokens TABLESAMPLE SYSTEM (0.01) LIMIT 200"
            )
        ]
        vocabulary = connection.execute("SELECT vocabulary FROM models WHERE name = %s", (model,)).fetchone()[
            0
        ]
    import zlib

    tokens = json.loads(zlib.decompress(vocabulary))["tokens"]
    terms = [tokens[i] for i in token_ids]
    rng = random.Random(0)
    base = f"/m/{quote(model)}"
    shared = _shared_permalinks(base, run_hash, rng)
    paths = {
        "trivial": lambda: "/ping",
        "pinned": lambda: rng.choice(shared),
        "unpinned": lambda: (
            f"{base}/{rng.randrange(LAYERS)}/{rng.randrange(NEURONS)}?side={rng.choice(SIDES)}"
        ),
        "search": lambda: "/search?" + urlencode({"token": rng.choice(terms)}),
    }
    with _server(url) as port:

        async def measure() -> dict:
            await _open_once(port, shared)
            return {name: await _phase(port, clients, seconds, warmup, make) for name, make in paths.items()}

        results = asyncio.run(measure())
    trivial = results["trivial"]["p99_ms"]
    for name, goal in GOALS.items():
        results[name]["ratio_p99_to_trivial_p99"] = round(results[name]["p99_ms"] / trivial, 2)
        results[name]["goal"] = goal
        results[name]["met"] = results[name]["ratio_p99_to_trivial_p99"] <= goal
    report = {
        "store": {"channels": channels, "url": url.rsplit("@", 1)[-1]},
        "clients": clients,
        "seconds_per_endpoint": seconds,
        **_machine(load_before),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'endpoint':10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/trivial':>12} goal")
    for name, r in results.items():
        ratio = r.get("ratio_p99_to_trivial_p99", 1.0)
        goal = f"<= {r['goal']:g} {'met' if r['met'] else 'MISSED'}" if "goal" in r else ""
        print(f"{name:10} {r['per_second']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {ratio:12.2f} {goal}")
    return report


# --- stall: what keeps answering while the database hangs -----------------------------------------


def stall(url: str, clients: int, seconds: float, warmup: float, out: Path) -> dict:
    import psycopg
    from sqlalchemy.engine import make_url

    from tests.fixtures.proxy import Proxy

    load_before = os.getloadavg()
    with psycopg.connect(url) as connection:
        model, run_hash = connection.execute(
            "SELECT m.name, r.hash FROM runs r JOIN models m ON m.id = r.model_id ORDER BY r.id LIMIT 1"
        ).fetchone()
    target = make_url(url)
    proxy = Proxy((target.host or "127.0.0.1", target.port or 5432))
    proxied = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    rng = random.Random(0)
    base = f"/m/{quote(model)}"
    shared = _shared_permalinks(base, run_hash, rng)
    measured = {
        "trivial": lambda: "/ping",
        "static": lambda: "/static/channelscope.css",
        "pinned": lambda: rng.choice(shared),
    }

    def waiting_page() -> str:
        return f"{base}/{rng.randrange(LAYERS)}/{rng.randrange(NEURONS)}?side={rng.choice(SIDES)}"

    with _server(proxied, quiet=True) as port:

        async def measure() -> dict:
            await _open_once(port, shared)
            normal = {
                name: await _phase(port, clients, seconds, warmup, make) for name, make in measured.items()
            }
            proxy.pause()
            # As many clients again ask for pages that wait on the database, all through the stall.
            span = len(measured) * (seconds + warmup)
            load = asyncio.create_task(_phase(port, clients, span, 0.0, waiting_page))
            stalled = {
                name: await _phase(port, clients, seconds, warmup, make) for name, make in measured.items()
            }
            waiting = await load
            proxy.resume()
            return {"normal": normal, "stalled": stalled, "waiting_pages": waiting}

        try:
            results = asyncio.run(measure())
        finally:
            proxy.down()
    for name in measured:
        before, during = results["normal"][name]["p99_ms"], results["stalled"][name]["p99_ms"]
        ratio = round(during / before, 2)
        results["stalled"][name]["ratio_p99_to_normal_p99"] = ratio
        results["stalled"][name]["met"] = ratio <= 3 and during < 100
    report = {
        "clients": clients,
        "seconds_per_endpoint": seconds,
        **_machine(load_before),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'endpoint':10} {'p99 normal':>11} {'p99 stalled':>12} {'ratio':>6} goal (<= 3x and < 100 ms)")
    for name in measured:
        r = results["stalled"][name]
        print(
            f"{name:10} {results['normal'][name]['p99_ms']:9.2f}ms {r['p99_ms']:10.2f}ms "
            f"{r['ratio_p99_to_normal_p99']:6.2f} {'met' if r['met'] else 'MISSED'}"
        )
    w = results["waiting_pages"]
    print(
        f"pages waiting on the database: {w['requests']} answered, "
        f"p50 {w['p50_ms']:.0f} ms, p99 {w['p99_ms']:.0f} ms"
    )
    return report


# --- split: where a page's time goes -----------------------------------------------------------


def split(url: str, count: int) -> None:
    """Median time to build and to render an unpinned neuron page and a search, in this process:
    the page builders and templates called directly, no HTTP (random neurons and sampled tokens,
    as `run` asks for them)."""
    import statistics

    from sqlalchemy import text
    from starlette.requests import Request

    from channelscope.web import lookup, queries
    from channelscope.web.main import create_app
    from channelscope.web.responses import render_html
    from channelscope.web.routes import neurons, search

    app = create_app(url)
    rng = random.Random(1)
    with app.state.sessions() as session:
        model = queries.models(session)[0].name
        sample = text("SELECT token_id FROM channel_tokens TABLESAMPLE SYSTEM (0.01) LIMIT 200")
        tokens = lookup.vocab(session, lookup.model(session, model)).tokens
        words = [tokens[token_id] for (token_id,) in session.execute(sample)]

    def request(path: str, query: str) -> Request:
        scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode(),
                 "headers": [(b"host", b"bench")], "app": app, "scheme": "http",
                 "server": ("bench", 80), "root_path": ""}  # fmt: skip
        return Request(scope)

    def neuron_page(session):
        layer, neuron, side = rng.randrange(LAYERS), rng.randrange(NEURONS), rng.choice(SIDES)
        made = request(f"/m/{model}/{layer}/{neuron}", f"side={side}")
        built = neurons.neuron_page(request=made, session=session, model=model, layer=layer, neuron=neuron,
                                    side=side, run=None, min_kurtosis=5.0)  # fmt: skip
        return made, built, "neuron.html"

    def search_page(session):
        word = rng.choice(words)
        made = request("/search", urlencode({"token": word}))
        built = search.search_page(
            request=made, session=session, token=word, exact=False, model=None, run=None,
            layer_min=None, layer_max=None, side=None, min_kurtosis=5.0, generic=False,
            sort="percentile", after=None, limit=25,
        )  # fmt: skip
        return made, built, "search.html"

    for name, make in (("unpinned neuron page", neuron_page), ("search", search_page)):
        times = []
        for i in range(count + 50):  # the first 50 fill the per-process caches
            with app.state.sessions() as session:
                started = time.perf_counter()
                made, built, template = make(session)
                middle = time.perf_counter()
                body = render_html(template, made, page=built.page, plots=built.plots)
                if i >= 50:
                    times.append((middle - started, time.perf_counter() - middle))
        build_ms = statistics.median(b for b, _ in times) * 1000
        render_ms = statistics.median(r for _, r in times) * 1000
        print(f"{name}: build {build_ms:.2f} ms, render {render_ms:.2f} ms, {len(body):,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "run", "split", "stall"])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--channels", type=int, default=CHANNELS, help="channels per neuron (build)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per endpoint")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--out", type=Path, help="default bench/results/web.json (stall: stall.json)")
    args = parser.parse_args()
    if args.action == "build":
        build(args.url, args.channels, args.seed)
    elif args.action == "split":
        split(args.url, 400)
    elif args.action == "stall":
        stall(args.url, args.clients, args.seconds, args.warmup, args.out or RESULTS / "stall.json")
    else:
        run(args.url, args.clients, args.seconds, args.warmup, args.out or RESULTS / "web.json")


if __name__ == "__main__":
    main()
