"""Every database query the web app makes, and nothing else: routes call these, templates never
query. Each page makes a fixed number of these calls, whatever the number of channels or rows
(tests/test_web.py counts them), and every list is read with keyset pagination, never OFFSET.

Rows come back as SQLAlchemy Row tuples (attribute access, no ORM identity map): a neuron page
reads a thousand token rows, and plain tuples are several times cheaper than ORM objects.

The queries of the pages that are hit most (neuron, channel, search) are built once, with bound
parameters, and cached (`functools.cache`): building a SQLAlchemy statement and its cache key
cost more than running it (a six-variant token search: 7 ms to build, 0.4 ms in PostgreSQL).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Float, and_, bindparam, cast, func, literal, or_, select, tuple_, union_all
from sqlalchemy.engine import Result, Row
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql import ColumnElement

from channelscope.core import tables as T
from channelscope.core.progress import shard_counts
from channelscope.core.tokens import LABEL_TOKENS
from channelscope.method.overview import OVERVIEW_VERSION

MODEL_COLUMNS = (
    T.Model.id,
    T.Model.name,
    T.Model.source,
    T.Model.sha256,
    T.Model.n_layers,
    T.Model.d_model,
    T.Model.d_mlp,
    T.Model.vocab_size,
    T.Model.sides,
    T.Model.created_at,
)
RUN_COLUMNS = (
    T.Run.id.label("run_id"),
    T.Run.hash,
    T.Run.model_id,
    T.Run.reference_id,
    T.Run.solver,
    T.Run.seed,
    T.Run.channels.label("run_channels"),
    T.Run.projection,
    T.Run.algorithm_version,
    T.Run.settings,
    T.Run.created_at.label("run_created_at"),
)
NEURON_COLUMNS = (
    T.Neuron.id,
    T.Neuron.layer,
    T.Neuron.side,
    T.Neuron.neuron,
    T.Neuron.vector,
    T.Neuron.norm,
    T.Neuron.kurtosis,
    T.Neuron.skew,
    T.Neuron.top_tokens,
    T.Neuron.bottom_tokens,
    T.Neuron.reconstruction,
    T.Neuron.reconstruction_baseline,
    T.Neuron.coverage,
    T.Neuron.measures_version,
    T.Neuron.score,
)
CHANNEL_COLUMNS = (
    T.Channel.channel,
    T.Channel.vector,
    T.Channel.kurtosis,
    T.Channel.skew,
    T.Channel.cos,
    T.Channel.loss,
    T.Channel.masked,
    T.Channel.step,
    T.Channel.history,
    T.Channel.alpha,
    T.Channel.faithfulness,
    T.Channel.faithfulness_percentile,
    T.Channel.percentile_local,
    T.Channel.generic,
)


def _execute(session: Session, statement, params: dict | None = None) -> Result:
    """Runs a statement on the session's connection. These statements select columns, not ORM
    entities, so the ORM's execution layer would add nothing but ~0.1 ms a query."""
    return session.connection().execute(statement, params)


def _scalar(session: Session, statement, params: dict | None = None):
    return _execute(session, statement, params).scalar()


# --- models and runs -------------------------------------------------------------------------------


@functools.cache
def _overview_parts():
    """How many layer sides of the model's overview are stored: all of them (layers x sides)
    once `channelscope overview` has finished. A count, so a model without one costs no query."""
    return (
        select(func.count())
        .select_from(T.OverviewLayer)
        .where(T.OverviewLayer.model_id == T.Model.id, T.OverviewLayer.version == OVERVIEW_VERSION)
        .scalar_subquery()
        .label("overview_parts")
    )


def _models():
    return select(*MODEL_COLUMNS, _overview_parts()).order_by(T.Model.name)


@functools.cache
def _model():
    return select(*MODEL_COLUMNS).where(T.Model.name == bindparam("name"))


def models(session: Session) -> Sequence[Row]:
    return _execute(session, _models()).all()


def model(session: Session, name: str) -> Row | None:
    return _execute(session, _model(), {"name": name}).one_or_none()


def vocabulary_blob(session: Session, model_id: int) -> bytes:
    return _scalar(session, select(T.Model.vocabulary).where(T.Model.id == model_id))


