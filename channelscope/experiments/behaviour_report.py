"""`channelscope behaviour`: do a neuron's channels say what it does on real text? (reports/behaviour.md)

For the most vocabulary-aligned vectors and random ones of a few layers, every side, apart:
decompose them with the default settings, run the model once over the real corpus summing, per
token, the MLP input x and the activation at those layers (worker/activations.token_stats, the
sums the activation pass keeps for the pages), and test each channel's top 20 tokens T
(method/behaviour.py; docs/method.md, "Behaviour on real text"):

- read sides (gate, in): the neuron's pre-activation x . w at positions holding a token of T,
  standardised: (their mean - the mean over every position) / the sd over every position;
- out: the neuron's activation act(x . w_gate) * (x . w_in) at positions followed by a token of T,
  standardised the same way.

Both oriented by the neuron's sign on T and set against the same figure for RANDOM_SETS sets of
tokens as common in the corpus (a channel passes at percentile >= 95: 5 % pass by chance), and
both computed the same way for DIRECTIONS random directions at each channel's cosine to w (the
pool of docs/method.md, "Faithfulness against directions at the same cosine"): a channel earns its
place only where it passes more often than directions that merely sit as close to w.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from channelscope.core.stats import finite, interval, median, share
from channelscope.experiments.eval_report import SMALL
from channelscope.method import behaviour, rotate
from channelscope.method.decomposer import Decomposer
from channelscope.method.measures import tail_sign, tokens_at_cosine
from channelscope.method.sampling import Sampled, most_aligned, random_neurons
from channelscope.worker import activations, corpus
from channelscope.worker.store import ALGORITHM_VERSION

ALIGNED, RANDOM = "aligned", "random"
DIRECTIONS = 10  # random directions at each channel's cosine, tested as the channel is


def sample(model, layers: list[int], aligned: int, random: int, seed: int) -> list[Sampled]:
    """Per layer and side, the `aligned` highest raw kurtosis vectors and `random` others drawn
    uniformly (not among them)."""
    rows: list[Sampled] = []
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        for side in model.sides:
            top = most_aligned(model, [layer], side, aligned, group=ALIGNED) if aligned else []
            taken = {r.neuron for r in top}
            drawn = [
                r
                for r in random_neurons(model, {RANDOM: [layer]}, random + len(taken), generator)
                if r.side == side and r.neuron not in taken
            ][:random]
            rows += top + drawn
    return rows


def evaluate(model, lm, decomposer: Decomposer, texts: list[str], corpus_key: str, layers: list[int],
             aligned: int, random: int, seed: int = 0, max_tokens: int = 256, log=print) -> dict:  # fmt: skip
    started = time.perf_counter()
    rows = sample(model, layers, aligned, random, seed)
    log(f"decomposing {len(rows)} vectors")
    records = decomposer.anywhere([(r.layer, r.side, r.neuron) for r in rows])
    sequences = [s for s in corpus.encode(lm, texts, max_tokens) if s]
    positions = sum(len(s) for s in sequences)
    log(f"the model over {len(sequences)} documents ({positions:,} positions)")
    stats = activations.token_stats(lm, sequences, layers, model.vocab_size)
    counts = np.bincount(np.concatenate([np.asarray(s) for s in sequences]), minlength=model.vocab_size)
    bins = behaviour.frequency_bins(counts)
    generator = np.random.default_rng(seed)
    scored = decomposer.scored.cpu()
    channels = []
    for row, record in zip(rows, records, strict=True):
        w = model.vectors(row.layer, row.side)[row.neuron]
        z_w = (w.to(decomposer.proj.exact.device) @ decomposer.proj.exact).float().cpu()  # [V]
        zs_w = rotate.z_scores(z_w[None], scored)[0]  # [V]
        w_read = w.double().numpy()  # [d], for the read sides' test

        def tested(top: np.ndarray, raises: bool, row=row, w_read=w_read) -> behaviour.Tested:
            sets = behaviour.matched_sets(top, bins, behaviour.RANDOM_SETS, generator)
            return behaviour.every_position(stats[row.layer], row.side, row.neuron, w_read, top, raises, sets)

        for ch in record.channels:
            top = np.unique(ch.top_ids.astype(np.int64))
            raises = ch.faithfulness * tail_sign(ch.skew) > 0
            found = tested(top, raises)
            ids, _ = tokens_at_cosine(w, z_w, ch.cos, decomposer.directions, scored)
            at_cosine = [
                tested(np.unique(ids[r].numpy()), bool(zs_w[ids[r]].mean() > 0))
                for r in range(min(DIRECTIONS, len(ids)))
            ]
            channels.append(
                {
                    "kind": row.group,
                    "layer": row.layer,
                    "side": row.side,
                    "neuron": row.neuron,
                    "channel": ch.index,
                    "cos": ch.cos,
                    "generic": ch.generic,
                    "tokens": [model.vocabulary.tokens[i] for i in ch.top_ids[:8]],
                    "raises": bool(raises),
                    "value": found.value,
                    "random_median": found.random_median,
                    "percentile": found.percentile,
                    "positions": found.positions,
                    "passed": found.passed,
                    # the same test for random directions at this channel's cosine to w
                    "at_cosine_passed": [t.passed for t in at_cosine],
                    "at_cosine_percentile": [t.percentile for t in at_cosine],
                }
            )
    return {
        "model": model.name,
        "corpus": corpus_key,
        "documents": len(sequences),
        "positions": positions,
        "layers": layers,
        "aligned": aligned,
        "random": random,
        "seed": seed,
        "channels_per_vector": decomposer.settings.channels,
        "solver": decomposer.settings.solver,
        "algorithm_version": ALGORITHM_VERSION,
        "precision": decomposer.settings.precision,
        "random_sets": behaviour.RANDOM_SETS,
        "directions": DIRECTIONS,
        "pass_percentile": behaviour.PASS,
        "min_positions": behaviour.MIN_POSITIONS,
        "seconds": round(time.perf_counter() - started, 1),
        "channels": channels,
    }


def write(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "behaviour.json").write_text(json.dumps(result, indent=1))
    return render(out_dir)


def render(out_dir: Path) -> Path:
    """behaviour.md from behaviour.json alone (`channelscope behaviour --render`)."""
    result = json.loads((out_dir / "behaviour.json").read_text())
    path = out_dir / "behaviour.md"
    path.write_text(_markdown(result))
    return path


def _row(label: str, cell: list[dict]) -> str:
    tested = [c for c in cell if c["passed"] is not None]
    passed = [c["passed"] for c in tested]
    low, high = interval(passed, share)
    pct = [c["percentile"] for c in tested]
    p_low, p_high = interval(pct)
    rates = finite(_direction_rate(c) for c in cell)
    d_low, d_high = interval(rates, share)
    small = "*" if len(tested) < SMALL else ""
    return (
        f"| {label} | {len(cell)} | {share(c['passed'] is None for c in cell):.0%} | {len(tested)}{small} "
        f"| {share(passed):.0%} [{low:.0%}, {high:.0%}] | {share(rates):.0%} "
        f"[{d_low:.0%}, {d_high:.0%}] | {median(pct):.0f} [{p_low:.0f}, {p_high:.0f}] |"
    )


def _direction_rate(channel: dict) -> float:
    """The share of a channel's testable directions at the same cosine that pass (nan for none):
    averaged over channels, the pass rate to set against the channels' own."""
    return share(p for p in channel["at_cosine_passed"] if p is not None)


