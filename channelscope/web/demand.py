"""Channels on demand from the web app's side: opening a neuron whose channels no run has
computed asks for them (worker/on_demand.py does the work), with bounds on what a crowd can
cause: one job per neuron however many ask, at most MAX_QUEUED waiting, and PER_CLIENT new
requests a minute per client (beyond: 429 with Retry-After).

Who computes: on SQLite a single background thread of this process, one neuron at a time; on
PostgreSQL procrastinate's on-demand queue, which every `channelscope worker` and `decompose`
serves before their shards."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import Row

from channelscope.core import db

MAX_QUEUED = 32  # neurons waiting or computing at once
PER_CLIENT = 6  # new requests a client may make per WINDOW seconds
WINDOW = 60.0
logger = logging.getLogger("channelscope.demand")


@dataclass(frozen=True)
class Asked:
    state: str  # "queued", "computing", "failed", "limited", "full", "unavailable", "off"
    message: str
    retry_after: int | None = None  # seconds, for 429 and 503


class Demand:
    def __init__(
        self, engine: Engine, *, enabled: bool, device: str, cache_dir: Path, url: str | None = None
    ):
        self.engine, self.enabled, self.device, self.cache_dir, self.url = (
            engine,
            enabled,
            device,
            cache_dir,
            url,
        )
        self.postgres = engine.dialect.name == "postgresql"
        self.lock = threading.Lock()
        self.states: dict[tuple[str, int, int], Asked] = {}  # SQLite: this process's requests
        self.todo: queue.Queue = queue.Queue()
        self.clients: dict[str, deque[float]] = {}
        self.thread: threading.Thread | None = None
        self.app = None  # PostgreSQL: procrastinate's app, opened on first use

    # --- asking ---------------------------------------------------------------------------------

    def ask(self, model_row: Row, layer: int, neuron: int, client: str) -> Asked:
        """Ask for a neuron's channels (all three sides); what happens to the request."""
        if not self.enabled:
            return Asked("off", "Channels are computed by `channelscope decompose` here, not on request.")
        key = (model_row.sha256, layer, neuron)
        known = self._known(key)
        if known is not None:
            return known
        if not self._allowed(client):
            return Asked("limited", "You asked for many neurons in a short time: try again in a minute.", 60)
        if self.postgres:
            return self._defer(model_row, layer, neuron)
        if not Path(model_row.source).exists():
            return Asked(
                "unavailable",
                "The model file is not on this server, so its channels cannot be computed here: "
                "run `channelscope decompose` where it is.",
            )
        with self.lock:
            waiting = sum(a.state in ("queued", "computing") for a in self.states.values())
            if waiting >= MAX_QUEUED:
                return Asked("full", f"{waiting} neurons are waiting already: try again in a minute.", 60)
            asked = self.states[key] = Asked("queued", f"Queued behind {waiting} other neurons.")
            self.todo.put((model_row.source, model_row.sha256, layer, neuron))
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="channels on demand", daemon=True)
                self.thread.start()
        return asked

    def _known(self, key) -> Asked | None:
        if not self.postgres:
            with self.lock:
                return self.states.get(key)
        from channelscope.worker import shard_queue

        with db.session(self.engine) as session:
            status = shard_queue.neuron_job(session, *key)
        if status == "todo":
            return Asked("queued", "Queued for a worker (`channelscope worker`).")
        if status == "doing":
            return Asked("computing", "A worker is computing its channels.")
        if status == "failed":
            return Asked(
                "failed", "Computing its channels failed; `channelscope status` on the server says why."
            )
        return None

    def _allowed(self, client: str) -> bool:
        now = time.monotonic()
        with self.lock:
            recent = self.clients.setdefault(client, deque())
            while recent and recent[0] < now - WINDOW:
                recent.popleft()
            if len(recent) >= PER_CLIENT:
                return False
            recent.append(now)
            if len(self.clients) > 10_000:  # forget idle clients: memory stays bounded
                for name in [c for c, times in self.clients.items() if not times]:
                    del self.clients[name]
            return True

    # --- SQLite: this process's worker ------------------------------------------------------------

    def _work(self) -> None:
        from channelscope.worker import compute, on_demand

        while True:
            source, sha256, layer, neuron = self.todo.get()
            key = (sha256, layer, neuron)
            with self.lock:
                self.states[key] = Asked("computing", "Computing its channels now (about 20 s).")
            try:
                on_demand.compute_neuron(
                    self.engine, source, sha256, layer, neuron,
                    device=self.device, cache_dir=self.cache_dir, worker=compute.worker_name() + " (web)",
                )  # fmt: skip
                state = None
            except Exception as error:  # one line on the page; the log keeps the rest
                logger.exception("on-demand neuron %s/%s failed", layer, neuron)
                state = Asked("failed", f"Computing its channels failed: {type(error).__name__}.")
            with self.lock:
                if state is None:
                    self.states.pop(key, None)
                else:
                    self.states[key] = state

    # --- PostgreSQL: the queue ----------------------------------------------------------------

    def _defer(self, model_row: Row, layer: int, neuron: int) -> Asked:
        from procrastinate.exceptions import AlreadyEnqueued

        from channelscope.worker import shard_queue

        with db.session(self.engine) as session:
            waiting = shard_queue.queued_neurons(session)
        if waiting >= MAX_QUEUED:
            return Asked("full", f"{waiting} neurons are waiting already: try again in a minute.", 60)
        with self.lock:
            if self.app is None:
                url = self.url or self.engine.url.render_as_string(hide_password=False)
                self.app = shard_queue.make_app(url).open()
        deferrer = self.app.configure_task(
            shard_queue.NEURON_TASK,
            queue=shard_queue.NEURON_QUEUE,
            priority=shard_queue.NEURON_PRIORITY,
            queueing_lock=shard_queue.neuron_lock(model_row.sha256, layer, neuron),
        )
        with contextlib.suppress(AlreadyEnqueued):
            deferrer.defer(source=model_row.source, sha256=model_row.sha256, layer=layer, neuron=neuron)
        return Asked(
            "queued", f"Queued for a worker (`channelscope worker`), behind {waiting} other neurons."
        )
