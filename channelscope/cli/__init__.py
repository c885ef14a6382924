"""The `channelscope` command. Each subcommand imports what it needs when it runs, so `--help`
stays instant; bad input ends with one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from channelscope.core.config import config
from channelscope.core.tokens import visible


class CliError(Exception):
    """A problem with the user's input, reported as one line."""


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _int_range(text: str) -> list[int]:
    """`20-29`, `3`, `0-3,7` -> a sorted list of ints."""
    values: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            values.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range like 20-29 or 0-3,7") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty range")
    return sorted(values)


def _progress(total: int, label: str):
    """A tqdm bar on stderr; returns the callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="ch", file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()

    return advance


def _settings(args):
    from channelscope.method import rotate

    base = rotate.PAPER if args.solver == "paper" else rotate.Settings()
    return rotate.with_overrides(
        base,
        channels=args.channels,
        precision=args.precision,
        downweight_generic=args.downweight_generic or None,
    )


def _load(spec: str):
    from channelscope.method.weights import ModelError, load_model

    try:
        return load_model(spec)
    except ModelError as error:
        raise CliError(str(error)) from None


# --- rotate --------------------------------------------------------------------------------------


def cmd_rotate(args) -> None:
    from channelscope.method.decomposer import Decomposer

    model = _load(args.model)
    if not 0 <= args.layer < model.n_layers:
        raise CliError(f"layer {args.layer} is out of range: {model.name} has layers 0-{model.n_layers - 1}")
    if not 0 <= args.neuron < model.d_mlp:
        raise CliError(f"neuron {args.neuron} is out of range: layers have neurons 0-{model.d_mlp - 1}")
    if args.side not in model.sides:
        raise CliError(f"unknown side {args.side!r}: {model.name} has sides {', '.join(model.sides)}")
    settings = _settings(args)
    decomposer = Decomposer(
        model,
        settings,
        device=args.device,
        seed=args.seed,
        cache_dir=config().data_dir / "references",
        progress=_progress,
    )
    on_channel = _progress(settings.channels, f"layer {args.layer} {args.side} neuron {args.neuron}")
    (record,) = decomposer.neurons(args.layer, args.side, [args.neuron], on_channel)
    tokens = model.vocabulary.tokens
    if args.json:
        print(json.dumps(_rotate_json(model.name, record, tokens), ensure_ascii=False))
    else:
        _rotate_table(model.name, record, tokens)


def _number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _rotate_json(model_name: str, record, tokens: list[str]) -> dict:
    return {
        "model": model_name,
        "layer": record.layer,
        "neuron": record.neuron,
        "side": record.side,
        "neuron_kurtosis": _number(record.kurtosis),
        "channels": [
            {
                "index": ch.index,
                "kurtosis": _number(ch.kurtosis),
                "skew": _number(ch.skew),
                "cos": _number(ch.cos),
                "loss": _number(ch.loss),
                "masked": int(len(ch.masked)),
                "step": ch.step,
                "alpha": _number(ch.alpha),
                "faithfulness": _number(ch.faithfulness),
                "faithfulness_percentile": _number(ch.faithfulness_percentile),
                "generic": ch.generic,
                "top_tokens": [
                    {"id": int(i), "token": tokens[i], "z": _number(z)}
                    for i, z in zip(ch.top_ids, ch.top_z, strict=True)
                ],
            }
            for ch in record.channels
        ],
        "reconstruction": [_number(x) for x in record.reconstruction],
        "reconstruction_baseline": [_number(x) for x in record.reconstruction_baseline],
    }


def _rotate_table(model_name: str, record, tokens: list[str]) -> None:
    print(
        f"{model_name}  layer {record.layer}  neuron {record.neuron}  side {record.side}  "
        f"|w| {record.norm:.3f}  kurtosis {record.kurtosis:.2f}"
    )
    print("  #   kurt   skew    cos    loss  masked  step  alpha  faith  pct  top tokens")
    for ch in record.channels:
        flag = " generic" if ch.generic else ""
        top = "  ".join(visible(tokens[i]) for i in ch.top_ids[:8])
        numbers = (
            f"{ch.index:3d} {ch.kurtosis:6.1f} {ch.skew:6.2f} {ch.cos:6.3f} {ch.loss:7.3f} "
            f"{len(ch.masked):7d} {ch.step:5d} {ch.alpha:6.3f} {ch.faithfulness:6.2f} "
            f"{ch.faithfulness_percentile:4.0f}"
        )
        print(f"{numbers}  {top}{flag}")
    recon = " ".join(f"{x:.2f}" for x in record.reconstruction)
    base = " ".join(f"{x:.2f}" for x in record.reconstruction_baseline)
    print(f"reconstruction |P_k w|/|w|: {recon}\n  random vectors at the same cosines: {base}")
    print(
        "faith = mean z of the channel's top tokens in the neuron's own projection; pct = its "
        "percentile against random vectors' channels"
    )


# --- decompose, worker, status, export, db -------------------------------------------------------
# decompose and `db upgrade` bring the schema up to date themselves; worker, status and export
# only check it, so a worker of older code never migrates a shared database under the others.


def _parse_list(text: str, option: str) -> list[int]:
    try:
        return _int_range(text)
    except argparse.ArgumentTypeError as error:
        raise CliError(f"{option}: {error}") from None


def _database(*, migrate: bool = False):
    """The configured database, reachable and at the code's schema revision."""
    from sqlalchemy import make_url, text
    from sqlalchemy.exc import SQLAlchemyError

    from channelscope.core import db

    url = config().database
    try:
        shown = make_url(db.normalise_url(url)).render_as_string(hide_password=True)
    except SQLAlchemyError:
        raise CliError(
            "DATABASE_URL is not a database URL (postgresql://user@host/db or sqlite:///file)"
        ) from None
    try:
        engine = db.make_engine(url)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise CliError(f"cannot connect to the database at {shown}: {reason}") from None
    head = db.head_revision()
    if migrate:
        _migrate(url, engine)
    elif db.current_revision(engine) != head:
        raise CliError(
            f"the database at {shown} has schema revision {db.current_revision(engine) or 'none'}, "
            f"this code needs {head}: run `channelscope db upgrade`"
        )
    return url, engine


