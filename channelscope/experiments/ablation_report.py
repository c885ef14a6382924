"""`channelscope eval-ablation`: does switching a channel off disable what it stands for, in the
real model? (docs/method.md, "Alpha* and ablation", "Selectivity" and "The ablation report").

In every sampled layer and side: the vectors with the highest raw kurtosis of w @ U (aligned,
hand-picked) and random ones, two kinds that no table pools. Each of their first channels is
ablated on its own (w' = w - alpha* c_k, the grid rule on the original w) and selectivity S is
measured three ways, each beside the same measure for random directions at the channel's cosine
to w with the same alpha*:

- weight level: delta = change of the vocabulary projection w @ (g * U);
- `gate` / `in`, real model: delta = change of the neuron's pre-activation x . w on the layer's
  real MLP inputs over the committed corpus; targets are positions whose token or next token is
  among the channel's tokens, against all other positions;
- `out`, real model: delta = change of the next-token logits at the positions where the neuron is
  active (|activation| above its 90th percentile of |activation| over the corpus), from forward passes on the
  corpus texts where it is most often active.

A channel's tokens are read as the logits see them: g is the final RMSNorm's gain, and the
tokens are the |T_k| scored ones furthest out on the dominant tail of c_k @ (g * U), the same
rule as for the random directions' own tokens. Channels come from the store where a run of the
current algorithm version has the neuron, otherwise from the Decomposer. `render` rebuilds the
report and its plots from ablation.json alone.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from channelscope.core import tables as T
from channelscope.core.stats import interval, median, share
from channelscope.experiments.eval_report import SMALL, quantisation_line, with_interval
from channelscope.method import ablation, intervention, measures, rotate, weights
from channelscope.method.decomposer import Decomposer
from channelscope.method.precision import cpu_model
from channelscope.method.sampling import Sampled, most_aligned, random_neurons
from channelscope.worker import activations, corpus, store

ALIGNED, RANDOM = "aligned", "random"
KINDS = ((ALIGNED, "aligned"), (RANDOM, "random"))  # (group, its label in the tables)
READ_SIDES = ("gate", "in")
# The read sides should test enough channels that the interval on the share beating its
# baseline is this narrow either side (issue 16); the report says how many a row would need.
TARGET_HALF_WIDTH = 0.10


@dataclass
class ChannelSample:
    vector: torch.Tensor  # [d]
    alpha: float
    cos: float
    skew: float
    kurtosis: float
    generic: bool
    masked: torch.Tensor  # T_k ids, as the solver claimed them (against the raw U)


@dataclass
class NeuronSample:
    group: str  # ALIGNED or RANDOM
    layer: int
    side: str
    neuron: int
    w: torch.Tensor
    channels: list[ChannelSample]
    source: str  # "store <run>" or "computed"


@dataclass
class Measured:
    group: str
    layer: int
    side: str
    neuron: int
    channel: int
    kurtosis: float
    cos: float
    alpha: float
    masked: int  # |T_k|: as many tokens are read through the final norm
    generic: bool
    overlap: float  # share of the solver's T_k among the tokens read through the final norm
    weight_s: float
    weight_baseline: float  # median over the random draws
    model_s: float
    model_baseline: float
    positions: int  # where the model-level S was measured (targets for read sides, active for out)


# --- sampling --------------------------------------------------------------------------------------


def sample(
    model, layers: list[int], per_cell: int, aligned: int, seed: int, out_vectors: int | None = None
) -> list[Sampled]:
    """In each layer and side: `per_cell` random vectors and the `aligned` ones with the highest
    raw kurtosis; on `out`, `out_vectors` of each kind instead, when given (its forward passes
    cost far more than a read side's products). A vector drawn at random that is also among the
    most aligned is measured in both kinds: neither sample is thinned by the other."""

    def count(kind: str, side: str) -> int:
        if side == "out" and out_vectors is not None:
            return out_vectors
        return aligned if kind == ALIGNED else per_cell

    cells = {f"layer {layer}": [layer] for layer in layers}
    # Draws are sequential within a layer and side, so the first k of the largest count are a
    # uniform sample of k too.
    most = max(count(RANDOM, side) for side in model.sides)
    taken: Counter[tuple[int, str]] = Counter()
    rows: list[Sampled] = []
    for s in random_neurons(model, cells, most, torch.Generator().manual_seed(seed)):
        if taken[s.layer, s.side] < count(RANDOM, s.side):
            taken[s.layer, s.side] += 1
            rows.append(replace(s, group=RANDOM))
    for layer in layers:
        for side in model.sides:
            rows += most_aligned(model, [layer], side, count(ALIGNED, side), group=ALIGNED)
    return rows


def from_store(session, model_sha256: str, layer: int, side: str, neuron: int, channels: int):
    """The newest stored run's channels of a neuron side, made by the current solver (the
    current algorithm version), or None."""
    stored = store.newest_channels(
        session, model_sha256, layer, side, neuron, channels, algorithm_version=store.ALGORITHM_VERSION
    )
    if stored is None:
        return None
    run_hash, found = stored
    return run_hash, [
        ChannelSample(
            vector=torch.from_numpy(T.channel_vector(ch.vector)),
            alpha=ch.alpha,
            cos=ch.cos,
            skew=ch.skew,
            kurtosis=ch.kurtosis,
            generic=ch.generic,
            masked=torch.from_numpy(T.masked_tokens(ch.masked)),
        )
        for ch in found
    ]


def channels_for(
    model, decomposer: Decomposer, rows: list[Sampled], session, channels: int, progress=None
) -> list[NeuronSample]:
    """Every sampled row with its vector and channels; a vector sampled twice (in both kinds) is
    read or decomposed once."""
    found: dict[tuple[int, str, int], tuple[torch.Tensor, list[ChannelSample], str]] = {}
    for row in rows:
        coord = (row.layer, row.side, row.neuron)
        if session is None or coord in found:
            continue
        stored = from_store(session, model.sha256, *coord, channels)
        if stored and stored[1]:
            w = model.vectors(row.layer, row.side)[row.neuron]
            found[coord] = (w, stored[1], f"store {stored[0]}")
    missing = sorted({(r.layer, r.side, r.neuron) for r in rows} - found.keys())
    records = decomposer.anywhere(missing, progress) if missing else []
    for coord, record in zip(missing, records, strict=True):
        found[coord] = (
            torch.from_numpy(record.vector),
            [
                ChannelSample(
                    vector=torch.from_numpy(ch.vector),
                    alpha=ch.alpha,
                    cos=ch.cos,
                    skew=ch.skew,
                    kurtosis=ch.kurtosis,
                    generic=ch.generic,
                    masked=torch.from_numpy(ch.masked).long(),
                )
                for ch in record.channels
            ],
            "computed",
        )
    return [
        NeuronSample(r.group, r.layer, r.side, r.neuron, *found[(r.layer, r.side, r.neuron)]) for r in rows
    ]


# --- measuring ------------------------------------------------------------------------------------


def through_final_norm(U: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """U [d, V] scaled row-wise by the final norm's gain g [d]: a residual direction r reaches
    the logits as (r * g) @ U (up to the 1 / rms of the position), so this is the vocabulary as
    the model's output sees what a channel writes."""
    return U * gain.to(U)[:, None]


