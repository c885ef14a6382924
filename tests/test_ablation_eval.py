"""`channelscope eval-ablation` end to end on the tiny Llama: every sampled channel gets S at
weight level and in the model beside its baselines, aligned and random vectors stay apart in
every table, and the report is rebuilt from its JSON alone, byte for byte."""

import json
import math

import torch

from channelscope.experiments import ablation_report
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.intervention import load_language_model
from channelscope.method.weights import load_model, quantisation
from tests import tiny


def test_the_evaluation_measures_every_channel_and_its_report_renders_from_the_json(tiny_gguf, tmp_path):
    model = load_model(tiny_gguf)
    lm = load_language_model(tiny_gguf)
    settings = rotate.with_overrides(rotate.Settings(), channels=2, mask_z=3.0)
    decomposer = Decomposer(model, settings, reference_count=8, cache_dir=tmp_path)
    result = ablation_report.evaluate(
        model,
        lm,
        decomposer,
        None,
        None,  # no stored pass: each out neuron's threshold over the committed corpus
        [0, 1],
        per_cell=1,
        aligned=1,
        channels=2,
        draws=2,
        texts=2,
        log=lambda _: None,
    )
    rows = result["channels"]
    assert len(rows) == 2 * 3 * 2 * 2  # layers x sides x kinds x channels
    assert {(r["group"], r["side"]) for r in rows} == {
        (kind, side) for kind in ("aligned", "random") for side in ("gate", "in", "out")
    }
    for r in rows:
        if r["alpha"] > 0:
            assert math.isfinite(r["weight_s"]) and math.isfinite(r["weight_baseline"])
        else:
            assert math.isnan(r["weight_s"]) and math.isnan(r["model_s"])
    assert any(math.isfinite(r["model_s"]) for r in rows if r["side"] == "out")
    out_neurons = [n for n in result["neurons"] if n["side"] == "out"]
    assert all(n["activation_min"] <= n["threshold"] <= n["activation_max"] for n in out_neurons)
    assert result["quantisation"]["matrices"]["gate"]["type"] == "F32"

    result["run"] |= {"command": "channelscope eval-ablation tiny", "wall_seconds": 1.0}
    path = ablation_report.write(result, tmp_path / "reports")
    written = path.read_bytes()
    assert b"## Findings" in written and b"## In the model, by kind, layer and side" in written
    assert (tmp_path / "reports" / "ablation_selectivity.png").stat().st_size > 1000
    assert ablation_report.render(tmp_path / "reports").read_bytes() == written
    assert json.loads((tmp_path / "reports" / "ablation.json").read_text())["channels"]


def test_out_can_sample_fewer_vectors_than_the_read_sides(tiny_gguf):
    from collections import Counter

    model = load_model(tiny_gguf)
    rows = ablation_report.sample(model, [0, 1], per_cell=3, aligned=2, seed=0, out_vectors=1)
    counts = Counter((r.group, r.layer, r.side) for r in rows)
    for layer in (0, 1):
        assert counts["random", layer, "gate"] == counts["random", layer, "in"] == 3
        assert counts["aligned", layer, "gate"] == counts["aligned", layer, "in"] == 2
        assert counts["random", layer, "out"] == counts["aligned", layer, "out"] == 1
    # The read sides' random vectors are those the same seed draws without a separate count for out.
    same = ablation_report.sample(model, [0, 1], per_cell=3, aligned=2, seed=0)
    assert [r for r in rows if r.side != "out"] == [r for r in same if r.side != "out"]


def test_the_final_norm_gain_is_the_norm_weight_of_a_llama(tiny_gguf):
    lm = load_language_model(tiny_gguf)
    weight = lm.model.base_model.norm.weight.detach()
    assert torch.allclose(lm.final_norm_gain, weight, rtol=1e-4)


