"""How far a run has got: the one definition of its shard counts, of "complete", and of the
throughput and ETA that `channelscope status`, `decompose` and the web pages show."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from channelscope.core import tables as T

# Throughput and ETA are measured over the shards finished in this last stretch of time, so
# they follow the workers that are running now, not the average since the run began.
RATE_WINDOW = timedelta(minutes=10)


def is_complete(shards_done: int, shards_total: int) -> bool:
    """Every planned shard is done. A run with no shards has nothing to show, so it is not
    complete: a complete run's pinned pages are cached as immutable."""
    return shards_total > 0 and shards_done == shards_total


def shard_counts():
    """shards_total, shards_done, neurons_total and neurons_done over the shards of a query
    (grouped by run by the caller): the columns every progress figure starts from."""
    size, done = T.Shard.size, T.Shard.done_at.is_not(None)
    return (
        func.count(T.Shard.id).label("shards_total"),
        func.count(T.Shard.done_at).label("shards_done"),
        func.coalesce(func.sum(size), 0).label("neurons_total"),
        func.coalesce(func.sum(case((done, size), else_=0)), 0).label("neurons_done"),
    )


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
        return is_complete(self.shards_done, self.shards_total)

    @property
    def compute_rate(self) -> float | None:
        """Neuron sides per second of one worker's compute time."""
        return self.neurons_done / self.compute_seconds if self.compute_seconds else None


def run_progress(session: Session, run: T.Run) -> RunProgress:
    size, done = T.Shard.size, T.Shard.done_at.is_not(None)
    counts = session.execute(select(*shard_counts()).where(T.Shard.run_id == run.id)).one()
    compute_seconds, failed = session.execute(
        select(
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
        began = min(T.utc(at) - timedelta(seconds=seconds or 0) for at, seconds, _ in recent)
        span = max((now - began).total_seconds(), 1e-3)
        rate = sum(n for _, _, n in recent) / span
        eta = (counts.neurons_total - counts.neurons_done) / rate if rate else None
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
        shards_total=counts.shards_total,
        shards_done=counts.shards_done,
        neurons_total=int(counts.neurons_total),
        neurons_done=int(counts.neurons_done),
        neurons_stored=stored,
        failed=failed,
        compute_seconds=float(compute_seconds),
        rate=rate,
        eta_seconds=eta,
        last_error=last_error,
        layers=sorted(layers),
        sides=sorted(sides, key=T.SIDE_ORDER.index),
    )