def channel_tokens(
    channels: list[ChannelSample], U_read: torch.Tensor, scored
) -> list[tuple[torch.Tensor, float]]:
    """Per channel: its tokens read through the final norm, the max(1, |T_k|) scored tokens
    furthest out on the dominant tail of c_k @ U_read (the random draws' own rule), and that
    tail's sign."""
    z = torch.stack([ch.vector for ch in channels]).to(U_read) @ U_read  # [K, V]
    zs, skews = rotate.z_scores(z, scored), rotate.tail_skew(z, scored)
    out = []
    for k, ch in enumerate(channels):
        sign = measures.tail_sign(float(skews[k]))
        ids, _ = measures.top_tokens(zs[k], scored, sign, k=max(1, len(ch.masked)))
        out.append((ids, sign))
    return out


def _overlap(masked: torch.Tensor, ids: torch.Tensor) -> float:
    if len(masked) == 0:
        return math.nan
    return len(set(masked.tolist()) & set(ids.tolist())) / len(masked)


def _draws(sample: NeuronSample, U, scored, draws: int, seed: int):
    """Per channel: `draws` random directions at its cosine to w, each with its own-tail targets."""
    generator = torch.Generator().manual_seed(
        rotate.neuron_seed(seed, sample.layer, sample.side, sample.neuron)
    )
    out = []
    for ch in sample.channels:
        found = ablation.random_draws(
            sample.w, ch.vector.unsqueeze(0), [len(ch.masked)], U, scored, draws, generator
        )
        out.append(found)
    return out


def weight_level(sample: NeuronSample, tokens, draws, U, scored) -> list[tuple[float, float]]:
    out = []
    for ch, (ids, sign), found in zip(sample.channels, tokens, draws, strict=True):
        single = ablation.Ablation(sample.w - ch.alpha * ch.vector, [ch.alpha])
        targets = (ids, torch.full((len(ids),), sign))
        effect = ablation.weight_effect(sample.w, single, targets, found, U, scored)
        out.append((effect.selectivity, median(effect.baseline)))
    return out


