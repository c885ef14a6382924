"""`channelscope eval` on the tiny Llama, and the batching across layers it relies on."""

import json
import re

import numpy as np
import torch

from channelscope.experiments import eval_report
from channelscope.method import rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.weights import load_model


def test_neurons_from_several_layers_and_sides_batch_together_unchanged(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    settings = rotate.with_overrides(rotate.Settings(), channels=2)
    decomposer = Decomposer(model, settings, reference_count=8, cache_dir=tmp_path)
    coords = [(1, "gate", 3), (0, "out", 7), (1, "in", 0), (0, "out", 2)]
    together = decomposer.anywhere(coords)
    for (layer, side, neuron), record in zip(coords, together, strict=True):
        (alone,) = decomposer.neurons(layer, side, [neuron])
        assert (record.layer, record.side, record.neuron) == (layer, side, neuron)
        assert np.array_equal(record.vector, model.vectors(layer, side)[neuron].numpy())
        for a, b in zip(record.channels, alone.channels, strict=True):
            assert np.array_equal(a.vector, b.vector) and a.kurtosis == b.kurtosis


def test_the_report_puts_every_measure_beside_its_baseline(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    result = eval_report.evaluate(
        model, tmp_path / "out", per_cell=1, channels=2, aligned=1, cache_dir=tmp_path
    )
    sides = len(model.sides)
    groups = len({layer // 10 for layer in range(model.n_layers)})  # the tiny model's layers are all "early"
    assert len(result["neurons"]) == groups * sides + sides  # random ones, then one aligned per side
    for neuron in result["neurons"]:
        for measure in ("reconstruction", "consistency", "selectivity"):
            assert f"{measure}_baseline" in neuron
        assert len(neuron["channel_kurtosis"]) == 2 and len(neuron["generic"]) == 2
        assert all(0 <= p <= 100 for p in neuron["percentile"])
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["random_vectors"]["count"] == result["random_vectors"]["count"] > 0
    summary = (tmp_path / "out" / "eval.md").read_text()
    assert "generic" in summary.lower() and "baseline" in summary.lower()
    for image in re.findall(r"\]\(([^)]+\.png)\)", summary):
        assert (tmp_path / "out" / image).stat().st_size > 1000
    assert re.findall(r"\]\(([^)]+\.png)\)", summary)
    assert torch.isfinite(torch.tensor(result["random_vectors"]["faithfulness_median_by_channel"])).all()
    # Random and aligned neurons are never pooled, and the report comes from its JSON alone.
    assert "random neurons" in summary and "aligned (" in summary
    assert all("consistency_other" in n and len(n["percentile_local"]) == 2 for n in result["neurons"])
    (tmp_path / "out" / "eval.md").unlink()
    assert eval_report.render(tmp_path / "out").read_text() == summary


def test_the_solver_check_renders_from_the_json_kind_by_kind(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    out = tmp_path / "out"
    result = eval_report.evaluate(
        model, out, per_cell=1, channels=2, aligned=1, cache_dir=tmp_path, held_out=8
    )
    assert len(result["held_out_scores"]) == 8 and all(0 <= s <= 100 for s in result["held_out_scores"])
    assert "## Is the neuron score calibrated?" in (out / "eval.md").read_text()

    def numbers(neuron, loss):
        return {"loss": [loss, loss], "kurtosis": neuron["channel_kurtosis"], "cos": neuron["cos"],
                "faithfulness": neuron["faithfulness"], "percentile": neuron["percentile"],
                "percentile_local": neuron["percentile_local"], "generic": [True, False],
                "score": 50.0, "steps": [2500, 3500]}  # fmt: skip

    # Stand-ins for the paper preset's numbers: the section reads them from the JSON alone.
    saved = json.loads((out / "eval.json").read_text())
    saved["solvers"] = [
        {
            "layer": n["layer"],
            "side": n["side"],
            "neuron": n["neuron"],
            "group": n["group"],
            "fast": numbers(n, -0.5),
            "paper": numbers(n, -0.25),
            "matched_cos": 0.75,
        }  # fmt: skip
        for n in saved["neurons"]
    ]
    (out / "eval.json").write_text(json.dumps(saved))
    text = eval_report.render(out).read_text()
    assert "## Does it depend on the solver?" in text
    rows = [line for line in text.splitlines() if line.startswith(("| random neurons |", "| aligned ("))]
    solver_rows = [line for line in rows if "-0.500 / -0.250" in line]
    assert len(solver_rows) == 2  # one row per kind, never pooled
    assert all("50% / 50%" in line and "0.75" in line and "| 3000 |" in line for line in solver_rows)
