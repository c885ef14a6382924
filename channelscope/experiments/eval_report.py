"""`channelscope eval`: the scientific report on a model (reports/eval.md and its plots).

For neurons sampled from early, middle and late layers, all sides, plus the most
vocabulary-aligned neurons of the late layers: kurtosis before and after, reconstruction, seed
consistency, weight-level selectivity, faithfulness against random vectors, how often channels
are generic, and what the optional down-weighting of the generic tokens changes. Every measure
sits beside its random baseline (docs/method.md).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from channelscope.core.stats import interval, median, share
from channelscope.experiments import calibration, solver_check
from channelscope.method import measures, rotate, weights
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


def paper_sample(rows: list[Sampled], per_kind: int) -> list[tuple[int, str, int]]:
    """`per_kind` random and `per_kind` aligned neurons of the sample, evenly spread over each
    kind's list (which runs through layer groups and sides), for the paper preset."""
    picked = []
    for kind in ([r for r in rows if r.group != ALIGNED], [r for r in rows if r.group == ALIGNED]):
        if kind and per_kind:
            at = np.linspace(0, len(kind) - 1, min(per_kind, len(kind))).round().astype(int)
            picked += [(kind[i].layer, kind[i].side, kind[i].neuron) for i in dict.fromkeys(at.tolist())]
    return list(dict.fromkeys(picked))


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


def _consistency_with_a_neighbour(here: int, rows: list[Sampled], records: list[NeuronRecord]) -> float:
    """Seed consistency's matching between this neuron's channels and those of the next neuron
    of its cell (group and side; the first, for the last): the baseline "consistent" must beat."""
    cell = [i for i, r in enumerate(rows) if (r.group, r.side) == (rows[here].group, rows[here].side)]
    other = cell[(cell.index(here) + 1) % len(cell)]
    if other == here:
        return float("nan")
    a, b = records[here], records[other]

    def stacked(record):
        return torch.stack([torch.from_numpy(ch.vector) for ch in record.channels]).double()

    return measures.consistency_between(
        torch.from_numpy(a.vector).double(), stacked(a), torch.from_numpy(b.vector).double(), stacked(b)
    )


def baselines_at_cosines(decomposer: Decomposer, record: NeuronRecord) -> dict:
    """Coverage and alpha* of directions at the channels' own cosines to w, in two kinds
    (docs/method.md, "Reconstruction and coverage", "Alpha* and ablation"): Gaussian directions, the
    very ones of the reconstruction baseline (the same generator, drawn first), and sparse ones,
    whose part orthogonal to w is a channel of the reference, as for "vs. cos". Direction k stands
    in for channel k: its alpha* against w, and tokens of its own tail as many as channel k added."""
    scored = decomposer.scored.cpu()
    w = torch.from_numpy(record.vector)
    cosines = torch.tensor([ch.cos for ch in record.channels], dtype=torch.float64)
    seed = rotate.neuron_seed(decomposer.seed, record.layer, record.side, record.neuron)
    generator = torch.Generator().manual_seed(seed)
    gaussian = measures.random_at_cosines(w.double(), cosines, generator).float()  # [C, d], |w| each
    pool = decomposer.directions
    rows = torch.randperm(len(pool.directions), generator=generator)[: len(cosines)]
    device = decomposer.proj.exact.device
    z_w = decomposer.proj.forward(w[None].to(device), exact=True)[0].cpu()  # [V]
    zs_w = rotate.z_scores(z_w[None], scored)[0]
    sparse = [
        measures.pool_at_cosine(w, z_w, c, pool, rows[k : k + 1]) for k, c in enumerate(cosines.tolist())
    ]
    projections = {
        "gaussian": decomposer.proj.forward(gaussian.to(device), exact=True).cpu(),  # [C, V]
        # unit directions scaled to |w|, as the channels are: alpha* depends on the ratio
        "sparse": float(w.norm()) * torch.cat(sparse),  # [C, V]
    }
    sizes = measures.claimed_union_sizes([torch.from_numpy(ch.masked).long() for ch in record.channels])
    out = {}
    for kind, z in projections.items():
        zs = rotate.z_scores(z, scored)
        out[f"coverage_baseline_{kind}"] = measures.coverage_of_directions(zs_w, scored, z, sizes)
        out[f"alpha_baseline_{kind}"] = measures.alpha_stars(z_w.expand_as(z), z, zs, scored).tolist()
    return out


# --- planted channels ------------------------------------------------------------------------------

PLANTED_TOKENS = 8  # tokens of a planted set: channels of SmolLM2 claim a few to a few dozen
# cos(planted direction, vector): either side of sqrt(1 - 0.9^2) ~ 0.44, above which the flag
# cannot see a channel that is a generic direction (docs/method.md, "Planted channels").
PLANTED_COSINES = (0.3, 0.5, 0.7)
# The nearest channel recovers a plant when |cos(c, p)| reaches this: p is then the larger part of
# it (half its squared norm or more).
RECOVERED_COS = math.sqrt(0.5)


@dataclass(frozen=True)
class TokenGeometry:
    """What planted token directions are made from: U's columns less the scored tokens' mean
    column, and their second moments over the scored tokens."""

    centred: torch.Tensor  # [d, V] float64
    unit: torch.Tensor  # [d, V] float32, each centred column at length 1
    second_moments: torch.Tensor  # [d, d] float64, sum over scored columns of the centred ones
    scored: torch.Tensor  # [V] bool


def token_geometry(U: torch.Tensor, scored: torch.Tensor) -> TokenGeometry:
    centred = (U - U[:, scored].mean(-1, keepdim=True)).double().cpu()  # [d, V]
    inside = centred[:, scored.cpu()]
    unit = (centred / centred.norm(dim=0, keepdim=True).clamp_min(1e-12)).float()
    return TokenGeometry(centred, unit, inside @ inside.T, scored.cpu())