def read_level(sample: NeuronSample, tokens, draws, X: torch.Tensor, token_ids, next_ids):
    """gate/in: S of the pre-activation change on the real MLP inputs X [N, d] of the corpus.
    next_ids[i] is the token after position i in its own text (-1 at a text's end)."""
    out = []
    for ch, (ids, sign), found in zip(sample.channels, tokens, draws, strict=True):
        delta = X @ (-ch.alpha * ch.vector)  # [N]
        s, n = _position_s(delta, token_ids, next_ids, ids, sign)
        baseline = []
        for r in range(found.directions.shape[0]):
            delta_r = X @ (-ch.alpha * found.directions[r, 0])
            ids_r, signs_r = found.targets[r]
            baseline.append(_position_s(delta_r, token_ids, next_ids, ids_r, float(signs_r[0]))[0])
        out.append((s, median(baseline), n))
    return out


def _position_s(delta, token_ids, next_ids, targets: torch.Tensor, sign: float) -> tuple[float, int]:
    hit = torch.isin(token_ids, targets) | torch.isin(next_ids, targets)
    positions = torch.nonzero(hit).flatten()
    signs = torch.full((len(positions),), sign)
    return ablation.position_selectivity(delta, positions, signs), len(positions)


def write_level(
    lm, sample: NeuronSample, tokens, draws, sequences, activations, threshold: float, scored, top: int
):
    """out: S of the next-token logit change at active positions, over the `top` corpus texts
    where the neuron is active most often (each cut after its last active position). One batch
    per text: the clean run, each ablated channel, and one random draw per channel. Channels
    with alpha* = 0 change nothing and get no rows."""
    counts = [(int((a > threshold).sum()), i) for i, a in enumerate(activations)]
    chosen = [i for n, i in sorted(counts, reverse=True)[:top] if n > 0]
    ablated = [c for c, ch in enumerate(sample.channels) if ch.alpha > 0]
    out = [(math.nan, math.nan, 0)] * len(sample.channels)
    if not chosen or not ablated:
        return out
    rows = [torch.zeros_like(sample.w)]
    rows += [-sample.channels[c].alpha * sample.channels[c].vector for c in ablated]
    rows += [-sample.channels[c].alpha * draws[c].directions[0, 0] for c in ablated]
    deltas = torch.stack(rows)
    changes = []  # [R - 1, P, d] per text
    for i in chosen:
        active = torch.nonzero(activations[i] > threshold).flatten()
        ids = sequences[i][: int(active.max()) + 1]
        probe = intervention.forward(lm, ids, sample.layer, "out", sample.neuron, deltas, positions=active)
        changes.append(probe.hidden[1:] - probe.hidden[0])
    change = torch.cat(changes, dim=1)  # [R - 1, P, d]
    W = lm.output_matrix.detach().cpu()
    for row, c in enumerate(ablated):
        ids, sign = tokens[c]
        s = ablation.logit_selectivity(change[row] @ W.T, ids, torch.full((len(ids),), sign), scored)
        base = ablation.logit_selectivity(change[len(ablated) + row] @ W.T, *draws[c].targets[0], scored)
        out[c] = (s, base, change.shape[1])
    return out


# --- the whole evaluation ---------------------------------------------------------------------------


