"""The channel store: migrations, and a tiny-model run written and read back."""

import numpy as np
import pytest
from sqlalchemy import func, inspect, select

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import load_model
from channelscope.worker import store
from tests.fixtures.writing import write_run


@pytest.mark.parametrize("flavour", ["sqlite", "postgresql"])
def test_migrations_up_from_empty_and_down_again(flavour, tmp_path, request):
    url = (
        f"sqlite:///{tmp_path / 'm.db'}"
        if flavour == "sqlite"
        else request.getfixturevalue("empty_postgres_url")
    )
    db.upgrade(url)
    engine = db.make_engine(url)
    assert {"models", "runs", "shards", "neurons", "channels", "channel_tokens"} <= set(
        inspect(engine).get_table_names()
    )
    assert db.current_revision(engine) == db.head_revision()
    db.downgrade(url)
    assert not {"models", "runs", "neurons"} & set(inspect(engine).get_table_names())
    engine.dispose()


def test_a_tiny_run_reads_back_equal_to_what_the_engine_returned(database_url, tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    settings = rotate.with_overrides(rotate.Settings(), channels=3)
    decomposer = Decomposer(model, settings, reference_count=8, cache_dir=tmp_path)
    records = decomposer.neurons(1, "gate", [0, 5, 9])
    engine = db.make_engine(database_url)
    stored = store.run_settings(settings, "unembedding", 8)
    write_run(engine, model, stored, 0, records, decomposer=decomposer)
    with db.session(engine) as session:
        assert session.scalar(select(func.count()).select_from(T.Channel)) == 9
        for record in records:
            row = session.scalar(select(T.Neuron).where(T.Neuron.neuron == record.neuron))
            assert np.array_equal(T.neuron_vector(row.vector), record.vector)
            assert row.kurtosis == pytest.approx(record.kurtosis)
            assert [t for t, _ in row.top_tokens] == record.top_ids.tolist()
            channels = session.scalars(
                select(T.Channel).where(T.Channel.neuron_id == row.id).order_by(T.Channel.channel)
            ).all()
            assert len(channels) == len(record.channels)
            for stored, computed in zip(channels, record.channels, strict=True):
                assert np.allclose(T.channel_vector(stored.vector), computed.vector, rtol=1e-3, atol=1e-3)
                assert np.array_equal(T.masked_tokens(stored.masked), computed.masked)
                assert stored.kurtosis == pytest.approx(computed.kurtosis)
                assert stored.faithfulness_percentile == pytest.approx(computed.faithfulness_percentile)
                assert stored.generic == computed.generic
                assert np.allclose(T.kurtosis_history(stored.history), computed.history)
                tokens = session.scalars(
                    select(T.ChannelToken.token_id)
                    .where(T.ChannelToken.neuron_id == row.id, T.ChannelToken.channel == stored.channel)
                    .order_by(T.ChannelToken.rank)
                ).all()
                assert tokens == computed.top_ids.tolist()
    engine.dispose()