def coherent_tokens(geometry: TokenGeometry, generator: torch.Generator, size: int = PLANTED_TOKENS):
    """A scored token drawn at random and its size - 1 nearest scored tokens by the cosine of their
    centred columns: a small set U itself holds together (' kick', ' kicks', 'kick', ...), as a
    channel's tokens are. Ids [size], the drawn one first."""
    ids = torch.nonzero(geometry.scored).flatten()
    seed = ids[torch.randint(len(ids), (1,), generator=generator)]
    similarity = (geometry.unit[:, seed].T @ geometry.unit)[0]  # [V]
    similarity[~geometry.scored] = -math.inf
    similarity[seed] = math.inf
    return torch.topk(similarity, size).indices


def token_direction(geometry: TokenGeometry, tokens: torch.Tensor) -> torch.Tensor:
    """The unit direction p whose projection over the scored tokens is closest, in least squares,
    to the indicator of `tokens`: the sum of their centred columns, whitened by the columns' second
    moments. The plain sum is not sparse on SmolLM2: the direction every column shares and U's few
    widest directions outweigh the tokens' own (docs/method.md, "Planted channels")."""
    p = torch.linalg.solve(geometry.second_moments, geometry.centred[:, tokens].sum(-1))
    return (p / p.norm()).float()


def plant(direction: torch.Tensor, cosine: float, generator: torch.Generator):
    """A unit vector at `cosine` to a unit direction p: cosine p + sqrt(1 - cosine^2) r, r a
    Gaussian unit vector orthogonal to p. Returns it and r, its twin without the plant."""
    r = torch.randn(direction.shape[0], generator=generator)
    r = r - (r @ direction) * direction
    r = r / r.norm()
    return cosine * direction + math.sqrt(1 - cosine**2) * r, r


def nearest_channel(record: NeuronRecord, direction: torch.Tensor, tokens: torch.Tensor) -> dict:
    """The channel with the largest |cos| to a planted direction, and what the run says of it."""
    vectors = torch.stack([torch.from_numpy(ch.vector) for ch in record.channels]).double()  # [C, d]
    cosines = (vectors @ direction.double()).abs() / vectors.norm(dim=-1)
    k = int(cosines.argmax())
    channel = record.channels[k]
    found = len(set(channel.top_ids.tolist()) & set(tokens.tolist())) / len(tokens)
    return {
        "channel": k,
        "cos_planted": float(cosines[k]),
        "cos_w": channel.cos,
        "kurtosis": channel.kurtosis,
        "tokens_found": found,
        "recovered": bool(cosines[k] >= RECOVERED_COS),
        "generic": channel.generic,
        "percentile": channel.faithfulness_percentile,
        "percentile_local": channel.percentile_local,
    }


def planted_channels(decomposer: Decomposer, per_cosine: int, cosines=PLANTED_COSINES, seed: int = 0,
                     progress=None) -> dict:  # fmt: skip
    """Random unit vectors with a known direction planted at each cosine, decomposed with the run's
    settings beside their twins (the same random part, no plant, the same solver seeds): per
    cosine, `per_cosine` token directions and as many of the reference's generic directions."""
    U, scored = decomposer.proj.exact.float().cpu(), decomposer.scored.cpu()
    geometry = token_geometry(U, scored)
    generator = torch.Generator().manual_seed(seed)
    generic = decomposer.reference.generic.float()
    plants = []  # (kind, cosine, direction [d], tokens)
    for cosine in cosines:
        for _ in range(per_cosine):
            tokens = coherent_tokens(geometry, generator)
            plants.append(("tokens", cosine, token_direction(geometry, tokens), tokens))
        for direction in generic[:per_cosine]:
            z = (direction @ U)[None]  # the generic direction's tokens: its own top on its tail
            sign = measures.tail_sign(float(rotate.tail_skew(z, scored)[0]))
            tokens, _ = measures.top_tokens(rotate.z_scores(z, scored)[0], scored, sign, k=PLANTED_TOKENS)
            plants.append(("generic", cosine, direction, tokens))
    planted, twins = zip(*(plant(p, c, generator) for _, c, p, _ in plants), strict=True)
    coords = [(-1, "planted", i) for i in range(len(plants))]
    step = progress(2 * len(plants) * decomposer.settings.channels, "planted channels") if progress else None
    records = decomposer.vectors(torch.stack(planted + twins), coords + coords, step)
    tokens_of = decomposer.model.vocabulary.tokens
    vectors = []
    for i, (kind, cosine, direction, tokens) in enumerate(plants):
        twin = records[len(plants) + i]
        vectors.append(
            {
                "kind": kind,
                "cosine": cosine,
                "tokens": [tokens_of[t] for t in tokens.tolist()],
                "planted": nearest_channel(records[i], direction, tokens),
                "twin": nearest_channel(twin, direction, tokens),
                "twin_channels": {
                    "generic": [ch.generic for ch in twin.channels],
                    "percentile": [ch.faithfulness_percentile for ch in twin.channels],
                    "percentile_local": [ch.percentile_local for ch in twin.channels],
                },
            }
        )
    return {
        "tokens": PLANTED_TOKENS,
        "cosines": list(cosines),
        "per_cosine": per_cosine,
        "recovered_cos": RECOVERED_COS,
        "generic_directions": len(generic),
        "vectors": vectors,
    }


# --- the paper's reconstruction claim at its own C -------------------------------------------------

RECONSTRUCTION_LAYERS = (25, 28)  # the late layers of the issue's check; a smaller model: its last


