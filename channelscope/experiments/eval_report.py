"""`channelscope eval`: the scientific report on a model (reports/eval.md and its plots).

For neurons sampled from early, middle and late layers, all sides, plus the most
vocabulary-aligned neurons of the late layers: kurtosis before and after, reconstruction, seed
consistency, weight-level selectivity, faithfulness against random vectors, how often channels
are generic, and what the optional down-weighting of the generic tokens changes. Every measure
sits beside its random baseline (docs/method.md).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch

from channelscope.core.stats import median, share
from channelscope.method import measures, rotate
from channelscope.method.decomposer import Decomposer, NeuronRecord
from channelscope.method.sampling import LAYER_GROUPS, Sampled, most_aligned, random_neurons

ALIGNED = "late, highest kurtosis"  # the group of the most vocabulary-aligned neurons


def sample_neurons(model, per_cell: int, seed: int, aligned: int) -> list[Sampled]:
    """`per_cell` random neurons per layer group and side, and the `aligned` highest-kurtosis
    neurons per side of the late layers (where channels are expected to be real)."""
    rows = random_neurons(model, LAYER_GROUPS, per_cell, torch.Generator().manual_seed(seed))
    if aligned:
        late = [layer for layer in LAYER_GROUPS["late"] if layer < model.n_layers] or [model.n_layers - 1]
        for side in model.sides:
            rows += most_aligned(model, late, side, aligned, group=ALIGNED)
    return rows


def decompose_all(decomposer: Decomposer, rows: list[Sampled], progress=None) -> list[NeuronRecord]:
    coords = sorted({(r.layer, r.side, r.neuron) for r in rows})
    found = dict(zip(coords, decomposer.anywhere(coords, progress), strict=True))
    return [found[(r.layer, r.side, r.neuron)] for r in rows]


def weight_selectivity(decomposer: Decomposer, record: NeuronRecord, generator) -> list[tuple[float, float]]:
    """Per channel: S of ablating it at weight level, and S of a random direction at the same
    cosine to w, whose tokens are as many (|T_k|) of its own dominant tail's (a random direction
    rarely passes the z > 6 masking rule). S does not depend on alpha (it scales numerator and
    denominator alike), so the direction alone is ablated."""
    proj, scored = decomposer.proj, decomposer.scored
    w = torch.from_numpy(record.vector).to(proj.exact.device)
    vectors = torch.stack([torch.from_numpy(ch.vector) for ch in record.channels]).to(w.device)
    cosines = torch.tensor([ch.cos for ch in record.channels], dtype=torch.float64)
    random = measures.random_at_cosines(w.cpu().double(), cosines, generator).float().to(w.device)
    z_c, z_r = proj.forward(vectors, exact=True), proj.forward(random, exact=True)
    skew_r, zs_r = rotate.tail_skew(z_r, scored), rotate.z_scores(z_r, scored)
    out = []
    for k, ch in enumerate(record.channels):
        real = measures.selectivity(
            -z_c[k], torch.from_numpy(ch.masked).long(), measures.tail_sign(ch.skew), scored
        )
        sign_r = measures.tail_sign(float(skew_r[k]))
        targets, _ = measures.top_tokens(zs_r[k], scored, sign_r, k=max(1, len(ch.masked)))
        base = measures.selectivity(-z_r[k], targets, sign_r, scored)
        out.append((real, base))
    return out


def evaluate(model, out_dir: Path, per_cell: int = 8, channels: int = 10, aligned: int = 8, seed: int = 0,
             cache_dir: Path | None = None, progress=None) -> dict:  # fmt: skip
    settings = rotate.with_overrides(rotate.Settings(), channels=channels)
    rows = sample_neurons(model, per_cell, seed, aligned)
    first = Decomposer(model, settings, seed=0, cache_dir=cache_dir, progress=progress)
    second = Decomposer(model, settings, seed=1, cache_dir=cache_dir, progress=progress)
    downweighted = Decomposer(
        model,
        rotate.with_overrides(settings, downweight_generic=True),
        seed=0,
        cache_dir=cache_dir,
        progress=progress,
    )
    step = progress(len(rows) * channels, "seed 0") if progress else None
    records = decompose_all(first, rows, step)
    step = progress(len(rows) * channels, "seed 1") if progress else None
    records_b = decompose_all(second, rows, step)
    step = progress(len(rows) * channels, "down-weighted") if progress else None
    records_dw = decompose_all(downweighted, rows, step)

    generator = torch.Generator().manual_seed(seed)
    per_neuron = []
    for row, a, b, dw in zip(rows, records, records_b, records_dw, strict=True):
        w = torch.from_numpy(a.vector).double()
        vecs_a = torch.stack([torch.from_numpy(ch.vector) for ch in a.channels]).double()
        vecs_b = torch.stack([torch.from_numpy(ch.vector) for ch in b.channels]).double()
        tops_a = [set(ch.top_ids.tolist()) for ch in a.channels]
        tops_b = [set(ch.top_ids.tolist()) for ch in b.channels]
        consistency, jaccard = measures.seed_consistency(w, vecs_a, vecs_b, tops_a, tops_b)
        cos_a = torch.tensor([ch.cos for ch in a.channels], dtype=torch.float64)
        cos_b = torch.tensor([ch.cos for ch in b.channels], dtype=torch.float64)
        selectivity = weight_selectivity(first, a, generator)
        per_neuron.append(
            {
                "group": row.group,
                "layer": row.layer,
                "side": row.side,
                "neuron": row.neuron,
                "kurtosis": a.kurtosis,
                "channel_kurtosis": [ch.kurtosis for ch in a.channels],
                "cos": [ch.cos for ch in a.channels],
                "faithfulness": [ch.faithfulness for ch in a.channels],
                "percentile": [ch.faithfulness_percentile for ch in a.channels],
                "generic": [ch.generic for ch in a.channels],
                "alpha": [ch.alpha for ch in a.channels],
                "reconstruction": a.reconstruction,
                "reconstruction_baseline": a.reconstruction_baseline,
                "coverage": a.coverage,
                "consistency": consistency,
                "consistency_jaccard": jaccard,
                "consistency_baseline": measures.seed_consistency_baseline(w, cos_a, cos_b, generator),
                "selectivity": [s for s, _ in selectivity],
                "selectivity_baseline": [b for _, b in selectivity],
                "downweighted_generic": [ch.generic for ch in dw.channels],
                "downweighted_faithfulness": [ch.faithfulness for ch in dw.channels],
                "downweighted_percentile": [ch.faithfulness_percentile for ch in dw.channels],
                "downweighted_kurtosis": [ch.kurtosis for ch in dw.channels],
                "top_tokens_first_channel": [model.vocabulary.tokens[i] for i in a.channels[0].top_ids[:8]],
            }
        )
    reference = first.reference
    result = {
        "model": model.name,
        "settings": {"channels": channels, "per_cell": per_cell, "aligned": aligned, "seed": seed},
        "random_vectors": {
            "count": int(reference.faithfulness.shape[0]),
            "generic_directions": int(len(reference.generic)),
            "tail_tokens": [model.vocabulary.tokens[i] for i in reference.tail_tokens],
            "faithfulness_median_by_channel": [float(np.median(c)) for c in reference.faithfulness.T],
            "kurtosis_median_by_channel": [float(np.median(c)) for c in reference.kurtosis.T],
        },
        "neurons": per_neuron,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1, default=float))
    plots = _plots(result, out_dir)
    (out_dir / "eval.md").write_text(_markdown(result, plots))
    return result


# --- the summary ---------------------------------------------------------------------------------

# (header, format, aggregate over a cell's neurons, value of one neuron)
CELL_COLUMNS = [
    ("K(w)", ".1f", median, lambda n: n["kurtosis"]),
    ("K(c0)", ".1f", median, lambda n: n["channel_kurtosis"][0]),
    ("cos(w,c0)", ".2f", median, lambda n: n["cos"][0]),
    ("faith c0", ".2f", median, lambda n: n["faithfulness"][0]),
    ("pct c0", ".0f", median, lambda n: n["percentile"][0]),
    ("generic c0", ".0%", share, lambda n: n["generic"][0]),
    ("generic all", ".0%", statistics.fmean, lambda n: share(n["generic"])),
    ("recon C", ".3f", median, lambda n: n["reconstruction"][-1]),
    ("baseline", ".3f", median, lambda n: n["reconstruction_baseline"][-1]),
    ("cons", ".2f", median, lambda n: n["consistency"]),
    ("baseline", ".2f", median, lambda n: n["consistency_baseline"]),
    ("S c0", ".1f", median, lambda n: n["selectivity"][0]),
    ("baseline", ".1f", median, lambda n: n["selectivity_baseline"][0]),
]


def _cells(neurons):
    cells: dict[tuple[str, str], list[dict]] = {}
    for n in neurons:
        cells.setdefault((n["group"], n["side"]), []).append(n)
    return cells


def _markdown(result: dict, plots: list[str]) -> str:
    neurons, ref = result["neurons"], result["random_vectors"]
    C = result["settings"]["channels"]
    lines = [
        f"# ROTATE on {result['model']}: what the channels are, against random vectors",
        "",
        "Made by `channelscope eval` (channelscope/experiments/eval_report.py); numbers in `eval.json`. "
        f"{len(neurons)} neurons, {C} channels each (fast solver, bf16), seeds 0 and 1; the random-vector "
        f"reference is {ref['count']} isotropic random vectors decomposed with the same settings. "
        'S = weight-level selectivity (docs/method.md, "Selectivity"); baselines are random vectors at '
        "the real channels' cosines to w.",
        "",
        "## Per layer group and side (medians over neurons)",
        "",
        "| group | side | n | " + " | ".join(header for header, *_ in CELL_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(CELL_COLUMNS),
    ]
    for (group, side), cell in _cells(neurons).items():
        values = [f"{aggregate(value(n) for n in cell):{fmt}}" for _, fmt, aggregate, value in CELL_COLUMNS]
        lines.append(f"| {group} | {side} | {len(cell)} | " + " | ".join(values) + " |")
    random_faith = ref["faithfulness_median_by_channel"]
    lines += [
        "",
        "K = excess kurtosis of the unweighted projection; c0 = the first channel; faith = mean z of the "
        "channel's top-20 tokens in the neuron's own projection; pct = that faithfulness as a percentile "
        "of random vectors' channels at the same index (50 = indistinguishable from random); cons = mean "
        "matched |cos| of the channels' parts orthogonal to w across two seeds.",
        "",
        "## Channel index: where real neurons separate from random vectors",
        "",
        "| channel | median faith (neurons) | median faith (random vectors) | median pct | share pct >= 90 "
        "| generic share | median K | median K (random) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in range(C):
        pct = [n["percentile"][k] for n in neurons]
        kurtosis = median(n["channel_kurtosis"][k] for n in neurons)
        lines.append(
            f"| {k} | {median(n['faithfulness'][k] for n in neurons):.2f} | {random_faith[k]:.2f} "
            f"| {median(pct):.0f} | {share(p >= 90 for p in pct):.0%} "
            f"| {share(n['generic'][k] for n in neurons):.0%} "
            f"| {kurtosis:.1f} | {ref['kurtosis_median_by_channel'][k]:.1f} |"
        )
    lines += _generic_check(neurons)
    plain_generic = share(g for n in neurons for g in n["generic"])
    dw_generic = share(g for n in neurons for g in n["downweighted_generic"])
    lines += [
        "",
        "## Down-weighting the generic tokens up front (the option, off by default)",
        "",
        f"The reference's random vectors put {len(ref['tail_tokens'])} tokens on the tails of more than a "
        f"quarter of their first channels: {', '.join(repr(t) for t in ref['tail_tokens'][:40])}.",
        "",
        f"- generic channels, all indices: {plain_generic:.0%} plain, {dw_generic:.0%} with the option;",
        f"- generic first channels: {share(n['generic'][0] for n in neurons):.0%} plain, "
        f"{share(n['downweighted_generic'][0] for n in neurons):.0%} with the option;",
        "- first channels with faithfulness < 1: "
        f"{share(n['faithfulness'][0] < 1 for n in neurons):.0%} plain, "
        f"{share(n['downweighted_faithfulness'][0] < 1 for n in neurons):.0%} with the option;",
        f"- median first-channel percentile: {median(n['percentile'][0] for n in neurons):.0f} plain, "
        f"{median(n['downweighted_percentile'][0] for n in neurons):.0f} with the option "
        "(each against its own random-vector reference).",
        "",
        *_against_the_paper(neurons),
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    return "\n".join(lines)


def _generic_check(neurons) -> list[str]:
    """Does the flag, which looks only at directions, agree with faithfulness, which looks only
    at the neuron's own tokens? Two independent readings of "generic"."""
    lines = [
        "",
        "## The generic flag against faithfulness",
        "",
        "| channels | n | median faith | median pct | share faith < 1 |",
        "|---|---|---|---|---|",
    ]
    for label, keep in [
        ("flagged generic", lambda n, k: n["generic"][k]),
        ("not flagged", lambda n, k: not n["generic"][k]),
        (
            "not flagged, random neurons only",
            lambda n, k: not n["generic"][k] and n["group"] != ALIGNED,
        ),
    ]:
        chosen = [(n, k) for n in neurons for k in range(len(n["generic"])) if keep(n, k)]
        faith = [n["faithfulness"][k] for n, k in chosen]
        pct = [n["percentile"][k] for n, k in chosen]
        lines.append(
            f"| {label} | {len(chosen)} | {median(faith):.2f} | {median(pct):.0f} "
            f"| {share(f < 1 for f in faith):.0%} |"
        )
    return lines + [""]