def projection_blob(session: Session, model_id: int, projection: str) -> bytes:
    """U (the unembedding) or W_E.T, float16 and compressed; the embedding falls back to U
    where the model ties the two (store.ensure_model keeps only one copy then)."""
    if projection == "embedding":
        column = func.coalesce(T.Model.embedding, T.Model.unembedding)
    else:
        column = T.Model.unembedding
    return _scalar(session, select(column).where(T.Model.id == model_id))


def reference_tail_tokens(session: Session, reference_id: int) -> list[int]:
    return _scalar(session, select(T.Reference.tail_tokens).where(T.Reference.id == reference_id)) or []


def runs_with_progress(session: Session, model_id: int | None = None) -> Sequence[Row]:
    """Every run (of one model, if given) with its model's name and its shard counts, newest
    first (the home and model pages)."""
    query = (
        select(*RUN_COLUMNS, T.Model.name.label("model_name"), *shard_counts())
        .join(T.Model, T.Model.id == T.Run.model_id)
        .outerjoin(T.Shard, T.Shard.run_id == T.Run.id)
        .group_by(T.Run.id, T.Model.name)
        .order_by(*T.NEWEST_RUN)
    )
    if model_id is not None:
        query = query.where(T.Run.model_id == model_id)
    return _execute(session, query).all()


def run_progress(session: Session, run_id: int) -> Row:
    return _execute(session, select(*shard_counts()).where(T.Shard.run_id == run_id)).one()


def run_by_hash(session: Session, model_id: int | None, run_hash: str) -> Row | None:
    """A run by its hash, within one model (or any model, for search's ?run= alone)."""
    query = select(*RUN_COLUMNS).where(T.Run.hash == run_hash)
    if model_id is not None:
        query = query.where(T.Run.model_id == model_id)
    return _execute(session, query).one_or_none()


def newest_run(session: Session, model_id: int, layer: int | None = None) -> Row | None:
    """The newest run of a model that has any neuron computed (in this layer, if given)."""
    has_neurons = select(T.Neuron.id).where(T.Neuron.run_id == T.Run.id)
    if layer is not None:
        has_neurons = has_neurons.where(T.Neuron.layer == layer)
    query = (
        select(*RUN_COLUMNS).where(T.Run.model_id == model_id, has_neurons.exists()).order_by(*T.NEWEST_RUN)
    )
    return _execute(session, query.limit(1)).one_or_none()


@functools.cache
def _models_with_newest_run():
    ranked = (
        select(
            *RUN_COLUMNS,
            func.row_number().over(partition_by=T.Run.model_id, order_by=T.NEWEST_RUN).label("rank"),
        )
        .where(select(T.Neuron.id).where(T.Neuron.run_id == T.Run.id).exists())
        .subquery()
    )
    newest = select(ranked).where(ranked.c.rank == 1).subquery()
    return (
        select(*MODEL_COLUMNS, _overview_parts(), *(column for column in newest.c if column.name != "rank"))
        .outerjoin(newest, newest.c.model_id == T.Model.id)
        .order_by(T.Model.name)
    )


def models_with_newest_run(session: Session) -> Sequence[Row]:
    """Every model (as `models`) with the columns of its newest run that has neurons (as
    `run_by_hash`; run_id is None for a model with none yet): search's default, one query."""
    return _execute(session, _models_with_newest_run()).all()


def runs_of_neuron(session: Session, model_id: int, layer: int, side: str, neuron: int) -> Sequence[Row]:
    """Every run that has computed this neuron side, newest first (the compare page's choices)."""
    query = (
        select(*RUN_COLUMNS)
        .join(T.Neuron, T.Neuron.run_id == T.Run.id)
        .where(T.Run.model_id == model_id, T.Neuron.layer == layer, T.Neuron.side == side)
        .where(T.Neuron.neuron == neuron)
        .order_by(*T.NEWEST_RUN)
    )
    return _execute(session, query).all()


# --- the model and layer pages ---------------------------------------------------------------------


def layer_side_summary(session: Session, run_id: int) -> Sequence[Row]:
    """One row per (layer, side) of a run: what the model page's heatmaps show."""
    query = (
        select(
            T.Neuron.layer,
            T.Neuron.side,
            func.count().label("neurons"),
            func.avg(T.Neuron.kurtosis).label("mean_kurtosis"),
            func.max(T.Neuron.kurtosis).label("max_kurtosis"),
            func.avg(T.Neuron.channel_count).label("mean_channels"),
            func.max(T.Neuron.best_percentile).label("best_percentile"),
        )
        .where(T.Neuron.run_id == run_id)
        .group_by(T.Neuron.layer, T.Neuron.side)
    )
    return _execute(session, query).all()