def reconstruction_at(model, decomposer: Decomposer, channels: int, sample: int, seed: int = 0,
                      progress=None) -> dict:  # fmt: skip
    """|P_k w| / |w| for k = 1..channels on the `sample` most aligned `out` vectors of the late
    layers and `sample` random ones, beside random directions at the same cosines. Solver only:
    these figures need no reference, so none is made for this channel count (the first C channels
    are the run's own: channel k depends on the channels before it, never after)."""
    layers = [layer for layer in RECONSTRUCTION_LAYERS if layer < model.n_layers] or [model.n_layers - 1]
    side = "out" if "out" in model.sides else model.sides[-1]
    drawn = random_neurons(model, {"random": layers}, sample, torch.Generator().manual_seed(seed))
    rows = most_aligned(model, layers, side, sample, group="aligned") + [r for r in drawn if r.side == side]
    settings = rotate.with_overrides(decomposer.settings, channels=channels)
    w = torch.stack([model.vectors(r.layer, r.side)[r.neuron] for r in rows]).to(decomposer.proj.exact.device)
    seeds = [rotate.neuron_seed(decomposer.seed, r.layer, r.side, r.neuron) for r in rows]
    step = progress(len(rows) * channels, f"reconstruction at {channels} channels") if progress else None
    found = rotate.decompose(w, decomposer.proj, decomposer.m0, seeds, settings, decomposer.batch_size, step)
    kurtosis = rotate.excess_kurtosis(decomposer.proj.forward(w, exact=True)).cpu()  # [N] K(w @ U)
    neurons = []
    for n, (row, vector, chans) in enumerate(zip(rows, w.cpu().double(), found, strict=True)):
        cosines = torch.tensor([ch.cos for ch in chans], dtype=torch.float64)
        # the decomposer's own baseline: the neuron's generator, drawn first
        baseline = measures.random_at_cosines(vector, cosines, torch.Generator().manual_seed(seeds[n]))
        neurons.append(
            {
                "kind": row.group,
                "layer": row.layer,
                "side": row.side,
                "neuron": row.neuron,
                "kurtosis": float(kurtosis[n]),
                "channel_kurtosis": [ch.kurtosis for ch in chans],
                "cos": [ch.cos for ch in chans],
                "reconstruction": measures.reconstruction(
                    vector, torch.stack([c.vector for c in chans]).double()
                ),
                "reconstruction_baseline": measures.reconstruction(vector, baseline),
            }
        )
    return {"channels": channels, "sample": sample, "layers": layers, "side": side, "neurons": neurons}


def evaluate(model, out_dir: Path, per_cell: int = 8, channels: int = 10, aligned: int = 8, seed: int = 0,
             cache_dir: Path | None = None, progress=None, held_out: int = 64, paper: int = 0,
             planted: int = 8, reconstruction_channels: int = 50,
             reconstruction_sample: int = 8) -> dict:  # fmt: skip
    """planted: token and generic directions planted per cosine (0: none); reconstruction_sample:
    aligned and random late `out` vectors decomposed into reconstruction_channels (0: none)."""
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
    held_out_scores = calibration.held_out_scores(first, held_out)
    checked = paper_sample(rows, paper)
    fast_of = {(r.layer, r.side, r.neuron): record for r, record in zip(rows, records, strict=True)}
    step = progress(len(checked) * channels, "paper preset") if progress and checked else None
    solvers = solver_check.compare(first, checked, [fast_of[c] for c in checked], step) if checked else []
    group_of = {(r.layer, r.side, r.neuron): r.group for r in rows}
    for row in solvers:
        row["group"] = group_of[row["layer"], row["side"], row["neuron"]]

    generator = torch.Generator().manual_seed(seed)
    per_neuron = []
    for index, (row, a, b, dw) in enumerate(zip(rows, records, records_b, records_dw, strict=True)):
        w = torch.from_numpy(a.vector).double()
        vecs_a = torch.stack([torch.from_numpy(ch.vector) for ch in a.channels]).double()
        vecs_b = torch.stack([torch.from_numpy(ch.vector) for ch in b.channels]).double()
        tops_a = [set(ch.top_ids.tolist()) for ch in a.channels]
        tops_b = [set(ch.top_ids.tolist()) for ch in b.channels]
        consistency, jaccard = measures.seed_consistency(w, vecs_a, vecs_b, tops_a, tops_b)
        cos_a = torch.tensor([ch.cos for ch in a.channels], dtype=torch.float64)
        cos_b = torch.tensor([ch.cos for ch in b.channels], dtype=torch.float64)
        selectivity = weight_selectivity(first, a, generator)
        at_cosines = baselines_at_cosines(first, a)
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
                "percentile_local": [ch.percentile_local for ch in a.channels],
                "generic": [ch.generic for ch in a.channels],
                "alpha": [ch.alpha for ch in a.channels],
                "alpha_baseline_sparse": at_cosines["alpha_baseline_sparse"],
                "alpha_baseline_gaussian": at_cosines["alpha_baseline_gaussian"],
                "best_percentile": a.best_percentile,
                "score": a.score,
                "reconstruction": a.reconstruction,
                "reconstruction_baseline": a.reconstruction_baseline,
                "coverage": a.coverage,
                "coverage_baseline_sparse": at_cosines["coverage_baseline_sparse"],
                "coverage_baseline_gaussian": at_cosines["coverage_baseline_gaussian"],
                "consistency": consistency,
                "consistency_jaccard": jaccard,
                "consistency_baseline": measures.seed_consistency_baseline(w, cos_a, cos_b, generator),
                "consistency_other": _consistency_with_a_neighbour(index, rows, records),
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
        "settings": {
            "channels": channels,
            "per_cell": per_cell,
            "aligned": aligned,
            "seed": seed,
            "planted": planted,
            "reconstruction_channels": reconstruction_channels,
            "reconstruction_sample": reconstruction_sample,
        },
        "solver": first.settings.solver,
        "precision": first.settings.precision,
        "random_vectors": {
            "count": int(reference.faithfulness.shape[0]),
            "generic_directions": int(len(reference.generic)),
            "tail_tokens": [model.vocabulary.tokens[i] for i in reference.tail_tokens],
            "faithfulness_median_by_channel": [float(np.median(c)) for c in reference.faithfulness.T],
            "kurtosis_median_by_channel": [float(np.median(c)) for c in reference.kurtosis.T],
        },
        "neurons": per_neuron,
        # Random vectors that the reference did not see, scored like neurons: ~50 if calibrated.
        "held_out_scores": held_out_scores,
        "quantisation": weights.quantisation(model.source),
        # The paper preset on a subsample, scored against the same (fast) reference.
        "solvers": solvers,
    }
    if planted:
        result["planted"] = planted_channels(first, planted, seed=seed, progress=progress)
    if reconstruction_channels and reconstruction_sample:
        result["reconstruction_at_c"] = reconstruction_at(
            model, first, reconstruction_channels, reconstruction_sample, seed=seed, progress=progress
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1, default=float))
    render(out_dir)
    return result


