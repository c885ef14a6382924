"""The channel store (core/tables.py) from the worker's side: writing what it computed, and
reading back the few things it wrote for its own use (a run's reference, a neuron's channels).

Bulk rows go in through PostgreSQL COPY where the database is PostgreSQL, and batched inserts
on SQLite. Every function here works inside the caller's transaction: a shard's rows and its
done mark commit together or not at all.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict

import numpy as np
import torch
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from channelscope.core import tables as T
from channelscope.core.stats import finite_or
from channelscope.method import rotate
from channelscope.method.decomposer import NeuronRecord
from channelscope.method.measures import MEASURES_VERSION
from channelscope.method.reference import Reference
from channelscope.method.weights import Model

# Bump when a change to the algorithm changes results: runs are identified by their settings,
# the model file and this number, never by the git commit.
# 2: the fast solver's rescaled AdamW moments, first-channel tail tokens, fixed-shape CUDA batches.
# 3: the loss centres z on its weighted mean before weighting; the mask's side from scored tokens.
# 4: the fused step's closed-form gradients and compiled kernel (docs/method.md, "The fused step").
# 5: batch-invariant CPU products and row sums (docs/method.md, "Determinism").
ALGORITHM_VERSION = 5


def run_settings(settings: rotate.Settings, projection: str, reference_count: int) -> dict:
    return {**asdict(settings), "projection": projection, "reference_count": reference_count}


def run_hash(model_sha256: str, settings: dict, seed: int) -> str:
    """A short, stable content hash: the run's permalinks depend on nothing else."""
    blob = json.dumps([model_sha256, settings, seed, ALGORITHM_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ModelConflict(Exception):
    """Another file is stored under this model's name; the message is one line for a person."""


def check_model(session: Session, model: Model) -> T.Model | None:
    """The stored model of this name if it is this very file (None if there is none); a model
    is named by its file, so a different file at the same path is a conflict."""
    row = session.scalar(select(T.Model).where(T.Model.name == model.name))
    if row is not None and row.sha256 != model.sha256:
        raise ModelConflict(
            f"a different model named {model.name!r} is already stored (from {row.source}, sha256 "
            f"{row.sha256[:12]}; this file has {model.sha256[:12]}): rename the file or folder"
        )
    return row


def ensure_model(session: Session, model: Model) -> T.Model:
    """The stored model of this name, added (with its vocabulary and U) if new."""
    row = check_model(session, model)
    if row is not None:
        return row
    unembedding = model.projection("unembedding")
    embedding = model.projection("embedding")
    row = T.Model(
        name=model.name,
        source=str(model.source),
        sha256=model.sha256,
        n_layers=model.n_layers,
        d_model=model.d_model,
        d_mlp=model.d_mlp,
        vocab_size=model.vocab_size,
        sides=",".join(model.sides),
        vocabulary=zlib.compress(
            json.dumps({"tokens": model.vocabulary.tokens, "kinds": model.vocabulary.kinds}).encode()
        ),
        unembedding=T.pack_compressed(unembedding.numpy(), "float16"),
        embedding=None
        if np.array_equal(embedding.numpy(), unembedding.numpy())
        else T.pack_compressed(embedding.numpy(), "float16"),
    )
    session.add(row)
    session.flush()
    return row


def ensure_reference(session: Session, model_row: T.Model, key: str, reference: Reference) -> T.Reference:
    row = session.scalar(select(T.Reference).where(T.Reference.key == key))
    if row is None:
        row = T.Reference(
            model_id=model_row.id,
            key=key,
            count=reference.faithfulness.shape[0],
            channels=reference.faithfulness.shape[1],
            faithfulness=T.pack(reference.faithfulness, "float32"),
            kurtosis=T.pack(reference.kurtosis, "float32"),
            generic=T.pack(reference.generic.cpu().numpy(), "float32"),
            tail_tokens=list(reference.tail_tokens),
            channel_vectors=T.pack(reference.channels.cpu().numpy(), "float32"),
        )
        session.add(row)
        session.flush()
    return row


def read_reference(row: T.Reference, d_model: int) -> Reference:
    """A stored reference, as ensure_reference wrote it."""
    return Reference(
        faithfulness=T.unpack(row.faithfulness, "float32", (row.count, row.channels)).astype(np.float64),
        kurtosis=T.unpack(row.kurtosis, "float32", (row.count, row.channels)).astype(np.float64),
        generic=torch.from_numpy(T.unpack(row.generic, "float32").reshape(-1, d_model).copy()),
        tail_tokens=list(row.tail_tokens),
        # A version-4 reference has none: its key is no newer Decomposer's, so only its
        # percentiles are read, never its pool.
        channels=torch.from_numpy(
            T.unpack(row.channel_vectors or b"", "float32").reshape(-1, d_model).copy()
        ),
    )


def newest_channels(
    session: Session,
    model_sha256: str,
    layer: int,
    side: str,
    neuron: int,
    channels: int,
    algorithm_version: int | None = None,
) -> tuple[str, list[T.Channel]] | None:
    """The first `channels` channels of a neuron side in the newest run that has it (of that
    algorithm version, if one is given), with that run's hash; None if no run has it."""
    query = (
        select(T.Neuron.id, T.Run.hash)
        .join(T.Run, T.Run.id == T.Neuron.run_id)
        .join(T.Model, T.Model.id == T.Run.model_id)
        .where(T.Model.sha256 == model_sha256, T.Neuron.layer == layer, T.Neuron.side == side)
        .where(T.Neuron.neuron == neuron)
    )
    if algorithm_version is not None:
        query = query.where(T.Run.algorithm_version == algorithm_version)
    row = session.execute(query.order_by(*T.NEWEST_RUN).limit(1)).first()
    if row is None:
        return None
    found = session.scalars(
        select(T.Channel).where(T.Channel.neuron_id == row.id).order_by(T.Channel.channel).limit(channels)
    ).all()
    return row.hash, list(found)


def ensure_run(session: Session, model_row: T.Model, settings: dict, seed: int, reference_row=None) -> T.Run:
    digest = run_hash(model_row.sha256, settings, seed)
    row = session.scalar(select(T.Run).where(T.Run.hash == digest))
    if row is None:
        row = T.Run(
            hash=digest,
            model_id=model_row.id,
            reference_id=reference_row.id if reference_row else None,
            solver=settings["solver"],
            seed=seed,
            channels=settings["channels"],
            projection=settings["projection"],
            algorithm_version=ALGORITHM_VERSION,
            settings=settings,
        )
        session.add(row)
        session.flush()
    return row


def _pairs(ids: np.ndarray, zs: np.ndarray) -> list[list]:
    return [[int(i), round(float(z), 4)] for i, z in zip(ids, zs, strict=True)]


def write_neurons(session: Session, run: T.Run, shard: T.Shard, records: list[NeuronRecord]) -> None:
    """Every row of a shard's neurons: neurons, channels and the token index."""
    neuron_rows = []
    for r in records:
        real = [ch for ch in r.channels if not ch.generic]
        neuron_rows.append(
            dict(
                run_id=run.id,
                shard_id=shard.id,
                layer=r.layer,
                side=r.side,
                neuron=r.neuron,
                vector=T.pack(r.vector, T.NEURON_VECTOR),
                norm=r.norm,
                kurtosis=finite_or(r.kurtosis, 0.0),
                skew=finite_or(r.skew, 0.0),
                top_tokens=_pairs(r.top_ids, r.top_z),
                bottom_tokens=_pairs(r.bottom_ids, r.bottom_z),
                reconstruction=[round(x, 6) for x in r.reconstruction],
                reconstruction_baseline=[round(x, 6) for x in r.reconstruction_baseline],
                coverage=[round(x, 6) for x in r.coverage],
                best_percentile=r.best_percentile,
                score=finite_or(r.score, None),
                best_kurtosis=max((finite_or(ch.kurtosis, 0.0) for ch in r.channels), default=0.0),
                channel_count=sum(ch.kurtosis >= T.JUNK_KURTOSIS for ch in r.channels),
                measures_version=MEASURES_VERSION,
                generic_count=len(r.channels) - len(real),
            )
        )
    returned = session.execute(
        insert(T.Neuron).returning(T.Neuron.id, sort_by_parameter_order=True), neuron_rows
    ).all()
    channel_rows, token_rows = [], []
    for (neuron_id,), r in zip(returned, records, strict=True):
        for ch in r.channels:
            percentile = finite_or(ch.faithfulness_percentile, 0.0)
            channel_rows.append(
                (
                    neuron_id,
                    ch.index,
                    T.pack(ch.vector, T.CHANNEL_VECTOR),
                    finite_or(ch.kurtosis, 0.0),
                    finite_or(ch.skew, 0.0),
                    finite_or(ch.cos, 0.0),
                    finite_or(ch.loss, 0.0),
                    T.pack(ch.masked, T.MASKED),
                    ch.step,
                    T.pack(np.asarray(ch.history, dtype=np.float32), T.HISTORY),
                    finite_or(ch.alpha, 0.0),
                    finite_or(ch.faithfulness, 0.0),
                    percentile,
                    finite_or(ch.percentile_local, None),  # nan (no finite faithfulness) is NULL
                    bool(ch.generic),
                )
            )
            sign = 1.0 if ch.skew >= 0 else -1.0
            for rank, (token, z) in enumerate(zip(ch.top_ids, ch.top_z, strict=True)):
                token_rows.append(
                    (
                        neuron_id,
                        ch.index,
                        rank,
                        int(token),
                        float(z) * sign,
                        run.id,
                        r.layer,
                        r.side,
                        r.neuron,
                        finite_or(ch.kurtosis, 0.0),
                        percentile,
                        bool(ch.generic),
                    )
                )
    _bulk(session, T.Channel.__table__, CHANNEL_COLUMNS, channel_rows)
    _bulk(session, T.ChannelToken.__table__, TOKEN_COLUMNS, token_rows)


CHANNEL_COLUMNS = (
    "neuron_id", "channel", "vector", "kurtosis", "skew", "cos", "loss", "masked", "step",
    "history", "alpha", "faithfulness", "faithfulness_percentile", "percentile_local", "generic",
)  # fmt: skip
TOKEN_COLUMNS = (
    "neuron_id", "channel", "rank", "token_id", "z", "run_id", "layer", "side", "neuron",
    "kurtosis", "faithfulness_percentile", "generic",
)  # fmt: skip


def _bulk(session: Session, table, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """COPY on PostgreSQL (an order of magnitude faster than INSERT for millions of token rows);
    executemany on SQLite. Both run inside the session's transaction."""
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        raw = connection.connection.driver_connection  # psycopg 3
        quoted = ", ".join(f'"{c}"' for c in columns)
        with raw.cursor() as cursor, cursor.copy(f'COPY "{table.name}" ({quoted}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)
    else:
        connection.execute(table.insert(), [dict(zip(columns, row, strict=True)) for row in rows])