def evaluate(
    model,
    lm,
    decomposer: Decomposer,
    session,
    thresholds: dict[int, np.ndarray] | None,
    layers: list[int],
    per_cell: int = 3,
    aligned: int = 2,
    channels: int = 5,
    draws: int = 8,
    texts: int = 6,
    seed: int = 0,
    out_vectors: int | None = None,
    progress=None,
    log=print,
) -> dict:
    """thresholds: each layer's stored activation thresholds, or None to take each `out`
    neuron's 90th percentile of |activation| over the committed corpus here, exactly."""
    started = time.monotonic()
    rows = sample(model, layers, per_cell, aligned, seed, out_vectors)
    samples = channels_for(model, decomposer, rows, session, channels, progress)
    log(f"{len(samples)} neuron sides, channels ready after {time.monotonic() - started:.0f} s")

    U, scored = decomposer.proj.exact.cpu(), decomposer.scored.cpu()
    gain = lm.final_norm_gain  # [d]
    U_read = through_final_norm(U, gain)  # [d, V]
    text = corpus.load()
    sequences = corpus.encode(lm, text.texts)
    token_ids = torch.tensor([t for seq in sequences for t in seq])
    next_ids = torch.tensor([t for seq in sequences for t in [*seq[1:], -1]])
    inputs = corpus.layer_inputs(lm, sequences, layers)  # [N, d] each
    elapsed = time.monotonic() - started
    log(f"corpus: {len(sequences)} texts, {len(token_ids):,} positions, after {elapsed:.0f} s")
    bounds = np.cumsum([0] + [len(s) for s in sequences])

    measured: list[Measured] = []
    neurons: list[dict] = []
    for n, sample_ in enumerate(samples):
        tokens = channel_tokens(sample_.channels, U_read, scored)
        found = _draws(sample_, U_read, scored, draws, seed)
        weight = weight_level(sample_, tokens, found, U_read, scored)
        X = inputs[sample_.layer]
        about = {k: getattr(sample_, k) for k in ("group", "layer", "side", "neuron", "source")}
        if sample_.side == "out":
            gate = model.vectors(sample_.layer, "gate")[sample_.neuron]
            up = model.vectors(sample_.layer, "in")[sample_.neuron]
            act = F.silu(X @ gate) * (X @ up)  # the neuron's activation at every corpus position
            per_text = [act[bounds[i] : bounds[i + 1]] for i in range(len(sequences))]
            if thresholds is None:
                threshold = float(torch.quantile(act.abs(), activations.QUANTILE))
            else:
                threshold = float(thresholds[sample_.layer][sample_.neuron])
            about |= {
                "threshold": threshold,
                "activation_min": float(act.min()),
                "activation_max": float(act.max()),
            }
            with torch.inference_mode():
                model_level = write_level(
                    lm, sample_, tokens, found, sequences, per_text, threshold, scored, texts
                )
        else:
            model_level = read_level(sample_, tokens, found, X, token_ids, next_ids)
        neurons.append(about)
        for c, (ch, (ids, _), (ws, wb), (ms, mb, positions)) in enumerate(
            zip(sample_.channels, tokens, weight, model_level, strict=True)
        ):
            if ch.alpha == 0:  # no alpha lowers the kurtosis: nothing is ablated, S is undefined
                ws = wb = ms = mb = math.nan
            measured.append(
                Measured(
                    sample_.group,
                    sample_.layer,
                    sample_.side,
                    sample_.neuron,
                    c,
                    ch.kurtosis,
                    ch.cos,
                    ch.alpha,
                    len(ch.masked),
                    ch.generic,
                    _overlap(ch.masked, ids),
                    ws,
                    wb,
                    ms,
                    mb,
                    positions,
                )
            )
        if (n + 1) % 10 == 0 or n + 1 == len(samples):
            log(f"{n + 1}/{len(samples)} neuron sides measured, {time.monotonic() - started:.0f} s")
    return {
        "model": model.name,
        "settings": {
            "layers": layers,
            "per_cell": per_cell,
            "aligned": aligned,
            "out_vectors": out_vectors,
            "channels": channels,
            "draws": draws,
            "texts": texts,
            "seed": seed,
            "corpus": text.key,
            "corpus_texts": len(sequences),
            "corpus_positions": len(token_ids),
            "thresholds": "committed corpus" if thresholds is None else "stored activation pass",
            "quantile": activations.QUANTILE,
            "active": "magnitude",  # |activation| above the threshold (older reports: activation)
            "target_half_width": TARGET_HALF_WIDTH,
            "small": SMALL,
        },
        # Where and how it ran; the command that ran it and its wall time are the caller's to add.
        "run": {
            "machine": cpu_model(),
            "threads": torch.get_num_threads(),
            "niceness": os.nice(0),
            "reference_cached": decomposer.reference_cached,
        },
        "solver": decomposer.settings.solver,
        "precision": decomposer.settings.precision,
        "algorithm_version": store.ALGORITHM_VERSION,
        "quantisation": weights.quantisation(model.source),
        "final_norm_gain": {
            "min": float(gain.min()),
            "median": float(gain.median()),
            "max": float(gain.max()),
        },
        "sources": sorted({s.source for s in samples}),
        "seconds": round(time.monotonic() - started, 1),
        "neurons": neurons,
        "channels": [asdict(m) for m in measured],
    }