def render(out_dir: Path) -> Path:
    """eval.md and its plots from eval.json alone (`channelscope eval --render`): every number
    in the report is computed from the JSON beside it."""
    result = json.loads((out_dir / "eval.json").read_text())
    plots = _plots(result, out_dir)
    path = out_dir / "eval.md"
    path.write_text(_markdown(result, plots))
    return path


# --- the summary ---------------------------------------------------------------------------------

SMALL = 8  # cells with fewer items are marked: their medians are a handful of numbers

# (header, format, aggregate over a cell's neurons, value of one neuron)
CELL_COLUMNS = [
    ("K(w)", ".1f", median, lambda n: n["kurtosis"]),
    ("K(c0)", ".1f", median, lambda n: n["channel_kurtosis"][0]),
    ("cos(w,c0)", ".2f", median, lambda n: n["cos"][0]),
    ("faith c0", ".2f", median, lambda n: n["faithfulness"][0]),
    ("pct c0", ".0f", median, lambda n: n["percentile"][0]),
    ("vs. cos c0", ".0f", median, lambda n: n["percentile_local"][0]),
    ("generic c0", ".0%", share, lambda n: n["generic"][0]),
    ("generic all", ".0%", statistics.fmean, lambda n: share(n["generic"])),
    ("recon C", ".3f", median, lambda n: n["reconstruction"][-1]),
    ("baseline", ".3f", median, lambda n: n["reconstruction_baseline"][-1]),
    ("cons", ".2f", median, lambda n: n["consistency"]),
    ("other neuron", ".2f", median, lambda n: n["consistency_other"]),
    ("S c0", ".1f", median, lambda n: n["selectivity"][0]),
    ("baseline", ".1f", median, lambda n: n["selectivity_baseline"][0]),
]

# The headline figures, each a median (or share) with its bootstrap interval, per kind of neuron.
HEADLINES = [
    ("first channel's percentile (isotropic)", ".0f", median, lambda n: [n["percentile"][0]]),
    (
        "first channel's percentile (vs. directions at its cosine)",
        ".0f",
        median,
        lambda n: [n["percentile_local"][0]],
    ),
    (
        "all channels' percentile (vs. directions at their cosine)",
        ".0f",
        median,
        lambda n: n["percentile_local"],
    ),
    ("first channel generic", ".0%", share, lambda n: [n["generic"][0]]),
    ("best percentile (non-generic channels)", ".0f", median, lambda n: [n["best_percentile"]]),
    ("neuron score (50 = as good as random vectors)", ".0f", median, lambda n: [n["score"]]),
    ("seed consistency", ".2f", median, lambda n: [n["consistency"]]),
    ("the same matching with another neuron", ".2f", median, lambda n: [n["consistency_other"]]),
    ("the same matching for random directions", ".2f", median, lambda n: [n["consistency_baseline"]]),
    ("reconstruction at C", ".3f", median, lambda n: [n["reconstruction"][-1]]),
    ("random directions at the same cosines", ".3f", median, lambda n: [n["reconstruction_baseline"][-1]]),
    ("first channel's weight-level S", ".1f", median, lambda n: [n["selectivity"][0]]),
    ("a random direction at its cosine", ".1f", median, lambda n: [n["selectivity_baseline"][0]]),
]


def kinds(neurons) -> list[tuple[str, list[dict]]]:
    """Random and aligned neurons, never pooled."""
    return [
        ("random neurons", [n for n in neurons if n["group"] != ALIGNED]),
        (f"aligned ({ALIGNED})", [n for n in neurons if n["group"] == ALIGNED]),
    ]


def with_interval(values, fmt: str, statistic=median) -> str:
    values = [v for v in values if v is not None]
    low, high = interval(values, statistic)
    mark = "*" if len(values) < SMALL else ""
    if low != low:  # nan: fewer than two values
        return f"{statistic(values):{fmt}}{mark}" if values else "–"
    return f"{statistic(values):{fmt}} [{low:{fmt}}, {high:{fmt}}]{mark}"


def _cells(neurons):
    cells: dict[tuple[str, str], list[dict]] = {}
    for n in neurons:
        cells.setdefault((n["group"], n["side"]), []).append(n)
    return cells


