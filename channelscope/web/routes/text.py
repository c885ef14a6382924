"""What a neuron does on real text: its top contexts and densities from the stored activation
pass (worker/activations.py), and its channels checked against them (method/behaviour.py)."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request

from channelscope.core import tables as T
from channelscope.core.stats import finite_or
from channelscope.core.tokens import label
from channelscope.method import behaviour, rotate
from channelscope.method.measures import TOP_K, tail_sign
from channelscope.web import lookup, pages, plots, queries, urls
from channelscope.web.database import DbSession
from channelscope.web.responses import Result, page
from channelscope.web.routes.params import Layer, ModelName, Neuron
from channelscope.worker import activations, token_sums

router = APIRouter()

MEANINGS = {
    "activation": "act(x . w_gate) * (x . w_in): what the neuron writes, times w_out",
    "gate": "x . w_gate, the gate's pre-activation",
    "in": "x . w_in, the up projection's pre-activation",
}


@page(
    router,
    "/m/{model}/{layer}/{neuron}/text",
    "text.html",
    pages.TextPage,
    "What a neuron does on real text: top contexts, densities, its channels at the peaks",
)
def text_page(request: Request, session: DbSession, model: ModelName, layer: Layer, neuron: Neuron) -> Result:
    """The neuron's top contexts over the stored corpus with the activation at every token, the
    density of its activation and both pre-activations, and for each channel of the newest run
    whether its tokens sit at the peaks more (or less) often than the corpus's own share of them.
    Revalidated, never immutable: it changes when a pass is stored."""
    model_row = lookup.model(session, model)
    lookup.check(model_row, layer=layer, neuron=neuron)
    name = model_row.name
    found = activations.neuron(session, model_row.id, layer, neuron)
    common = dict(
        model=lookup.model_out(model_row),
        layer=layer,
        neuron=neuron,
        neuron_url=urls.neuron(name, layer, neuron),
        json_url=urls.text(name, layer, neuron, json=True),
    )
    if found is None:
        message = (
            f"No activation pass is stored for {name}: `channelscope activations {name}` computes one "
            "(bin/up runs it after the default slice)."
        )
        empty = dict(corpus=None, documents=None, tokens=None, threshold=None)
        return Result(
            pages.TextPage(
                **common, **empty, stored=False, message=message, densities=[], contexts=[], channels=[]
            )
        )
    vocab = lookup.vocab(session, model_row)
    # One context per document, but the corpus holds near-copies (a paragraph in the docs and in a
    # docstring): a window already shown, token for token, is not shown again.
    seen: set[bytes] = set()
    contexts, shown = [], []
    for row, (ids, values) in enumerate(zip(found.window_tokens, found.window_values, strict=True)):
        if ids.tobytes() not in seen:
            seen.add(ids.tobytes())
            shown.append(row)
            contexts.append(_context(vocab.tokens, ids, values, len(contexts) + 1))
    windows = found.window_tokens[shown]  # [K, W], the contexts shown: a copy is not a second hit
    densities = [
        pages.Density(
            signal=signal,
            meaning=MEANINGS[signal],
            low=-float(found.ranges[i]),
            high=float(found.ranges[i]),
            counts=found.counts[i].tolist(),
        )
        for i, signal in enumerate(activations.SIGNALS)
    ]
    counts = activations.token_counts(session, model_row.id, found.corpus)
    sums = token_sums.read_stats(request.app.state.data_dir, model_row, found.corpus, layer)
    channels = (
        []
        if counts is None
        else _channels_at_peaks(session, model_row, layer, neuron, windows, counts, vocab.tokens, sums)
    )
    for channel in channels:  # each context names the channels whose tokens it holds there
        for number in channel.hit_contexts:
            contexts[number - 1].channels.append(f"{channel.side} {channel.index}")
    message = (
        f"{len(contexts)} top contexts over {found.documents:,} documents ({found.tokens:,} tokens) "
        f"of corpus {found.corpus}, one per document."
    )
    if counts is None:
        message += (
            " The corpus's token counts are not stored (a pass older than them): channels are not checked."
        )
    elif sums is None:
        message += (
            " The pass's per-token sums are not in this server's data directory (a pass older than them, "
            f"or run on another machine): `channelscope activations {name}` here writes them, and each "
            "channel's test over every position shows up."
        )
    charts = {
        "densities": [
            plots.density(d, found.threshold if d.signal == "activation" else None) for d in densities
        ]
    }
    return Result(
        pages.TextPage(
            **common,
            stored=True,
            message=message,
            corpus=found.corpus,
            documents=found.documents,
            tokens=found.tokens,
            threshold=round(found.threshold, 4),
            densities=densities,
            contexts=contexts,
            channels=channels,
        ),
        plots=charts,
    )


def _context(tokens: list[str], ids: np.ndarray, values: np.ndarray, number: int) -> pages.TopContext:
    inside = ids >= 0  # the window runs off the document at either end
    shown = [
        pages.ContextToken(id=int(t), token=tokens[int(t)], activation=round(float(v), 4))
        for t, v in zip(ids[inside], values[inside], strict=True)
    ]
    peak_index = activations.BEFORE - int((~inside[: activations.BEFORE]).sum())
    return pages.TopContext(
        number=number, peak=shown[peak_index].activation, peak_index=peak_index, tokens=shown, channels=[]
    )


def _channels_at_peaks(
    session, model_row, layer, neuron, windows: np.ndarray, counts, tokens, sums
) -> list[pages.ChannelAtPeaks]:
    out = []
    bins = behaviour.frequency_bins(counts)
    for side in model_row.sides.split(","):
        _, row = lookup.neuron_side(session, model_row.name, layer, neuron, side, None, missing_ok=True)
        if row is None:
            continue
        top = queries.channel_tokens(session, [row.id])
        w = T.neuron_vector(row.vector).astype(np.float64)  # [d], for the read sides' test
        for ch in queries.channels(session, [row.id]):
            ids = np.array([t for t, _ in top.get((row.id, ch.channel), [])[:TOP_K]], dtype=np.int64)
            # faithfulness is the neuron's mean z on the channel's tokens, oriented by the
            # channel's tail: its sign times the tail's is the neuron's own sign on them.
            raises = ch.faithfulness * tail_sign(ch.skew) > 0
            found_at = behaviour.at_peaks(windows, activations.BEFORE, side, ids, counts, raises)
            every = None
            if sums is not None and len(ids):
                every = _every_position(sums, side, layer, neuron, ch.channel, w, ids, raises, bins)
            out.append(
                pages.ChannelAtPeaks(
                    side=side,
                    index=ch.channel,
                    url=urls.channel(model_row.name, layer, neuron, side, ch.channel, run=row.hash),
                    label=label([tokens[int(i)] for i in ids]),
                    position=found_at.position,
                    contexts=found_at.contexts,
                    hits=found_at.hits,
                    chance=round(found_at.chance, 6),
                    expected=round(found_at.expected, 3),
                    low=round(found_at.low, 3),
                    high=round(found_at.high, 3),
                    p_value=round(found_at.p_value, 4),
                    expected_direction=found_at.expected_direction,
                    verdict=found_at.verdict,
                    hit_contexts=[row + 1 for row in found_at.hit_rows],
                    every_position=every,
                    faithfulness_percentile=round(ch.faithfulness_percentile, 1),
                    percentile_local=None if ch.percentile_local is None else round(ch.percentile_local, 1),
                )
            )
    return out


def _every_position(sums, side, layer, neuron, channel, w, ids, raises, bins) -> pages.EveryPosition:
    # The random sets are drawn from a generator seeded by the channel's coordinates: a page
    # shows the same figure every time it is served.
    generator = np.random.default_rng(rotate.neuron_seed(channel, layer, side, neuron))
    tokens = np.unique(ids)
    sets = behaviour.matched_sets(tokens, bins, behaviour.RANDOM_SETS, generator)
    found = behaviour.every_position(sums, side, neuron, w, tokens, raises, sets)
    return pages.EveryPosition(
        effect=finite_or(round(found.value, 4), None),
        random_median=finite_or(round(found.random_median, 4), None),
        random_sets=behaviour.RANDOM_SETS,
        percentile=None if found.passed is None else round(found.percentile, 1),
        positions=found.positions,
        passed=found.passed,
    )