def _against_the_paper(neurons) -> list[str]:
    """The paper's claims, each next to what this sample measured (the numbers are this run's)."""
    random_ones = [n for n in neurons if n["group"] != ALIGNED]
    aligned = [n for n in neurons if n["group"] == ALIGNED]
    recon = median(n["reconstruction"][-1] for n in neurons)
    recon_base = median(n["reconstruction_baseline"][-1] for n in neurons)
    lines = ["## Where SmolLM2 disagrees with the paper", ""]
    lines.append(
        f"- Channels are sparse, but sparsity says little about the neuron: random neurons' first channels "
        f"have median kurtosis {median(n['channel_kurtosis'][0] for n in random_ones):.1f}, and "
        f"{share(n['generic'][0] for n in random_ones):.0%} of them are a generic direction of U that "
        f"random vectors reach too (median faithfulness percentile "
        f"{median(n['percentile'][0] for n in random_ones):.0f}, where 50 is random)."
    )
    if aligned:
        lines.append(
            f"- The paper's picture holds for vocabulary-aligned neurons: the highest-kurtosis late neurons' "
            f"first channels sit at percentile {median(n['percentile'][0] for n in aligned):.0f}, "
            f"{share(n['generic'][0] for n in aligned):.0%} generic, cos(w, c0) "
            f"{median(n['cos'][0] for n in aligned):.2f}."
        )
    verdict = (
        "random directions reach as much: the cosine to w explains the reconstruction, which is no "
        "evidence that the channels are parts of the neuron"
        if recon <= recon_base + 0.01
        else "more than random directions reach"
    )
    lines.append(
        f"- Reconstruction: {len(neurons[0]['reconstruction'])} channels recover {recon:.3f} of |w| "
        f"(median), random directions at the same cosines {recon_base:.3f}; {verdict}."
    )
    mostly_generic = [n for n in neurons if share(n["generic"]) >= 0.5]
    mostly_real = [n for n in neurons if share(n["generic"]) < 0.5]
    lines.append(
        f"- Seed consistency: {median(n['consistency'] for n in neurons):.2f} against "
        f"{median(n['consistency_baseline'] for n in neurons):.2f} for random channels; "
        f"{median(n['consistency'] for n in mostly_generic):.2f} for the {len(mostly_generic)} neurons "
        f"whose channels are mostly generic, {median(n['consistency'] for n in mostly_real):.2f} for the "
        f"other {len(mostly_real)}. Reproducible across seeds is not the same as real."
    )
    lines.append(
        f"- Weight-level selectivity of first channels: {median(n['selectivity'][0] for n in neurons):.1f} "
        f"against {median(n['selectivity_baseline'][0] for n in neurons):.1f} for a random direction at "
        'the same cosine; partly circular (docs/method.md, "Selectivity"), so `reports/ablation.md` '
        "measures it in the model."
    )
    return lines + [""]