def _row(group: str, side: str, layer: int, channel: int, s: float, baseline: float, **changes) -> dict:
    row = {"group": group, "layer": layer, "side": side, "neuron": channel, "channel": channel % 2,
           "kurtosis": 9.0, "cos": 0.7, "alpha": 0.5, "masked": 4, "generic": channel % 3 == 0,
           "overlap": 0.75, "weight_s": s, "weight_baseline": baseline, "model_s": s,
           "model_baseline": baseline, "positions": 10}  # fmt: skip
    return row | changes


def _made_up_result() -> dict:
    """Aligned channels all at S 3 against 1, random ones at -1 against 2: any row that pooled
    the two kinds would show a median in between."""
    rows = []
    for layer in (4, 9):
        for side in ("gate", "in", "out"):
            for c in range(12):
                rows.append(_row("aligned", side, layer, c, 3.0, 1.0))
                rows.append(_row("random", side, layer, c, -1.0, 2.0))
            rows.append(_row("random", side, layer, 99, math.nan, math.nan, positions=0))
            rows.append(_row("random", side, layer, 98, math.nan, math.nan, alpha=0.0, positions=0))
    neurons = [
        {"group": kind, "layer": 4, "side": "out", "neuron": 1, "source": "computed", "threshold": 0.5,
         "activation_min": low, "activation_max": 2.0}
        for kind, low in (("aligned", -6.0), ("random", -0.1))
    ]  # fmt: skip
    return {
        "model": "made-up",
        "settings": {"layers": [4, 9], "per_cell": 1, "aligned": 1, "out_vectors": None, "channels": 2,
                     "draws": 2, "texts": 2, "seed": 0, "corpus": "c", "corpus_texts": 3,
                     "corpus_positions": 300, "thresholds": "committed corpus", "quantile": 0.9,
                     "target_half_width": 0.1, "small": 8},
        "run": {"machine": "a CPU", "threads": 2, "niceness": 10, "reference_cached": True,
                "command": "channelscope eval-ablation x", "wall_seconds": 12.0},
        "solver": "fast", "precision": "fp32", "algorithm_version": 4,
        "quantisation": {"file": "m.gguf", "file_type": "MOSTLY_Q4_1",
                         "matrices": {"gate": {"type": "Q4_1", "relative_rms_error": 0.08},
                                      "U": {"type": "Q8_0", "relative_rms_error": 0.007}}},
        "final_norm_gain": {"min": 0.5, "median": 1.0, "max": 2.0},
        "sources": ["computed"], "seconds": 10.0, "neurons": neurons, "channels": rows,
    }  # fmt: skip


def test_every_table_keeps_aligned_and_random_apart(tmp_path):
    (tmp_path / "ablation.json").write_text(json.dumps(_made_up_result()))
    text = ablation_report.render(tmp_path).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| kind")]
    assert len(rows) > 20
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        kind = cells[0]
        assert kind in ("aligned", "random"), line
        s, baseline = (3.0, 1.0) if kind == "aligned" else (-1.0, 2.0)
        numbers = " ".join(cells)
        assert f"{s:.2f}" in numbers and f"{baseline:.2f}" in numbers, line
    # The channels with nowhere to measure are counted, not dropped: 1 untestable, 1 alpha* = 0 a cell.
    assert "| random | `gate` | 28 | 2 | 2 | 24 |" in text
    assert "1 of 1 aligned" in text and "0 of 1 random" in text  # negative activations, counted
    assert "the intervals do not overlap: aligned channels beat theirs more often" in text
    assert "Q4_1 (RMS rounding error 8.0 %" in text and "MOSTLY_Q4_1" in text


def test_quantisation_is_read_off_the_file(tmp_path):
    path = tiny.write_gguf(tmp_path / "q8.gguf", quantization="Q8_0")
    found = quantisation(path)
    assert found["matrices"]["gate"]["type"] == "Q8_0"
    assert 0 < found["matrices"]["out"]["relative_rms_error"] < 0.01  # 8 bits: well under 1 %
    assert found["matrices"]["attention"] == {"type": "F32", "relative_rms_error": None}
    assert found["matrices"]["U"]["type"] == "F32"


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
