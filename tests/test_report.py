"""`channelscope eval` on the tiny Llama, and the batching across layers it relies on."""

import json
import re
import statistics

import numpy as np
import torch

from channelscope.experiments import eval_report
from channelscope.method import measures, rotate
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
        model, tmp_path / "out", per_cell=1, channels=2, aligned=1, cache_dir=tmp_path, planted=1,
        reconstruction_channels=3, reconstruction_sample=1,
    )  # fmt: skip
    sides = len(model.sides)
    groups = len({layer // 10 for layer in range(model.n_layers)})  # the tiny model's layers are all "early"
    assert len(result["neurons"]) == groups * sides + sides  # random ones, then one aligned per side
    for neuron in result["neurons"]:
        for measure in ("reconstruction", "consistency", "selectivity"):
            assert f"{measure}_baseline" in neuron
        for kind in ("sparse", "gaussian"):  # coverage and alpha* beside their stand-ins'
            assert len(neuron[f"coverage_baseline_{kind}"]) == len(neuron[f"alpha_baseline_{kind}"]) == 2
            assert all(0 <= a <= 1 for a in neuron[f"alpha_baseline_{kind}"])
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
    planted = result["planted"]["vectors"]  # one token and one generic plant per cosine
    assert len(planted) == 2 * len(eval_report.PLANTED_COSINES) and "## Planted channels" in summary
    assert all(len(v["twin_channels"]["generic"]) == 2 for v in planted)
    recon = result["reconstruction_at_c"]["neurons"]  # the most aligned out vector and a random one
    assert [n["kind"] for n in recon] == ["aligned", "random"] and all(n["side"] == "out" for n in recon)
    assert all(len(n["reconstruction"]) == len(n["reconstruction_baseline"]) == 3 for n in recon)
    assert "## Reconstruction at the paper's C = 3" in summary
    (tmp_path / "out" / "eval.md").unlink()
    assert eval_report.render(tmp_path / "out").read_text() == summary


def test_the_solver_check_renders_from_the_json_kind_by_kind(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    out = tmp_path / "out"
    result = eval_report.evaluate(
        model, out, per_cell=1, channels=2, aligned=1, cache_dir=tmp_path, held_out=8, planted=0,
        reconstruction_sample=0,
    )  # fmt: skip
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


def test_a_planted_channel_is_recovered_not_flagged_and_ranked_high(tiny_folder, tmp_path):
    """Known answers for the generic flag and the percentile (docs/method.md, "Planted channels"):
    token directions planted in random vectors come back as channels that are not flagged and
    rank high, their twins (the same vectors without the plant) find nothing of them, and the
    reference's generic direction planted at a low cosine comes back flagged when it comes back."""
    model = load_model(tiny_folder)
    decomposer = Decomposer(
        model, rotate.with_overrides(rotate.Settings(), channels=3), reference_count=16, cache_dir=tmp_path
    )
    geometry = eval_report.token_geometry(decomposer.proj.exact.cpu(), decomposer.scored.cpu())
    generator = torch.Generator().manual_seed(0)
    plants = []  # (direction, tokens, cosine)
    for _ in range(4):
        tokens = eval_report.coherent_tokens(geometry, generator)
        plants.append((eval_report.token_direction(geometry, tokens), tokens, 0.7))
    (generic,) = decomposer.reference.generic  # the tiny model's reference has one
    z = (generic @ decomposer.proj.exact.cpu())[None]
    sign = measures.tail_sign(float(rotate.tail_skew(z, decomposer.scored.cpu())[0]))
    tokens, _ = measures.top_tokens(
        rotate.z_scores(z, decomposer.scored.cpu())[0], decomposer.scored.cpu(), sign
    )
    plants += [(generic, tokens[:8], 0.3)] * 4
    vectors, twins = zip(*(eval_report.plant(p, c, generator) for p, _, c in plants), strict=True)
    coords = [(-1, "planted", i) for i in range(len(plants))]
    records = decomposer.vectors(torch.stack(vectors + twins), coords + coords)
    found = [eval_report.nearest_channel(records[i], p, t) for i, (p, t, _) in enumerate(plants)]
    missed = [
        eval_report.nearest_channel(records[len(plants) + i], p, t) for i, (p, t, _) in enumerate(plants)
    ]
    tokens_found, generic_found = found[:4], found[4:]
    assert all(f["recovered"] and f["tokens_found"] >= 0.5 for f in tokens_found)
    assert not any(f["generic"] for f in tokens_found)
    assert statistics.median(f["percentile"] for f in tokens_found) >= 90  # 100 here
    assert not any(m["recovered"] for m in missed) and max(m["cos_planted"] for m in missed) < 0.3
    assert max(m["tokens_found"] for m in missed) < 0.5
    # Below cos 0.44 the flag can see a channel that is a generic direction: it fires on every one.
    recovered = [f for f in generic_found if f["recovered"]]
    assert recovered and all(f["generic"] for f in recovered)  # 2 of 4 recovered here
