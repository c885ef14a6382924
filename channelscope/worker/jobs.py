"""Runs and shards: plan a run, compute one shard, commit it exactly once.

A run (worker/store.py: settings, model and seed, named by a content hash) is split into shards:
one layer, one side, one block of neurons. Asking again for the same run adds only the shards
it lacks, so `decompose` after a crash resumes, and a wider --layers or --neurons extends the run.

A shard's neurons, channels and token rows commit in one transaction with its done mark. The
mark is `UPDATE ... WHERE done_at IS NULL` and must touch exactly one row, so of two workers
that computed the same shard (a worker wrongly taken for dead, a duplicate job) only the first
commits; the unique constraint on neurons backs that up in the database itself. A process
killed at any moment loses at most the shards it had in flight, and leaves no partial neuron.

Who runs shards: on SQLite, `decompose` computes them in its own process (`compute_pending`);
on PostgreSQL they go through the queue of worker/queue.py, which calls `compute_shard`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import reference, rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import Model, ModelError, load_model
from channelscope.worker import store

DEFAULT_SHARD_SIZE = 64
# `out` first: it is what a neuron writes, and the pages lead with it; the read sides follow.
SIDE_PRIORITY = {"out": 0, "in": 1, "gate": 2}
# Throughput and ETA are measured over the shards finished in this last stretch of time, so
# they follow the workers that are running now, not the average since the run began.
RATE_WINDOW = timedelta(minutes=10)


class JobError(Exception):
    """A run or shard that cannot go ahead; the message is one line meant for a person."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- what was asked for ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    layers: list[int]
    sides: list[str]
    neurons: list[int]
    shard_size: int = DEFAULT_SHARD_SIZE
    # The first `first` requested neurons of every layer side in shards of their own, computed
    # before all other shards: the first pages appear soon, and because every shard is planned
    # at once, the run is not "complete" (its pinned pages immutable) until all of it is done.
    first: int = 0


def check_request(model: Model, request: Request) -> None:
    """Every layer, side and neuron must exist in the model; a shard holds at least one neuron."""
    if not request.layers:
        raise JobError("the layer range is empty")
    if not request.neurons:
        raise JobError("the neuron range is empty")
    if not request.sides:
        raise JobError("no side given: use gate, in and/or out")
    bad = [x for x in request.layers if not 0 <= x < model.n_layers]
    if bad:
        raise JobError(f"layer {bad[0]} is out of range: {model.name} has layers 0-{model.n_layers - 1}")
    bad = [x for x in request.neurons if not 0 <= x < model.d_mlp]
    if bad:
        raise JobError(f"neuron {bad[0]} is out of range: {model.name} has neurons 0-{model.d_mlp - 1}")
    for side in request.sides:
        if side not in model.sides:
            raise JobError(f"unknown side {side!r}: {model.name} has sides {', '.join(model.sides)}")
    if request.shard_size < 1:
        raise JobError("--shard-size must be at least 1")
    if request.first < 0:
        raise JobError("--first-neurons cannot be negative")


