"""Every database query the web app makes, and nothing else: routes call these, templates never
query. Each page makes a fixed number of these calls, whatever the number of channels or rows
(tests/test_web.py counts them), and every list is read with keyset pagination, never OFFSET.

Rows come back as SQLAlchemy Row tuples (attribute access, no ORM identity map): a neuron page
reads a thousand token rows, and plain tuples are several times cheaper than ORM objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Float, and_, case, cast, func, literal, or_, select, tuple_, union_all
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from channelscope import tables as T

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
    T.Channel.generic,
)
# Newest first; the id breaks ties between runs created within one clock tick.
NEWEST = (T.Run.created_at.desc(), T.Run.id.desc())


# --- models and runs -------------------------------------------------------------------------------


def models(session: Session) -> Sequence[Row]:
    return session.execute(select(*MODEL_COLUMNS).order_by(T.Model.name)).all()


def model(session: Session, name: str) -> Row | None:
    return session.execute(select(*MODEL_COLUMNS).where(T.Model.name == name)).one_or_none()


def vocabulary_blob(session: Session, model_id: int) -> bytes:
    return session.scalar(select(T.Model.vocabulary).where(T.Model.id == model_id))


def projection_blob(session: Session, model_id: int, projection: str) -> bytes:
    """U (the unembedding) or W_E.T, float16 and compressed; the embedding falls back to U
    where the model ties the two (store.ensure_model keeps only one copy then)."""
    if projection == "embedding":
        column = func.coalesce(T.Model.embedding, T.Model.unembedding)
    else:
        column = T.Model.unembedding
    return session.scalar(select(column).where(T.Model.id == model_id))


def reference_tail_tokens(session: Session, reference_id: int) -> list[int]:
    return session.scalar(select(T.Reference.tail_tokens).where(T.Reference.id == reference_id)) or []


def _progress_columns():
    size = T.Shard.neuron_stop - T.Shard.neuron_start
    done = T.Shard.done_at.is_not(None)
    return (
        func.count(T.Shard.id).label("shards_total"),
        func.count(T.Shard.done_at).label("shards_done"),
        func.coalesce(func.sum(size), 0).label("neurons_total"),
        func.coalesce(func.sum(case((done, size), else_=0)), 0).label("neurons_done"),
    )


def runs_with_progress(session: Session, model_id: int | None = None) -> Sequence[Row]:
    """Every run (of one model, if given) with its model's name and its shard counts, newest
    first (the home and model pages)."""
    query = (
        select(*RUN_COLUMNS, T.Model.name.label("model_name"), *_progress_columns())
        .join(T.Model, T.Model.id == T.Run.model_id)
        .outerjoin(T.Shard, T.Shard.run_id == T.Run.id)
        .group_by(T.Run.id, T.Model.name)
        .order_by(*NEWEST)
    )
    if model_id is not None:
        query = query.where(T.Run.model_id == model_id)
    return session.execute(query).all()


def run_progress(session: Session, run_id: int) -> Row:
    return session.execute(select(*_progress_columns()).where(T.Shard.run_id == run_id)).one()


def run_by_hash(session: Session, model_id: int | None, run_hash: str) -> Row | None:
    """A run by its hash, within one model (or any model, for search's ?run= alone)."""
    query = select(*RUN_COLUMNS).where(T.Run.hash == run_hash)
    if model_id is not None:
        query = query.where(T.Run.model_id == model_id)
    return session.execute(query).one_or_none()


def newest_run(session: Session, model_id: int, layer: int | None = None) -> Row | None:
    """The newest run of a model that has any neuron computed (in this layer, if given)."""
    has_neurons = select(T.Neuron.id).where(T.Neuron.run_id == T.Run.id)
    if layer is not None:
        has_neurons = has_neurons.where(T.Neuron.layer == layer)
    query = select(*RUN_COLUMNS).where(T.Run.model_id == model_id, has_neurons.exists()).order_by(*NEWEST)
    return session.execute(query.limit(1)).one_or_none()


def newest_runs(session: Session, model_ids: list[int]) -> Sequence[Row]:
    """Each model's newest run that has neurons (search's default), one query."""
    ranked = (
        select(
            *RUN_COLUMNS,
            func.row_number().over(partition_by=T.Run.model_id, order_by=NEWEST).label("rank"),
        )
        .where(T.Run.model_id.in_(model_ids), select(T.Neuron.id).where(T.Neuron.run_id == T.Run.id).exists())
        .subquery()
    )
    return session.execute(select(ranked).where(ranked.c.rank == 1)).all()


def runs_of_neuron(session: Session, model_id: int, layer: int, side: str, neuron: int) -> Sequence[Row]:
    """Every run that has computed this neuron side, newest first (the compare page's choices)."""
    query = (
        select(*RUN_COLUMNS)
        .join(T.Neuron, T.Neuron.run_id == T.Run.id)
        .where(T.Run.model_id == model_id, T.Neuron.layer == layer, T.Neuron.side == side)
        .where(T.Neuron.neuron == neuron)
        .order_by(*NEWEST)
    )
    return session.execute(query).all()


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
    return session.execute(query).all()


def _last(column, dialect: str) -> ColumnElement:
    """The last element of a JSON list of numbers, as a float (0 for an empty list)."""
    if dialect == "postgresql":
        value = cast(column.op("->>")(literal(-1)), Float)
    else:
        value = cast(func.json_extract(column, "$[#-1]"), Float)
    return func.coalesce(value, 0.0)


LAYER_SORTS = ("percentile", "kurtosis", "best_kurtosis", "channels", "reconstruction")


def layer_sort_column(sort: str, dialect: str) -> ColumnElement:
    return {
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
    return session.execute(query.limit(limit)).all()


def computed_neighbours(session: Session, run_id: int, layer: int, side: str, neuron: int) -> Row:
    """The previous and next neuron of this layer side that the run has computed, and the count."""
    here = (T.Neuron.run_id == run_id, T.Neuron.layer == layer, T.Neuron.side == side)
    previous = select(func.max(T.Neuron.neuron)).where(*here, T.Neuron.neuron < neuron).scalar_subquery()
    following = select(func.min(T.Neuron.neuron)).where(*here, T.Neuron.neuron > neuron).scalar_subquery()
    return session.execute(select(previous.label("previous"), following.label("next"))).one()


def random_neuron(session: Session, run_id: int, layer: int, side: str, start: int) -> int | None:
    """The first computed neuron at or after `start` (wrapping round): a uniform pick over the
    neuron ids, read from the index instead of ORDER BY random() over the whole layer."""
    here = (T.Neuron.run_id == run_id, T.Neuron.layer == layer, T.Neuron.side == side)
    at_or_after = select(func.min(T.Neuron.neuron)).where(*here, T.Neuron.neuron >= start).scalar_subquery()
    first = select(func.min(T.Neuron.neuron)).where(*here).scalar_subquery()
    return session.scalar(select(func.coalesce(at_or_after, first)))


def layer_sides_of_run(session: Session, run_id: int) -> Sequence[Row]:
    return session.execute(
        select(T.Neuron.layer, T.Neuron.side).where(T.Neuron.run_id == run_id).distinct()
    ).all()


# --- a neuron and its channels ---------------------------------------------------------------------


def neuron_with_run(
    session: Session, model_id: int, layer: int, side: str, neuron: int, run_hash: str | None
) -> Row | None:
    """A neuron side with the run it comes from: the pinned run, or the newest run that has it."""
    query = (
        select(*NEURON_COLUMNS, *RUN_COLUMNS)
        .join(T.Run, T.Run.id == T.Neuron.run_id)
        .where(T.Run.model_id == model_id, T.Neuron.layer == layer, T.Neuron.side == side)
        .where(T.Neuron.neuron == neuron)
    )
    query = query.where(T.Run.hash == run_hash) if run_hash else query.order_by(*NEWEST)
    return session.execute(query.limit(1)).one_or_none()


def neurons_in_runs(
    session: Session, layer: int, side: str, neuron: int, run_ids: list[int]
) -> Sequence[Row]:
    """One neuron side in several runs (the compare page), in one query."""
    query = (
        select(*NEURON_COLUMNS, T.Neuron.run_id)
        .where(T.Neuron.run_id.in_(run_ids), T.Neuron.layer == layer, T.Neuron.side == side)
        .where(T.Neuron.neuron == neuron)
    )
    return session.execute(query).all()


def channels(session: Session, neuron_ids: list[int]) -> Sequence[Row]:
    query = (
        select(T.Channel.neuron_id, *CHANNEL_COLUMNS)
        .where(T.Channel.neuron_id.in_(neuron_ids))
        .order_by(T.Channel.neuron_id, T.Channel.channel)
    )
    return session.execute(query).all()


def channel_tokens(session: Session, neuron_ids: list[int]) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """(neuron id, channel) -> [(token id, oriented z)] by rank, for every channel of the neurons."""
    query = (
        select(T.ChannelToken.neuron_id, T.ChannelToken.channel, T.ChannelToken.token_id, T.ChannelToken.z)
        .where(T.ChannelToken.neuron_id.in_(neuron_ids))
        .order_by(T.ChannelToken.neuron_id, T.ChannelToken.channel, T.ChannelToken.rank)
    )
    out: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for neuron_id, channel, token, z in session.execute(query):
        out.setdefault((neuron_id, channel), []).append((token, z))
    return out


def run_channel_vectors(session: Session, run_id: int) -> Sequence[Row]:
    """Every channel vector of a run, for the exact nearest-channel products (app/nearest.py)."""
    query = (
        select(T.Neuron.layer, T.Neuron.side, T.Neuron.neuron, T.Channel.channel, T.Channel.vector)
        .join(T.Neuron, T.Neuron.id == T.Channel.neuron_id)
        .where(T.Neuron.run_id == run_id)
    )
    return session.execute(query).all()


def run_channel_count(session: Session, run_id: int) -> int:
    query = select(func.count()).select_from(T.Channel).join(T.Neuron, T.Neuron.id == T.Channel.neuron_id)
    return session.scalar(query.where(T.Neuron.run_id == run_id)) or 0


def channel_labels(
    session: Session, keys: list[tuple[int, int]], count: int
) -> dict[tuple[int, int], list[int]]:
    """The first `count` token ids of each (neuron id, channel): a channel's short label."""
    if not keys:
        return {}
    query = (
        select(T.ChannelToken.neuron_id, T.ChannelToken.channel, T.ChannelToken.token_id)
        .where(
            tuple_(T.ChannelToken.neuron_id, T.ChannelToken.channel).in_(keys), T.ChannelToken.rank < count
        )
        .order_by(T.ChannelToken.neuron_id, T.ChannelToken.channel, T.ChannelToken.rank)
    )
    out: dict[tuple[int, int], list[int]] = {}
    for neuron_id, channel, token in session.execute(query):
        out.setdefault((neuron_id, channel), []).append(token)
    return out


# --- search ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchFilters:
    layer_min: int | None
    layer_max: int | None
    side: str | None
    min_kurtosis: float
    include_generic: bool
    by_z: bool  # sort=z: the token's z first; otherwise the faithfulness percentile first


def search(
    session: Session,
    targets: list[tuple[int, int]],
    filters: SearchFilters,
    after: tuple[float, float, int, int] | None,
    limit: int,
) -> Sequence[Row]:
    """Channels whose top tokens include any of the targets, (run id, token id) pairs.

    One index range scan per target, each already in the page's order, merged by one outer
    ORDER BY ... LIMIT: a popular token costs a page, not its whole posting list. The keyset
    is (first key, second key, neuron id, channel), all descending."""
    ct = T.ChannelToken
    first, second = (ct.z, ct.faithfulness_percentile) if filters.by_z else (ct.faithfulness_percentile, ct.z)
    parts = []
    for run_id, token_id in targets:
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
        ).where(ct.run_id == run_id, ct.token_id == token_id, ct.kurtosis >= filters.min_kurtosis)
        if not filters.include_generic:
            part = part.where(ct.generic.is_(False))
        if filters.side:
            part = part.where(ct.side == filters.side)
        if filters.layer_min is not None:
            part = part.where(ct.layer >= filters.layer_min)
        if filters.layer_max is not None:
            part = part.where(ct.layer <= filters.layer_max)
        if after is not None:
            part = part.where(tuple_(first, second, ct.neuron_id, ct.channel) < tuple_(*after))
        order = (first.desc(), second.desc(), ct.neuron_id.desc(), ct.channel.desc())
        parts.append(part.order_by(*order).limit(limit))
    if not parts:
        return []
    if len(parts) == 1:
        return session.execute(parts[0]).all()
    # SQLite wants each ordered, limited member of a UNION wrapped in a subquery.
    merged = union_all(*(select(p.subquery()) for p in parts)).subquery()
    query = select(merged).order_by(
        merged.c.k1.desc(), merged.c.k2.desc(), merged.c.neuron_id.desc(), merged.c.channel.desc()
    )
    return session.execute(query.limit(limit)).all()
