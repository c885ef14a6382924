"""Commands that compute: rotate (one neuron, printed), decompose and worker (runs into the
store), status, neighbours, the corpus and activations."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from channelscope.cli.common import (
    CliError,
    at_least_one,
    check_stored_model,
    database,
    duration,
    int_range,
    load,
    log,
    model_spec,
    progress_bar,
    references_dir,
    solver_settings,
    stored_run,
)
from channelscope.core.tokens import visible

# --- rotate --------------------------------------------------------------------------------------


def cmd_rotate(args) -> None:
    from channelscope.core.coordinates import out_of_range
    from channelscope.method.decomposer import Decomposer

    model = load(args.model)
    wrong = out_of_range(
        model.name,
        model.n_layers,
        model.d_mlp,
        model.sides,
        layer=args.layer,
        neuron=args.neuron,
        side=args.side,
    )
    if wrong:
        raise CliError(wrong)
    settings = solver_settings(args)
    decomposer = Decomposer(
        model, settings, device=args.device, seed=args.seed, cache_dir=references_dir(), progress=progress_bar
    )
    on_channel = progress_bar(settings.channels, f"layer {args.layer} {args.side} neuron {args.neuron}")
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
                "percentile_local": _number(ch.percentile_local),
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
    print("  #   kurt   skew    cos    loss  masked  step  alpha  faith  pct  local  top tokens")
    for ch in record.channels:
        flag = " generic" if ch.generic else ""
        top = "  ".join(visible(tokens[i]) for i in ch.top_ids[:8])
        numbers = (
            f"{ch.index:3d} {ch.kurtosis:6.1f} {ch.skew:6.2f} {ch.cos:6.3f} {ch.loss:7.3f} "
            f"{len(ch.masked):7d} {ch.step:5d} {ch.alpha:6.3f} {ch.faithfulness:6.2f} "
            f"{ch.faithfulness_percentile:4.0f} {ch.percentile_local:6.0f}"
        )
        print(f"{numbers}  {top}{flag}")
    recon = " ".join(f"{x:.2f}" for x in record.reconstruction)
    base = " ".join(f"{x:.2f}" for x in record.reconstruction_baseline)
    print(f"reconstruction |P_k w|/|w|: {recon}\n  random vectors at the same cosines: {base}")
    print(
        "faith = mean z of the channel's top tokens in the neuron's own projection; pct = its "
        "percentile against random vectors' channels"
    )


# --- decompose -----------------------------------------------------------------------------------


def cmd_decompose(args) -> None:
    from channelscope.method.decomposer import Decomposer, default_batch_size, pick_device
    from channelscope.web.neighbours import MAX_CHANNELS
    from channelscope.worker import compute, plan, store

    layers = int_range(args.layers, "--layers")
    neurons = int_range(args.neurons, "--neurons") if args.neurons else None
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    url, engine = database(migrate=True)
    model = load(args.model)
    check_stored_model(engine, model)
    shard_size = args.shard_size
    if shard_size is None:  # on a GPU a shard fills one padded batch (docs/method.md, "Determinism")
        device = pick_device(args.device)
        shard_size = default_batch_size(device) if device.type == "cuda" else plan.DEFAULT_SHARD_SIZE
    picks = ()
    if args.aligned or args.random:
        picks = plan.slice_picks(engine, model, layers, sides, args.aligned, args.random, args.seed)
    else:
        neurons = neurons or list(range(model.d_mlp))
    request = plan.Request(layers, sides, neurons or [], shard_size, args.first_neurons, picks)
    try:
        plan.check_request(model, request)
    except plan.JobError as error:
        raise CliError(str(error)) from None
    settings = plan.resolved_settings(
        engine,
        model,
        solver_settings(args),
        args.projection,
        args.reference_count,
        args.seed,
        pick_device(args.device),
    )
    stored = store.run_settings(settings, args.projection, args.reference_count)
    compute.seed_reference_of_settings(engine, model, stored, args.seed, references_dir())
    decomposer = Decomposer(
        model,
        settings,
        projection=args.projection,
        device=args.device,
        cache_dir=references_dir(),
        reference_count=args.reference_count,
        seed=args.seed,
        progress=progress_bar,
    )
    run, added = plan.open_run(engine, model, decomposer, stored, args.seed, request)
    compute.DECOMPOSERS.add(run.hash, model, decomposer)
    log(
        f"run {run.hash}: {model.name}, {settings.solver} solver, {settings.channels} channels, seed "
        f"{args.seed}; {added} new shards"
    )
    if engine.dialect.name == "postgresql":
        progress = _decompose_queued(args, url, engine, run)
    else:
        progress = _decompose_here(args, engine, run)
    if progress is None:
        return
    if not progress.complete:
        missing = progress.shards_total - progress.shards_done
        why = f"{progress.failed} failed, first: {progress.last_error}" if progress.failed else "not queued"
        raise CliError(f"run {run.hash}: {missing} shards not done ({why}); run the same command again")
    print(f"run {run.hash} complete: {progress.shards_total} shards, {progress.neurons_stored} neuron sides")
    if progress.neurons_stored * settings.channels > MAX_CHANNELS:  # too many to compare live
        log(f"nearest channels for its channel pages: channelscope neighbours {run.hash}")


def _shard_bar(engine, run):
    from tqdm import tqdm

    from channelscope.core import db, progress

    with db.session(engine) as session:
        found = progress.run_progress(session, run)
    return tqdm(
        total=found.shards_total,
        initial=found.shards_done,
        desc=f"run {run.hash}",
        unit="shard",
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _decompose_here(args, engine, run):
    """SQLite: every missing shard in this process, one after another."""
    import time

    from channelscope.core import db, progress
    from channelscope.worker import compute, plan

    bar = _shard_bar(engine, run)
    started, neurons = time.perf_counter(), 0

    def on_shard(result) -> None:
        nonlocal neurons
        neurons += result.neurons
        bar.update(1)
        bar.set_postfix_str(f"{neurons / (time.perf_counter() - started):.3g} neurons/s")

    try:
        for _ in compute.compute_pending(
            engine,
            run,
            worker=compute.worker_name(),
            cache_dir=references_dir(),
            device=args.device,
            on_shard=on_shard,
            on_channel_for=lambda shard, total: progress_bar(total, compute.shard_label(shard)),
        ):
            pass
    except plan.JobError as error:
        raise CliError(str(error)) from None
    finally:
        bar.close()
    with db.session(engine) as session:
        return progress.run_progress(session, run)


def _decompose_queued(args, url, engine, run):
    """PostgreSQL: queue the missing shards and work on them here too; `channelscope worker`
    processes elsewhere share the queue."""
    import asyncio
    import logging
    import os
    import signal

    from channelscope.worker import compute, shard_queue

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("procrastinate").setLevel(logging.CRITICAL)  # failures are in `status`
    options = shard_queue.WorkerOptions(
        name=compute.worker_name(),
        cache_dir=references_dir(),
        device=args.device,
        specs=[model_spec(args.model)],
        concurrency=args.concurrency,
        heartbeat_seconds=args.heartbeat_seconds,
        stalled_seconds=args.stalled_seconds,
    )
    if args.enqueue_only:
        added, _ = asyncio.run(
            shard_queue.decompose(url, engine, run, model_spec(args.model), options, print, work=False)
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
            shard_queue.decompose(url, engine, run, model_spec(args.model), options, on_progress)
        )
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    return progress


# --- worker and status ---------------------------------------------------------------------------


def cmd_worker(args) -> None:
    from channelscope.core import db
    from channelscope.worker import compute, plan, shard_queue

    url, engine = database()
    if engine.dialect.name != "postgresql":
        raise CliError(
            "workers share a queue in PostgreSQL: set DATABASE_URL=postgresql://...; "
            "on SQLite, `channelscope decompose` computes the run itself"
        )
    queues = None
    if args.only_run:
        with db.session(engine) as session:
            try:
                queues = [shard_queue.queue_name(plan.find_run(session, args.only_run).hash)]
            except plan.JobError as error:
                raise CliError(str(error)) from None
    name = compute.worker_name()

    def on_shard(result) -> None:
        verb = "done" if result.committed else "already done elsewhere"
        took = f"{result.neurons} neurons in {result.seconds:.1f} s"
        log(f"shard {result.shard_id} ({result.label}): {verb}, {took}")

    options = shard_queue.WorkerOptions(
        name=name,
        cache_dir=references_dir(),
        device=args.device,
        specs=[model_spec(spec) for spec in args.model],
        concurrency=args.concurrency,
        heartbeat_seconds=args.heartbeat_seconds,
        stalled_seconds=args.stalled_seconds,
        on_shard=on_shard,
    )
    log(f"worker {name} waiting for shards (Ctrl-C or SIGTERM stops it after the current shard)")
    shard_queue.run_worker(url, engine, options, queues)


def cmd_status(args) -> None:
    from dataclasses import asdict

    from sqlalchemy import select

    from channelscope.core import db, progress
    from channelscope.core import tables as T
    from channelscope.worker import plan, shard_queue

    _, engine = database()
    with db.session(engine) as session:
        try:
            runs = (
                [plan.find_run(session, args.only_run)]
                if args.only_run
                else session.scalars(select(T.Run).order_by(T.Run.id)).all()
            )
        except plan.JobError as error:
            raise CliError(str(error)) from None
        rows = []
        for run in runs:
            found = progress.run_progress(session, run)
            row = {**asdict(found), "complete": found.complete, "compute_rate": found.compute_rate}
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
            f"{rate:>7}  {'done' if r['complete'] else duration(r['eta_seconds']):>7}  {r['failed']}"
        )
        if r["last_error"]:
            print(f"    first error: {r['last_error']}")
        if r.get("queue"):
            print("    queue: " + ", ".join(f"{n} {status}" for status, n in sorted(r["queue"].items())))
    if workers is not None:
        print(f"live workers: {workers}")


# --- neighbours ---------------------------------------------------------------------------------


def cmd_neighbours(args) -> None:
    from tqdm import tqdm

    from channelscope.method.decomposer import pick_device
    from channelscope.worker import neighbours

    engine, run = stored_run(args.run_hash)
    device = pick_device(args.device)
    with tqdm(desc=f"run {run.hash} neighbours", unit="channel", file=sys.stderr, dynamic_ncols=True) as bar:

        def on_block(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        found = neighbours.build(engine, run, device, args.count, on_block)
    log(
        f"run {found.run_hash}: the {args.count} nearest channels of each of its "
        f"{found.channels:,} channels, exact, on {found.device} in {found.seconds:.1f} s"
    )


# --- measures -----------------------------------------------------------------------------------


def cmd_measures(args) -> None:
    from tqdm import tqdm

    from channelscope.core import db
    from channelscope.core import tables as T
    from channelscope.method.decomposer import pick_device
    from channelscope.method.measures import MEASURES_VERSION
    from channelscope.worker import remeasure

    engine, run = stored_run(args.run_hash)
    left = remeasure.pending(engine, run)
    if not left:
        print(f"run {run.hash}: every neuron side is at measures version {MEASURES_VERSION}")
        return
    with db.session(engine) as session:
        model_row = session.get(T.Model, run.model_id)
        model = load(args.model or model_row.source)
    if model.sha256 != model_row.sha256:
        raise CliError(f"{args.model} is not the file run {run.hash} was computed from")
    device = str(pick_device(args.device))
    decomposer = remeasure.decomposer_for(engine, run, model, device, references_dir())
    with tqdm(
        desc=f"run {run.hash} measures v{MEASURES_VERSION}", total=left, unit="neuron",
        file=sys.stderr, dynamic_ncols=True,
    ) as bar:  # fmt: skip
        done = remeasure.backfill(engine, run, decomposer, lambda n: bar.update(n - bar.n))
    print(f"run {run.hash}: {done:,} neuron sides brought to measures version {MEASURES_VERSION}")


# --- overview ----------------------------------------------------------------------------------


def cmd_overview(args) -> None:
    from tqdm import tqdm

    from channelscope.method.decomposer import pick_device
    from channelscope.worker import overview

    _, engine = database(migrate=True)
    model = load(args.model)
    check_stored_model(engine, model)
    with tqdm(desc=f"{model.name} overview", unit="layer side", file=sys.stderr, dynamic_ncols=True) as bar:

        def on_part(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        computed = overview.build(engine, model, pick_device(args.device), on_part)
    log(
        f"{model.name}: raw projections of {computed} layer sides computed and stored (the rest were already)"
    )


# --- the real corpus and what neurons do on it ------------------------------------------------------


def cmd_corpus(args) -> None:
    from channelscope.core.config import config
    from channelscope.worker import corpus

    if args.action == "add":
        if not args.paths:
            raise CliError("corpus add: name one or more text files")
        for path in args.paths:
            if not path.is_file():
                raise CliError(f"corpus add: {path} is not a file")
            log(f"added {corpus.add(config().data_dir, path)}; `channelscope corpus build` takes it in")
        return
    manifest = corpus.build(config().data_dir)
    chars = ", ".join(f"{source} {count:,}" for source, count in manifest["characters"].items())
    print(f"corpus {manifest['key']}: {manifest['documents']:,} documents (characters: {chars})")


def cmd_activations(args) -> None:
    from tqdm import tqdm

    from channelscope.core.config import config
    from channelscope.method.intervention import load_language_model
    from channelscope.worker import activations, corpus

    _, engine = database(migrate=True)
    model = load(args.model)
    check_stored_model(engine, model)
    built = corpus.ensure_built(config().data_dir, log)
    lm = load_language_model(model.source, args.device if args.device != "auto" else "cpu")
    with tqdm(
        desc=f"{model.name} on corpus {built.key}", unit="doc", file=sys.stderr, dynamic_ncols=True
    ) as bar:

        def on_block(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        found = activations.run(
            engine, model, lm, built, config().data_dir, on_block=on_block, max_documents=args.max_documents
        )
    print(
        f"{model.name}: activations of every neuron over corpus {found['corpus']} "
        f"({found['documents']:,} documents, {found['tokens']:,} tokens) in {found['seconds']:.0f} s, stored"
    )


# --- doctor ------------------------------------------------------------------------------------


def cmd_doctor(args) -> None:
    from dataclasses import asdict

    from channelscope.core.config import config
    from channelscope.method import precision
    from channelscope.method.decomposer import pick_device

    device = pick_device(args.device)
    found = precision.choose(device, config().data_dir, fresh=True)
    if args.json:
        print(json.dumps({**asdict(found), "cores": precision.cores()}))
        return
    rows, d, V = precision.SHAPE
    print(f"device      {found.device} ({found.cpu}; {precision.cores()} cores usable)")
    setting = config().threads or "all cores"
    print(f"torch       {found.torch}, {found.threads} threads (CHANNELSCOPE_THREADS: {setting})")
    print(f"native bf16 {'yes' if found.native_bf16 else 'no'}")
    rates = ", ".join(f"{p} {r:,.1f}" for p, r in found.gflops.items())
    print(f"GEMM        [{rows} x {d}] x [{d} x {V:,}] in GFLOP/s: {rates}")
    print(f"precision   auto -> {found.precision} (kept in {config().data_dir / 'precision.json'})")


# --- the parsers ---------------------------------------------------------------------------------


def add_solver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=int, default=None, help="channels per vector (default 50; rotate: 5)")
    p.add_argument("--solver", choices=["fast", "paper"], default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="GEMM precision against U (default auto: the faster here, or the existing run's)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument(
        "--downweight-generic",
        action="store_true",
        help="down-weight the tokens on the tails of many random vectors' channels (off by default)",
    )


def _add_worker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--concurrency", type=at_least_one, default=1, help="shards at once in this process (default 1)"
    )
    p.add_argument("--heartbeat-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--stalled-seconds",
        type=float,
        default=30.0,
        help="a worker silent this long is taken for dead and its shard queued again (default 30)",
    )


def add_commands(sub) -> None:
    p = sub.add_parser("rotate", help="decompose one neuron vector and print its channels")
    p.add_argument("model", help="smollm2, a .gguf file or a Hugging Face model folder")
    p.add_argument("layer", type=int)
    p.add_argument("neuron", type=int)
    p.add_argument("--side", default="out", help="gate, in or out (default out)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_solver_options(p)
    p.set_defaults(uses_torch=True, run=cmd_rotate, default_channels=5)

    p = sub.add_parser("decompose", help="create or resume a run and compute its channels")
    p.add_argument("model", help="smollm2, a .gguf file or a Hugging Face model folder")
    p.add_argument("--layers", required=True, help="e.g. 20-29 or 0-3,7")
    p.add_argument("--sides", default="out,in,gate", help="comma-separated (default out,in,gate)")
    p.add_argument("--neurons", default=None, help="e.g. 0-1535 (default: every neuron)")
    p.add_argument(
        "--shard-size", type=int, default=None, help="neurons per shard (default 64; 1024 on a GPU)"
    )
    p.add_argument(
        "--aligned",
        type=int,
        default=0,
        help="the N most vocabulary-aligned vectors (highest raw kurtosis) of each layer side, first",
    )
    p.add_argument(
        "--random", type=int, default=0, help="N randomly chosen vectors of each layer side (the run's seed)"
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
    add_solver_options(p)
    p.set_defaults(uses_torch=True, run=cmd_decompose, default_channels=50)

    p = sub.add_parser("worker", help="compute queued shards (PostgreSQL) until stopped")
    p.add_argument("--run", dest="only_run", help="only this run's shards (its hash)")
    p.add_argument("--model", action="append", default=[], help="a model file on this machine (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    _add_worker_options(p)
    p.set_defaults(uses_torch=True, run=cmd_worker)

    p = sub.add_parser("status", help="progress of every run: shards, neurons, throughput, ETA, failures")
    p.add_argument("--run", dest="only_run", help="one run (its hash)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser(
        "neighbours", help="each channel's nearest channels in its run, computed and stored (large runs)"
    )
    p.add_argument("run_hash", metavar="RUN", help="the run's hash (or a unique prefix)")
    p.add_argument("--count", type=int, default=12, help="neighbours kept per channel (default 12)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.set_defaults(uses_torch=True, run=cmd_neighbours)

    p = sub.add_parser(
        "measures", help="bring a run's stored measures up to this code's version (channels unchanged)"
    )
    p.add_argument("run_hash", metavar="RUN")
    p.add_argument("--model", default=None, help="the model file, if not where the run found it")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.set_defaults(uses_torch=True, run=cmd_measures)

    p = sub.add_parser("overview", help="the raw projection of every vector of a model, stored (minutes)")
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.set_defaults(uses_torch=True, run=cmd_overview)

    p = sub.add_parser(
        "corpus", help="the real corpus: build it from this Python's docs and stdlib, add files"
    )
    p.add_argument("action", choices=["build", "add"])
    p.add_argument("paths", nargs="*", type=Path, help="add: text files")
    p.set_defaults(run=cmd_corpus)

    p = sub.add_parser(
        "activations", help="what every neuron does on the real corpus: top contexts, densities"
    )
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument(
        "--max-documents", type=int, default=None, help="only the first N documents (a quick look)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.set_defaults(uses_torch=True, run=cmd_activations)

    p = sub.add_parser("doctor", help="this machine: device, threads, GEMM rates, the precision auto picks")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: auto)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_doctor, uses_torch=True)
