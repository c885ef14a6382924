"""The channel store: one set of tables that the worker writes and the web app reads.

Created only by Alembic migrations (migrations/). Arrays are stored as little-endian numpy
bytes (see `pack`/`unpack`): compact, and the same on SQLite and PostgreSQL.

    models ─< runs ─< shards             a run is split into shards (layer x side x neuron block)
      │        └─< neurons ─< channels ─< channel_tokens   (the token index)
      │        └─ neighbour_builds       when a run's nearest channels were computed (worker/neighbours.py)
      │           neurons ─< channel_neighbours   each channel's nearest channels elsewhere in its run
      ├─< references                     random-vector reference per model and settings
      ├─< overview_layers                per layer and side: every vector's raw projection
      ├─< activation_layers              per corpus and layer: top contexts, densities (real text)
      └─< activation_corpora             per corpus: its token counts (the behavioural chance level)
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SIDES = ("gate", "in", "out")  # a neuron's three vectors (docs/method.md, "Vectors")
# The order in which sides are computed and listed: `out` first, it is what a neuron writes.
SIDE_ORDER = ("out", "in", "gate")
SIDE_CHECK = "side IN ({})".format(", ".join(f"'{side}'" for side in SIDES))
# Channels below this excess kurtosis are counted as junk: Neuron.channel_count and the pages'
# default cut-off (docs/method.md, "Glitch tokens": low-kurtosis channels still appear).
JUNK_KURTOSIS = 5.0


def now() -> datetime:
    return datetime.now(UTC)


def utc(moment: datetime) -> datetime:
    """Stored times are UTC (`now`); SQLite hands them back without the zone."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def pack(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def unpack(blob: bytes, dtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    return array.reshape(shape) if shape else array


# How each array column is stored; the writer (worker/store.py) and every reader use these.
NEURON_VECTOR = "float32"  # Neuron.vector [d]
CHANNEL_VECTOR = "float16"  # Channel.vector [d]: half the bytes; every measure was taken in fp32 before
MASKED = "int32"  # Channel.masked: token ids
HISTORY = "float32"  # Channel.history: unweighted kurtosis against step


def neuron_vector(blob: bytes) -> np.ndarray:
    """A stored neuron vector w, [d] float32."""
    return unpack(blob, NEURON_VECTOR)


def channel_vector(blob: bytes) -> np.ndarray:
    """A stored channel vector c, [d] float32."""
    return unpack(blob, CHANNEL_VECTOR).astype(np.float32)


def masked_tokens(blob: bytes) -> np.ndarray:
    """The token ids a channel claimed (T_k), int64."""
    return unpack(blob, MASKED).astype(np.int64)


def kurtosis_history(blob: bytes) -> np.ndarray:
    return unpack(blob, HISTORY)


def pack_compressed(array: np.ndarray, dtype: str) -> bytes:
    return zlib.compress(pack(array, dtype), level=1)


def unpack_compressed(blob: bytes, dtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    return unpack(zlib.decompress(blob), dtype, shape)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)  # URL slug
    source: Mapped[str] = mapped_column(Text)  # the file or folder it was read from
    sha256: Mapped[str] = mapped_column(String(64))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)
    d_mlp: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    sides: Mapped[str] = mapped_column(String(20))  # "gate,in,out"
    # zlib-compressed JSON {"tokens": [...], "kinds": [...]}: token text may hold NUL, which a
    # PostgreSQL text column cannot.
    vocabulary: Mapped[bytes] = mapped_column(LargeBinary)
    # U as float16 [d_model, V], zlib-compressed: pages and weight-level previews work without
    # the model file. `embedding` is W_E.T, stored only when it differs from U.
    unembedding: Mapped[bytes] = mapped_column(LargeBinary)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Reference(Base):
    """The random-vector reference of a model and run settings (method/reference.py)."""

    __tablename__ = "references"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(32), unique=True)
    count: Mapped[int] = mapped_column(Integer)  # random vectors
    channels: Mapped[int] = mapped_column(Integer)
    faithfulness: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [count, channels]
    kurtosis: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [count, channels]
    generic: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [G, d_model]
    tail_tokens: Mapped[list] = mapped_column(JSON)
    # float32 [count * channels, d_model], unit: the random vectors' channels (REFERENCE_VERSION 5)
    channel_vectors: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash: Mapped[str] = mapped_column(String(16), unique=True)  # permalinks: ?run=<hash>
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    reference_id: Mapped[int | None] = mapped_column(ForeignKey("references.id"), nullable=True)
    solver: Mapped[str] = mapped_column(String(10))
    seed: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)  # C
    projection: Mapped[str] = mapped_column(String(20))
    algorithm_version: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict] = mapped_column(JSON)  # every setting of docs/method.md, as run
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