def write(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    return render(out_dir)


def render(out_dir: Path) -> Path:
    """ablation.md and its plots from ablation.json alone (`channelscope eval-ablation
    --render`): every number in the report is computed from the JSON beside it."""
    result = json.loads((out_dir / "ablation.json").read_text())
    names = plots(result, out_dir)
    path = out_dir / "ablation.md"
    path.write_text(markdown(result, names))
    return path


# --- the report ----------------------------------------------------------------------------------------

LEVELS = {"model": ("model_s", "model_baseline"), "weights": ("weight_s", "weight_baseline")}


def tested(rows: list[dict], level: str) -> list[dict]:
    """The channels where S and its baseline are both defined at this level: every median and
    share of a table row is over this one set, so S and its baseline are compared like for like."""
    key, base = LEVELS[level]
    return [r for r in rows if math.isfinite(r[key]) and math.isfinite(r[base])]


def untestable(rows: list[dict]) -> list[dict]:
    """Ablated channels that could not be compared with their baseline in the model, so that
    every channel is counted: alpha* = 0, untestable or tested. Mostly, nowhere to measure them
    (read sides: no position whose token or next token is one of the channel's; `out`: no active
    position in the texts run); otherwise S or its baseline undefined (no random draw's tokens
    occur in the corpus, or nothing changed)."""
    both = {id(r) for r in tested(rows, "model")}
    return [r for r in rows if r["alpha"] > 0 and id(r) not in both]


def beats(rows: list[dict], level: str) -> list[bool]:
    key, base = LEVELS[level]
    return [r[key] > r[base] for r in tested(rows, level)]


def half_width(flags: list[bool]) -> float:
    low, high = interval(flags, share)
    return (high - low) / 2


def _cells(level: str, rows: list[dict], small: int) -> list[str]:
    """tested | median S | median baseline | share beating: over the same tested channels."""
    key, base = LEVELS[level]
    both = tested(rows, level)
    mark = "*" if len(both) < small else ""
    return [
        f"{len(both)}{mark}",
        with_interval([r[key] for r in both], ".2f"),
        with_interval([r[base] for r in both], ".2f"),
        with_interval(beats(rows, level), ".0%", share),
    ]


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(line) + " |" for line in lines],
    ]


def _kind_side_cells(rows: list[dict], sides) -> list[tuple[str, str, str, list[dict]]]:
    return [
        (kind, name, side, [r for r in rows if r["group"] == kind and r["side"] == side])
        for kind, name in KINDS
        for side in sides
    ]


def _verdict(flags: list[bool]) -> str:
    """What the share beating its baseline says, by its interval against 50 % (a channel that
    is no better than a random direction at its cosine beats that direction's median half the
    time)."""
    if len(flags) < 2:
        return "too few channels to say"
    low, high = interval(flags, share)
    if low > 0.5:
        return "beat their baseline more often than not"
    if high < 0.5:
        return "**lose to their baseline more often than not**"
    return "**no better than a random direction at the same cosine** (the interval holds 50 %)"


def findings(rows: list[dict], settings: dict) -> list[str]:
    sides = list(dict.fromkeys(r["side"] for r in rows))
    out = []
    for _, name, side, cell in _kind_side_cells(rows, sides):
        if not cell:
            continue
        both, flags = tested(cell, "model"), beats(cell, "model")
        if not both:
            out.append(f"- {name.capitalize()} `{side}`, in the model: no channel could be tested.")
            continue
        low, high = interval(flags, share)
        s, b = median(r["model_s"] for r in both), median(r["model_baseline"] for r in both)
        out.append(
            f"- {name.capitalize()} `{side}`, in the model: {share(flags):.0%} [{low:.0%}, {high:.0%}] of "
            f"{len(both)} tested channels beat their own baseline; median S {s:.2f} against {b:.2f} over "
            f"the same channels: {_verdict(flags)}."
        )
    for kind, name in KINDS:
        parts = []
        for side in sides:
            flags = beats([r for r in rows if r["group"] == kind and r["side"] == side], "weights")
            if flags:
                low, high = interval(flags, share)
                parts.append(f"`{side}` {share(flags):.0%} [{low:.0%}, {high:.0%}] of {len(flags)}")
        if parts:
            out.append(
                f"- {name.capitalize()}, at weight level: " + ", ".join(parts) + " channels beat their "
                "own baseline (partly circular: the tokens are read off the same projection, "
                'docs/method.md, "Selectivity").'
            )
    out += _kinds_compared(rows, sides)
    out += power(rows, settings)
    return out


def _kinds_compared(rows: list[dict], sides) -> list[str]:
    """Per side: do aligned vectors' channels beat their baselines more often than random
    vectors' do? Said only as far as the two intervals allow."""
    out = []
    for side in sides:
        found = []
        for kind, name in KINDS:
            flags = beats([r for r in rows if r["group"] == kind and r["side"] == side], "model")
            if len(flags) >= 2:
                found.append((name, share(flags), *interval(flags, share)))
        if len(found) != 2:
            continue
        (a, share_a, low_a, high_a), (b, share_b, low_b, high_b) = found
        if low_a > high_b or low_b > high_a:
            higher = a if share_a > share_b else b
            verdict = f"the intervals do not overlap: {higher} channels beat theirs more often"
        else:
            verdict = "the intervals overlap: this sample does not tell the two kinds apart"
        out.append(
            f"- `{side}`, {a} against {b} in the model: {share_a:.0%} [{low_a:.0%}, {high_a:.0%}] and "
            f"{share_b:.0%} [{low_b:.0%}, {high_b:.0%}] of the channels beat their own baseline; {verdict}."
        )
    return out