def _last(column, dialect: str) -> ColumnElement:
    """The last element of a JSON list of numbers, as a float (0 for an empty list)."""
    if dialect == "postgresql":
        value = cast(column.op("->>")(literal(-1)), Float)
    else:
        value = cast(func.json_extract(column, "$[#-1]"), Float)
    return func.coalesce(value, 0.0)


LAYER_SORTS = ("score", "percentile", "kurtosis", "best_kurtosis", "channels", "reconstruction")


def layer_sort_column(sort: str, dialect: str) -> ColumnElement:
    return {
        # Not indexed, like reconstruction; a neuron measured before version 3 (no score) goes last.
        "score": func.coalesce(T.Neuron.score, -1.0),
        "percentile": T.Neuron.best_percentile,
        "kurtosis": T.Neuron.kurtosis,
        "best_kurtosis": T.Neuron.best_kurtosis,
        "channels": cast(T.Neuron.channel_count, Float),
        # Not indexed: a layer side holds at most d_mlp neurons, so sorting them all is cheap.
        "reconstruction": _last(T.Neuron.reconstruction, dialect),
    }[sort]


def layer_neurons(
    session: Session,
    run_id: int,
    layer: int,
    side: str,
    sort: str,
    descending: bool,
    after: tuple[float, int] | None,
    limit: int,
) -> Sequence[Row]:
    """One page of a layer side's neurons, keyset-paginated on (sort value, neuron). Neuron ids
    always ascend within ties, so a page boundary inside a run of equal values is stable."""
    key = layer_sort_column(sort, session.get_bind().dialect.name)
    query = select(
        T.Neuron.neuron,
        T.Neuron.kurtosis,
        T.Neuron.best_percentile,
        T.Neuron.score,
        T.Neuron.best_kurtosis,
        T.Neuron.channel_count,
        T.Neuron.generic_count,
        T.Neuron.reconstruction,
        T.Neuron.reconstruction_baseline,
        key.label("sort_value"),
    ).where(T.Neuron.run_id == run_id, T.Neuron.layer == layer, T.Neuron.side == side)
    if after is not None:
        value, neuron = after
        beyond = key < value if descending else key > value
        query = query.where(or_(beyond, and_(key == value, T.Neuron.neuron > neuron)))
    query = query.order_by(key.desc() if descending else key.asc(), T.Neuron.neuron.asc())
    return _execute(session, query.limit(limit)).all()


def best_channel_labels(
    session: Session, run_id: int, layer: int, side: str, neurons: list[int]
) -> Sequence[Row]:
    """For these neurons of a layer side: every non-generic channel's percentile and the ids of
    its first LABEL_TOKENS tokens (one row per token), for the layer table's best-channel column.
    Asked even for no neurons, so that a layer page costs the same number of queries."""
    ct = T.ChannelToken
    query = (
        select(T.Neuron.neuron, T.Channel.channel, T.Channel.faithfulness_percentile, ct.rank, ct.token_id)
        .join(T.Channel, T.Channel.neuron_id == T.Neuron.id)
        .join(ct, (ct.neuron_id == T.Channel.neuron_id) & (ct.channel == T.Channel.channel))
        .where(
            T.Neuron.run_id == run_id,
            T.Neuron.layer == layer,
            T.Neuron.side == side,
            T.Neuron.neuron.in_(neurons),
            T.Channel.generic.is_(False),
            ct.rank < LABEL_TOKENS,
        )
    )
    return _execute(session, query).all()


def neuron_counts_of_run(session: Session, run_id: int) -> Sequence[Row]:
    """How many neurons the run has computed on each layer side (the weights of a uniform draw)."""
    return _execute(
        session,
        select(T.Neuron.layer, T.Neuron.side, func.count().label("neurons"))
        .where(T.Neuron.run_id == run_id)
        .group_by(T.Neuron.layer, T.Neuron.side),
    ).all()


def neuron_ids(session: Session, run_id: int, layer: int, side: str) -> list[int]:
    """The neuron ids a run has computed on one layer side (at most d_mlp of them, from the index)."""
    query = select(T.Neuron.neuron).where(
        T.Neuron.run_id == run_id, T.Neuron.layer == layer, T.Neuron.side == side
    )
    return list(_execute(session, query).scalars())


# --- a neuron and its channels ---------------------------------------------------------------------


