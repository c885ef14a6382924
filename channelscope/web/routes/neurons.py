"""A neuron page (one side at a time), its z-score histogram, one channel, and two runs of a
neuron side by side."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from sqlalchemy.engine import Row

from channelscope.core import tables as T
from channelscope.core.schemas import TokenScore, neuron_side
from channelscope.core.tokens import label
from channelscope.web import ablation, lookup, neighbours, overview, pages, plots, queries, urls
from channelscope.web.database import DbSession
from channelscope.web.errors import NotFound
from channelscope.web.responses import Result, finish, page, problem_responses, render_html
from channelscope.web.routes.params import Layer, MinKurtosis, ModelName, Neuron, RunParam, Side

router = APIRouter()

CHANNEL_TOKENS = 100
# Folded on the neuron page below this faithfulness percentile: a channel that random vectors'
# channels beat more often than not is no evidence about the neuron, however sparse it looks.
FOLD_PERCENTILE = 50.0
HISTOGRAM_BINS = 60


def _step_unit(run_row: Row) -> tuple[int, str, int | None]:
    """The paper preset records kurtosis every checkpoint_every steps; the fast solver every
    iteration (docs/method.md, "The fast solver"), and changes stage after its exploration."""
    settings = run_row.settings or {}
    if run_row.solver == "paper":
        return int(settings.get("checkpoint_every", 100)), "step", None
    explore = settings.get("fast_explore_steps")
    return 1, "iteration", int(explore) if explore else None


def _histogram(zs: np.ndarray) -> pages.Histogram:
    counts, edges = np.histogram(zs, bins=HISTOGRAM_BINS)
    return pages.Histogram(
        scored_tokens=int(zs.size),
        bins=[
            pages.HistogramBin(low=float(edges[i]), high=float(edges[i + 1]), count=int(c))
            for i, c in enumerate(counts)
        ],
    )


def _cosines(channel_rows) -> list[list[float]]:
    if not channel_rows:
        return []
    vectors = np.stack([T.channel_vector(ch.vector) for ch in channel_rows])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    return np.round(unit @ unit.T, 4).tolist()


@page(
    router,
    "/m/{model}/{layer}/{neuron}",
    "neuron.html",
    pages.NeuronPage,
    "A neuron side and its channels",
)
def neuron_page(
    request: Request,
    session: DbSession,
    model: ModelName,
    layer: Layer,
    neuron: Neuron,
    side: Side = "out",
    run: RunParam = None,
    min_kurtosis: MinKurtosis = urls.DEFAULT_MIN_KURTOSIS,
) -> Result:
    """One side of a neuron: its raw projection (kurtosis, top and bottom tokens of w @ U) and
    its channels in discovery order with faithfulness and its percentile against random vectors,
    kurtosis curves, the reconstruction beside its random baseline, and the channel x channel
    cosines. A neuron no run has computed yet shows its raw projection, and asks for its channels
    (on a server that computes on demand): the page fills in when they are committed."""
    model_row, row = lookup.neuron_side(session, model, layer, neuron, side, run, missing_ok=True)
    name = model_row.name
    arrays = overview.layer(session, model_row, layer, side) if row is None else None
    if row is None and arrays is None:
        raise NotFound(f"Layer {layer} neuron {neuron} ({side}) of {name} has not been computed yet.")
    vocab = lookup.vocab(session, model_row)
    pin = row.hash if row is not None and run is not None else None

    def neighbour(n: int | None) -> str | None:
        return None if n is None else urls.neuron(name, layer, n, side, pin, min_kurtosis)

    # With the overview every neuron has a page, so the neighbours are the next ids; without it,
    # the neurons the run has computed.
    if row is None or row.in_overview:
        previous, following = (
            neuron - 1 if neuron > 0 else None,
            neuron + 1 if neuron + 1 < model_row.d_mlp else None,
        )
    else:
        previous, following = row.previous, row.next
    common = dict(
        model=lookup.model_out(model_row),
        layer=layer,
        neuron=neuron,
        side=side,
        min_kurtosis=min_kurtosis,
        side_urls={s: urls.neuron(name, layer, neuron, s, pin, min_kurtosis) for s in _sides(model_row, row)},
        layer_url=urls.layer(name, layer, side, run=pin),
        previous_url=neighbour(previous),
        next_url=neighbour(following),
        random_url=urls.random_neuron(name, run=pin),
        histogram_url=urls.histogram(name, layer, neuron, side, row.hash if row is not None else None),
        compare_url=urls.compare(name, layer, neuron, side)
        if row is not None and (run is not None or row.comparable)
        else None,
        text_url=urls.text(name, layer, neuron),
        json_url=urls.neuron(name, layer, neuron, side, pin, min_kurtosis, json=True),
    )
    if row is None:
        return _without_channels(request, model_row, vocab, arrays, common)

    channel_rows = queries.channels(session, [row.id])
    tokens_by_channel = queries.channel_tokens(session, [row.id])
    # Pinned to its run, a neuron's page is immutable: it leaves out what changes as the run grows
    # (its progress), and its neighbours are the next ids (the overview's) rather than the next
    # computed neurons. Without the overview it is not cached for good.
    immutable = run is not None and bool(row.in_overview)
    run_out = lookup.run_out(name, row, None if run is not None else row)
    data = neuron_side(
        name,
        row.hash,
        row,
        channel_rows,
        {ch: pairs for (_, ch), pairs in tokens_by_channel.items()},
        vocab.tokens,
    )

    def channel_url(index: int) -> str:
        return urls.channel(name, layer, neuron, side, index, run=row.hash)

    result = pages.NeuronPage(
        **common,
        run=run_out,
        pinning=lookup.pinning(
            run is not None, urls.neuron(name, layer, neuron, side, row.hash, min_kurtosis)
        ),
        raw=pages.RawProjection(
            source="run",
            norm=data.norm,
            kurtosis=data.kurtosis,
            skew=data.skew,
            top_tokens=data.top_tokens,
            bottom_tokens=data.bottom_tokens,
        ),
        best_percentile=max(
            (ch.faithfulness_percentile for ch in data.channels if not ch.generic), default=None
        ),
        data=data,
        channels_state=None,
        channels=[
            pages.ChannelLink(
                index=ch.index,
                url=channel_url(ch.index),
                label=label([t.token for t in ch.top_tokens]),
                below_cutoff=ch.kurtosis < min_kurtosis,
                below_median=ch.faithfulness_percentile < FOLD_PERCENTILE,
            )
            for ch in data.channels
        ],
        cosines=_cosines(channel_rows),
        ablation=None
        if not data.channels
        else ablation.controls(name, layer, neuron, side, row.hash, data.channels, [], None, min_kurtosis),
    )
    step_size, unit, stage_change = _step_unit(row)
    charts = {
        "curves": plots.kurtosis_curves(data.channels, step_size, unit, stage_change),
        "by_index": plots.kurtosis_by_index(
            data.channels, min_kurtosis, {c.index: c.url for c in result.channels}
        ),
        "reconstruction": plots.reconstruction(data),
        "cosines": plots.cosine_heatmap(result.cosines),
    }
    return Result(result, immutable=immutable, plots=charts)


def _sides(model_row: Row, row: Row | None) -> list[str]:
    """The side tabs: only sides that have a page (queries: has_<side>); a neuron without a run
    has its page from the overview, which covers every side."""
    sides = model_row.sides.split(",")
    return sides if row is None else [s for s in sides if getattr(row, f"has_{s}")]


def _without_channels(request: Request, model_row: Row, vocab, arrays, common: dict) -> Result:
    """The page of a neuron no run has computed: its raw projection, and where its channels
    stand. Asking is idempotent (one job per neuron); a client over its limit gets 429 and a full
    queue 503, each with Retry-After, and the page all the same. While the channels are coming
    the page looks again by itself: htmx polls it with JavaScript, a <noscript> refresh without
    (a Refresh header would reload the page under htmx's feet too)."""
    layer, neuron = common["layer"], common["neuron"]
    asked = request.app.state.demand.ask(
        model_row, layer, neuron, request.client.host if request.client else ""
    )
    coming = asked.state in ("queued", "computing")
    refresh = 5 if coming else None
    status = {"limited": 429, "full": 503}.get(asked.state, 200)
    headers = {}
    if asked.retry_after:
        headers["Retry-After"] = str(asked.retry_after)
    stats = {name: float(values[neuron]) for name, values in arrays.stats.items()}

    def scores(ids, zs) -> list[TokenScore]:
        return [
            TokenScore(id=int(i), token=vocab.tokens[int(i)], z=round(float(z), 4))
            for i, z in zip(ids, zs, strict=True)
        ]

    page_out = pages.NeuronPage(
        **common,
        run=None,
        pinning=lookup.pinning(False, urls.neuron(model_row.name, layer, neuron, common["side"])),
        raw=pages.RawProjection(
            source="overview",
            norm=stats["norm"],
            kurtosis=stats["kurtosis"],
            skew=stats["skew"],
            top_tokens=scores(arrays.top_ids[neuron], arrays.top_z[neuron]),
            bottom_tokens=scores(arrays.bottom_ids[neuron], arrays.bottom_z[neuron]),
        ),
        best_percentile=None,
        data=None,
        channels_state=pages.ChannelsState(
            state=asked.state,
            message=asked.message,
            refresh_url=urls.neuron(
                model_row.name, layer, neuron, common["side"], None, common["min_kurtosis"]
            ),
            refresh_seconds=refresh,
        ),
        channels=[],
        cosines=[],
        ablation=None,
    )
    return Result(page_out, status=status, headers=headers or None)


def _neuron_histogram(session, model, layer, neuron, side, run) -> pages.Histogram:
    """From the run's stored vector; without a run, from the overview's (float16) one."""
    if run is not None:
        model_row, row = lookup.neuron_side(session, model, layer, neuron, side, run)
        vector = T.neuron_vector(row.vector)
    else:
        model_row, row = lookup.model(session, model), None
        lookup.check(model_row, layer=layer, neuron=neuron, side=side)
        arrays = overview.layer(session, model_row, layer, side)
        if arrays is None:
            raise NotFound(f"The raw projections of layer {layer} ({side}) have not been computed yet.")
        vector = arrays.vectors[neuron].float().numpy()
    projection, scored = lookup.projection(session, model_row, row)
    zs = projection.z_scores(vector[None, :], scored)[0]
    return _histogram(zs[scored])


HistogramRun = Annotated[
    str | None,
    Query(
        max_length=64, description="the run hash; without it, the overview's vector (every neuron has one)"
    ),
]


@router.get(
    "/m/{model}/{layer}/{neuron}/histogram.json",
    response_model=pages.Histogram,
    tags=["json"],
    summary="z-score histogram of a neuron side's projection (JSON)",
    responses=problem_responses(html=False),
)
def neuron_histogram_json(
    request: Request,
    session: DbSession,
    model: ModelName,
    layer: Layer,
    neuron: Neuron,
    run: HistogramRun = None,
    side: Side = "out",
):
    hist = _neuron_histogram(session, model, layer, neuron, side, run)
    return finish(request, hist.model_dump_json().encode(), "application/json", immutable=run is not None)


@router.get(
    "/m/{model}/{layer}/{neuron}/histogram.svg",
    tags=["pages"],
    summary="z-score histogram of a neuron side's projection, log scale (SVG)",
    responses={200: {"content": {"image/svg+xml": {"schema": {"type": "string"}}}}}
    | problem_responses(html=True),
)
def neuron_histogram_svg(
    request: Request,
    session: DbSession,
    model: ModelName,
    layer: Layer,
    neuron: Neuron,
    run: HistogramRun = None,
    side: Side = "out",
):
    """A separate image rather than part of the neuron page: w @ U over the whole vocabulary is
    a 28 MFLOP product that reads all of U (~10 ms here), and the page itself stays fast. A
    neuron's vector never changes within a run, so this is immutable."""
    hist = _neuron_histogram(session, model, layer, neuron, side, run)
    chart = plots.histogram(hist, f"Layer {layer} neuron {neuron} ({side}): z-scores of w @ U")
    body = render_html("histogram.svg", request, chart=chart).encode()
    return finish(request, body, "image/svg+xml", immutable=run is not None)


@page(
    router,
    "/m/{model}/{layer}/{neuron}/{side}/{channel}",
    "channel.html",
    pages.ChannelPage,
    "One channel: its top 100 tokens, z histogram and nearest channels",
)
def channel_page(
    request: Request,
    session: DbSession,
    model: ModelName,
    layer: Layer,
    neuron: Neuron,
    side: Annotated[str, Path(max_length=10)],
    channel: Annotated[int, Path(ge=0, le=100_000)],
    run: RunParam = None,
) -> Result:
    """One channel: its top tokens on its tail with z (recomputed from the stored vector and U),
    its z-score histogram, and its nearest channels elsewhere in the run."""
    model_row, row = lookup.neuron_side(session, model, layer, neuron, side, run)
    channel_rows = queries.channels(session, [row.id])
    tokens_by_channel = queries.channel_tokens(session, [row.id])
    vocab = lookup.vocab(session, model_row)
    projection, scored = lookup.projection(session, model_row, row)
    found = [ch for ch in channel_rows if ch.channel == channel]
    if not found:
        last = len(channel_rows) - 1
        raise NotFound(
            f"Layer {layer} neuron {neuron} ({side}) has channels 0-{last} in run {row.hash}, not {channel}."
        )
    ch_row = found[0]
    data = neuron_side(
        model_row.name,
        row.hash,
        row,
        [ch_row],
        {channel: tokens_by_channel.get((row.id, channel), [])},
        vocab.tokens,
    )
    out = data.channels[0]
    sign = 1.0 if ch_row.skew >= 0 else -1.0
    vector = T.channel_vector(ch_row.vector)
    zs = projection.z_scores(vector[None, :], scored)[0]
    oriented = np.where(scored, zs * sign, -np.inf)
    k = min(CHANNEL_TOKENS, int(scored.sum()))
    top = np.argpartition(-oriented, k - 1)[:k]
    top = top[np.argsort(-oriented[top], kind="stable")]
    run_out = lookup.run_out(model_row.name, row, row)
    nearest, note, candidates = neighbours.nearest(
        session,
        row.run_id,
        row.hash,
        run_out.neurons_done,
        row.run_channels,
        (layer, side, neuron, channel),
        row.id,
        ch_row.vector,
    )
    name, pin = model_row.name, row.hash if run is not None else None
    indices = [ch.channel for ch in channel_rows]
    result = pages.ChannelPage(
        model=lookup.model_out(model_row),
        run=run_out,
        pinning=lookup.pinning(run is not None, urls.channel(name, layer, neuron, side, channel, row.hash)),
        layer=layer,
        neuron=neuron,
        side=side,
        neuron_url=urls.neuron(name, layer, neuron, side, pin),
        label=label([t.token for t in out.top_tokens]),
        channel=out,
        tokens=[TokenScore(id=int(i), token=vocab.tokens[i], z=round(float(zs[i]), 4)) for i in top],
        histogram=_histogram(zs[scored]),
        nearest=[
            pages.NearestChannel(
                layer=n.layer,
                side=n.side,
                neuron=n.neuron,
                channel=n.channel,
                cos=round(n.cos, 4),
                url=urls.channel(name, n.layer, n.neuron, n.side, n.channel, row.hash),
            )
            for n in nearest
        ],
        nearest_note=note,
        nearest_candidates=candidates,
        nearest_baseline=round(neighbours.random_max_abs_cos(len(vector), candidates), 4)
        if candidates
        else None,
        ablate_url=urls.ablate(name, layer, neuron, side, row.hash, [channel]),
        text_url=f"{urls.text(name, layer, neuron)}#channel-{side}-{channel}",
        previous_url=urls.channel(name, layer, neuron, side, channel - 1, pin)
        if channel - 1 in indices
        else None,
        next_url=urls.channel(name, layer, neuron, side, channel + 1, pin)
        if channel + 1 in indices
        else None,
        vector=[round(float(x), 5) for x in vector],
        json_url=urls.channel(name, layer, neuron, side, channel, pin, json=True),
    )
    marks = [(float(zs[top[0]]), "top token")] if len(top) else []
    chart = plots.histogram(result.histogram, f"Channel {channel}: z-scores of c @ U", marks)
    step_size, unit, stage_change = _step_unit(row)
    curve = plots.kurtosis_curves([out], step_size, unit, stage_change)
    # Not cached for good: its nearest channels are those of the run as it stands now.
    return Result(result, plots={"histogram": chart, "curve": curve})


@page(
    router,
    "/m/{model}/{layer}/{neuron}/compare",
    "compare.html",
    pages.ComparePage,
    "Two runs of one neuron side by side",
)
def compare_page(
    request: Request,
    session: DbSession,
    model: ModelName,
    layer: Layer,
    neuron: Neuron,
    side: Side = "out",
    a: RunParam = None,
    b: RunParam = None,
) -> Result:
    """Two runs of one neuron side (two seeds, or the fast solver against the paper preset),
    channels matched one-to-one as in docs/method.md, "Seed consistency": the parts orthogonal to w,
    Hungarian on |cos|, beside the same matching for random vectors at the same cosines."""
    model_row = lookup.model(session, model)
    lookup.check(model_row, layer=layer, neuron=neuron, side=side)
    a, b = lookup.run_hash(a), lookup.run_hash(b)
    runs = queries.runs_of_neuron(session, model_row.id, layer, side, neuron)
    if not runs:
        raise NotFound(
            f"Layer {layer} neuron {neuron} ({side}) of {model_row.name} has not been computed yet."
        )
    by_hash = {r.hash: r for r in runs}
    for value in (a, b):
        if value is not None and value not in by_hash:
            lookup.run(session, model_row, value)  # 404 for a run that does not exist at all
            raise NotFound(f"Run {value} has not computed layer {layer} neuron {neuron} ({side}).")
    a = a or runs[0].hash
    b = b or next((r.hash for r in runs if r.hash != a), None)
    name = model_row.name
    result = pages.ComparePage(
        model=lookup.model_out(model_row),
        layer=layer,
        neuron=neuron,
        side=side,
        runs=[
            pages.RunChoice(hash=r.hash, solver=r.solver, seed=r.seed, created_at=T.utc(r.run_created_at))
            for r in runs
        ],
        run_a=None,
        run_b=None,
        a=None,
        b=None,
        matches=[],
        mean_cos=None,
        mean_jaccard=None,
        baseline_cos=None,
        other_neurons_cos=None,
        other_neurons=0,
        message=None,
        neuron_url=urls.neuron(name, layer, neuron, side),
    )
    if b is None or a == b:
        result.message = (
            "Only one run has computed this neuron side: there is nothing to compare it with yet."
        )
        return Result(result)
    run_a, run_b = by_hash[a], by_hash[b]
    rows = {
        r.run_id: r
        for r in queries.neurons_in_runs(session, layer, side, neuron, [run_a.run_id, run_b.run_id])
    }
    channel_rows = queries.channels(session, [r.id for r in rows.values()])
    tokens = queries.channel_tokens(session, [r.id for r in rows.values()])
    vocab = lookup.vocab(session, model_row)

    def side_of(run_row: Row):
        n = rows[run_row.run_id]
        chs = [c for c in channel_rows if c.neuron_id == n.id]
        own = {ch: pairs for (nid, ch), pairs in tokens.items() if nid == n.id}
        return n, chs, neuron_side(name, run_row.hash, n, chs, own, vocab.tokens)

    n_a, chs_a, result.a = side_of(run_a)
    n_b, chs_b, result.b = side_of(run_b)
    # Not cached for good: the list of runs to choose from grows as other runs compute the neuron.
    result.run_a, result.run_b = lookup.run_out(name, run_a, None), lookup.run_out(name, run_b, None)
    if chs_a and chs_b:
        _match(result, n_a, chs_a, chs_b, (layer, side, neuron))
        others = queries.other_neurons(session, run_a.run_id, layer, side, neuron, OTHER_NEURONS)
        other_channels = queries.channels(session, [o.id for o in others])
        _other_neurons(result, n_a, chs_a, others, other_channels)
    return Result(result)


def _neuron_w(row):
    """A stored neuron row's w as float64 [d] (the matchings' precision); torch on first use."""
    import torch

    return torch.from_numpy(T.neuron_vector(row.vector).astype(np.float64))


def _channel_stack(chs):
    """Stored channel rows' vectors as float64 [C, d]."""
    import torch

    return torch.from_numpy(np.stack([T.channel_vector(c.vector).astype(np.float64) for c in chs]))


OTHER_NEURONS = 8  # neurons of the same layer and side that the compare page matches against


def _other_neurons(result: pages.ComparePage, neuron_row, chs, others, other_channels) -> None:
    from channelscope.method import measures

    found = [
        measures.consistency_between(
            _neuron_w(neuron_row), _channel_stack(chs), _neuron_w(o), _channel_stack(own)
        )
        for o in others
        if (own := [c for c in other_channels if c.neuron_id == o.id])
    ]
    result.other_neurons = len(found)
    result.other_neurons_cos = round(float(np.mean(found)), 4) if found else None


def _match(result: pages.ComparePage, neuron_row, chs_a, chs_b, where) -> None:
    # The one definition of seed consistency is the worker's (method/measures.py); it needs
    # torch, so this page alone imports it, on first use.
    import torch

    from channelscope.method import measures, rotate

    w = _neuron_w(neuron_row)
    va, vb = _channel_stack(chs_a), _channel_stack(chs_b)
    rows, cols, cos = measures.matched_cosines(
        measures.residual_directions(w, va), measures.residual_directions(w, vb)
    )
    top_a = [{t.id for t in ch.top_tokens} for ch in result.a.channels]
    top_b = [{t.id for t in ch.top_tokens} for ch in result.b.channels]
    jaccard = [
        len(top_a[i] & top_b[j]) / max(1, len(top_a[i] | top_b[j])) for i, j in zip(rows, cols, strict=True)
    ]
    result.matches = [
        pages.ChannelMatch(a=int(i), b=int(j), cos=round(float(c), 4), jaccard=round(float(s), 4))
        for i, j, c, s in sorted(zip(rows, cols, cos, jaccard, strict=True))
    ]
    result.mean_cos = round(float(np.mean(cos)), 4)
    result.mean_jaccard = round(float(np.mean(jaccard)), 4)
    generator = torch.Generator().manual_seed(rotate.neuron_seed(0, *where))
    cos_a = torch.tensor([c.cos for c in chs_a], dtype=torch.float64)
    cos_b = torch.tensor([c.cos for c in chs_b], dtype=torch.float64)
    result.baseline_cos = round(measures.seed_consistency_baseline(w, cos_a, cos_b, generator), 4)