def power(rows: list[dict], settings: dict) -> list[str]:
    """Per read-side row: is the share's interval as narrow as the target, and if not, how many
    channels it would take, from this row's half width (which shrinks as 1 / sqrt(n)) and its
    share of testable channels."""
    target = settings["target_half_width"]
    out = []
    for _, name, side, cell in _kind_side_cells(rows, READ_SIDES):
        if not cell:
            continue
        flags = beats(cell, "model")
        if len(flags) < 2:
            out.append(f"- {name.capitalize()} `{side}`: {len(flags)} of {len(cell)} channels testable.")
            continue
        width = half_width(flags)
        if width <= target:
            out.append(
                f"- {name.capitalize()} `{side}`: {len(flags)} of {len(cell)} channels testable, interval "
                f"±{100 * width:.0f} points, within the ±{100 * target:.0f} aimed at."
            )
            continue
        needed = math.ceil(len(flags) * (width / target) ** 2)
        sampled = math.ceil(needed * len(cell) / len(flags))
        out.append(
            f"- {name.capitalize()} `{side}`: {len(flags)} of {len(cell)} channels testable, interval "
            f"±{100 * width:.0f} points, wider than the ±{100 * target:.0f} aimed at: about {needed} tested "
            f"channels would reach it, about {sampled} sampled at this row's testable share."
        )
    return out


def caveats(result: dict) -> list[str]:
    """What limits the numbers above, counted from them."""
    rows, s, neurons = result["channels"], result["settings"], result["neurons"]
    out = []
    for kind, name in KINDS:
        read = [r for r in rows if r["group"] == kind and r["side"] in READ_SIDES and r["alpha"] > 0]
        if read:
            lost = untestable(read)
            nowhere = sum(r["positions"] == 0 for r in lost)
            out.append(
                f"- {name.capitalize()} read sides: {len(lost)} of {len(read)} ablated `gate`/`in` channels "
                f"are untestable. {nowhere} have no target position in the corpus ({s['corpus_positions']:,} "
                "positions): their tokens never occur there, nor right before one. "
                f"{len(lost) - nowhere} have target positions but an undefined S or baseline (no random "
                "draw's tokens occur). All are counted in every table, not dropped."
            )
    gain = result["final_norm_gain"]
    overlap = " and ".join(
        f"{median(r['overlap'] for r in rows if r['group'] == kind):.0%} ({name})"
        for kind, name in KINDS
        if any(r["group"] == kind for r in rows)
    )
    out.append(
        "- The solver finds channels against the raw U; this report reads their tokens through the final "
        f"norm's gain (from {gain['min']:.2f} to {gain['max']:.2f}, median {gain['median']:.2f}), as the "
        f"logits see them; they hold a median {overlap} of the solver's T_k. A read "
        "vector sees the residual stream through its own layer's norm, not the final one: for `gate` and "
        "`in` the tokens are those the logits would see, the same rule for channel and baseline."
    )
    out += _negative_activations(neurons, s)
    out.append(
        "- `out` in the model: one random draw per channel (a forward row each), so a single channel's "
        "baseline is noisy; the medians and shares over channels are not."
    )
    for kind, name in KINDS:
        cell = [r for r in rows if r["group"] == kind]
        if cell:
            out.append(
                f"- {name.capitalize()}: {sum(r['alpha'] == 0 for r in cell)} of {len(cell)} channels "
                "have alpha* = 0 (no alpha lowers the kurtosis): ablating them changes nothing, so they "
                f"have no S; {sum(r['generic'] for r in cell)} are flagged generic by the run's "
                'random-vector reference (docs/method.md, "Generic channels"), and kept apart in the table '
                "by channel."
            )
    return out


def _active(settings: dict) -> str:
    """What "active" compared with the threshold in this report's run: |activation| since the
    thresholds became quantiles of it, the activation itself in older reports."""
    return "|activation|" if settings.get("active") == "magnitude" else "activation"


def _negative_activations(neurons: list[dict], settings: dict) -> list[str]:
    """Older reports counted positions above the neuron's upper quantile only: say how many
    sampled neurons did more on the negative side than on the positive, and the clearest one.
    Since "active" is |activation| above its quantile, there is nothing to say."""
    out_neurons = [n for n in neurons if n["side"] == "out"]
    if not out_neurons or settings.get("active") == "magnitude":
        return []
    negative = [n for n in out_neurons if -n["activation_min"] > n["activation_max"]]
    counts = []
    for kind, name in KINDS:
        of_kind = [n for n in out_neurons if n["group"] == kind]
        if of_kind:
            counts.append(f"{sum(n in negative for n in of_kind)} of {len(of_kind)} {name}")
    line = (
        f'- `out`: "active" counts positions above the neuron\'s {100 * settings["quantile"]:.0f}th '
        f'percentile only (docs/method.md, "Selectivity"). Neurons whose most negative activation over the '
        f"corpus is larger than their most positive: {', '.join(counts)}; their strongest positions are not "
        "in this measure"
    )
    if negative:
        most = min(negative, key=lambda n: n["activation_min"])
        line += (
            f" (the furthest down: layer {most['layer']} neuron {most['neuron']} reaches "
            f"{most['activation_min']:.1f}, its highest activation is {most['activation_max']:.1f} and its "
            f"threshold {most['threshold']:.2f})"
        )
    return [line + "."]