def blocks(neurons: list[int], covered: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over the requested neurons that no existing shard covers, each within
    one aligned block of `size` (0-63, 64-127, ...), so that extending a run later cuts the same
    blocks as asking for everything at once would have."""
    taken = set()
    for start, stop in covered:
        taken.update(range(start, stop))
    wanted = sorted(set(neurons) - taken)
    out: list[tuple[int, int]] = []
    for n in wanted:
        if out and out[-1][1] == n and n % size != 0:
            out[-1] = (out[-1][0], n + 1)
        else:
            out.append((n, n + 1))
    return out


def settings_from_run(stored: dict) -> tuple[rotate.Settings, str, int]:
    """The rotate.Settings, projection and reference count a run was made with."""
    names = {f.name for f in fields(rotate.Settings)}
    values = {k: v for k, v in stored.items() if k in names}
    if "betas" in values:
        values["betas"] = tuple(values["betas"])  # JSON made the tuple a list
    return rotate.Settings(**values), stored["projection"], stored["reference_count"]


# --- creating and resuming a run ------------------------------------------------------------------


def open_run(
    engine: Engine, model: Model, decomposer: Decomposer, settings: dict, seed: int, request: Request
) -> tuple[T.Run, int]:
    """The run of these settings (created if new) with a shard for every requested neuron that
    has none yet. Returns the run and how many shards were added. Safe to call again, and from
    two processes at once: rows that already exist are left alone."""
    for attempt in range(2):
        try:
            with db.session(engine) as session, session.begin():
                model_row = store.ensure_model(session, model)
                reference_row = store.ensure_reference(
                    session, model_row, decomposer.reference_key, decomposer.reference
                )
                run = store.ensure_run(session, model_row, settings, seed, reference_row)
                added = add_shards(session, run, request)
            return run, added
        except IntegrityError:
            # Another process created the model, reference or run between our read and write;
            # the second pass finds its rows.
            if attempt:
                raise
    raise AssertionError("unreachable")


def add_shards(session: Session, run: T.Run, request: Request) -> int:
    # Serialise planners of one run (PostgreSQL; SQLite has one writer anyway), so two commands
    # with different --shard-size cannot cut overlapping shards.
    session.execute(select(T.Run.id).where(T.Run.id == run.id).with_for_update())
    existing: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for layer, side, start, stop in session.execute(
        select(T.Shard.layer, T.Shard.side, T.Shard.neuron_start, T.Shard.neuron_stop).where(
            T.Shard.run_id == run.id
        )
    ):
        existing.setdefault((layer, side), []).append((start, stop))
    rows = []
    head = sorted(request.neurons)[: request.first]
    for side in sorted(request.sides, key=SIDE_PRIORITY.__getitem__):
        for layer in request.layers:
            covered = existing.get((layer, side), [])
            # (neurons, shard size, priority): the head before every ordinary shard of any side
            for neurons, size, priority in (
                (head, max(1, request.first), SIDE_PRIORITY[side] - len(SIDE_PRIORITY)),
                (request.neurons, request.shard_size, SIDE_PRIORITY[side]),
            ):
                for start, stop in blocks(neurons, covered, size):
                    covered = [*covered, (start, stop)]
                    rows.append(
                        dict(
                            run_id=run.id,
                            layer=layer,
                            side=side,
                            neuron_start=start,
                            neuron_stop=stop,
                            priority=priority,
                            attempts=0,
                        )
                    )
    if rows:
        session.execute(_insert_ignoring_duplicates(session, T.Shard), rows)
    return len(rows)


def _insert_ignoring_duplicates(session: Session, table):
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


def find_run(session: Session, text: str) -> T.Run:
    """A run by its hash, or by a prefix of it that names one run only."""
    text = text.strip().lower()
    if len(text) < 4:
        raise JobError(f"run {text!r}: give at least 4 characters of the run hash")
    found = session.scalars(select(T.Run).where(T.Run.hash.startswith(text, autoescape=True)).limit(2)).all()
    if not found:
        raise JobError(f"no run {text!r} in this database (`channelscope status` lists them)")
    if len(found) > 1:
        raise JobError(f"run {text!r} is ambiguous: give more of its hash")
    return found[0]


def pending_shards(session: Session, run_id: int) -> list[T.Shard]:
    """The run's shards not yet done, in the order they should be computed."""
    return list(
        session.scalars(
            select(T.Shard)
            .where(T.Shard.run_id == run_id, T.Shard.done_at.is_(None))
            .order_by(T.Shard.priority, T.Shard.id)
        )
    )


# --- the model and decomposer of a run, built once per process ------------------------------------


@dataclass
class Decomposers:
    """Loading weights and building a Decomposer (U on the device, the reference) takes seconds,
    a shard may take less: a process keeps the ones it built. Only the latest run's is kept, to
    bound memory; a worker serves one run at a time in practice."""

    models: dict[str, Model] = field(default_factory=dict)  # by model spec
    current: tuple[str, Model, Decomposer] | None = None  # (run hash, model, decomposer)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, run_hash: str, model: Model, decomposer: Decomposer) -> None:
        with self.lock:
            self.current = (run_hash, model, decomposer)

    def get(
        self, session: Session, run: T.Run, specs: list[str], device: str, cache_dir: Path
    ) -> tuple[Model, Decomposer]:
        with self.lock:
            if self.current and self.current[0] == run.hash:
                return self.current[1], self.current[2]
            model_row = session.get(T.Model, run.model_id)
            model = self._model(model_row, specs)
            settings, projection, count = settings_from_run(run.settings)
            if run.algorithm_version != store.ALGORITHM_VERSION or run.hash != store.run_hash(
                model.sha256, store.run_settings(settings, projection, count), run.seed
            ):
                raise JobError(
                    f"run {run.hash} was made with settings or an algorithm version "
                    f"({run.algorithm_version}) that this code (version {store.ALGORITHM_VERSION}) does "
                    "not reproduce: compute it with the code that created it"
                )
            if run.reference_id is not None:
                seed_reference(session.get(T.Reference, run.reference_id), model, cache_dir)
            decomposer = Decomposer(
                model,
                settings,
                projection=projection,
                device=device,
                cache_dir=cache_dir,
                reference_count=count,
                seed=run.seed,
            )
            self.current = (run.hash, model, decomposer)
            return model, decomposer

    def _model(self, model_row: T.Model, specs: list[str]) -> Model:
        tried = []
        for spec in dict.fromkeys([*specs, model_row.source]):
            if spec not in self.models:
                try:
                    self.models[spec] = load_model(spec)
                except ModelError as error:
                    tried.append(str(error))
                    continue
            if self.models[spec].sha256 == model_row.sha256:
                return self.models[spec]
            tried.append(f"{spec} is a different file (sha256 {self.models[spec].sha256[:12]})")
        raise JobError(
            f"model {model_row.name} (sha256 {model_row.sha256[:12]}) not found on this machine: "
            f"{'; '.join(tried)}; pass --model PATH"
        )


def seed_reference(row: T.Reference, model: Model, cache_dir: Path) -> None:
    """Put the run's stored random-vector reference where the Decomposer looks for it, so every
    worker, on any machine or device, scores channels against the same reference instead of
    recomputing its own."""
    path = cache_dir / f"{model.name}-{row.key}.pt"
    if path.exists():
        return
    found = reference.Reference(
        faithfulness=T.unpack(row.faithfulness, "float32", (row.count, row.channels)).astype(np.float64),
        kurtosis=T.unpack(row.kurtosis, "float32", (row.count, row.channels)).astype(np.float64),
        generic=torch.from_numpy(T.unpack(row.generic, "float32").reshape(-1, model.d_model).copy()),
        tail_tokens=list(row.tail_tokens),
    )
    reference.save(found, path)


def seed_reference_of_settings(
    engine: Engine, model: Model, settings: dict, seed: int, cache_dir: Path
) -> None:
    """Before `decompose` builds its Decomposer: reuse the reference stored with the run if the
    run exists already (computed on another machine, say)."""
    digest = store.run_hash(model.sha256, settings, seed)
    with db.session(engine) as session:
        run = session.scalar(select(T.Run).where(T.Run.hash == digest))
        if run is not None and run.reference_id is not None:
            seed_reference(session.get(T.Reference, run.reference_id), model, cache_dir)


DECOMPOSERS = Decomposers()


# --- computing one shard --------------------------------------------------------------------------


@dataclass
class ShardResult:
    shard_id: int
    committed: bool  # False: done already, or another worker committed it first
    neurons: int
    seconds: float
    label: str


def shard_label(shard: T.Shard) -> str:
    return f"layer {shard.layer} {shard.side} neurons {shard.neuron_start}-{shard.neuron_stop - 1}"


def compute_shard(
    engine: Engine,
    shard_id: int,
    *,
    worker: str,
    specs: Sequence[str] = (),
    device: str = "auto",
    cache_dir: Path,
    decomposers: Decomposers = DECOMPOSERS,
    on_channel: Callable[[int], None] | None = None,
) -> ShardResult:
    """Compute one shard and commit it with its done mark, or nothing at all."""
    with db.session(engine) as session:
        shard = session.get(T.Shard, shard_id)
        if shard is None:
            raise JobError(f"shard {shard_id} does not exist (its run was deleted?)")
        label = shard_label(shard)
        if shard.done_at is not None:
            return ShardResult(shard_id, False, 0, 0.0, label)
        run = session.get(T.Run, shard.run_id)
        session.execute(
            update(T.Shard)
            .where(T.Shard.id == shard_id)
            .values(attempts=T.Shard.attempts + 1, worker=worker, error=None)
        )
        session.commit()
        try:
            _, decomposer = decomposers.get(session, run, list(specs), device, cache_dir)
            started = time.perf_counter()
            ids = list(range(shard.neuron_start, shard.neuron_stop))
            records = decomposer.neurons(shard.layer, shard.side, ids, on_channel)
            seconds = time.perf_counter() - started
        except Exception as error:
            _record_error(engine, shard_id, error)
            raise
    committed = commit_shard(engine, shard_id, records, seconds=seconds, worker=worker)
    return ShardResult(shard_id, committed, len(records), seconds, label)


def commit_shard(engine: Engine, shard_id: int, records: list, *, seconds: float, worker: str) -> bool:
    """One transaction: the done mark (exactly one row, or roll back) and every row of the
    shard's neurons. False when the shard was committed by someone else first."""
    with db.session(engine) as session:
        try:
            with session.begin():
                marked = session.execute(
                    update(T.Shard)
                    .where(T.Shard.id == shard_id, T.Shard.done_at.is_(None))
                    .values(done_at=T.now(), seconds=seconds, worker=worker, error=None)
                )
                if marked.rowcount != 1:
                    session.rollback()
                    return False
                shard = session.get(T.Shard, shard_id)
                run = session.get(T.Run, shard.run_id)
                store.write_neurons(session, run, shard, records)
        except IntegrityError:
            # Neurons of this shard are stored already: the database refused a second copy.
            return False
    return True


def _record_error(engine: Engine, shard_id: int, error: BaseException) -> None:
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    with db.session(engine) as session, session.begin():
        session.execute(
            update(T.Shard).where(T.Shard.id == shard_id, T.Shard.done_at.is_(None)).values(error=text[:2000])
        )


def compute_pending(
    engine: Engine,
    run: T.Run,
    *,
    worker: str,
    cache_dir: Path,
    device: str = "auto",
    decomposers: Decomposers = DECOMPOSERS,
    on_shard: Callable[[ShardResult], None] | None = None,
    on_channel_for: Callable[[T.Shard, int], Callable[[int], None]] | None = None,
) -> Iterator[ShardResult]:
    """Every shard of the run not yet done, in this process, one after another (SQLite)."""
    with db.session(engine) as session:
        todo = [(s.id, s) for s in pending_shards(session, run.id)]
        channels = run.channels
    for shard_id, shard in todo:
        size = (shard.neuron_stop - shard.neuron_start) * channels
        on_channel = on_channel_for(shard, size) if on_channel_for else None
        result = compute_shard(
            engine,
            shard_id,
            worker=worker,
            device=device,
            cache_dir=cache_dir,
            decomposers=decomposers,
            on_channel=on_channel,
        )
        if on_shard:
            on_shard(result)
        yield result


# --- progress -------------------------------------------------------------------------------------


@dataclass
class RunProgress:
    run: str  # hash
    model: str
    solver: str
    channels: int
    seed: int
    shards_total: int
    shards_done: int
    neurons_total: int  # neuron sides planned
    neurons_done: int  # in done shards
    neurons_stored: int  # rows in the neurons table (equals neurons_done: a check)
    failed: int  # shards not done whose last attempt raised an error
    compute_seconds: float  # summed over done shards
    rate: float | None  # neuron sides per second, all workers together, over RATE_WINDOW
    eta_seconds: float | None
    last_error: str | None
    layers: list[int]
    sides: list[str]

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    @property
    def compute_rate(self) -> float | None:
        """Neuron sides per second of one worker's compute time."""
        return self.neurons_done / self.compute_seconds if self.compute_seconds else None


def run_progress(session: Session, run: T.Run) -> RunProgress:
    size = T.Shard.neuron_stop - T.Shard.neuron_start
    done = T.Shard.done_at.is_not(None)
    totals = session.execute(
        select(
            func.count(),
            func.count().filter(done),
            func.coalesce(func.sum(size), 0),
            func.coalesce(func.sum(size).filter(done), 0),
            func.coalesce(func.sum(T.Shard.seconds).filter(done), 0.0),
            func.count().filter(~done, T.Shard.error.is_not(None)),
        ).where(T.Shard.run_id == run.id)
    ).one()
    stored = session.scalar(select(func.count()).select_from(T.Neuron).where(T.Neuron.run_id == run.id))
    now = T.now()
    recent = session.execute(
        select(T.Shard.done_at, T.Shard.seconds, size).where(
            T.Shard.run_id == run.id, done, T.Shard.done_at >= now - RATE_WINDOW
        )
    ).all()
    rate = eta = None
    if recent:
        # From the start of the earliest shard finished in the window until now.
        began = min(_aware(at) - timedelta(seconds=seconds or 0) for at, seconds, _ in recent)
        span = max((now - began).total_seconds(), 1e-3)
        rate = sum(n for _, _, n in recent) / span
        eta = (totals[2] - totals[3]) / rate if rate else None
    last_error = session.scalar(
        select(T.Shard.error)
        .where(T.Shard.run_id == run.id, T.Shard.done_at.is_(None), T.Shard.error.is_not(None))
        .order_by(T.Shard.id)
        .limit(1)
    )
    layers = session.scalars(select(T.Shard.layer).where(T.Shard.run_id == run.id).distinct()).all()
    sides = session.scalars(select(T.Shard.side).where(T.Shard.run_id == run.id).distinct()).all()
    model_name = session.scalar(select(T.Model.name).where(T.Model.id == run.model_id))
    return RunProgress(
        run=run.hash,
        model=model_name,
        solver=run.solver,
        channels=run.channels,
        seed=run.seed,
        shards_total=totals[0],
        shards_done=totals[1],
        neurons_total=int(totals[2]),
        neurons_done=int(totals[3]),
        neurons_stored=stored,
        failed=totals[5],
        compute_seconds=float(totals[4]),
        rate=rate,
        eta_seconds=eta,
        last_error=last_error,
        layers=sorted(layers),
        sides=sorted(sides, key=SIDE_PRIORITY.__getitem__),
    )


def _aware(at: datetime) -> datetime:
    # SQLite hands back naive datetimes for what was written in UTC.
    return at if at.tzinfo else at.replace(tzinfo=UTC)