def _markdown(result: dict, plots: list[str]) -> str:
    neurons, ref = result["neurons"], result["random_vectors"]
    C = result["settings"]["channels"]
    groups = kinds(neurons)
    lines = [
        f"# ROTATE on {result['model']}: what the channels are, against random vectors",
        "",
        "Made by `channelscope eval` (channelscope/experiments/eval_report.py) and rendered from "
        f"`eval.json` alone (`channelscope eval --render`). {len(groups[0][1])} random neurons and "
        f"{len(groups[1][1])} aligned ones (the highest raw kurtosis of the late layers), kept apart in "
        f"every table; {C} channels each ({result.get('solver', 'fast')} solver, "
        f"{result.get('precision', 'bf16')}), seeds 0 and 1. Two references: {ref['count']} isotropic "
        'random vectors decomposed with the same settings ("pct"), and random directions at each '
        "channel's own cosine to its w whose other part is one of those random vectors' channels "
        '("vs. cos", docs/method.md, "Faithfulness against directions at the same cosine"). '
        f"Brackets: 95 % bootstrap intervals; * marks fewer than {SMALL} items.",
        "",
        *([quantisation_line(result), ""] if "quantisation" in result else []),
        "## Headline figures",
        "",
        "| measure | " + " | ".join(f"{name} (n = {len(cell)})" for name, cell in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for label, fmt, statistic, values in HEADLINES:
        cells = [with_interval([v for n in cell for v in values(n)], fmt, statistic) for _, cell in groups]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per layer group and side (medians over neurons)",
        "",
        "| group | side | n | " + " | ".join(header for header, *_ in CELL_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(CELL_COLUMNS),
    ]
    for (group, side), cell in _cells(neurons).items():
        values = [
            f"{aggregate(v for v in (value(n) for n in cell) if v is not None):{fmt}}"
            for _, fmt, aggregate, value in CELL_COLUMNS
        ]
        mark = "*" if len(cell) < SMALL else ""
        lines.append(f"| {group} | {side} | {len(cell)}{mark} | " + " | ".join(values) + " |")
    random_faith = ref["faithfulness_median_by_channel"]
    lines += [
        "",
        "K = excess kurtosis of the unweighted projection; c0 = the first channel; faith = mean z of the "
        "channel's top-20 tokens in the neuron's own projection; pct = that faithfulness as a percentile "
        "of random vectors' channels at the same index (50 = indistinguishable from random); vs. cos = "
        "its percentile among directions at the same cosine to this w; cons = mean matched |cos| of the "
        "channels' parts orthogonal to w across two seeds; other neuron = the same matching with the next "
        "neuron of the cell.",
    ]
    for name, cell in groups:
        if not cell:
            continue
        lines += [
            "",
            f"## Channel index, {name}",
            "",
            "| channel | median faith | median faith (random vectors) | median pct | median vs. cos "
            "| share pct >= 90 | generic share | median K | median K (random) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k in range(C):
            pct = [n["percentile"][k] for n in cell]
            lines.append(
                f"| {k} | {median(n['faithfulness'][k] for n in cell):.2f} | {random_faith[k]:.2f} "
                f"| {with_interval(pct, '.0f')} "
                f"| {with_interval([n['percentile_local'][k] for n in cell], '.0f')} "
                f"| {share(p >= 90 for p in pct):.0%} | {share(n['generic'][k] for n in cell):.0%} "
                f"| {median(n['channel_kurtosis'][k] for n in cell):.1f} "
                f"| {ref['kurtosis_median_by_channel'][k]:.1f} |"
            )
    lines += _calibration(result)
    lines += _solvers(result)
    lines += _generic_check(neurons)
    lines += _at_cosines_section(neurons, C)
    lines += _planted_section(result.get("planted"))
    random_ones = groups[0][1]
    lines += [
        "",
        "## Down-weighting the generic tokens up front (the option, off by default; random neurons)",
        "",
        f"The reference's random vectors put {len(ref['tail_tokens'])} tokens on the tails of more than a "
        f"quarter of their first channels: {', '.join(repr(t) for t in ref['tail_tokens'][:40])}.",
        "",
        f"- generic channels, all indices: {share(g for n in random_ones for g in n['generic']):.0%} plain, "
        f"{share(g for n in random_ones for g in n['downweighted_generic']):.0%} with the option;",
        f"- generic first channels: {share(n['generic'][0] for n in random_ones):.0%} plain, "
        f"{share(n['downweighted_generic'][0] for n in random_ones):.0%} with the option;",
        "- first channels with faithfulness < 1: "
        f"{share(n['faithfulness'][0] < 1 for n in random_ones):.0%} plain, "
        f"{share(n['downweighted_faithfulness'][0] < 1 for n in random_ones):.0%} with the option;",
        f"- median first-channel percentile: {median(n['percentile'][0] for n in random_ones):.0f} plain, "
        f"{median(n['downweighted_percentile'][0] for n in random_ones):.0f} with the option "
        "(each against its own random-vector reference).",
        "",
        *_against_the_paper(neurons),
        *_reconstruction_section(result.get("reconstruction_at_c")),
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    return "\n".join(lines)


def _calibration(result: dict) -> list[str]:
    """Held-out random vectors' scores against the 50 that a calibrated score gives them."""
    scores, C = result["held_out_scores"], result["settings"]["channels"]
    best = calibration.summary(scores)
    low, high = best["interval"]
    return [
        "",
        "## Is the neuron score calibrated?",
        "",
        "A neuron's best percentile is a maximum over its non-generic channels, and a maximum is high "
        f"for random vectors too (the best of {C} uniform percentiles has a median of "
        f'{100 * 0.5 ** (1 / C):.0f}). The neuron score (docs/method.md, "Neuron score") places it among '
        "the reference's random vectors' own best percentiles, each held out of the reference. "
        f"{best['count']} random vectors that the reference never saw (another seed), decomposed and "
        f"scored exactly as neurons are, score a median of {best['median']:.0f} [{low:.0f}, {high:.0f}] "
        f"(50 if calibrated); {best['share_at_least_90']:.0%} score 90 or more and "
        f"{best['share_at_most_10']:.0%} score 10 or less (10 % each if calibrated).",
    ]


def _solvers(result: dict) -> list[str]:
    """The paper preset beside the fast solver on the same neurons, kind by kind."""
    rows = result.get("solvers") or []
    if not rows:
        return []
    lines = [
        "",
        "## Does it depend on the solver? The paper preset on a subsample",
        "",
        f"{len(rows)} neurons of the sample decomposed again with the paper preset (AdamW to its plateau, "
        'docs/method.md, "The paper preset"), measured exactly as the fast channels and against the same '
        "reference (a reference of its own would cost thousands of steps per random vector's channel). "
        "Matched |cos|: the seed-consistency matching between the two solvers' channels; the same matching "
        "between different neurons is its baseline.",
        "",
        "| neurons | n | loss c0 fast / paper | pct c0 fast / paper | vs. cos c0 fast / paper "
        "| generic, all channels, fast / paper | matched \\|cos\\| fast-paper | other neuron | paper steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    other = {kind: [n["consistency_other"] for n in cell] for kind, cell in kinds(result["neurons"])}
    for kind, _ in kinds(result["neurons"]):
        cell = [r for r in rows if (r["group"] == ALIGNED) == (kind != "random neurons")]
        if not cell:
            continue

        def pair(key, fmt, cell=cell):
            return " / ".join(
                f"{median(r[solver][key][0] for r in cell):{fmt}}" for solver in ("fast", "paper")
            )

        generic = " / ".join(
            f"{share(g for r in cell for g in r[solver]['generic']):.0%}" for solver in ("fast", "paper")
        )
        mark = "*" if len(cell) < SMALL else ""
        lines.append(
            f"| {kind} | {len(cell)}{mark} | {pair('loss', '.3f')} | {pair('percentile', '.0f')} "
            f"| {pair('percentile_local', '.0f')} | {generic} "
            f"| {with_interval([r['matched_cos'] for r in cell], '.2f')} | {median(other[kind]):.2f} "
            f"| {median(s for r in cell for s in r['paper']['steps']):.0f} |"
        )
    return lines


def _compared(differences: list[float], fmt: str) -> tuple[str, str]:
    """A paired difference's median with its interval, and what the interval says of its sign."""
    low, high = interval(differences)
    verdict = "more than" if low > 0 else "less than" if high < 0 else "no different from"
    return with_interval(differences, fmt), verdict


# Each channel's stand-ins in the JSON: (key suffix, name in the report).
STAND_INS = [("sparse", "sparse stand-ins"), ("gaussian", "Gaussian stand-ins")]


def _at_cosines_section(neurons, C: int) -> list[str]:
    """Coverage and alpha* beside the same statistics of directions at each channel's cosine."""
    if not neurons or "coverage_baseline_sparse" not in neurons[0]:
        return []
    lines = [
        "",
        "## Coverage and alpha* against directions at each channel's cosine",
        "",
        "Each channel has two stand-ins at its own cosine to w: a Gaussian direction (the reconstruction "
        "baseline's own) and a sparse one (whose part orthogonal to w is one of the reference's channels, as "
        'for "vs. cos"). Coverage: in channel order, each stand-in adds as many new tokens as its channel '
        "did, the furthest out on its own dominant tail, so both curves count sets of the same sizes; "
        "alpha*: the paper's rule with the stand-in in place of the channel (docs/method.md). Intervals "
        "over channels treat a neuron's channels as independent.",
        "",
        "| neurons | measure | channels | " + " | ".join(name for _, name in STAND_INS) + " |",
        "|---|---|---|" + "---|" * len(STAND_INS),
    ]
    measures_of = [
        ("coverage after 1 channel", ".3f", median, lambda n, key: [n[key][0]]),
        (f"coverage after {C} channels", ".3f", median, lambda n, key: [n[key][-1]]),
        ("alpha* = 0 (share of channels)", ".0%", share, lambda n, key: [a == 0 for a in n[key]]),
        ("alpha* (median over channels)", ".2f", median, lambda n, key: n[key]),
    ]
    for name, cell in kinds(neurons):
        if not cell:
            continue
        for label, fmt, statistic, values in measures_of:
            key = "coverage" if label.startswith("coverage") else "alpha"
            columns = [key] + [f"{key}_baseline_{kind}" for kind, _ in STAND_INS]
            figures = [
                with_interval([v for n in cell for v in values(n, c)], fmt, statistic) for c in columns
            ]
            lines.append(f"| {name} (n = {len(cell)}) | {label} | " + " | ".join(figures) + " |")
    lines.append("")
    for name, cell in kinds(neurons):
        if not cell:
            continue
        said = []
        for kind, stand_in in STAND_INS:
            figure, verdict = _compared(
                [n["coverage"][-1] - n[f"coverage_baseline_{kind}"][-1] for n in cell], "+.3f"
            )
            said.append(f"{verdict} the {stand_in}' sets ({figure})")
        lines.append(
            f"- {name.capitalize()}: after {C} channels the channels' tokens hold "
            f"{median(n['coverage'][-1] for n in cell):.3f} of the neuron's vocabulary mass (median), "
            f"{' and '.join(said)}; medians of the paired differences, neuron by neuron."
        )
    return lines + [""]


# kind of plant: (its name in prose, what the generic flag must do on its recovered channel)
PLANTED_KINDS = {"tokens": ("token", "must not"), "generic": ("generic", "must")}


def _planted_section(planted: dict | None) -> list[str]:
    """Known answers for the generic flag and the percentiles: planted token directions must be
    found, not flagged and ranked high; planted generic directions must be flagged."""
    if not planted:
        return []
    vectors = planted["vectors"]
    sets = [v["tokens"] for v in vectors if v["kind"] == "tokens"][:3]
    examples = "; ".join(", ".join(repr(t) for t in tokens[:4]) for tokens in sets)
    cosines = ", ".join(f"{c:g}" for c in planted["cosines"])
    lines = [
        "",
        "## Planted channels: the flag and the percentiles on a known answer",
        "",
        f"Random unit vectors, each with a known unit direction p planted at cosine {cosines} (at most "
        f"{planted['per_cosine']} of each kind per cosine), decomposed with the run's settings beside "
        "its twin: the same random part without the plant, the same solver seeds. Token directions: "
        f"the least-squares direction of a coherent set of {planted['tokens']} tokens (e.g. {examples}; "
        'docs/method.md, "Planted channels"); generic directions: the reference\'s own '
        f"({planted['generic_directions']}; p's tokens: its own top {planted['tokens']}). The planted "
        "channel is the channel with the largest absolute cosine to p; it recovers p when that cosine "
        f"is {planted['recovered_cos']:.2f} or more (p is at least half of it). Flags and percentiles are "
        "those of the recovered planted channels. The twin's columns are the same measures against p: "
        "chance for a token direction; for a generic one, how often a random vector reaches it unplanted.",
        "",
        "| planted | cos | n | recovered | median abs. cos to p | p's tokens in its top 20 | flagged generic "
        "| median pct | median vs. cos | twin recovered | twin median abs. cos to p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in PLANTED_KINDS:
        for cosine in planted["cosines"]:
            cell = [v for v in vectors if v["kind"] == kind and v["cosine"] == cosine]
            if not cell:
                continue
            found = [v["planted"] for v in cell if v["planted"]["recovered"]]
            lines.append(
                f"| {kind} | {cosine:g} | {len(cell)}{'*' if len(cell) < SMALL else ''} "
                f"| {with_interval([v['planted']['recovered'] for v in cell], '.0%', share)} "
                f"| {with_interval([v['planted']['cos_planted'] for v in cell], '.2f')} "
                f"| {with_interval([v['planted']['tokens_found'] for v in cell], '.0%')} "
                f"| {with_interval([c['generic'] for c in found], '.0%', share)} "
                f"| {with_interval([c['percentile'] for c in found], '.0f')} "
                f"| {with_interval([c['percentile_local'] for c in found], '.0f')} "
                f"| {with_interval([v['twin']['recovered'] for v in cell], '.0%', share)} "
                f"| {with_interval([v['twin']['cos_planted'] for v in cell], '.2f')} |"
            )
    twins = [v["twin_channels"] for v in vectors]
    flags = [g for t in twins for g in t["generic"]]
    lines += [
        "",
        f"- The twins are held-out random vectors: {len(flags)} channels, "
        f"{with_interval(flags, '.0%', share)} flagged generic, median percentile "
        f"{with_interval([p for t in twins for p in t['percentile']], '.0f')} against random vectors and "
        f"{with_interval([p for t in twins for p in t['percentile_local']], '.0f')} against directions at "
        "their cosine (50 = calibrated).",
    ]
    for kind, (label, must) in PLANTED_KINDS.items():
        found = [v for v in vectors if v["kind"] == kind and v["planted"]["recovered"]]
        by_cosine = ", ".join(
            f"{sum(v['planted']['generic'] for v in found if v['cosine'] == c)} of "
            f"{sum(v['cosine'] == c for v in found)} at cos {c:g}"
            for c in planted["cosines"]
        )
        lines.append(f"- The flag fired on recovered planted {label} channels ({must} fire): {by_cosine}.")
    return lines + [""]


def _reconstruction_section(section: dict | None) -> list[str]:
    """|P_k w| / |w| up to the paper's C, beside random directions at the same cosines."""
    if not section:
        return []
    C, neurons = section["channels"], section["neurons"]
    # From k = 2: after one channel both curves are |cos(w, c_1)|, equal by construction.
    ks = sorted({k for k in (2, 5, 10, 20, C) if k <= C})
    layers = ", ".join(map(str, section["layers"]))
    lines = [
        "",
        f"## Reconstruction at the paper's C = {C}",
        "",
        f"The {section['sample']} most aligned `{section['side']}` vectors of layers {layers} (highest raw "
        f"kurtosis) and {section['sample']} random ones, "
        f"{C} channels each, the run's settings; |P_k w| / |w| after k channels, beside the same curve for "
        'random directions at the channels\' cosines (docs/method.md, "Reconstruction and coverage"); the '
        "paired row is channels minus baseline, neuron by neuron.",
        "",
        "| neurons | curve | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    curves = [
        ("channels", lambda n, k: n["reconstruction"][k - 1]),
        ("random directions at the same cosines", lambda n, k: n["reconstruction_baseline"][k - 1]),
        ("paired difference", lambda n, k: n["reconstruction"][k - 1] - n["reconstruction_baseline"][k - 1]),
    ]
    for kind in ("aligned", "random"):
        cell = [n for n in neurons if n["kind"] == kind]
        if not cell:
            continue
        for label, value in curves:
            fmt = "+.3f" if label == "paired difference" else ".3f"
            figures = [with_interval([value(n, k) for n in cell], fmt) for k in ks]
            lines.append(f"| {kind} (n = {len(cell)}) | {label} | " + " | ".join(figures) + " |")
    lines.append("")
    for kind in ("aligned", "random"):
        cell = [n for n in neurons if n["kind"] == kind]
        if not cell:
            continue
        figure, verdict = _compared(
            [n["reconstruction"][-1] - n["reconstruction_baseline"][-1] for n in cell], "+.3f"
        )
        recovered = median(n["reconstruction"][-1] for n in cell)
        baseline = median(n["reconstruction_baseline"][-1] for n in cell)
        lines.append(
            f"- {kind.capitalize()} neurons: {C} channels recover {recovered:.3f} of |w| (median), {verdict} "
            f"random directions at the same cosines ({baseline:.3f}; paired difference {figure})."
        )
    return lines + [""]


def quantisation_line(result: dict) -> str:
    """What the model file stores, from result["quantisation"] (method/weights.py), in one sentence."""
    q = result["quantisation"]
    if not q["matrices"]:
        return f"**The model.** {q['file']} holds float weights: no quantisation."
    labels = {"gate": "`gate`", "in": "`in`", "out": "`out`", "attention": "attention", "U": "U"}
    parts = []
    for role, label in labels.items():
        found = q["matrices"].get(role)
        if found is None:
            continue
        error = found["relative_rms_error"]
        parts.append(
            f"{label} {found['type']}"
            + (f" (RMS rounding error {100 * error:.1f} % of the weights' RMS)" if error is not None else "")
        )
    return (
        f"**The model.** {q['file']} (GGUF file type {q['file_type']}): " + ", ".join(parts) + ". Every "
        "number here is the quantised model's; the error is estimated from the blocks' rounding steps "
        "(method/weights.py, `quantisation`, as in bench/quantisation.py)."
    )


def _generic_check(neurons) -> list[str]:
    """Does the flag, which looks only at directions, agree with faithfulness, which looks only
    at the neuron's own tokens? Two independent readings of "generic", per kind of neuron."""
    lines = [
        "",
        "## The generic flag against faithfulness",
        "",
        "| neurons | channels | n | median faith | median pct | median vs. cos | share faith < 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cell in kinds(neurons):
        for label, flagged in (("flagged generic", True), ("not flagged", False)):
            chosen = [(n, k) for n in cell for k in range(len(n["generic"])) if n["generic"][k] == flagged]
            faith = [n["faithfulness"][k] for n, k in chosen]
            lines.append(
                f"| {name} | {label} | {len(chosen)} | {median(faith):.2f} "
                f"| {with_interval([n['percentile'][k] for n, k in chosen], '.0f')} "
                f"| {with_interval([n['percentile_local'][k] for n, k in chosen], '.0f')} "
                f"| {share(f < 1 for f in faith):.0%} |"
            )
    return lines + [""]


def _against_the_paper(neurons) -> list[str]:
    """The paper's claims, each next to what this sample measured (the numbers are this run's),
    for random and aligned neurons apart."""
    (_, random_ones), (_, aligned) = kinds(neurons)
    lines = ["## Where SmolLM2 disagrees with the paper", ""]
    lines.append(
        f"- Channels are sparse, but sparsity says little about the neuron: random neurons' first channels "
        f"have median kurtosis {median(n['channel_kurtosis'][0] for n in random_ones):.1f}, and "
        f"{share(n['generic'][0] for n in random_ones):.0%} of them are a generic direction of U that "
        f"random vectors reach too (median faithfulness percentile "
        f"{median(n['percentile'][0] for n in random_ones):.0f} against random vectors, "
        f"{median(n['percentile_local'][0] for n in random_ones):.0f} against directions at the same "
        "cosine, where 50 is random)."
    )
    if aligned:
        lines.append(
            f"- For vocabulary-aligned neurons the first channels sit at percentile "
            f"{median(n['percentile'][0] for n in aligned):.0f} against isotropic random vectors, "
            f"{share(n['generic'][0] for n in aligned):.0%} generic, cos(w, c0) "
            f"{median(n['cos'][0] for n in aligned):.2f}; against directions as close to their own w, "
            f"{median(n['percentile_local'][0] for n in aligned):.0f}."
        )
    for name, cell in (("random", random_ones), ("aligned", aligned)):
        if not cell:
            continue
        recon = median(n["reconstruction"][-1] for n in cell)
        recon_base = median(n["reconstruction_baseline"][-1] for n in cell)
        verdict = (
            "random directions reach as much: the cosine to w explains the reconstruction, which is no "
            "evidence that the channels are parts of the neuron"
            if recon <= recon_base + 0.01
            else "more than random directions reach"
        )
        lines.append(
            f"- Reconstruction, {name} neurons: {len(cell[0]['reconstruction'])} channels recover "
            f"{recon:.3f} of |w| (median), random directions at the same cosines {recon_base:.3f}; {verdict}."
        )
        lines.append(
            f"- Seed consistency, {name} neurons: {median(n['consistency'] for n in cell):.2f} between two "
            f"seeds of one neuron, {median(n['consistency_other'] for n in cell):.2f} between two different "
            f"neurons of the same cell, {median(n['consistency_baseline'] for n in cell):.2f} for random "
            "directions at the same cosines. "
            + (
                "Different neurons match about as well as two seeds of one: the channels are attractors of U "
                "more than parts of the neuron."
                if median(n["consistency_other"] for n in cell)
                >= median(n["consistency"] for n in cell) - 0.1
                else "Two seeds of one neuron match better than two neurons do."
            )
        )
        lines.append(
            f"- Weight-level selectivity of first channels, {name} neurons: "
            f"{median(n['selectivity'][0] for n in cell):.1f} against "
            f"{median(n['selectivity_baseline'][0] for n in cell):.1f} for a random direction at the same "
            'cosine; partly circular (docs/method.md, "Selectivity"), so `reports/ablation.md` measures it '
            "in the model."
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
    if "coverage_baseline_sparse" in neurons[0]:
        stand_ins = np.array([n["coverage_baseline_sparse"] for n in neurons])
        axes[0].plot(range(1, C + 1), np.median(stand_ins, 0), "k:", label="covered by sparse stand-ins")
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