def _side_has_page(pinned: bool) -> list:
    """has_<side>: whether this neuron's <side> has a page (the overview covers it, or a run, the
    pinned one if pinned, has computed it): a side tab must not lead to a 404."""
    out = []
    for side in T.SIDES:
        other, other_run = aliased(T.Neuron), aliased(T.Run)
        computed = (
            select(other.id)
            .join(other_run, other_run.id == other.run_id)
            .where(other_run.model_id == T.Run.model_id, other.layer == T.Neuron.layer)
            .where(other.neuron == T.Neuron.neuron, other.side == side)
        )
        if pinned:
            computed = computed.where(other.run_id == T.Neuron.run_id)
        overview = select(T.OverviewLayer.id).where(
            T.OverviewLayer.model_id == T.Run.model_id,
            T.OverviewLayer.layer == T.Neuron.layer,
            T.OverviewLayer.side == side,
            T.OverviewLayer.version == OVERVIEW_VERSION,
        )
        out.append(or_(computed.exists(), overview.exists()).label(f"has_{side}"))
    return out


@functools.cache
def _neuron_with_run(pinned: bool):
    other, other_run = aliased(T.Neuron), aliased(T.Run)
    same_side = (other.run_id == T.Neuron.run_id, other.layer == T.Neuron.layer, other.side == T.Neuron.side)
    # Each candidate run's progress (as run_progress), aggregated in one pass over its shards.
    progress = (
        select(T.Shard.run_id, *shard_counts())
        .join(T.Run, T.Run.id == T.Shard.run_id)
        .where(T.Run.model_id == bindparam("model_id"))
        .group_by(T.Shard.run_id)
    )
    if pinned:
        progress = progress.where(T.Run.hash == bindparam("run_hash"))
    progress = progress.subquery()
    query = (
        select(
            *NEURON_COLUMNS,
            *RUN_COLUMNS,
            *(func.coalesce(progress.c[c.name], 0).label(c.name) for c in shard_counts()),
            # The neighbouring computed neurons, in the same round trip.
            select(func.max(other.neuron))
            .where(*same_side, other.neuron < T.Neuron.neuron)
            .scalar_subquery()
            .label("previous"),
            select(func.min(other.neuron))
            .where(*same_side, other.neuron > T.Neuron.neuron)
            .scalar_subquery()
            .label("next"),
            # Whether the overview has this layer side: then every neuron has a page.
            select(T.OverviewLayer.id)
            .where(T.OverviewLayer.model_id == T.Run.model_id, T.OverviewLayer.layer == T.Neuron.layer)
            .where(T.OverviewLayer.side == T.Neuron.side, T.OverviewLayer.version == OVERVIEW_VERSION)
            .exists()
            .label("in_overview"),
            # Whether another run of the model has this neuron side: something to compare.
            select(other.id)
            .join(other_run, other_run.id == other.run_id)
            .where(other_run.model_id == T.Run.model_id, other.run_id != T.Neuron.run_id)
            .where(
                other.layer == T.Neuron.layer, other.side == T.Neuron.side, other.neuron == T.Neuron.neuron
            )
            .exists()
            .label("comparable"),
            *_side_has_page(pinned),
        )
        .join(T.Run, T.Run.id == T.Neuron.run_id)
        .outerjoin(progress, progress.c.run_id == T.Neuron.run_id)
        .where(T.Run.model_id == bindparam("model_id"), T.Neuron.layer == bindparam("layer"))
        .where(T.Neuron.side == bindparam("side"), T.Neuron.neuron == bindparam("neuron"))
    )
    query = query.where(T.Run.hash == bindparam("run_hash")) if pinned else query.order_by(*T.NEWEST_RUN)
    return query.limit(1)


def neuron_with_run(
    session: Session, model_id: int, layer: int, side: str, neuron: int, run_hash: str | None
) -> Row | None:
    """A neuron side with the run it comes from (the pinned run, or the newest run that has it),
    that run's progress (shards_total, shards_done, neurons_total, neurons_done) and the previous
    and next neuron the run has computed on this layer side."""
    params = {"model_id": model_id, "layer": layer, "side": side, "neuron": neuron}
    if run_hash:
        params["run_hash"] = run_hash
    return _execute(session, _neuron_with_run(bool(run_hash)), params).one_or_none()