def _migrate(url: str, engine) -> None:
    from alembic.util import CommandError
    from sqlalchemy import text

    from channelscope.core import db

    try:
        if engine.dialect.name != "postgresql":
            db.upgrade(url)
            return
        with engine.connect() as connection:
            # Two commands starting at once on a fresh database must not both create it.
            connection.execute(text("SELECT pg_advisory_lock(7012004)"))
            try:
                db.upgrade(url)
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(7012004)"))
                connection.commit()
    except CommandError as error:
        raise CliError(
            f"cannot migrate the database: {error} (is this code older than the database?)"
        ) from None


def _model_spec(spec: str) -> str:
    """What a worker on another machine is told to load: the name, or an absolute path."""
    from pathlib import Path

    return spec if spec == "smollm2" or not Path(spec).exists() else str(Path(spec).resolve())


def cmd_decompose(args) -> None:
    from channelscope.method.decomposer import Decomposer, default_batch_size, pick_device
    from channelscope.worker import jobs, store

    layers = _parse_list(args.layers, "--layers")
    neurons = _parse_list(args.neurons, "--neurons") if args.neurons else None
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    url, engine = _database(migrate=True)
    model = _load(args.model)
    shard_size = args.shard_size
    if shard_size is None:  # on a GPU a shard fills one padded batch (worker/rotate.py, "Determinism")
        device = pick_device(args.device)
        shard_size = default_batch_size(device) if device.type == "cuda" else jobs.DEFAULT_SHARD_SIZE
    request = jobs.Request(layers, sides, neurons or list(range(model.d_mlp)), shard_size, args.first_neurons)
    try:
        jobs.check_request(model, request)
    except jobs.JobError as error:
        raise CliError(str(error)) from None
    settings = _settings(args)
    stored = store.run_settings(settings, args.projection, args.reference_count)
    cache_dir = config().data_dir / "references"
    jobs.seed_reference_of_settings(engine, model, stored, args.seed, cache_dir)
    decomposer = Decomposer(
        model,
        settings,
        projection=args.projection,
        device=args.device,
        cache_dir=cache_dir,
        reference_count=args.reference_count,
        seed=args.seed,
        progress=_progress,
    )
    run, added = jobs.open_run(engine, model, decomposer, stored, args.seed, request)
    jobs.DECOMPOSERS.add(run.hash, model, decomposer)
    print(
        f"run {run.hash}: {model.name}, {settings.solver} solver, {settings.channels} channels, seed "
        f"{args.seed}; {added} new shards",
        file=sys.stderr,
    )
    if engine.dialect.name == "postgresql":
        progress = _decompose_queued(args, url, engine, run, cache_dir)
    else:
        progress = _decompose_here(args, engine, run, cache_dir)
    if progress is None:
        return
    if not progress.complete:
        missing = progress.shards_total - progress.shards_done
        why = f"{progress.failed} failed, first: {progress.last_error}" if progress.failed else "not queued"
        raise CliError(f"run {run.hash}: {missing} shards not done ({why}); run the same command again")
    print(f"run {run.hash} complete: {progress.shards_total} shards, {progress.neurons_stored} neuron sides")
    from channelscope.web.neighbours import MAX_CHANNELS

    if progress.neurons_stored * settings.channels > MAX_CHANNELS:  # too many to compare live
        print(f"nearest channels for its channel pages: channelscope neighbours {run.hash}", file=sys.stderr)


