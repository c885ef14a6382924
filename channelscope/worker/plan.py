"""Planning a run: what was asked for, the run's shards, and finding a run again.

A run (worker/store.py: settings, model and seed, named by a content hash) is split into shards:
one layer, one side, one block of neurons. Asking again for the same run adds only the shards
it lacks, so `decompose` after a crash resumes, and a wider --layers or --neurons extends the run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.core.config import config
from channelscope.core.coordinates import out_of_range
from channelscope.method import precision, rotate, sampling
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import Model
from channelscope.worker import overview, store

DEFAULT_SHARD_SIZE = 64
# Shards are computed lowest priority first. Within a tier `out` goes first: it is what a neuron
# writes, and the pages lead with it; the read sides follow. The tiers: a neuron someone opened
# on a page, then the default slice's most aligned and random vectors, then the first-neurons
# head, then ordinary blocks.
SIDE_PRIORITY = {side: rank for rank, side in enumerate(T.SIDE_ORDER)}
ON_DEMAND, ALIGNED, RANDOM, HEAD, ORDINARY = -40, -30, -20, -10, 0


class JobError(Exception):
    """A run or shard that cannot go ahead; the message is one line meant for a person."""


# --- what was asked for ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pick:
    """Scattered neurons of one layer and side, planned as one shard of their own."""

    layer: int
    side: str
    neurons: tuple[int, ...]
    tier: int  # ON_DEMAND, ALIGNED or RANDOM


@dataclass(frozen=True)
class Request:
    layers: list[int]
    sides: list[str]
    neurons: list[int]  # cut into blocks of shard_size
    shard_size: int = DEFAULT_SHARD_SIZE
    # The first `first` requested neurons of every layer side in shards of their own, computed
    # before all other shards: the first pages appear soon, and because every shard is planned
    # at once, the run is not "complete" (its pinned pages immutable) until all of it is done.
    first: int = 0
    picks: tuple[Pick, ...] = ()  # scattered neurons, before every block


def check_request(model: Model, request: Request) -> None:
    """Every layer, side and neuron must exist in the model; a shard holds at least one neuron."""
    if not request.layers:
        raise JobError("the layer range is empty")
    if not request.neurons and not request.picks:
        raise JobError("the neuron range is empty")
    if not request.sides:
        raise JobError("no side given: use gate, in and/or out")
    shape = (model.name, model.n_layers, model.d_mlp, model.sides)
    picked = [{"layer": p.layer, "side": p.side} for p in request.picks]
    coordinates = [
        *({"layer": x} for x in request.layers),
        *({"neuron": x} for x in [*request.neurons, *(n for p in request.picks for n in p.neurons)]),
        *({"side": x} for x in request.sides),
        *picked,
    ]
    for given in coordinates:
        wrong = out_of_range(*shape, **given)
        if wrong:
            raise JobError(wrong)
    if request.shard_size < 1:
        raise JobError("--shard-size must be at least 1")
    if request.first < 0:
        raise JobError("--first-neurons cannot be negative")


def slice_picks(
    engine: Engine, model: Model, layers: list[int], sides: list[str], aligned: int, random: int, seed: int
) -> tuple[Pick, ...]:
    """A default slice that shows the whole model: in every layer and side, the `aligned` most
    vocabulary-aligned vectors (highest raw kurtosis, from the stored overview where it exists)
    and `random` others drawn with a generator of the run's seed, layer and side."""
    picks = []
    with db.session(engine) as session:
        model_id = session.scalar(select(T.Model.id).where(T.Model.sha256 == model.sha256))
        for layer in layers:
            for side in sides:
                stored = overview.raw_kurtosis(session, model_id, layer, side) if model_id else None
                kurtosis = (
                    torch.from_numpy(stored)
                    if stored is not None
                    else sampling.raw_kurtosis(model, layer, side)
                )
                top = torch.argsort(kurtosis, descending=True, stable=True)[:aligned].tolist()
                generator = torch.Generator().manual_seed(rotate.neuron_seed(seed, layer, side, -1))
                others = [
                    n for n in torch.randperm(model.d_mlp, generator=generator).tolist() if n not in top
                ]
                picks.append(Pick(layer, side, tuple(sorted(top)), ALIGNED))
                picks.append(Pick(layer, side, tuple(sorted(others[:random])), RANDOM))
    return tuple(p for p in picks if p.neurons)


def blocks(neurons: list[int], taken: set[int], size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over the requested neurons that no existing shard covers (`taken`),
    each within one aligned block of `size` (0-63, 64-127, ...), so that extending a run later
    cuts the same blocks as asking for everything at once would have."""
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


def resolved_settings(
    engine: Engine,
    model: Model,
    settings: rotate.Settings,
    projection: str,
    reference_count: int,
    seed: int,
    device: torch.device,
) -> rotate.Settings:
    """`auto` precision becomes the precision of the run these settings already have, made on
    any machine, so that extending it never mixes precisions or splits its permalinks; for a new
    run, the machine's choice (method/precision.py). Two machines that create a run from scratch
    may therefore make two different runs."""
    if settings.precision != "auto":
        return settings
    digests = {
        store.run_hash(
            model.sha256,
            store.run_settings(replace(settings, precision=p), projection, reference_count),
            seed,
        ): p
        for p in precision.PRECISIONS
    }
    with db.session(engine) as session:
        newest = select(T.Run.hash).where(T.Run.hash.in_(digests)).order_by(*T.NEWEST_RUN).limit(1)
        found = session.scalar(newest)
    chosen = digests[found] if found else precision.choose(device, config().data_dir).precision
    return replace(settings, precision=chosen)


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
    taken: dict[tuple[int, str], set[int]] = {}
    for shard in session.execute(
        select(T.Shard.layer, T.Shard.side, T.Shard.neuron_start, T.Shard.neuron_stop, T.Shard.neurons).where(
            T.Shard.run_id == run.id
        )
    ):
        taken.setdefault((shard.layer, shard.side), set()).update(T.shard_neurons(shard))
    rows = []

    def add(layer: int, side: str, neurons: list[int], priority: int, scattered: bool) -> None:
        rows.append(
            dict(
                run_id=run.id,
                layer=layer,
                side=side,
                neuron_start=neurons[0],
                neuron_stop=neurons[-1] + 1,
                neurons=neurons if scattered else None,
                size=len(neurons),
                priority=priority,
                attempts=0,
            )
        )
        taken.setdefault((layer, side), set()).update(neurons)

    for pick in request.picks:
        wanted = sorted(set(pick.neurons) - taken.get((pick.layer, pick.side), set()))
        if wanted:
            add(pick.layer, pick.side, wanted, pick.tier + SIDE_PRIORITY[pick.side], scattered=True)
    head = sorted(request.neurons)[: request.first]
    for side in sorted(request.sides, key=SIDE_PRIORITY.__getitem__):
        for layer in request.layers:
            # the head before every ordinary shard of any side
            for neurons, size, tier in (
                (head, max(1, request.first), HEAD),
                (request.neurons, request.shard_size, ORDINARY),
            ):
                for start, stop in blocks(neurons, taken.get((layer, side), set()), size):
                    add(layer, side, list(range(start, stop)), tier + SIDE_PRIORITY[side], scattered=False)
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
