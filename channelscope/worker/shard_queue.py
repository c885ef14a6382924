"""The shard queue on PostgreSQL: procrastinate, which keeps its jobs in the same database.

Why procrastinate. The channel store is PostgreSQL already, and procrastinate needs nothing
else: no broker to run on every cluster (Celery, RQ and arq need Redis or RabbitMQ), jobs are
rows that `channelscope status` can count with SQL, workers wake through LISTEN/NOTIFY and
take a job with `SELECT ... FOR UPDATE SKIP LOCKED`, so any number of machines share a queue
with nothing but DATABASE_URL. Its schema is created by our own Alembic migration 0002.

What it does not do by itself: give back the job of a worker that died. Each worker writes a
heartbeat (`update_heartbeat_interval`), and `JobManager.get_stalled_jobs` lists the jobs still
`doing` under a worker whose heartbeat is older than a limit; every worker here runs a loop that
asks for those and puts them back with `retry_job`. A job lost MAX_LOST times is failed instead,
so a shard that kills whatever runs it (out of memory, say) cannot take down one worker after
another. A worker wrongly taken for dead costs only duplicate compute: the shard's done mark
(worker/compute.py) lets exactly one commit through.

One queue per run, so `decompose` works on its own run only and stops when it is complete,
while `channelscope worker` serves every queue (or one run with --run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from procrastinate import App, PsycopgConnector
from procrastinate.exceptions import AlreadyEnqueued, ConnectorException
from procrastinate.jobs import Status
from sqlalchemy import Engine, make_url, text
from sqlalchemy.orm import Session

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.core.progress import RunProgress, run_progress
from channelscope.worker import compute, on_demand, plan

SHARD_TASK = "channelscope.shard"
# A neuron opened on a page (worker/on_demand.py): its own queue, served by every worker and by
# `decompose`, at a priority above every shard's.
NEURON_TASK = "channelscope.neuron"
NEURON_QUEUE = "on-demand"
NEURON_PRIORITY = 1000
QUEUE_PREFIX = "run-"
MAX_LOST = 3
logger = logging.getLogger("channelscope.worker")


def queue_name(run_hash: str) -> str:
    return QUEUE_PREFIX + run_hash


def conninfo(url: str) -> str:
    """A libpq URI for psycopg from a SQLAlchemy URL (which may name the driver)."""
    return make_url(db.normalise_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class WorkerOptions:
    name: str
    cache_dir: Path
    device: str = "auto"
    specs: list[str] = field(default_factory=list)  # where to look for model files, besides the job's
    concurrency: int = 1
    heartbeat_seconds: float = 10.0
    # A worker silent this long is taken for dead. Keep it several heartbeats long: a heartbeat
    # can be late while a shard holds the CPU.
    stalled_seconds: float = 30.0
    poll_seconds: float = 2.0  # fallback only: LISTEN/NOTIFY wakes workers at once
    on_shard: Callable[[compute.ShardResult], None] | None = None


@dataclass
class _Context:
    engine: Engine
    options: WorkerOptions


def make_app(url: str) -> App:
    app = App(connector=PsycopgConnector(conninfo=conninfo(url), min_size=1, max_size=8))
    app.task(name=SHARD_TASK, pass_context=True)(_shard_task)
    app.task(name=NEURON_TASK, pass_context=True)(_neuron_task)
    return app


def _shard_task(context, shard: int, model: str) -> dict:
    own: _Context = context.additional_context["channelscope"]
    result = compute.compute_shard(
        own.engine,
        shard,
        worker=own.options.name,
        specs=[*own.options.specs, model],
        device=own.options.device,
        cache_dir=own.options.cache_dir,
    )
    if own.options.on_shard:
        own.options.on_shard(result)
    return {"committed": result.committed, "neurons": result.neurons, "seconds": round(result.seconds, 3)}


def _neuron_task(context, source: str, sha256: str, layer: int, neuron: int) -> dict:
    own: _Context = context.additional_context["channelscope"]
    run_hash = on_demand.compute_neuron(
        own.engine, source, sha256, layer, neuron,
        device=own.options.device, cache_dir=own.options.cache_dir, worker=own.options.name,
    )  # fmt: skip
    return {"run": run_hash, "layer": layer, "neuron": neuron}


def neuron_lock(sha256: str, layer: int, neuron: int) -> str:
    """One job per neuron, however many ask (procrastinate's queueing lock)."""
    return f"neuron-{sha256[:16]}-{layer}-{neuron}"


def queued_neurons(session: Session) -> int:
    """On-demand requests waiting or running, all models."""
    return session.scalar(
        text(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = :task AND status IN ('todo', 'doing')"
        ),
        {"task": NEURON_TASK},
    )


def neuron_job(session: Session, sha256: str, layer: int, neuron: int) -> str | None:
    """The status of the newest on-demand job of a neuron (todo, doing, failed ...), if any."""
    return session.scalar(
        text(
            "SELECT status::text FROM procrastinate_jobs WHERE queueing_lock = :lock ORDER BY id DESC LIMIT 1"
        ),
        {"lock": neuron_lock(sha256, layer, neuron)},
    )


# --- queueing a run -------------------------------------------------------------------------------


def active_jobs(session: Session, run_hash: str) -> dict[int, str]:
    """shard id -> status of the run's jobs that are waiting or running."""
    rows = session.execute(
        text(
            "SELECT (args->>'shard')::int, status::text FROM procrastinate_jobs "
            "WHERE queue_name = :queue AND task_name = :task AND status IN ('todo', 'doing')"
        ),
        {"queue": queue_name(run_hash), "task": SHARD_TASK},
    )
    return dict(rows.all())


async def enqueue(app: App, engine: Engine, run: T.Run, model_spec: str) -> int:
    """A job for every shard of the run that is not done and has no job waiting or running.
    A job left `doing` by a dead worker is not doubled: the stalled-job loop gives it back."""

    def unqueued():
        with db.session(engine) as session:
            active = active_jobs(session, run.hash)
            return [(s.id, s.priority) for s in plan.pending_shards(session, run.id) if s.id not in active]

    added = 0
    for shard_id, priority in await asyncio.to_thread(unqueued):
        deferrer = app.configure_task(
            SHARD_TASK,
            queue=queue_name(run.hash),
            priority=-priority,  # procrastinate runs higher first; our column runs lower first
            queueing_lock=f"shard-{shard_id}",
        )
        with contextlib.suppress(AlreadyEnqueued):  # another `decompose` queued it a moment ago
            await deferrer.defer_async(shard=shard_id, model=model_spec)
            added += 1
    return added


# --- running workers ------------------------------------------------------------------------------


async def recover_stalled(app: App, engine: Engine, options: WorkerOptions) -> None:
    """Put the shards of dead workers back in the queue (see the module's docstring)."""
    every = max(1.0, options.stalled_seconds / 3)
    while True:
        await asyncio.sleep(every)
        try:
            stalled = await app.job_manager.get_stalled_jobs(
                task_name=SHARD_TASK, seconds_since_heartbeat=options.stalled_seconds
            )
        except Exception as error:  # the database may be restarting: try again next round
            logger.warning("could not look for stalled jobs: %s", error)
            continue
        for job in stalled:
            shard = job.task_kwargs.get("shard")
            try:
                if job.attempts + 1 >= MAX_LOST:
                    await app.job_manager.finish_job(job, status=Status.FAILED, delete_job=False)
                    await asyncio.to_thread(
                        _record_lost, engine, shard, f"its worker was lost {job.attempts + 1} times"
                    )
                    logger.warning("shard %s failed: its worker was lost %s times", shard, job.attempts + 1)
                else:
                    await app.job_manager.retry_job(job)
                    logger.warning("shard %s: its worker stopped sending heartbeats; queued again", shard)
            except Exception:
                # Another worker's loop got to this job first.
                logger.debug("stalled job %s was handled elsewhere", job.id)


def _record_lost(engine: Engine, shard_id: int, message: str) -> None:
    with db.session(engine) as session, session.begin():
        session.execute(
            text("UPDATE shards SET error = :error WHERE id = :id AND done_at IS NULL"),
            {"error": message, "id": shard_id},
        )


def _lost_job_quietly(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """A worker paused past the stall limit finds, once it resumes, that its shard went to
    another worker: its commit is rejected (compute.commit_shard; `on_shard` says "already done
    elsewhere" in one line), and procrastinate's own attempt to finish the job fails inside a
    task that nobody awaits, which asyncio would report with a traceback. That failure says
    nothing more, so only the debug log has it; anything else goes to asyncio's handler."""
    error = context.get("exception")
    if isinstance(error, ConnectorException) and 'not in "doing"' in str(error.__cause__):
        logger.debug("the job of a shard done elsewhere was finished there: %s", error.__cause__)
        return
    loop.default_exception_handler(context)


async def serve(
    app: App,
    engine: Engine,
    options: WorkerOptions,
    *,
    queues: list[str] | None = None,
    until: Coroutine | None = None,
    install_signal_handlers: bool = True,
):
    """Run a procrastinate worker with the stalled-job loop beside it, until it is stopped by
    a signal or, when given, until the coroutine `until` returns (its result is returned)."""
    asyncio.get_running_loop().set_exception_handler(_lost_job_quietly)
    recovery = asyncio.create_task(recover_stalled(app, engine, options), name="stalled jobs")
    worker = asyncio.create_task(
        app.run_worker_async(
            queues=queues,
            name=options.name,
            concurrency=options.concurrency,
            fetch_job_polling_interval=options.poll_seconds,
            update_heartbeat_interval=options.heartbeat_seconds,
            stalled_worker_timeout=options.stalled_seconds,
            install_signal_handlers=install_signal_handlers,
            additional_context={"channelscope": _Context(engine, options)},
        ),
        name="procrastinate worker",
    )
    watcher = asyncio.create_task(until, name="until") if until is not None else None
    try:
        await asyncio.wait({worker, watcher} - {None}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelling the worker lets a running shard finish first (procrastinate's graceful stop).
        for task in (watcher, worker, recovery):
            if task and not task.done():
                task.cancel()
        for task in (watcher, worker, recovery):
            if task:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if watcher and watcher.done() and not watcher.cancelled():
        return watcher.result()
    return None


async def watch_run(
    engine: Engine,
    run: T.Run,
    on_progress: Callable[[RunProgress], None],
    every: float = 1.0,
) -> RunProgress:
    """Report the run's progress until it is complete, or until no job of it is left waiting or
    running (the rest failed)."""

    def look():
        with db.session(engine) as session:
            found = run_progress(session, session.get(T.Run, run.id))
            return found, len(active_jobs(session, run.hash))

    while True:
        progress, active = await asyncio.to_thread(look)
        on_progress(progress)
        if progress.complete or not active:
            return progress
        await asyncio.sleep(every)


async def decompose(
    url: str,
    engine: Engine,
    run: T.Run,
    model_spec: str,
    options: WorkerOptions,
    on_progress: Callable[[RunProgress], None],
    *,
    work: bool = True,
) -> tuple[int, RunProgress | None]:
    """Queue the run's missing shards and, with `work`, process them here until the run is
    complete; workers elsewhere take shards from the same queue meanwhile. Returns how many
    shards were queued, and the run's progress at the end (None if the worker stopped first)."""
    app = make_app(url)
    async with app.open_async():
        added = await enqueue(app, engine, run, model_spec)
        if not work:
            return added, None
        progress = await serve(
            app,
            engine,
            options,
            queues=[queue_name(run.hash), NEURON_QUEUE],  # on-demand neurons go first
            until=watch_run(engine, run, on_progress),
            install_signal_handlers=False,
        )
        return added, progress


def run_worker(url: str, engine: Engine, options: WorkerOptions, queues: list[str] | None = None) -> None:
    """`channelscope worker`: serve until SIGINT or SIGTERM (a running shard finishes first)."""

    async def main():
        app = make_app(url)
        async with app.open_async():
            await serve(app, engine, options, queues=queues)

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    asyncio.run(main())


def job_counts(session: Session, run_hash: str) -> dict[str, int]:
    """The run's jobs by status: todo, doing, succeeded, failed ..."""
    rows = session.execute(
        text(
            "SELECT status::text, count(*) FROM procrastinate_jobs WHERE queue_name = :queue GROUP BY status"
        ),
        {"queue": queue_name(run_hash)},
    )
    return dict(rows.all())


def live_workers(session: Session, within_seconds: float = 30.0) -> int:
    """Workers whose last heartbeat is recent, on any machine."""
    return session.scalar(
        text(
            "SELECT count(*) FROM procrastinate_workers "
            "WHERE last_heartbeat > now() - make_interval(secs => :seconds)"
        ),
        {"seconds": within_seconds},
    )