HEADER = [
    "| channels | n | untestable | tested | pass (>= 95th pct) | directions at the same cosine: pass "
    "| median percentile |",
    "|---|---|---|---|---|---|---|",
]


def _markdown(result: dict) -> str:
    channels = result["channels"]
    kinds = [(ALIGNED, "aligned (highest raw kurtosis)"), (RANDOM, "random")]
    sides = list(dict.fromkeys(c["side"] for c in channels))
    lines = [
        f"# Do channels say what the neuron does on real text? {result['model']}",
        "",
        "Made by `channelscope behaviour` (channelscope/experiments/behaviour_report.py), rendered from "
        f"`behaviour.json` alone (`--render`). Layers {', '.join(map(str, result['layers']))}, every "
        f"side: the {result['aligned']} most vocabulary-aligned vectors and {result['random']} random "
        "ones of each, "
        f"{result['channels_per_vector']} channels each ({result['solver']} solver, {result['precision']}, "
        f"algorithm version {result['algorithm_version']}); "
        f"the model over {result['documents']:,} documents of corpus {result['corpus']} "
        f"({result['positions']:,} positions). `{result.get('command', 'channelscope behaviour')}`: "
        f"{result['seconds'] / 60:.0f} min on {result.get('cpu', 'an unrecorded machine')}.",
        "",
        "Each channel's figure (read sides: the neuron's pre-activation at every position holding one of "
        "its top 20 tokens; `out`: its activation at every position followed by one of them; both as a "
        "standardised mean, (mean there - mean everywhere) / sd everywhere), oriented by the neuron's "
        "sign on those tokens, is set against the same figure for "
        f"{result['random_sets']} token sets as common in the corpus. It passes at the "
        f"{result['pass_percentile']:.0f}th percentile: **5 % of channels pass by chance**. The same "
        f"test, run for {result['directions']} random directions at each channel's cosine to w (their "
        "own top 20 tokens and sign), gives the column *directions at the same cosine*: a channel adds "
        "something only where it passes more often than they do. Untestable: fewer than "
        f"{result['min_positions']} positions to rest on. Brackets: 95 % bootstrap intervals over "
        f"channels; * fewer than {SMALL} channels tested.",
        "",
        "## By kind and side",
        "",
        *HEADER,
    ]
    for kind, name in kinds:
        for side in sides:
            cell = [c for c in channels if c["kind"] == kind and c["side"] == side]
            if cell:
                lines.append(_row(f"{name}, {side}", cell))
    lines += ["", "## By kind and layer", "", *HEADER]
    for kind, name in kinds:
        for layer in result["layers"]:
            cell = [c for c in channels if c["kind"] == kind and c["layer"] == layer]
            if cell:
                lines.append(_row(f"{name}, layer {layer}", cell))
    lines += ["", "## By kind and channel index", "", *HEADER]
    for kind, name in kinds:
        for k in range(result["channels_per_vector"]):
            cell = [c for c in channels if c["kind"] == kind and c["channel"] == k]
            if cell:
                lines.append(_row(f"{name}, channel {k}", cell))
    lines += ["", "## Generic channels and the rest", "", *HEADER]
    for kind, name in kinds:
        for label, flag in (("flagged generic", True), ("not flagged", False)):
            cell = [c for c in channels if c["kind"] == kind and c["generic"] == flag]
            if cell:
                lines.append(_row(f"{name}, {label}", cell))
    lines += ["", "## What this says", "", *_findings(channels, kinds), ""]
    return "\n".join(lines)