def _plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    neurons, ref = result["neurons"], result["random_vectors"]
    C = result["settings"]["channels"]
    groups = list(dict.fromkeys(n["group"] for n in neurons))
    names = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for group in groups:
        cell = [n for n in neurons if n["group"] == group]
        axes[0].plot(
            range(C),
            [median(n["faithfulness"][k] for n in cell) for k in range(C)],
            marker="o",
            label=group,
        )
        axes[1].plot(
            range(C),
            [median(n["channel_kurtosis"][k] for n in cell) for k in range(C)],
            marker="o",
            label=group,
        )
    axes[0].plot(range(C), ref["faithfulness_median_by_channel"], "k--", label="random vectors")
    axes[1].plot(range(C), ref["kurtosis_median_by_channel"], "k--", label="random vectors")
    axes[0].set(
        title="faithfulness by channel index (median)", xlabel="channel", ylabel="mean own-z of top-20"
    )
    axes[1].set(
        title="channel kurtosis by index (median)", xlabel="channel", ylabel="excess kurtosis", yscale="log"
    )
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    names.append("eval-faithfulness.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    recon = np.array([n["reconstruction"] for n in neurons])
    base = np.array([n["reconstruction_baseline"] for n in neurons])
    coverage = np.array([n["coverage"] for n in neurons])
    axes[0].plot(range(1, C + 1), np.median(recon, 0), marker="o", label="channels")
    axes[0].plot(range(1, C + 1), np.median(base, 0), "k--", label="random at same cosines")
    axes[0].plot(range(1, C + 1), np.median(coverage, 0), marker="s", label="vocabulary mass covered")
    axes[0].set(title="reconstruction |P_k w|/|w| (median)", xlabel="k", ylim=(0, 1.02))
    axes[0].legend(fontsize=8)
    cons = [n["consistency"] for n in neurons]
    cons_base = [n["consistency_baseline"] for n in neurons]
    axes[1].hist([cons, cons_base], bins=20, label=["two seeds", "random at same cosines"])
    axes[1].set(title="seed consistency (matched |cos| of residuals)", xlabel="|cos|")
    axes[1].legend(fontsize=8)
    sel = [s for n in neurons for s in n["selectivity"] if s == s and s > 0]
    sel_base = [s for n in neurons for s in n["selectivity_baseline"] if s == s and s > 0]
    bins = np.logspace(np.log10(max(min(sel + sel_base), 1e-2)), np.log10(max(sel + sel_base)), 30)
    axes[2].hist([sel, sel_base], bins=bins, label=["channels", "random directions"])
    axes[2].set(title="weight-level selectivity S (all channels)", xscale="log", xlabel="S")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    names.append("eval-measures.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)
    return names
