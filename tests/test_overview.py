"""The whole model's raw projections: computed per layer and side, stored, resumable, and equal
to what a channel run records for the same neuron; raw token z-scores by one product."""

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import overview as O
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import load_model
from channelscope.worker import overview


def stored(engine, layer: int, side: str):
    with db.session(engine) as session:
        return session.scalar(
            select(T.OverviewLayer).where(T.OverviewLayer.layer == layer, T.OverviewLayer.side == side)
        )


def test_the_overview_holds_every_vector_and_agrees_with_a_channel_run(database_url, tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    engine = db.make_engine(database_url)
    seen = []
    assert (
        overview.build(engine, model, torch.device("cpu"), lambda done, total: seen.append((done, total)))
        == 6
    )
    assert seen[-1] == (6, 6)
    assert overview.build(engine, model, torch.device("cpu")) == 0  # resumes: nothing left to do
    with db.session(engine) as session:
        assert session.scalar(select(func.count()).select_from(T.OverviewLayer)) == 6
    row = stored(engine, 1, "gate")
    stats = T.unpack(row.stats, "float32").reshape(len(T.OVERVIEW_STATS), -1)
    top_ids = T.unpack(row.top_ids, "int32").reshape(model.d_mlp, -1)
    top_z = T.unpack(row.top_z, "float32").reshape(model.d_mlp, -1)
    bottom_ids = T.unpack(row.bottom_ids, "int32").reshape(model.d_mlp, -1)
    # What a channel run stores for the neuron is what the overview says of it.
    settings = rotate.with_overrides(rotate.Settings(), channels=1, precision="fp32")
    (record,) = Decomposer(model, settings, reference_count=4, cache_dir=tmp_path).neurons(1, "gate", [7])
    assert top_ids[7].tolist() == record.top_ids.tolist()
    assert bottom_ids[7].tolist() == record.bottom_ids.tolist()
    assert np.allclose(top_z[7], record.top_z, atol=1e-4)
    assert stats[T.OVERVIEW_STATS.index("kurtosis"), 7] == pytest.approx(record.kurtosis, abs=1e-4)
    assert stats[T.OVERVIEW_STATS.index("norm"), 7] == pytest.approx(record.norm, rel=1e-5)
    engine.dispose()


def test_raw_z_of_a_token_is_its_z_score_in_each_vectors_projection(tiny_folder):
    model = load_model(tiny_folder)
    U = model.projection()
    scored = rotate.initial_token_weights(U, model.vocabulary.kinds, rotate.Settings()) == 1
    part = O.layer_overview(0, "out", model.vectors(0, "out"), U, scored)
    mean = torch.from_numpy(part.stats[T.OVERVIEW_STATS.index("mean")])
    std = torch.from_numpy(part.stats[T.OVERVIEW_STATS.index("std")])
    token = int(torch.nonzero(scored)[10])
    found = O.raw_z(torch.from_numpy(part.vectors), mean, std, U[:, [token]])[:, 0]
    expected = rotate.z_scores(model.vectors(0, "out") @ U, scored)[:, token]
    assert torch.allclose(found, expected, atol=2e-2)  # float16 vectors
    assert torch.equal(torch.argsort(found)[-3:], torch.argsort(expected)[-3:])
