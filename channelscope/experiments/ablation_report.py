"""`channelscope eval-ablation`: does switching a channel off disable what it stands for, in the
real model? (docs/method.md, "Alpha* and ablation" and "Selectivity").

For neurons sampled across layers and sides (plus the most vocabulary-aligned `out` neurons of
the late layers), each of their first channels is ablated on its own (w' = w - alpha* c_k, the
grid rule on the original w) and selectivity S is measured three ways, each beside the same
measure for random directions at the channel's cosine to w with the same alpha*:

- weight level: delta = change of the vocabulary projection w @ U;
- `gate` / `in`, real model: delta = change of the neuron's pre-activation x . w on the layer's
  real MLP inputs over the committed corpus; targets are positions whose token or next token is
  in T_k, against all other positions;
- `out`, real model: delta = change of the next-token logits at the positions where the neuron is
  active (activation above its 90th percentile over the corpus), from forward passes on the
  corpus texts where it is most often active.

Channels come from the store where a run has the neuron, otherwise from the Decomposer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from channelscope.core import tables as T
from channelscope.core.stats import finite, median
from channelscope.method import ablation, intervention, measures, rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.sampling import most_aligned, random_neurons
from channelscope.worker import corpus, store

LATE = 20  # layers from here on are "late" (SmolLM2 has 30)


@dataclass
class ChannelSample:
    vector: torch.Tensor  # [d]
    alpha: float
    cos: float
    skew: float
    kurtosis: float
    generic: bool
    masked: torch.Tensor  # T_k ids


@dataclass
class NeuronSample:
    group: str  # "random" or "aligned" (highest kurtosis, late layers)
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
    masked: int
    generic: bool
    weight_s: float
    weight_baseline: float  # median over the random draws
    model_s: float
    model_baseline: float
    positions: int  # where the model-level S was measured (targets for read sides, active for out)
    extra: dict = field(default_factory=dict)


# --- sampling --------------------------------------------------------------------------------------


def sample(
    model, layers: list[int], per_cell: int, aligned: int, seed: int
) -> list[tuple[str, int, str, int]]:
    """`per_cell` random neurons per layer and side, and the `aligned` highest-kurtosis `out`
    neurons of each late layer (that were not drawn at random already)."""
    cells = {f"layer {layer}": [layer] for layer in layers}
    drawn = random_neurons(model, cells, per_cell, torch.Generator().manual_seed(seed))
    rows = [("random", s.layer, s.side, s.neuron) for s in drawn]
    if aligned and "out" in model.sides:
        for layer in [layer for layer in layers if layer >= LATE]:
            for s in most_aligned(model, [layer], "out", aligned):
                if ("random", layer, "out", s.neuron) not in rows:
                    rows.append(("aligned", layer, "out", s.neuron))
    return rows


def from_store(session, model_sha256: str, layer: int, side: str, neuron: int, channels: int):
    """The newest stored run's channels of a neuron side, or None."""
    stored = store.newest_channels(session, model_sha256, layer, side, neuron, channels)
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
    model, decomposer: Decomposer, rows, session, channels: int, progress=None
) -> list[NeuronSample]:
    out: dict[tuple, NeuronSample] = {}
    missing: list[tuple[int, str, int]] = []
    for group, layer, side, neuron in rows:
        w = model.vectors(layer, side)[neuron]
        stored = from_store(session, model.sha256, layer, side, neuron, channels) if session else None
        if stored and stored[1]:
            out[(layer, side, neuron)] = NeuronSample(
                group, layer, side, neuron, w, stored[1], f"store {stored[0]}"
            )
        else:
            missing.append((layer, side, neuron))
    coords = sorted(set(missing))
    for (layer, side, _), record in zip(coords, decomposer.anywhere(coords, progress), strict=True):
        out[(layer, side, record.neuron)] = NeuronSample(
            "",
            layer,
            side,
            record.neuron,
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
    samples = []
    for group, layer, side, neuron in rows:
        found = out[(layer, side, neuron)]
        found.group = group
        samples.append(found)
    return samples


# --- measuring ------------------------------------------------------------------------------------


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


def weight_level(sample: NeuronSample, draws, U, scored) -> list[tuple[float, float]]:
    out = []
    for ch, found in zip(sample.channels, draws, strict=True):
        single = ablation.Ablation(sample.w - ch.alpha * ch.vector, [ch.alpha])
        T = (ch.masked, torch.full((len(ch.masked),), measures.tail_sign(ch.skew)))
        effect = ablation.weight_effect(sample.w, single, T, found, U, scored)
        out.append((effect.selectivity, median(effect.baseline)))
    return out


def read_level(sample: NeuronSample, draws, X: torch.Tensor, token_ids: torch.Tensor, next_ids: torch.Tensor):
    """gate/in: S of the pre-activation change on the real MLP inputs X [N, d] of the corpus.
    next_ids[i] is the token after position i in its own text (-1 at a text's end)."""
    out = []
    for ch, found in zip(sample.channels, draws, strict=True):
        delta = X @ (-ch.alpha * ch.vector)  # [N]
        s, n = _position_s(delta, token_ids, next_ids, ch.masked, measures.tail_sign(ch.skew))
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


def write_level(lm, sample: NeuronSample, draws, sequences, activations, threshold: float, scored, top: int):
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
        ch = sample.channels[c]
        signs = torch.full((len(ch.masked),), measures.tail_sign(ch.skew))
        s = ablation.logit_selectivity(change[row] @ W.T, ch.masked, signs, scored)
        base = ablation.logit_selectivity(change[len(ablated) + row] @ W.T, *draws[c].targets[0], scored)
        out[c] = (s, base, change.shape[1])
    return out


# --- the whole evaluation ---------------------------------------------------------------------------


def evaluate(
    model,
    lm,
    decomposer: Decomposer,
    session,
    thresholds: dict[int, np.ndarray],
    layers: list[int],
    per_cell: int = 3,
    aligned: int = 2,
    channels: int = 5,
    draws: int = 8,
    texts: int = 6,
    seed: int = 0,
    progress=None,
    log=print,
) -> dict:
    started = time.monotonic()
    rows = sample(model, layers, per_cell, aligned, seed)
    samples = channels_for(model, decomposer, rows, session, channels, progress)
    log(f"{len(samples)} neuron sides, channels ready after {time.monotonic() - started:.0f} s")

    U, scored = decomposer.proj.exact.cpu(), decomposer.scored.cpu()
    text = corpus.load()
    sequences = corpus.encode(lm, text.texts)
    token_ids = torch.tensor([t for seq in sequences for t in seq])
    next_ids = torch.tensor([t for seq in sequences for t in [*seq[1:], -1]])
    inputs = corpus.layer_inputs(lm, sequences, {layer: "mlp_input" for layer in layers})  # [N, d] each
    elapsed = time.monotonic() - started
    log(f"corpus: {len(sequences)} texts, {len(token_ids):,} positions, after {elapsed:.0f} s")
    bounds = np.cumsum([0] + [len(s) for s in sequences])

    measured: list[Measured] = []
    for n, sample_ in enumerate(samples):
        found = _draws(sample_, U, scored, draws, seed)
        weight = weight_level(sample_, found, U, scored)
        X = inputs[sample_.layer]
        if sample_.side == "out":
            gate = model.vectors(sample_.layer, "gate")[sample_.neuron]
            up = model.vectors(sample_.layer, "in")[sample_.neuron]
            act = F.silu(X @ gate) * (X @ up)  # the neuron's activation at every corpus position
            per_text = [act[bounds[i] : bounds[i + 1]] for i in range(len(sequences))]
            threshold = float(thresholds[sample_.layer][sample_.neuron])
            with torch.inference_mode():
                model_level = write_level(lm, sample_, found, sequences, per_text, threshold, scored, texts)
        else:
            model_level = read_level(sample_, found, X, token_ids, next_ids)
        for c, (ch, (ws, wb), (ms, mb, positions)) in enumerate(
            zip(sample_.channels, weight, model_level, strict=True)
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
        "settings": {
            "layers": layers,
            "per_cell": per_cell,
            "aligned": aligned,
            "channels": channels,
            "draws": draws,
            "texts": texts,
            "seed": seed,
            "corpus": text.key,
            "corpus_texts": len(sequences),
            "corpus_positions": len(token_ids),
        },
        "sources": sorted({s.source for s in samples}),
        "seconds": round(time.monotonic() - started, 1),
        "channels": [asdict(m) for m in measured],
    }


# --- the report ----------------------------------------------------------------------------------------


def _share_above(rows, key: str, base: str) -> float:
    pairs = [(r[key], r[base]) for r in rows if math.isfinite(r[key]) and math.isfinite(r[base])]
    return sum(a > b for a, b in pairs) / len(pairs) if pairs else math.nan


def _line(label: str, rows: list[dict]) -> str:
    if not rows:
        return f"| {label} | 0 | | | | | | |"
    return (
        f"| {label} | {len(rows)} | {median(r['weight_s'] for r in rows):.2f} | "
        f"{median(r['weight_baseline'] for r in rows):.2f} | {median(r['model_s'] for r in rows):.2f} | "
        f"{median(r['model_baseline'] for r in rows):.2f} | "
        f"{100 * _share_above(rows, 'model_s', 'model_baseline'):.0f}% | "
        f"{len(finite(r['model_s'] for r in rows))} |"
    )


HEADER = (
    "| | channels | S weight | baseline | S model | baseline | S model > its baseline | defined |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def findings(rows: list[dict]) -> list[str]:
    """Per side and level: the median S against its baseline, said plainly, and low where the
    channel does no better than a random direction at its cosine. For all ablated channels, and
    for the channels a user should trust (kurtosis >= 5, not generic)."""
    out = []
    skipped = sum(1 for r in rows if r["alpha"] == 0)
    out.append(
        f"- {skipped} of {len(rows)} channels have alpha* = 0 (no alpha lowers the kurtosis): ablating them "
        "changes nothing, so they have no S and are left out of every median."
    )
    for side in ("gate", "in", "out"):
        for label, keep in (("all channels", lambda r: True), ("kurtosis >= 5, not generic", _trusted)):
            cell = [r for r in rows if r["side"] == side and keep(r)]
            for level, key, base in (
                ("weights", "weight_s", "weight_baseline"),
                ("model", "model_s", "model_baseline"),
            ):
                s, b = median(r[key] for r in cell), median(r[base] for r in cell)
                beating = _share_above(cell, key, base)
                if not (math.isfinite(s) and math.isfinite(b)):
                    continue
                if s > 1.5 * abs(b) and beating >= 0.7:
                    verdict = "selective"
                elif s > b and beating > 0.5:
                    verdict = "weakly selective"
                else:
                    verdict = "**not selective: no better than a random direction**"
                count = len(finite(r[key] for r in cell))
                out.append(
                    f"- `{side}` ({label}), {level}: median S {s:.2f} against {b:.2f} for random directions; "
                    f"{100 * beating:.0f}% of {count} beat their own baseline: {verdict}."
                )
    return out


def caveats(rows: list[dict], settings: dict) -> list[str]:
    """What limits the numbers above, counted from them."""
    read = [r for r in rows if r["side"] != "out" and r["alpha"] > 0]
    absent = sum(1 for r in read if r["positions"] == 0)
    generic = sum(1 for r in rows if r["generic"])
    return [
        f"- Read sides: {absent} of {len(read)} ablated `gate`/`in` channels have no target position at all "
        f"in the corpus ({settings['corpus_positions']:,} positions): their tokens (often word fragments) "
        "never occur in it, or next to it, so their S in the model is undefined.",
        "- Read sides measure the channel against the raw U, as the method does; the neuron reads the "
        "residual stream after RMSNorm's elementwise weight, so a channel's tokens in U need not be the "
        "tokens whose residual streams it responds to. Folding that weight into the projection for read "
        "sides is untested here.",
        '- `out`: "active" counts positions above the neuron\'s 90th percentile only (docs/method.md, '
        '"Selectivity"). Some late neurons do their work with large negative activations: on SmolLM2, '
        "layer 29 neuron 1260 (channel 0: `).` `)` `.)`) reaches -7.9 right before a `)` and pushes it "
        "down there, while its 90th percentile is 2.3; those positions are not in this measure.",
        "- `out` in the model: one random draw per channel (a forward row each), so a single channel's "
        "baseline is noisy; the medians over channels are not.",
        f"- {generic} of {len(rows)} channels are flagged generic by the run's random-vector reference "
        '(docs/method.md, "Generic channels"); their selectivity is reported separately above.',
        f"- A small sample: {settings['per_cell']} random neurons per layer and side over "
        f"{len(settings['layers'])} layers, plus {settings['aligned']} highest-kurtosis `out` neurons per "
        "late layer; each channel's S is one number, so read the spreads in the plots.",
    ]


def _trusted(row: dict) -> bool:
    return not row["generic"] and row["kurtosis"] >= 5


def markdown(result: dict, plots: list[str], command: str) -> str:
    rows = result["channels"]
    s = result["settings"]
    real = [r for r in rows if _trusted(r)]
    lines = [
        "# Ablation: does switching a channel off disable what it stands for?",
        "",
        f"`{command}` ({result['seconds']:.0f} s on this machine). Channels from: "
        f"{', '.join(result['sources'])}. Corpus {s['corpus']}: {s['corpus_texts']} texts generated by "
        f"SmolLM2 itself (corpus/make_corpus.py), {s['corpus_positions']:,} positions.",
        "",
        f"Each of the first {s['channels']} channels of every sampled neuron side is ablated on its own "
        "(w' = w - alpha* c_k, the paper's grid rule). **S** = mean over T_k of the oriented drop "
        "(-sign(skew_k) * delta) / mean over all other tokens (or positions) of |delta| (docs/method.md, "
        '"Selectivity"). **Baseline**: the same for random directions at the channel\'s cosine to w with '
        "the same alpha*, whose tokens are the |T_k| furthest out on their own dominant tail (median of "
        f"{s['draws']} draws at weight level and on read sides; one draw per channel on `out`).",
        "",
        "- weight level: delta = change of w @ U;",
        "- `gate` / `in` in the model: delta = change of the pre-activation x . w on the layer's real MLP "
        "inputs over the whole corpus; targets = positions whose token or next token is in T_k;",
        "- `out` in the model: delta = change of next-token logits at positions where the neuron is active "
        f"(activation above its corpus 90th percentile), forward passes on the {s['texts']} texts where "
        "it is active most often.",
        "",
        "## Findings (computed from the numbers below)",
        "",
        *findings(rows),
        "",
        "## Medians",
        "",
        HEADER,
    ]
    for side in ("gate", "in", "out"):
        lines.append(_line(f"`{side}`, all channels", [r for r in rows if r["side"] == side]))
        lines.append(_line(f"`{side}`, kurtosis >= 5, not generic", [r for r in real if r["side"] == side]))
    aligned = [r for r in rows if r["group"] == "aligned"]
    if aligned:
        lines.append(_line("`out`, highest-kurtosis late neurons", aligned))
        lines.append(_line("`out`, their first channel", [r for r in aligned if r["channel"] == 0]))
    lines.append(_line("generic channels", [r for r in rows if r["generic"]]))
    lines += ["", "## By layer (all channels)", "", HEADER.replace("| |", "| layer, side |", 1)]
    for layer in s["layers"]:
        for side in ("gate", "in", "out"):
            cell = [r for r in rows if r["layer"] == layer and r["side"] == side and r["group"] == "random"]
            if cell:
                lines.append(_line(f"{layer} `{side}`", cell))
    lines += ["", "## Caveats", "", *caveats(rows, s), "", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["channels"]
    names = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, base, title) in zip(
        axes,
        [
            ("weight_s", "weight_baseline", "weight level (w @ U)"),
            ("model_s", "model_baseline", "in the real model"),
        ],
        strict=True,
    ):
        data, labels = [], []
        for side in ("gate", "in", "out"):
            cell = [r for r in rows if r["side"] == side]
            data += [finite(r[key] for r in cell), finite(r[base] for r in cell)]
            labels += [f"{side}\nchannel", f"{side}\nrandom"]
        parts = ax.boxplot(data, showfliers=False, patch_artist=True)
        for i, box in enumerate(parts["boxes"]):
            box.set_facecolor("#7ea9e0" if i % 2 == 0 else "#dddddd")
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_title(f"S {title}")
        ax.set_ylabel("S")
    fig.tight_layout()
    name = "ablation_selectivity.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    names.append(name)

    fig, ax = plt.subplots(figsize=(6.5, 5))
    colours = {"gate": "#2f6bbd", "in": "#3a9d5d", "out": "#d9531a"}
    for side, colour in colours.items():
        cell = [
            r
            for r in rows
            if r["side"] == side and math.isfinite(r["model_s"]) and math.isfinite(r["model_baseline"])
        ]
        ax.scatter(
            [r["model_baseline"] for r in cell],
            [r["model_s"] for r in cell],
            s=12,
            c=colour,
            label=side,
            alpha=0.7,
        )
    lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lim, lim, color="#999", lw=0.8, label="S = baseline")
    ax.set_xlabel("random-direction baseline (model)")
    ax.set_ylabel("channel's S (model)")
    ax.set_title("Each channel against its own baseline, in the real model")
    ax.legend()
    fig.tight_layout()
    name = "ablation_model_vs_baseline.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names


def write_report(result: dict, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    names = plots(result, out_dir)
    path = out_dir / "ablation.md"
    path.write_text(markdown(result, names, command))
    return path
