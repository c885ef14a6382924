"""What comes back out of the channel store: the token index's order, and `channelscope export`.

The neurons here are made by hand with chosen numbers, so that ties and orders are known in
advance (nothing is decomposed), and written the way the worker writes them."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, text

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.core.schemas import NeuronSideOut
from channelscope.method import rotate
from channelscope.method.decomposer import ChannelRecord, NeuronRecord
from channelscope.method.weights import load_model
from channelscope.web import export
from channelscope.web.queries import SearchFilters, search
from channelscope.worker import store
from tests.fixtures.writing import write_run

TOKEN = 100


def channel(index: int, top: list[int], z: list[float], percentile: float, kurtosis: float = 20.0):
    return ChannelRecord(
        index=index,
        vector=np.full(64, 0.1 * (index + 1), dtype=np.float32),
        kurtosis=kurtosis,
        skew=3.0,
        cos=0.7,
        loss=-0.5,
        masked=np.array(top[:3], dtype=np.int32),
        step=40 + index,
        history=[1.0, 2.0, kurtosis],
        alpha=0.5,
        faithfulness=2.0,
        faithfulness_percentile=percentile,
        percentile_local=percentile,
        generic=False,
        top_ids=np.array(top, dtype=np.int32),
        top_z=np.array(z, dtype=np.float32),
    )


def neuron(layer: int, side: str, index: int, channels: list[ChannelRecord]) -> NeuronRecord:
    return NeuronRecord(
        layer=layer,
        side=side,
        neuron=index,
        vector=np.arange(64, dtype=np.float32) / 64 + index,
        norm=1.5,
        kurtosis=3.0 + index,
        skew=0.5,
        top_ids=np.array([1, 2, 3], dtype=np.int32),
        top_z=np.array([4.0, 3.5, 3.0], dtype=np.float32),
        bottom_ids=np.array([7, 8, 9], dtype=np.int32),
        bottom_z=np.array([-4.0, -3.5, -3.0], dtype=np.float32),
        reconstruction=[0.5, 0.75],
        reconstruction_baseline=[0.4, 0.7],
        coverage=[0.1, 0.2],
        channels=channels,
        best_percentile=max(ch.faithfulness_percentile for ch in channels),
        score=50.0,
    )


def write(url: str, tiny_folder, records: list[NeuronRecord]) -> T.Run:
    engine = db.make_engine(url)
    settings = store.run_settings(rotate.with_overrides(rotate.Settings(), channels=2), "unembedding", 8)
    run_hash = write_run(engine, load_model(tiny_folder), settings, 0, records)
    with db.session(engine) as session:
        run = session.scalar(select(T.Run).where(T.Run.hash == run_hash))
    engine.dispose()
    return run


# --- the token index ------------------------------------------------------------------------------


@pytest.fixture
def ranked(database_url, tiny_folder):
    """Five channels that hold TOKEN, with a tie in (percentile, z) between neurons 0 and 1."""
    records = [
        neuron(1, "out", 0, [channel(0, [TOKEN, 5], [5.0, 4.0], 90.0), channel(1, [6], [4.0], 10.0)]),
        neuron(
            1, "out", 1, [channel(0, [TOKEN, 5], [5.0, 4.0], 90.0), channel(1, [6, TOKEN], [8.0, 7.0], 90.0)]
        ),
        neuron(1, "out", 2, [channel(0, [5, TOKEN], [6.0, 3.0], 95.0), channel(1, [6], [4.0], 10.0)]),
        neuron(1, "out", 3, [channel(0, [5], [6.0], 95.0), channel(1, [TOKEN], [9.0], 50.0)]),
    ]
    run = write(database_url, tiny_folder, records)
    return database_url, run


def _search(url, run, by_z: bool, after=None, limit=50):
    filters = SearchFilters(None, None, None, -1e9, True, by_z)
    engine = db.make_engine(url)
    with db.session(engine) as session:
        rows = search(session, [(run.id, TOKEN)], filters, after, limit)
    engine.dispose()
    return rows


def test_channels_for_a_token_come_back_by_percentile_then_z_with_ties_broken_by_neuron(ranked):
    url, run = ranked
    rows = _search(url, run, by_z=False)
    assert [(r.neuron, r.channel, r.faithfulness_percentile, r.z) for r in rows] == [
        (2, 0, 95.0, 3.0),
        (1, 1, 90.0, 7.0),
        (1, 0, 90.0, 5.0),  # the exact tie with neuron 0: the later-written neuron id first, every time
        (0, 0, 90.0, 5.0),
        (3, 1, 50.0, 9.0),
    ]
    by_z = _search(url, run, by_z=True)
    assert [(r.neuron, r.channel) for r in by_z] == [(3, 1), (1, 1), (1, 0), (0, 0), (2, 0)]
    # Keyset pages split the tie and still walk the same list, with nothing lost or repeated.
    for order, full in ((False, rows), (True, by_z)):
        walked, after = [], None
        while True:
            page = _search(url, run, by_z=order, after=after, limit=3)
            walked += page
            if len(page) < 3:
                break
            last = page[-1]
            after = (last.k1, last.k2, last.neuron_id, last.channel)
        assert [(r.neuron_id, r.channel) for r in walked] == [(r.neuron_id, r.channel) for r in full]


def test_the_percentile_order_is_read_straight_from_the_index(postgres_url, tiny_folder):
    records = [neuron(0, "in", i, [channel(0, [TOKEN], [float(i)], float(i % 7))]) for i in range(40)]
    run = write(postgres_url, tiny_folder, records)
    engine = db.make_engine(postgres_url)
    with engine.connect() as connection:
        connection.execute(text("ANALYZE channel_tokens"))
        connection.execute(text("SET enable_seqscan = off"))  # a table this small would be read whole
        plan = "\n".join(
            connection.execute(
                text(
                    "EXPLAIN SELECT neuron_id, channel FROM channel_tokens "
                    "WHERE run_id = :run AND token_id = :token "
                    "ORDER BY faithfulness_percentile DESC, z DESC, neuron_id DESC, channel DESC LIMIT 10"
                ),
                {"run": run.id, "token": TOKEN},
            ).scalars()
        )
    engine.dispose()
    assert "ix_channel_tokens_by_percentile" in plan and "Sort" not in plan, plan


# --- export ---------------------------------------------------------------------------------------


@pytest.fixture
def exported_run(database_url, tiny_folder):
    records = [
        neuron(
            layer, side, i, [channel(0, [10 + i, 11], [6.0, 5.0], 80.0), channel(1, [12], [4.5], 20.0, 4.0)]
        )
        for layer in (0, 1)
        for side in ("gate", "out")
        for i in range(5)
    ]
    return database_url, write(database_url, tiny_folder, records), records


def test_export_writes_every_neuron_side_in_the_json_api_layout(exported_run, tmp_path, monkeypatch):
    url, run, records = exported_run
    engine = db.make_engine(url)
    monkeypatch.setattr(export, "BATCH", 3)  # several keyset batches, split inside a layer and side
    assert export.write(engine, run, "jsonl", tmp_path / "run.jsonl") == 20
    lines = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [(o["layer"], o["side"], o["neuron"]) for o in lines] == sorted(
        (r.layer, r.side, r.neuron) for r in records
    )
    by_key = {(r.layer, r.side, r.neuron): r for r in records}
    tokens = load_model_tokens(url)
    for obj in lines:
        assert NeuronSideOut.model_validate(obj).model_dump(mode="json") == obj  # exactly the API's fields
        record = by_key[(obj["layer"], obj["side"], obj["neuron"])]
        assert obj["run"] == run.hash and obj["model"] == "tiny-llama"
        assert [c["index"] for c in obj["channels"]] == [0, 1]
        first = obj["channels"][0]
        assert [t["id"] for t in first["top_tokens"]] == record.channels[0].top_ids.tolist()
        assert [t["token"] for t in first["top_tokens"]] == [tokens[i] for i in record.channels[0].top_ids]
        assert first["masked"] == 2 and first["history"] == [1.0, 2.0, 20.0]
        assert obj["reconstruction"] == record.reconstruction

    assert export.write(engine, run, "parquet", tmp_path / "run.parquet") == 20
    assert pq.read_table(tmp_path / "run.parquet").to_pylist() == lines
    engine.dispose()


def test_export_from_the_command_line(exported_run, tmp_path, monkeypatch, capsys):
    from channelscope import cli
    from channelscope.core.config import config

    url, run, _ = exported_run
    monkeypatch.setenv("DATABASE_URL", url)
    config.cache_clear()
    try:
        assert cli.main(["export", run.hash[:6]]) == 0
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 20 and f"wrote 20 neuron sides of run {run.hash}" in err
        assert cli.main(["export", run.hash, "--format", "parquet", "-o", str(tmp_path / "r.parquet")]) == 0
        assert pq.read_metadata(tmp_path / "r.parquet").num_rows == 20
    finally:
        config.cache_clear()


def load_model_tokens(url: str) -> list[str]:
    import zlib

    engine = db.make_engine(url)
    with db.session(engine) as session:
        blob = session.scalar(select(T.Model.vocabulary))
    engine.dispose()
    return json.loads(zlib.decompress(blob))["tokens"]


def test_autocomplete_offers_whole_words_first_in_their_word_spelling():
    from channelscope.web.vocabulary import Vocabulary

    fragments = ["Par", "par", "para", "parc", "pare", "pari", "park", "pars", "part", "parz", "parx", "pary"]
    tokens = [*fragments, "Paris", " Paris", " parent", "parenthood"]
    vocab = Vocabulary(tokens, ["normal"] * len(tokens))
    found = [tokens[i] for i in vocab.suggest("Par", 10)]
    # Eleven fragments are shorter than "paris": by length alone " Paris" would be cut off.
    assert found[:2] == [" Paris", " parent"] and "Paris" not in found and len(found) == 10