def _shard_bar(engine, run):
    from tqdm import tqdm

    from channelscope.core import db
    from channelscope.worker import jobs

    with db.session(engine) as session:
        progress = jobs.run_progress(session, run)
    return tqdm(
        total=progress.shards_total,
        initial=progress.shards_done,
        desc=f"run {run.hash}",
        unit="shard",
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _decompose_here(args, engine, run, cache_dir):
    """SQLite: every missing shard in this process, one after another."""
    import time

    from channelscope.core import db
    from channelscope.worker import jobs

    bar = _shard_bar(engine, run)
    started, neurons = time.perf_counter(), 0

    def on_shard(result) -> None:
        nonlocal neurons
        neurons += result.neurons
        bar.update(1)
        bar.set_postfix_str(f"{neurons / (time.perf_counter() - started):.3g} neurons/s")

    try:
        for _ in jobs.compute_pending(
            engine,
            run,
            worker=jobs.worker_name(),
            cache_dir=cache_dir,
            device=args.device,
            on_shard=on_shard,
            on_channel_for=lambda shard, total: _progress(total, jobs.shard_label(shard)),
        ):
            pass
    except jobs.JobError as error:
        raise CliError(str(error)) from None
    finally:
        bar.close()
    with db.session(engine) as session:
        return jobs.run_progress(session, run)


def _decompose_queued(args, url, engine, run, cache_dir):
    """PostgreSQL: queue the missing shards and work on them here too; `channelscope worker`
    processes elsewhere share the queue."""
    import asyncio
    import logging
    import os
    import signal

    from channelscope.worker import jobs, shard_queue

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("procrastinate").setLevel(logging.CRITICAL)  # failures are in `status`
    options = shard_queue.WorkerOptions(
        name=jobs.worker_name(),
        cache_dir=cache_dir,
        device=args.device,
        specs=[_model_spec(args.model)],
        concurrency=args.concurrency,
        heartbeat_seconds=args.heartbeat_seconds,
        stalled_seconds=args.stalled_seconds,
    )
    if args.enqueue_only:
        added, _ = asyncio.run(
            shard_queue.decompose(url, engine, run, _model_spec(args.model), options, print, work=False)
        )
        print(f"queued {added} shards of run {run.hash}: start `channelscope worker` to compute them")
        return None

    def leave(*_):
        # A shard in flight runs in a thread that cannot be interrupted; its job goes back to the
        # queue once our heartbeat is missed, and its uncommitted rows are rolled back.
        print("\ninterrupted: the shard in flight returns to the queue", file=sys.stderr, flush=True)
        os._exit(130)

    previous = signal.signal(signal.SIGINT, leave)
    bar = _shard_bar(engine, run)

    def on_progress(progress) -> None:
        bar.total = progress.shards_total
        bar.update(progress.shards_done - bar.n)
        if progress.rate:
            bar.set_postfix_str(f"{progress.rate:.3g} neurons/s (all workers)")

    try:
        _, progress = asyncio.run(
            shard_queue.decompose(url, engine, run, _model_spec(args.model), options, on_progress)
        )
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    return progress


def cmd_worker(args) -> None:
    from channelscope.worker import jobs, shard_queue

    url, engine = _database()
    if engine.dialect.name != "postgresql":
        raise CliError(
            "workers share a queue in PostgreSQL: set DATABASE_URL=postgresql://...; "
            "on SQLite, `channelscope decompose` computes the run itself"
        )
    queues = None
    if args.only_run:
        from channelscope.core import db

        with db.session(engine) as session:
            try:
                queues = [shard_queue.queue_name(jobs.find_run(session, args.only_run).hash)]
            except jobs.JobError as error:
                raise CliError(str(error)) from None
    name = jobs.worker_name()

    def on_shard(result) -> None:
        verb = "done" if result.committed else "already done elsewhere"
        print(
            f"shard {result.shard_id} ({result.label}): {verb}, "
            f"{result.neurons} neurons in {result.seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    options = shard_queue.WorkerOptions(
        name=name,
        cache_dir=config().data_dir / "references",
        device=args.device,
        specs=[_model_spec(spec) for spec in args.model],
        concurrency=args.concurrency,
        heartbeat_seconds=args.heartbeat_seconds,
        stalled_seconds=args.stalled_seconds,
        on_shard=on_shard,
    )
    print(
        f"worker {name} waiting for shards (Ctrl-C or SIGTERM stops it after the current shard)",
        file=sys.stderr,
    )
    shard_queue.run_worker(url, engine, options, queues)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def cmd_status(args) -> None:
    from dataclasses import asdict

    from sqlalchemy import select

    from channelscope.core import db
    from channelscope.core import tables as T
    from channelscope.worker import jobs, shard_queue

    _, engine = _database()
    with db.session(engine) as session:
        try:
            runs = (
                [jobs.find_run(session, args.only_run)]
                if args.only_run
                else session.scalars(select(T.Run).order_by(T.Run.id)).all()
            )
        except jobs.JobError as error:
            raise CliError(str(error)) from None
        rows = []
        for run in runs:
            progress = jobs.run_progress(session, run)
            row = {**asdict(progress), "complete": progress.complete, "compute_rate": progress.compute_rate}
            if engine.dialect.name == "postgresql":
                row["queue"] = shard_queue.job_counts(session, run.hash)
            rows.append(row)
        workers = shard_queue.live_workers(session) if engine.dialect.name == "postgresql" else None
    if args.json:
        print(json.dumps({"runs": rows, "live_workers": workers}, default=str))
        return
    if not rows:
        print("no runs yet: `channelscope decompose MODEL --layers ...` starts one")
        return
    print(
        f"{'run':12}  {'model':24} {'solver':6} {'C':>3}  {'shards':>11}  {'neurons':>13}  "
        f"{'rate/s':>7}  {'ETA':>7}  failed"
    )
    for r in rows:
        rate = f"{r['rate']:.1f}" if r["rate"] else "-"
        print(
            f"{r['run']:12}  {r['model'][:24]:24} {r['solver']:6} {r['channels']:>3}  "
            f"{r['shards_done']:>5}/{r['shards_total']:<5}  "
            f"{r['neurons_stored']:>6}/{r['neurons_total']:<6}  "
            f"{rate:>7}  {'done' if r['complete'] else _duration(r['eta_seconds']):>7}  {r['failed']}"
        )
        if r["last_error"]:
            print(f"    first error: {r['last_error']}")
        if r.get("queue"):
            print("    queue: " + ", ".join(f"{n} {status}" for status, n in sorted(r["queue"].items())))
    if workers is not None:
        print(f"live workers: {workers}")


def _stored_run(run_hash: str):
    """The configured database's engine and the run that a hash (or a unique prefix) names."""
    from channelscope.core import db
    from channelscope.worker import jobs

    _, engine = _database()
    with db.session(engine) as session:
        try:
            return engine, jobs.find_run(session, run_hash)
        except jobs.JobError as error:
            raise CliError(str(error)) from None


def cmd_export(args) -> None:
    from channelscope.web import export

    engine, run = _stored_run(args.run_hash)
    output = args.output or ("-" if args.format == "jsonl" else f"{run.hash}.parquet")
    if output == "-" and args.format == "parquet":
        raise CliError("parquet cannot go to stdout: give -o FILE")
    try:
        count = export.write(engine, run, args.format, output)
    except BrokenPipeError:  # `export RUN | head`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    print(f"wrote {count} neuron sides of run {run.hash} to {output}", file=sys.stderr)


def cmd_neighbours(args) -> None:
    from tqdm import tqdm

    from channelscope.method.decomposer import pick_device
    from channelscope.worker import neighbours

    engine, run = _stored_run(args.run_hash)
    device = pick_device(args.device)
    with tqdm(desc=f"run {run.hash} neighbours", unit="channel", file=sys.stderr, dynamic_ncols=True) as bar:

        def on_block(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        found = neighbours.build(engine, run, device, args.count, on_block)
    print(
        f"run {found.run_hash}: the {args.count} nearest channels of each of its "
        f"{found.channels:,} channels, exact, on {found.device} in {found.seconds:.1f} s",
        file=sys.stderr,
    )


def cmd_db(args) -> None:
    from channelscope.core import db

    _, engine = _database(migrate=args.action == "upgrade")
    print(f"schema revision {db.current_revision(engine)} (head {db.head_revision()})")


# --- eval --------------------------------------------------------------------------------------


def cmd_eval(args) -> None:
    from channelscope.experiments.eval_report import evaluate

    model = _load(args.model)
    evaluate(model, args.out, per_cell=args.per_cell, channels=args.channels, aligned=args.aligned,
             seed=args.seed, cache_dir=config().data_dir / "references", progress=_progress)  # fmt: skip
    print(f"wrote {args.out / 'eval.md'}")


# --- serve ---------------------------------------------------------------------------------------


def cmd_serve(args) -> None:
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from channelscope.core import db

    # Like the worker, serve only checks the schema (decompose and `db upgrade` migrate it): a
    # web process of older code must never migrate a shared database under the others.
    try:
        current, head = db.current_revision(db.engine()), db.head_revision()
        if current != head:
            print(
                f"warning: the database is at migration {current}, not {head}: channelscope db upgrade",
                file=sys.stderr,
            )
    except SQLAlchemyError as error:
        print(f"warning: the database is unreachable for now ({str(error).splitlines()[0]})", file=sys.stderr)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    print(f"Channelscope is serving at http://{shown}:{args.port}/", flush=True)
    uvicorn.run(
        "channelscope.web.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )


# --- ablation: activation thresholds and the evaluation (issue 6) ------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_thresholds(args) -> None:
    from channelscope.method.intervention import load_language_model
    from channelscope.worker import corpus

    model = _load(args.model)
    _, engine = _database(migrate=True)
    lm = load_language_model(model.source, args.device if args.device != "auto" else "cpu")
    found = corpus.ensure_thresholds(engine, model, lm, recompute=args.recompute, log=_log)
    print(f"{model.name}: activation thresholds (90th percentile) of {len(found)} layers are stored")


def cmd_eval_ablation(args) -> None:
    from channelscope.core import db
    from channelscope.experiments import ablation_report
    from channelscope.method import rotate
    from channelscope.method.decomposer import Decomposer
    from channelscope.method.intervention import load_language_model
    from channelscope.worker import corpus

    model = _load(args.model)
    layers = _parse_list(args.layers, "--layers")
    if max(layers) >= model.n_layers:
        raise CliError(f"--layers: {model.name} has layers 0-{model.n_layers - 1}")
    _, engine = _database(migrate=True)
    lm = load_language_model(model.source)
    thresholds = corpus.ensure_thresholds(engine, model, lm, log=_log)
    settings = rotate.with_overrides(rotate.Settings(), channels=args.channels)
    decomposer = Decomposer(
        model, settings, device=args.device, seed=args.seed, cache_dir=config().data_dir / "references"
    )
    with db.session(engine) as session:
        result = ablation_report.evaluate(
            model, lm, decomposer, session, thresholds, layers, per_cell=args.per_cell, aligned=args.aligned,
            channels=args.channels, draws=args.draws, texts=args.texts, seed=args.seed, log=_log,
        )  # fmt: skip
    command = (
        f"channelscope eval-ablation {args.model} --layers {args.layers} --per-cell {args.per_cell} "
        f"--aligned {args.aligned} --channels {args.channels} --draws {args.draws} --texts {args.texts} "
        f"--seed {args.seed}"
    )
    print(f"wrote {ablation_report.write_report(result, args.out, command)}")


# --- the parser ----------------------------------------------------------------------------------


def _add_solver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=int, default=None, help="channels per vector (default 50; rotate: 5)")
    p.add_argument("--solver", choices=["fast", "paper"], default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="GEMM precision against U")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument(
        "--downweight-generic",
        action="store_true",
        help="down-weight the tokens on the tails of many random vectors' channels (off by default)",
    )


def _add_worker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--concurrency", type=_at_least_one, default=1, help="shards at once in this process (default 1)"
    )
    p.add_argument("--heartbeat-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--stalled-seconds",
        type=float,
        default=30.0,
        help="a worker silent this long is taken for dead and its shard queued again (default 30)",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="channelscope",
        description="Browse the MLP neurons of a language model through their vocabulary channels (ROTATE).",
    )
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rotate", help="decompose one neuron vector and print its channels")
    p.add_argument("model", help="smollm2, a .gguf file or a Hugging Face model folder")
    p.add_argument("layer", type=int)
    p.add_argument("neuron", type=int)
    p.add_argument("--side", default="out", help="gate, in or out (default out)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_solver_options(p)
    p.set_defaults(run=cmd_rotate, default_channels=5)

    p = sub.add_parser("serve", help="the web app: browse neurons, search channels by token")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--workers", type=int, default=1, help="web processes (default 1)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser(
        "eval", help="the scientific report: channels against random vectors (reports/eval.md)"
    )
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--per-cell", type=int, default=8, help="random neurons per layer group and side")
    p.add_argument("--aligned", type=int, default=8, help="highest-kurtosis late neurons per side")
    p.add_argument("--channels", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.set_defaults(run=cmd_eval, default_channels=10)

    p = sub.add_parser("decompose", help="create or resume a run and compute its channels")
    p.add_argument("model", help="smollm2, a .gguf file or a Hugging Face model folder")
    p.add_argument("--layers", required=True, help="e.g. 20-29 or 0-3,7")
    p.add_argument("--sides", default="out,in,gate", help="comma-separated (default out,in,gate)")
    p.add_argument("--neurons", default=None, help="e.g. 0-1535 (default: every neuron)")
    p.add_argument(
        "--shard-size", type=int, default=None, help="neurons per shard (default 64; 1024 on a GPU)"
    )
    p.add_argument(
        "--first-neurons",
        type=int,
        default=0,
        help="the first N neurons of each layer side in shards of their own, before all others",
    )
    p.add_argument("--projection", choices=["unembedding", "embedding"], default="unembedding")
    p.add_argument("--reference-count", type=int, default=64, help="random vectors in the reference")
    _add_worker_options(p)
    p.add_argument(
        "--enqueue-only",
        action="store_true",
        help="PostgreSQL: queue the shards for workers, compute nothing here",
    )
    _add_solver_options(p)
    p.set_defaults(run=cmd_decompose, default_channels=50)

    p = sub.add_parser("worker", help="compute queued shards (PostgreSQL) until stopped")
    p.add_argument("--run", dest="only_run", help="only this run's shards (its hash)")
    p.add_argument("--model", action="append", default=[], help="a model file on this machine (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    _add_worker_options(p)
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("status", help="progress of every run: shards, neurons, throughput, ETA, failures")
    p.add_argument("--run", dest="only_run", help="one run (its hash)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("export", help="write a whole run in the JSON API's layout, streaming")
    p.add_argument("run_hash", metavar="RUN", help="the run's hash (or a unique prefix)")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    p.add_argument("-o", "--output", help="file to write (jsonl default: stdout; parquet: RUN.parquet)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser(
        "neighbours", help="each channel's nearest channels in its run, computed and stored (large runs)"
    )
    p.add_argument("run_hash", metavar="RUN", help="the run's hash (or a unique prefix)")
    p.add_argument("--count", type=int, default=12, help="neighbours kept per channel (default 12)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.set_defaults(run=cmd_neighbours)

    p = sub.add_parser("db", help="the database schema (Alembic migrations)")
    p.add_argument("action", choices=["upgrade", "current"])
    p.set_defaults(run=cmd_db)
    p = sub.add_parser("thresholds", help="each neuron's activation 90th percentile over the corpus, stored")
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--recompute", action="store_true", help="even if stored for this corpus")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.set_defaults(run=cmd_thresholds)

    p = sub.add_parser(
        "eval-ablation", help="selectivity of channel ablations, weights and real model (reports/ablation.md)"
    )
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--layers", default="2,8,14,20,25,29", help="layers to sample (default 2,8,14,20,25,29)")
    p.add_argument("--per-cell", type=int, default=2, help="random neurons per layer and side (default 2)")
    p.add_argument("--aligned", type=int, default=2, help="highest-kurtosis out neurons per late layer")
    p.add_argument("--channels", type=int, default=None, help="first channels of each neuron (default 5)")
    p.add_argument("--draws", type=int, default=8, help="random directions per channel (default 8)")
    p.add_argument("--texts", type=int, default=4, help="corpus texts per out neuron for forward passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="for decomposing missing channels (default: auto)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.set_defaults(run=cmd_eval_ablation, default_channels=5)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "channels", 0) is None:
        args.channels = args.default_channels
    if getattr(args, "channels", None) is not None and args.channels < 1:
        print("error: --channels must be at least 1", file=sys.stderr)
        return 2
    if hasattr(args, "device") and args.device is None:
        args.device = config().device
    try:
        args.run(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