# Newest run first; the id breaks ties between runs created within one clock tick.
NEWEST_RUN = (Run.created_at.desc(), Run.id.desc())


class Shard(Base):
    """Neurons of one layer and side: a block (neuron_start..neuron_stop), or the scattered
    neurons listed in `neurons` (the most aligned, random ones, one asked for on a page), which
    lie between neuron_start and neuron_stop. Its rows and its done mark commit together."""

    __tablename__ = "shards"
    __table_args__ = (
        UniqueConstraint("run_id", "layer", "side", "neuron_start"),
        CheckConstraint(SIDE_CHECK, name="side"),
        CheckConstraint("neuron_stop > neuron_start", name="neurons"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    side: Mapped[str] = mapped_column(String(4))
    neuron_start: Mapped[int] = mapped_column(Integer)
    neuron_stop: Mapped[int] = mapped_column(Integer)  # exclusive
    neurons: Mapped[list | None] = mapped_column(JSON, nullable=True)  # scattered: their ids, sorted
    size: Mapped[int] = mapped_column(Integer)  # neurons in the shard
    priority: Mapped[int] = mapped_column(Integer, default=0)  # lower first: `out` before reads
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # compute time
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


def shard_neurons(shard) -> list[int]:
    """The neuron ids a shard (row or ORM object) holds."""
    return (
        list(shard.neurons)
        if shard.neurons is not None
        else list(range(shard.neuron_start, shard.neuron_stop))
    )


class Neuron(Base):
    """One neuron and side of a run. The unique constraint makes a second write impossible."""

    __tablename__ = "neurons"
    __table_args__ = (
        UniqueConstraint("run_id", "layer", "side", "neuron"),
        CheckConstraint(SIDE_CHECK, name="side"),
        # Keyset pagination of a layer's table, by each sortable column.
        Index("ix_neurons_by_percentile", "run_id", "layer", "side", "best_percentile", "neuron"),
        Index("ix_neurons_by_kurtosis", "run_id", "layer", "side", "kurtosis", "neuron"),
        Index("ix_neurons_by_best_kurtosis", "run_id", "layer", "side", "best_kurtosis", "neuron"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    side: Mapped[str] = mapped_column(String(4))
    neuron: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [d_model]
    norm: Mapped[float] = mapped_column(Float)
    kurtosis: Mapped[float] = mapped_column(Float)
    skew: Mapped[float] = mapped_column(Float)
    top_tokens: Mapped[list] = mapped_column(JSON)  # [[id, z], ...] highest z first
    bottom_tokens: Mapped[list] = mapped_column(JSON)  # [[id, z], ...] lowest z first
    reconstruction: Mapped[list] = mapped_column(JSON)  # |P_k w| / |w|, k = 1..C
    reconstruction_baseline: Mapped[list] = mapped_column(JSON)
    coverage: Mapped[list] = mapped_column(JSON)  # share of sum(z_w^2) claimed by channels 1..k
    # Summaries for the layer table, over the neuron's channels.
    best_percentile: Mapped[float] = mapped_column(Float)  # max faithfulness percentile, non-generic
    # measures.neuron_score: best_percentile against held-out random vectors' (50 = as good as
    # random). None below measures version 3.
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    best_kurtosis: Mapped[float] = mapped_column(Float)
    # method/measures.MEASURES_VERSION its measures were computed under (a backfill raises it
    # without touching its channels or the run's hash).
    measures_version: Mapped[int] = mapped_column(SmallInteger, server_default="1")
    channel_count: Mapped[int] = mapped_column(SmallInteger)  # channels with kurtosis >= 5 (the junk cut)
    generic_count: Mapped[int] = mapped_column(SmallInteger)


class Channel(Base):
    __tablename__ = "channels"

    neuron_id: Mapped[int] = mapped_column(ForeignKey("neurons.id", ondelete="CASCADE"), primary_key=True)
    channel: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # discovery order, from 0
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float16 [d_model]
    kurtosis: Mapped[float] = mapped_column(Float)
    skew: Mapped[float] = mapped_column(Float)
    cos: Mapped[float] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)
    masked: Mapped[bytes] = mapped_column(LargeBinary)  # int32 token ids it claimed (T_k)
    step: Mapped[int] = mapped_column(Integer)
    history: Mapped[bytes] = mapped_column(LargeBinary)  # float32 kurtosis against step
    alpha: Mapped[float] = mapped_column(Float)
    faithfulness: Mapped[float] = mapped_column(Float)
    faithfulness_percentile: Mapped[float] = mapped_column(Float)  # against random vectors' channels
    # Against random directions at the same cosine to this w (measures version 2); None where the
    # run was measured before it and not backfilled (`channelscope measures RUN`).
    percentile_local: Mapped[float | None] = mapped_column(Float, nullable=True)
    generic: Mapped[bool] = mapped_column(Boolean)


class ChannelToken(Base):
    """The token index: each channel's top tokens, with what search filters and sorts on copied
    in, so "which channels promote token X, most trustworthy first" is one index range scan."""

    __tablename__ = "channel_tokens"
    __table_args__ = (
        Index(
            "ix_channel_tokens_by_percentile",
            "run_id",
            "token_id",
            "faithfulness_percentile",
            "z",
            "neuron_id",
            "channel",
        ),  # fmt: skip
        Index("ix_channel_tokens_by_z", "run_id", "token_id", "z", "neuron_id", "channel"),
        ForeignKeyConstraint(
            ["neuron_id", "channel"], ["channels.neuron_id", "channels.channel"], ondelete="CASCADE"
        ),
    )

    neuron_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # 0 = furthest out
    token_id: Mapped[int] = mapped_column(Integer)
    z: Mapped[float] = mapped_column(Float)  # oriented: positive on the channel's tail
    run_id: Mapped[int] = mapped_column(Integer)
    layer: Mapped[int] = mapped_column(Integer)
    side: Mapped[str] = mapped_column(String(4))
    neuron: Mapped[int] = mapped_column(Integer)
    kurtosis: Mapped[float] = mapped_column(Float)
    faithfulness_percentile: Mapped[float] = mapped_column(Float)
    generic: Mapped[bool] = mapped_column(Boolean)


class NeighbourBuild(Base):
    """A run's nearest channels were computed (worker/neighbours.py) over this many of its
    channels; channels the run computed later have no row in channel_neighbours until the next
    build."""

    __tablename__ = "neighbour_builds"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    channels: Mapped[int] = mapped_column(Integer)  # channel vectors compared, all sides
    count: Mapped[int] = mapped_column(Integer)  # neighbours kept per channel
    device: Mapped[str] = mapped_column(String(32))
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class ActivationLayer(Base):
    """What a layer's neurons do on the real corpus (worker/activations.py), per model, corpus
    (its manifest hash) and layer: top contexts with the activation at every token, the density
    of the activation and of both pre-activations, and the activation threshold."""

    __tablename__ = "activation_layers"
    __table_args__ = (UniqueConstraint("model_id", "corpus", "layer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    corpus: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)  # worker/activations.py's ACTIVATIONS_VERSION
    layer: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)  # corpus positions
    documents: Mapped[int] = mapped_column(Integer)
    ranges: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [3, d_mlp]: bins span [-h, h]
    counts: Mapped[bytes] = mapped_column(LargeBinary)  # zlib int32 [3, d_mlp, BINS]
    thresholds: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [d_mlp]: the activation's QUANTILE
    top_value: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [d_mlp, K], descending
    top_doc: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [d_mlp, K], -1 where empty
    top_pos: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [d_mlp, K]
    window_tokens: Mapped[bytes] = mapped_column(LargeBinary)  # zlib int32 [d_mlp, K, W], -1 off the text
    window_values: Mapped[bytes] = mapped_column(LargeBinary)  # zlib float16 [d_mlp, K, W]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class ActivationCorpus(Base):
    """The corpus an activation pass went over (worker/activations.py), per model and corpus
    manifest: how often each token occurs in it. The chance level of the pages' behavioural
    figures: a token set that makes up share p of the corpus's positions is expected at share p
    of any positions the neuron picks, if the neuron ignored it."""

    __tablename__ = "activation_corpora"
    __table_args__ = (UniqueConstraint("model_id", "corpus"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    corpus: Mapped[str] = mapped_column(String(16))
    documents: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)  # positions the pass went over
    token_counts: Mapped[bytes] = mapped_column(LargeBinary)  # zlib int32 [vocab_size]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class OverviewLayer(Base):
    """The raw vocabulary projection z_w = w @ U of every vector of one layer and side, computed
    for the whole model at set-up (method/overview.py), before any channel: per vector its
    statistics and its top and bottom tokens (z-scores over the scored tokens), and the vectors
    themselves in float16, from which raw token search takes exact products. Arrays, one row per
    layer and side: 90 rows for SmolLM2, not 138,240."""

    __tablename__ = "overview_layers"
    __table_args__ = (UniqueConstraint("model_id", "layer", "side"), CheckConstraint(SIDE_CHECK, name="side"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(Integer)
    side: Mapped[str] = mapped_column(String(4))
    version: Mapped[int] = mapped_column(Integer)  # method/overview.py's OVERVIEW_VERSION
    glitch_quantile: Mapped[float] = mapped_column(Float)  # which tokens are scored
    vectors: Mapped[bytes] = mapped_column(LargeBinary)  # float16 [d_mlp, d_model]
    stats: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [OVERVIEW_STATS, d_mlp]
    top_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [d_mlp, K], highest z first
    top_z: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [d_mlp, K]
    bottom_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [d_mlp, K], lowest z first
    bottom_z: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [d_mlp, K]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


# The rows of OverviewLayer.stats, in order: |w|, the mean and standard deviation of z_w over the
# scored tokens (a token's raw z = (w . U[:, t] - mean) / std), and K and skew of z_w over all V.
OVERVIEW_STATS = ("norm", "mean", "std", "kurtosis", "skew")


SIDE_CODES = {side: code for code, side in enumerate(SIDES)}
NEIGHBOUR = np.dtype(
    [("layer", "<i2"), ("side", "<i1"), ("neuron", "<i4"), ("channel", "<i2"), ("cos", "<f4")]
)
"""One nearest channel in channel_neighbours.neighbours (side as SIDE_CODES)."""


class ChannelNeighbour(Base):
    """A channel's nearest channels of other neurons in its run, by exact cos of the channel
    vectors, best first: NEIGHBOUR records, one blob per channel."""

    __tablename__ = "channel_neighbours"
    __table_args__ = (
        ForeignKeyConstraint(
            ["neuron_id", "channel"], ["channels.neuron_id", "channels.channel"], ondelete="CASCADE"
        ),
    )

    neuron_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    neighbours: Mapped[bytes] = mapped_column(LargeBinary)
