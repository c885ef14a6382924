"""`channelscope export`: a whole run as JSON lines or Parquet, in the layout of the JSON API.

Every neuron side goes through core.schemas.neuron_side, the function the `.json` pages use, so
an export and the live site cannot disagree. The run is read in keyset batches of neurons,
(layer, side, neuron) ascending, and each batch is written before the next is read: memory
stays flat however large the run.
"""

from __future__ import annotations

import json
import sys
import types
import typing
import zlib
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import Engine, select, tuple_

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.core.schemas import NeuronSideOut, neuron_side
from channelscope.web import queries

FORMATS = ("jsonl", "parquet")
BATCH = 256  # neuron sides per read: ~13k channel rows and ~256k token rows at C = 50


def neuron_sides(engine: Engine, run: T.Run, batch: int | None = None) -> Iterator[list[NeuronSideOut]]:
    """The run's neuron sides, a batch at a time, in (layer, side, neuron) order. Channels and
    token rows are read by the web app's own queries."""
    batch = batch or BATCH
    with db.session(engine) as session:
        model = session.get(T.Model, run.model_id)
        tokens = json.loads(zlib.decompress(model.vocabulary))["tokens"]
        after: tuple[int, str, int] | None = None
        while True:
            query = select(*queries.NEURON_COLUMNS).where(T.Neuron.run_id == run.id)
            if after is not None:
                query = query.where(tuple_(T.Neuron.layer, T.Neuron.side, T.Neuron.neuron) > tuple_(*after))
            neurons = session.execute(
                query.order_by(T.Neuron.layer, T.Neuron.side, T.Neuron.neuron).limit(batch)
            ).all()
            if not neurons:
                return
            ids = [n.id for n in neurons]
            channels: dict[int, list] = {}
            for row in queries.channels(session, ids):
                channels.setdefault(row.neuron_id, []).append(row)
            ranked: dict[int, dict[int, list[tuple[int, float]]]] = {}
            for (neuron_id, index), pairs in queries.channel_tokens(session, ids).items():
                ranked.setdefault(neuron_id, {})[index] = pairs
            yield [
                neuron_side(model.name, run.hash, n, channels.get(n.id, []), ranked.get(n.id, {}), tokens)
                for n in neurons
            ]
            last = neurons[-1]
            after = (last.layer, last.side, last.neuron)


def write(engine: Engine, run: T.Run, fmt: str, path: str | Path) -> int:
    """Write the run to `path` ("-" = stdout, JSON lines only); returns the neuron sides written."""
    if fmt == "jsonl":
        return _write_jsonl(engine, run, path)
    if fmt == "parquet":
        return _write_parquet(engine, run, path)
    raise ValueError(f"unknown format {fmt!r}: use {' or '.join(FORMATS)}")


def _write_jsonl(engine: Engine, run: T.Run, path: str | Path) -> int:
    count = 0
    target = nullcontext(sys.stdout) if str(path) == "-" else open(path, "w", encoding="utf-8")  # noqa: SIM115
    with target as out:
        for sides in neuron_sides(engine, run):
            out.writelines(side.model_dump_json() + "\n" for side in sides)
            count += len(sides)
    return count


def _write_parquet(engine: Engine, run: T.Run, path: str | Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(NeuronSideOut)
    count = 0
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        for sides in neuron_sides(engine, run):
            writer.write_table(pa.Table.from_pylist([side.model_dump() for side in sides], schema=schema))
            count += len(sides)
        if count == 0:
            writer.write_table(schema.empty_table())
    return count


def arrow_schema(model: type[BaseModel]):
    """The Arrow schema of a pydantic model, read from its fields, so the Parquet columns follow
    the JSON layout wherever core/schemas.py takes it."""
    import pyarrow as pa

    def arrow_type(annotation):
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
            return arrow_type(inner)
        if origin is list:
            return pa.list_(arrow_type(typing.get_args(annotation)[0]))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return pa.struct([(n, arrow_type(f.annotation)) for n, f in annotation.model_fields.items()])
        simple = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}
        if annotation in simple:
            return simple[annotation]
        raise TypeError(f"no Arrow type for {annotation!r}")

    return pa.schema([(name, arrow_type(f.annotation)) for name, f in model.model_fields.items()])
