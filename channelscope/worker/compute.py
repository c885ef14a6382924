"""Computing shards: one shard at a time, committed exactly once.

A shard's neurons, channels and token rows commit in one transaction with its done mark. The
mark is `UPDATE ... WHERE done_at IS NULL` and must touch exactly one row, so of two workers
that computed the same shard (a worker wrongly taken for dead, a duplicate job) only the first
commits; the unique constraint on neurons backs that up in the database itself. A process
killed at any moment loses at most the shards it had in flight, and leaves no partial neuron.

Who runs shards: on SQLite, `decompose` computes them in its own process (`compute_pending`);
on PostgreSQL they go through the queue of worker/shard_queue.py, which calls `compute_shard`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import reference
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import Model, ModelError, load_model
from channelscope.worker import store
from channelscope.worker.plan import JobError, pending_shards, settings_from_run


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
            decomposer = run_decomposer(session, run, model, device, cache_dir)
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


def run_decomposer(session: Session, run: T.Run, model: Model, device: str, cache_dir: Path) -> Decomposer:
    """A Decomposer with the run's settings, scoring against the run's own stored reference."""
    settings, projection, count = settings_from_run(run.settings)
    if run.reference_id is not None:
        seed_reference(session.get(T.Reference, run.reference_id), model, cache_dir)
    return Decomposer(
        model,
        settings,
        projection=projection,
        device=device,
        cache_dir=cache_dir,
        reference_count=count,
        seed=run.seed,
    )


def seed_reference(row: T.Reference, model: Model, cache_dir: Path) -> None:
    """Put the run's stored random-vector reference where the Decomposer looks for it, so every
    worker, on any machine or device, scores channels against the same reference instead of
    recomputing its own."""
    path = cache_dir / f"{model.name}-{row.key}.pt"
    if path.exists():
        return
    reference.save(store.read_reference(row, model.d_model), path)


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
    if shard.neurons is not None:
        return f"layer {shard.layer} {shard.side} neurons {', '.join(map(str, shard.neurons))}"
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
            ids = T.shard_neurons(shard)
            records = decomposer.neurons(shard.layer, shard.side, ids, on_channel)
            seconds = time.perf_counter() - started
        except Exception as error:
            _record_error(engine, shard_id, error)
            raise
    committed = commit_shard(engine, shard_id, records, seconds=seconds, worker=worker)
    return ShardResult(shard_id, committed, len(records), seconds, label)


def compute_together(
    engine: Engine, shard_ids: list[int], decomposer: Decomposer, *, worker: str
) -> list[ShardResult]:
    """Several shards of one run in one solver batch (a neuron's three sides, asked for on a
    page: one batch of three rows instead of three of one), each committed on its own. A
    neuron's channels do not depend on its batch-mates, so they are what a shard alone gives.
    On SQLite each is claimed first, and one another process holds (a `decompose` that got to it)
    is left to that process."""
    with contextlib.ExitStack() as claims:
        held = [i for i in shard_ids if claims.enter_context(db.sqlite_claim(engine, i, wait=False))]
        return _compute_together(engine, held, decomposer, worker)


def _compute_together(engine: Engine, shard_ids: list[int], decomposer: Decomposer, worker: str):
    with db.session(engine) as session, session.begin():
        shards = [
            s for s in (session.get(T.Shard, i) for i in shard_ids) if s is not None and s.done_at is None
        ]
        for shard in shards:
            shard.attempts, shard.worker, shard.error = shard.attempts + 1, worker, None
        coords = [(s.layer, s.side, n) for s in shards for n in T.shard_neurons(s)]
        labels = {s.id: shard_label(s) for s in shards}
        sizes = {s.id: s.size for s in shards}
    if not coords:
        return []
    started = time.perf_counter()
    try:
        records = decomposer.anywhere(coords)
    except Exception as error:
        for shard_id in labels:
            _record_error(engine, shard_id, error)
        raise
    seconds = time.perf_counter() - started
    results = []
    for shard_id, label in labels.items():
        part, records = records[: sizes[shard_id]], records[sizes[shard_id] :]
        committed = commit_shard(
            engine, shard_id, part, seconds=seconds * len(part) / len(coords), worker=worker
        )
        results.append(ShardResult(shard_id, committed, len(part), seconds, label))
    return results


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
    """Every shard of the run not yet done, in this process, one after another (SQLite).

    Two `decompose` commands on one file share the shards: each claims a shard before computing
    it (core/db.sqlite_claim) and passes over the ones another process holds. Once it has been
    through them all, it waits for each shard it passed over in turn: done by its holder
    meanwhile, or free again because its holder died, in which case it computes it itself."""
    with db.session(engine) as session:
        todo = list(pending_shards(session, run.id))
        channels = run.channels

    def attempt(shard: T.Shard, wait: bool) -> ShardResult | None:  # None: another process holds it
        with db.sqlite_claim(engine, shard.id, wait) as held:
            if not held:
                return None
            with db.session(engine) as session:
                if session.get(T.Shard, shard.id).done_at is not None:  # by the process we waited for
                    return ShardResult(shard.id, False, 0, 0.0, shard_label(shard))
            size = shard.size * channels
            return compute_shard(
                engine,
                shard.id,
                worker=worker,
                device=device,
                cache_dir=cache_dir,
                decomposers=decomposers,
                on_channel=on_channel_for(shard, size) if on_channel_for else None,
            )

    passed_over, seen = [], set()
    while todo:
        shard = todo.pop(0)
        seen.add(shard.id)
        result = attempt(shard, wait=False)
        if result is None:
            passed_over.append(shard)
        else:
            if on_shard:
                on_shard(result)
            yield result
        # Shards planned meanwhile (a neuron asked for on a page) go before the rest, by priority.
        with db.session(engine) as session:
            todo = [s for s in pending_shards(session, run.id) if s.id not in seen]
    for shard in passed_over:
        result = attempt(shard, wait=True)
        if on_shard:
            on_shard(result)
        yield result