def neurons_in_runs(
    session: Session, layer: int, side: str, neuron: int, run_ids: list[int]
) -> Sequence[Row]:
    """One neuron side in several runs (the compare page), in one query."""
    query = (
        select(*NEURON_COLUMNS, T.Neuron.run_id)
        .where(T.Neuron.run_id.in_(run_ids), T.Neuron.layer == layer, T.Neuron.side == side)
        .where(T.Neuron.neuron == neuron)
    )
    return _execute(session, query).all()


def other_neurons(
    session: Session, run_id: int, layer: int, side: str, neuron: int, limit: int
) -> Sequence[Row]:
    """Up to `limit` other neuron sides of the same run, layer and side, nearest ids first: the
    compare page's "different neurons" baseline."""
    query = (
        select(T.Neuron.id, T.Neuron.neuron, T.Neuron.vector)
        .where(T.Neuron.run_id == run_id, T.Neuron.layer == layer, T.Neuron.side == side)
        .where(T.Neuron.neuron != neuron)
        .order_by(func.abs(T.Neuron.neuron - neuron), T.Neuron.neuron)
        .limit(limit)
    )
    return _execute(session, query).all()


@functools.cache
def _channels():
    return (
        select(T.Channel.neuron_id, *CHANNEL_COLUMNS)
        .where(T.Channel.neuron_id.in_(bindparam("neuron_ids", expanding=True)))
        .order_by(T.Channel.neuron_id, T.Channel.channel)
    )


@functools.cache
def _channel_tokens():
    ct = T.ChannelToken
    return (
        select(ct.neuron_id, ct.channel, ct.token_id, ct.z)
        .where(ct.neuron_id.in_(bindparam("neuron_ids", expanding=True)))
        .order_by(ct.neuron_id, ct.channel, ct.rank)
    )


def channels(session: Session, neuron_ids: list[int]) -> Sequence[Row]:
    return _execute(session, _channels(), {"neuron_ids": neuron_ids}).all()


def channel_tokens(session: Session, neuron_ids: list[int]) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """(neuron id, channel) -> [(token id, oriented z)] by rank, for every channel of the neurons."""
    out: dict[tuple[int, int], list[tuple[int, float]]] = {}
    # .all(): iterating the result would fetch its ~200 rows one driver call at a time.
    for neuron_id, channel, token, z in _execute(
        session, _channel_tokens(), {"neuron_ids": neuron_ids}
    ).all():
        out.setdefault((neuron_id, channel), []).append((token, z))
    return out


def run_channel_vectors(session: Session, run_id: int) -> Sequence[Row]:
    """Every channel vector of a run, for the exact nearest-channel products (web/neighbours.py)."""
    query = (
        select(T.Neuron.layer, T.Neuron.side, T.Neuron.neuron, T.Channel.channel, T.Channel.vector)
        .join(T.Neuron, T.Neuron.id == T.Channel.neuron_id)
        .where(T.Neuron.run_id == run_id)
    )
    return _execute(session, query).all()


@functools.cache
def _stored_neighbours():
    found = T.ChannelNeighbour
    here = and_(found.neuron_id == bindparam("neuron_id"), found.channel == bindparam("channel"))
    return (
        select(T.NeighbourBuild.channels, T.NeighbourBuild.created_at, found.neighbours)
        .select_from(T.NeighbourBuild)
        .outerjoin(found, here)
        .where(T.NeighbourBuild.run_id == bindparam("run_id"))
    )


def stored_neighbours(session: Session, run_id: int, neuron_id: int, channel: int) -> Row | None:
    """The run's neighbour build (None if it has none) with this channel's stored neighbours
    (None if the channel came after the build)."""
    params = {"run_id": run_id, "neuron_id": neuron_id, "channel": channel}
    return _execute(session, _stored_neighbours(), params).one_or_none()


# --- search ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchFilters:
    layer_min: int | None
    layer_max: int | None
    side: str | None
    min_kurtosis: float
    include_generic: bool
    by_z: bool  # sort=z: the token's z first; otherwise the faithfulness percentile first