def markdown(result: dict, plots: list[str]) -> str:
    rows, s = result["channels"], result["settings"]
    small = s["small"]
    sides = list(dict.fromkeys(r["side"] for r in rows))
    counts = {kind: len([n for n in result["neurons"] if n["group"] == kind]) for kind, _ in KINDS}
    run = result["run"]
    if s["out_vectors"] is None:
        on_sides, on_out = "every side", ""
    else:  # out's forward passes cost far more than a read side's products
        on_sides = ", ".join(f"`{side}`" for side in sides if side != "out")
        on_out = f", and on `out` {s['out_vectors']} of each kind"
    reference = "read from its cache" if run["reference_cached"] else "computed in this run"
    lines = [
        f"# Ablation: does switching a channel off disable what it stands for? {result['model']}",
        "",
        "Made by `channelscope eval-ablation` (channelscope/experiments/ablation_report.py) and rendered "
        f"from `ablation.json` alone (`channelscope eval-ablation --render`). Run as `{run['command']}`: "
        f"{run['wall_seconds']:.0f} s wall, {result['seconds']:.0f} s of it sampling and measuring once the "
        f"model and the random-vector reference were ready (the reference {reference}), {run['threads']} "
        f"torch threads at niceness {run['niceness']} on {run['machine']}. Channels from: "
        f"{', '.join(result['sources'])} ({result['solver']} solver, {result['precision']}, algorithm "
        f"version {result['algorithm_version']}). Corpus {s['corpus']}: {s['corpus_texts']} texts generated "
        f"by SmolLM2 itself (corpus/make_corpus.py), {s['corpus_positions']:,} positions.",
        "",
        quantisation_line(result),
        "",
        f"**Sample.** In each of layers {', '.join(map(str, s['layers']))}, on {on_sides}: the "
        f"{s['aligned']} vectors with the highest raw kurtosis of w @ U (aligned, hand-picked) and "
        f"{s['per_cell']} random ones{on_out}; {counts[ALIGNED]} aligned and {counts[RANDOM]} random "
        "vectors in all. The two kinds have rows of their own in every table and are never pooled. Each "
        f"of their first {s['channels']} channels is ablated on its own (w' = w - alpha* c_k, the paper's "
        "grid rule).",
        "",
        "**S** = mean over the channel's tokens of the oriented drop (-sign * delta) / mean over all other "
        'tokens (or positions) of |delta| (docs/method.md, "Selectivity"). A channel\'s tokens are read as '
        "the logits see them: the |T_k| scored tokens furthest out on the dominant tail of c_k @ (g * U), g "
        "the final RMSNorm's gain. **Baseline**: the same for random directions at the channel's cosine to "
        "w with the same alpha*, whose tokens are as many of their own dominant tail's, by the same rule "
        f"(median of {s['draws']} draws at weight level and on read sides; one draw per channel on `out`).",
        "",
        "- weight level: delta = change of w @ (g * U);",
        "- `gate` / `in` in the model: delta = change of the pre-activation x . w on the layer's real MLP "
        "inputs over the whole corpus; targets = positions whose token or next token is one of the "
        "channel's;",
        "- `out` in the model: delta = change of next-token logits at positions where the neuron is active "
        f"({_active(s)} above its {100 * s['quantile']:.0f}th percentile over the {s['thresholds']}), "
        f"forward passes on the {s['texts']} texts where it is active most often.",
        "",
        "**Counting.** A channel with alpha* = 0 is not ablated at all. An ablated one that cannot be "
        "compared with its baseline is **untestable**: no target position (read sides) or no active position "
        "(`out`), or S or its baseline undefined. The rest are **tested**: S and its baseline both "
        "defined. Medians of S and of its baseline, and the share of channels whose S "
        "beats their own baseline, are over the same tested channels. Brackets: 95 % bootstrap intervals; "
        f"* marks fewer than {small} channels.",
        "",
        "## Findings (computed from the tables below)",
        "",
        *findings(rows, s),
        "",
        "## In the model, by kind and side",
        "",
    ]
    lines += _table(
        ["kind", "side", "channels", "alpha* = 0", "untestable", *TESTED, "± of the share"],
        [
            _model_row([name, f"`{side}`"], cell, small)
            for _, name, side, cell in _kind_side_cells(rows, sides)
            if cell
        ],
    )
    lines += ["", "## At weight level, by kind and side", ""]
    lines += _table(
        ["kind", "side", "channels", *TESTED, "T_k among the tokens read through the norm (median)"],
        [
            [
                name,
                f"`{side}`",
                str(len(cell)),
                *_cells("weights", cell, small),
                f"{median(r['overlap'] for r in cell):.0%}",
            ]
            for _, name, side, cell in _kind_side_cells(rows, sides)
            if cell
        ],
    )
    lines += ["", "## In the model, by kind, side and channel", ""]
    lines += _table(
        ["kind", "side", "which channels", *TESTED],
        [
            [name, f"`{side}`", label, *_cells("model", [r for r in cell if keep(r)], small)]
            for _, name, side, cell in _kind_side_cells(rows, sides)
            for label, keep in CLASSES
            if cell
        ],
    )
    lines += ["", "## In the model, by kind, layer and side", ""]
    lines += _table(
        ["kind", "layer", "side", "channels", "alpha* = 0", "untestable", *TESTED, "± of the share"],
        [
            _model_row([name, str(layer), f"`{side}`"], cell, small)
            for kind, name in KINDS
            for layer in s["layers"]
            for side in sides
            if (cell := [r for r in rows if r["group"] == kind and r["layer"] == layer and r["side"] == side])
        ],
    )
    lines += ["", "## Caveats", "", *caveats(result), "", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _trusted(row: dict) -> bool:
    return not row["generic"] and row["kurtosis"] >= T.JUNK_KURTOSIS


TESTED = ["tested", "median S", "median baseline", "S > its baseline"]
CLASSES = [
    ("first channel", lambda r: r["channel"] == 0),
    (f"kurtosis >= {T.JUNK_KURTOSIS:g}, not generic", _trusted),
    ("flagged generic", lambda r: r["generic"]),
]


def _model_row(label: list[str], cell: list[dict], small: int) -> list[str]:
    """A row of a table in the model: how many channels, how many could not be ablated or
    tested, then S, its baseline and the share beating it over the tested ones, and the half
    width of that share's interval."""
    flags = beats(cell, "model")
    width = f"{100 * half_width(flags):.0f} points" if len(flags) >= 2 else "–"
    alpha_zero = sum(r["alpha"] == 0 for r in cell)
    return [
        *label,
        str(len(cell)),
        str(alpha_zero),
        str(len(untestable(cell))),
        *_cells("model", cell, small),
        width,
    ]


# --- plots ---------------------------------------------------------------------------------------------

COLOURS = {ALIGNED: ("#2f6bbd", "#b8c9e0"), RANDOM: ("#d9531a", "#ebc3b0")}  # channel, baseline


def plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["channels"]
    sides = list(dict.fromkeys(r["side"] for r in rows))
    names = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    titles = [("weights", "weight level, w @ (g * U)"), ("model", "in the real model")]
    for ax, (level, title) in zip(axes, titles, strict=True):
        key, base = LEVELS[level]
        data, colours, ticks, labels = [], [], [], []
        for kind, _, side, cell in _kind_side_cells(rows, sides):
            both = tested(cell, level)
            data += [[r[key] for r in both], [r[base] for r in both]]
            colours += list(COLOURS[kind])
            ticks.append(len(data) - 0.5)
            labels.append(f"{side}\n{kind}")
        parts = ax.boxplot(data, showfliers=False, patch_artist=True, medianprops={"color": "black"})
        for box, colour in zip(parts["boxes"], colours, strict=True):
            box.set_facecolor(colour)
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_title(f"S, {title}: channel (dark) against its baseline (light)", fontsize=9)
        ax.set_ylabel("S")
    fig.tight_layout()
    names.append("ablation_selectivity.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    markers = {"gate": "o", "in": "s", "out": "^"}
    for ax, (kind, name) in zip(axes, KINDS, strict=True):
        for side in sides:
            both = tested([r for r in rows if r["group"] == kind and r["side"] == side], "model")
            ax.scatter([r["model_baseline"] for r in both], [r["model_s"] for r in both], s=14,
                       marker=markers.get(side, "o"), alpha=0.7, label=side)  # fmt: skip
        low = min(ax.get_xlim()[0], ax.get_ylim()[0])
        high = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([low, high], [low, high], color="#999", lw=0.8, label="S = baseline")
        ax.set_xlabel("random-direction baseline (model)")
        ax.set_ylabel("channel's S (model)")
        ax.set_title(f"{name}: each channel against its own baseline", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    names.append("ablation_model_vs_baseline.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)
    return names