def _findings(channels, kinds) -> list[str]:
    out = []
    for kind, name in kinds:
        cell = [c for c in channels if c["kind"] == kind]
        tested = [c for c in cell if c["passed"] is not None]
        if not cell:
            continue
        rate = share(c["passed"] for c in tested)
        low, high = interval([c["passed"] for c in tested], share)
        rates = finite(_direction_rate(c) for c in cell)
        d_rate, (d_low, d_high) = share(rates), interval(rates, share)
        verdict = (
            "no better than chance (5 %)"
            if low <= 0.05
            else "above chance, the channels carry what the neuron does on text"
            if rate >= 0.5
            else "above chance, but most channels do not pass"
        )
        against = (
            "more often than"
            if low > d_high
            else "less often than"
            if high < d_low
            else "no more often than (intervals overlap)"
        )
        out.append(
            f"- {name.capitalize()} vectors: {rate:.0%} of {len(tested)} tested channels pass "
            f"[{low:.0%}, {high:.0%}]: {verdict}; {share(c['passed'] is None for c in cell):.0%} of "
            f"{len(cell)} are untestable on this corpus. Random directions at the same cosines pass "
            f"{d_rate:.0%} [{d_low:.0%}, {d_high:.0%}]: the channels pass {against} them."
        )
    untestable = [c for c in channels if c["passed"] is None]
    if untestable:
        common = Counter(tuple(c["tokens"][:5]) for c in untestable).most_common(1)[0]
        out.append(
            f"- Untestable: {len(untestable)} of {len(channels)} channels "
            f"({share(c['passed'] is None for c in channels):.0%}), "
            f"{share(c['generic'] for c in untestable):.0%} of them flagged generic; their tokens are "
            f"ones this corpus (Python's documentation, docstrings and source, and SmolLM2's own "
            f"passages) barely holds. The most common set, in {common[1]} channels: "
            f"{', '.join(repr(t) for t in common[0])}. A corpus of general prose "
            "(`channelscope corpus add FILE`) would test them."
        )
    return out
