"""`channelscope eval-ablation` end to end on the tiny Llama: every sampled channel gets S at
weight level and in the model beside its baselines, and the report says how they compare."""

import json
import math

import torch

from channelscope.experiments import ablation_report
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.intervention import load_language_model
from channelscope.method.weights import load_model
from channelscope.worker import corpus


def test_the_evaluation_measures_every_channel_and_writes_its_report(tiny_gguf, tmp_path):
    model = load_model(tiny_gguf)
    lm = load_language_model(tiny_gguf)
    sequences = corpus.encode(lm, corpus.load().texts[:40])
    thresholds = corpus.activation_thresholds(lm, sequences)
    settings = rotate.with_overrides(rotate.Settings(), channels=2, mask_z=3.0)
    decomposer = Decomposer(model, settings, reference_count=8, cache_dir=tmp_path)
    result = ablation_report.evaluate(
        model,
        lm,
        decomposer,
        None,
        {layer: thresholds[layer].numpy() for layer in range(model.n_layers)},
        [0, 1],
        per_cell=1,
        aligned=0,
        channels=2,
        draws=2,
        texts=2,
        log=lambda _: None,
    )
    rows = result["channels"]
    assert len(rows) == 2 * 3 * 2  # layers x sides x channels
    assert {r["side"] for r in rows} == {"gate", "in", "out"}
    for r in rows:
        if r["alpha"] > 0:
            assert math.isfinite(r["weight_s"]) and math.isfinite(r["weight_baseline"])
        else:
            assert math.isnan(r["weight_s"]) and math.isnan(r["model_s"])
    assert any(math.isfinite(r["model_s"]) for r in rows if r["side"] == "out")
    path = ablation_report.write_report(result, tmp_path / "reports", "channelscope eval-ablation tiny")
    text = path.read_text()
    assert "## Findings" in text and "| `out`, all channels |" in text
    assert (tmp_path / "reports" / "ablation_selectivity.png").stat().st_size > 1000
    assert json.loads((tmp_path / "reports" / "ablation.json").read_text())["channels"]


def test_random_draws_for_the_baseline_are_the_same_for_the_same_neuron():
    w = torch.randn(8, generator=torch.Generator().manual_seed(0))
    sample = ablation_report.NeuronSample("random", 3, "out", 5, w, [], "computed")
    U = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    scored = torch.ones(50, dtype=torch.bool)
    sample.channels = [
        ablation_report.ChannelSample(w.flip(0), 0.5, 0.1, 1.0, 6.0, False, torch.tensor([1, 2])),
    ]
    a = ablation_report._draws(sample, U, scored, 3, seed=0)
    b = ablation_report._draws(sample, U, scored, 3, seed=0)
    assert torch.equal(a[0].directions, b[0].directions)