@functools.cache
def _search(
    targets: int, side: bool, layer_min: bool, layer_max: bool, generic: bool, by_z: bool, keyset: bool
):
    """The search statement for a number of (run, token) targets and which filters are set; the
    values themselves are bound per request."""
    ct = T.ChannelToken
    first, second = (ct.z, ct.faithfulness_percentile) if by_z else (ct.faithfulness_percentile, ct.z)
    parts = []
    for i in range(targets):
        part = select(
            ct.run_id,
            ct.token_id,
            ct.neuron_id,
            ct.channel,
            ct.rank,
            ct.z,
            ct.layer,
            ct.side,
            ct.neuron,
            ct.kurtosis,
            ct.faithfulness_percentile,
            ct.generic,
            first.label("k1"),
            second.label("k2"),
        ).where(ct.run_id == bindparam(f"run_{i}"), ct.token_id == bindparam(f"token_{i}"))
        part = part.where(ct.kurtosis >= bindparam("min_kurtosis"))
        if not generic:
            part = part.where(ct.generic.is_(False))
        if side:
            part = part.where(ct.side == bindparam("side"))
        if layer_min:
            part = part.where(ct.layer >= bindparam("layer_min"))
        if layer_max:
            part = part.where(ct.layer <= bindparam("layer_max"))
        if keyset:
            after = tuple_(
                bindparam("after_1"), bindparam("after_2"), bindparam("after_3"), bindparam("after_4")
            )
            part = part.where(tuple_(first, second, ct.neuron_id, ct.channel) < after)
        order = (first.desc(), second.desc(), ct.neuron_id.desc(), ct.channel.desc())
        parts.append(part.order_by(*order).limit(bindparam("limit")))
    # SQLite wants each ordered, limited member of a UNION wrapped in a subquery.
    hits = (parts[0] if len(parts) == 1 else union_all(*(select(p.subquery()) for p in parts))).subquery()
    # Each hit's label (its first LABEL_TOKENS tokens), by primary key, in the same round trip.
    label = aliased(T.ChannelToken)
    labels = [
        select(label.token_id)
        .where(label.neuron_id == hits.c.neuron_id, label.channel == hits.c.channel, label.rank == rank)
        .scalar_subquery()
        .label(f"label_{rank}")
        for rank in range(LABEL_TOKENS)
    ]
    skew = (
        select(T.Channel.skew)
        .where(T.Channel.neuron_id == hits.c.neuron_id, T.Channel.channel == hits.c.channel)
        .scalar_subquery()
        .label("skew")
    )
    return (
        select(hits, *labels, skew)
        .order_by(hits.c.k1.desc(), hits.c.k2.desc(), hits.c.neuron_id.desc(), hits.c.channel.desc())
        .limit(bindparam("limit"))
    )


def matched_spellings(
    session: Session, channels: list[tuple[int, int]], token_ids: list[int]
) -> Sequence[Row]:
    """Every (neuron id, channel, token id, rank, oriented z) of these channels whose token is
    one of token_ids: the spellings a query matched on each channel, so that search lists a
    channel once (at its best-placed spelling) with the others beside it."""
    if not channels or not token_ids:
        return []
    ct = T.ChannelToken
    rows = _execute(
        session,
        select(ct.neuron_id, ct.channel, ct.token_id, ct.rank, ct.z).where(
            ct.neuron_id.in_(sorted({n for n, _ in channels})), ct.token_id.in_(sorted(set(token_ids)))
        ),
    ).all()
    wanted = set(channels)
    return [r for r in rows if (r.neuron_id, r.channel) in wanted]


def search(
    session: Session,
    targets: list[tuple[int, int]],
    filters: SearchFilters,
    after: tuple[float, float, int, int] | None,
    limit: int,
) -> Sequence[Row]:
    """Channels whose top tokens include any of the targets, (run id, token id) pairs, each
    with the ids of its first top tokens (label_0, label_1, ...; None past its last).

    One index range scan per target, each already in the page's order, merged by one outer
    ORDER BY ... LIMIT: a popular token costs a page, not its whole posting list. The keyset
    is (first key, second key, neuron id, channel), all descending."""
    if not targets:
        return []
    params = {"limit": limit, "min_kurtosis": filters.min_kurtosis}
    for i, (run_id, token_id) in enumerate(targets):
        params[f"run_{i}"], params[f"token_{i}"] = run_id, token_id
    for name in ("side", "layer_min", "layer_max"):
        if getattr(filters, name) is not None:
            params[name] = getattr(filters, name)
    if after is not None:
        params.update(zip(("after_1", "after_2", "after_3", "after_4"), after, strict=True))
    statement = _search(
        len(targets),
        filters.side is not None,
        filters.layer_min is not None,
        filters.layer_max is not None,
        filters.include_generic,
        filters.by_z,
        after is not None,
    )
    return _execute(session, statement, params).all()
