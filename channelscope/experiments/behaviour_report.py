"""`channelscope behaviour`: do a neuron's channels say what it does on real text? (reports/behaviour.md)

For the most vocabulary-aligned vectors and random ones of a few layers, every side, apart:
decompose them with the default settings, run the model once over the real corpus keeping the
MLP input x at those layers, and test each channel against frequency-matched random token sets
(method/behaviour.py; docs/method.md, "Behaviour on real text"):

- read sides (gate, in): the AUROC of the neuron's pre-activation x . w at positions whose token
  is one of the channel's top 20, against every other position;
- out: among the positions where the neuron is active (act(x . w_gate) * (x . w_in) above its
  90th percentile over these positions), the share whose next token is one of them.

Both oriented by the neuron's sign on the channel's tokens, and both set against the same figure
for RANDOM_SETS sets of tokens as common in the corpus. A channel passes at percentile >= 95: 5 %
pass by chance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from channelscope.core.stats import interval, median, share
from channelscope.method import behaviour
from channelscope.method.decomposer import Decomposer
from channelscope.method.measures import tail_sign
from channelscope.method.sampling import Sampled, most_aligned, random_neurons
from channelscope.worker import corpus
from channelscope.worker.store import ALGORITHM_VERSION

ALIGNED, RANDOM = "aligned", "random"
QUANTILE = 0.9  # "active": above this quantile of the activation over the pass's positions


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


def positions(lm, texts: list[str], max_tokens: int) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """The sequences, every position's token [N] and the token after it in its document [N] (-1
    at a document's end)."""
    sequences = [s for s in corpus.encode(lm, texts, max_tokens) if len(s) > 1]
    tokens = np.concatenate([np.asarray(s) for s in sequences])
    following = np.concatenate([np.append(np.asarray(s[1:]), -1) for s in sequences])
    return sequences, tokens, following


def evaluate(model, lm, decomposer: Decomposer, texts: list[str], corpus_key: str, layers: list[int],
             aligned: int, random: int, seed: int = 0, max_tokens: int = 256, log=print) -> dict:  # fmt: skip
    started = time.perf_counter()
    rows = sample(model, layers, aligned, random, seed)
    log(f"decomposing {len(rows)} vectors")
    records = decomposer.anywhere([(r.layer, r.side, r.neuron) for r in rows])
    sequences, tokens, following = positions(lm, texts, max_tokens)
    log(f"the model over {len(sequences)} documents ({len(tokens):,} positions)")
    inputs = corpus.layer_inputs(lm, sequences, {layer: "mlp_input" for layer in layers})  # [N, d] each
    counts = np.bincount(tokens, minlength=model.vocab_size)
    bins = behaviour.frequency_bins(counts)
    generator = np.random.default_rng(seed)
    channels = []
    for row, record in zip(rows, records, strict=True):
        x = inputs[row.layer].double()
        gate = x @ model.vectors(row.layer, "gate")[row.neuron].double()
        up = x @ model.vectors(row.layer, "in")[row.neuron].double()
        if row.side == "out":
            activation = (torch.nn.functional.silu(gate) * up).numpy()
            test = behaviour.WriteSide(activation > np.quantile(activation, QUANTILE), following, len(counts))
        else:
            test = behaviour.ReadSide((gate if row.side == "gate" else up).numpy(), tokens, len(counts))
        for ch in record.channels:
            top = np.unique(ch.top_ids.astype(np.int64))
            raises = ch.faithfulness * tail_sign(ch.skew) > 0
            found = test.test(
                top, raises, behaviour.matched_sets(top, bins, behaviour.RANDOM_SETS, generator)
            )
            channels.append(
                {
                    "kind": row.group,
                    "layer": row.layer,
                    "side": row.side,
                    "neuron": row.neuron,
                    "channel": ch.index,
                    "generic": ch.generic,
                    "tokens": [model.vocabulary.tokens[i] for i in ch.top_ids[:8]],
                    "raises": bool(raises),
                    "value": found.value,
                    "random_median": found.random_median,
                    "percentile": found.percentile,
                    "positions": found.positions,
                    "passed": found.passed,
                }
            )
    return {
        "model": model.name,
        "corpus": corpus_key,
        "documents": len(sequences),
        "positions": int(len(tokens)),
        "layers": layers,
        "aligned": aligned,
        "random": random,
        "seed": seed,
        "channels_per_vector": decomposer.settings.channels,
        "solver": decomposer.settings.solver,
        "algorithm_version": ALGORITHM_VERSION,
        "precision": decomposer.settings.precision,
        "random_sets": behaviour.RANDOM_SETS,
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
    small = "*" if len(tested) < 8 else ""
    return (
        f"| {label} | {len(cell)} | {share(c['passed'] is None for c in cell):.0%} | {len(tested)}{small} "
        f"| {share(passed):.0%} [{low:.0%}, {high:.0%}] | {median(pct):.0f} [{p_low:.0f}, {p_high:.0f}] |"
    )


HEADER = [
    "| channels | n | untestable | tested | pass (>= 95th pct) | median percentile |",
    "|---|---|---|---|---|---|",
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
        f"({result['positions']:,} positions).",
        "",
        "Each channel's figure (read sides: the AUROC of the neuron's pre-activation at positions holding "
        "one of its top 20 tokens; `out`: the share of the neuron's active positions whose next token is "
        "one of them), oriented by the neuron's sign on those tokens, is set against the same figure for "
        f"{result['random_sets']} token sets as common in the corpus. It passes at the "
        f"{result['pass_percentile']:.0f}th percentile: **5 % of channels pass by chance**. Untestable: "
        f"fewer than {result['min_positions']} positions to rest on. Brackets: 95 % bootstrap "
        "intervals; * fewer than 8 channels tested.",
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
        verdict = (
            "no better than chance (5 %)"
            if low <= 0.05
            else "above chance, the channels carry what the neuron does on text"
            if rate >= 0.5
            else "above chance, but most channels do not pass"
        )
        out.append(
            f"- {name.capitalize()} vectors: {rate:.0%} of {len(tested)} tested channels pass "
            f"[{low:.0%}, {high:.0%}]: {verdict}; {share(c['passed'] is None for c in cell):.0%} of "
            f"{len(cell)} are untestable on this corpus."
        )
    return out
