"""A model's layer x side overview, a layer's table of neurons, and the random-neuron jump."""

from __future__ import annotations

import math
import random
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse

from channelscope.core.tokens import label
from channelscope.web import lookup, overview, pages, plots, queries, urls
from channelscope.web.database import DbSession
from channelscope.web.errors import Malformed, NotFound
from channelscope.web.responses import Result, page, problem_responses
from channelscope.web.routes.params import Layer, ModelName, RunParam, Side

router = APIRouter()

SORT_LABELS = {
    "score": "score (against random vectors)",
    "percentile": "best faithfulness percentile",
    "kurtosis": "neuron kurtosis",
    "best_kurtosis": "best channel kurtosis",
    "channels": "channels above the cut-off",
    "reconstruction": "reconstruction",
}


def _random_target(session, model: str, run: str | None, side: str | None, json: bool) -> str:
    """A neuron drawn uniformly: with the overview (every neuron has a page) and no run pinned,
    over every vector of the model; otherwise over the neurons the run has computed (a layer side
    weighted by its count, then one of its neurons), never "the next computed one after a random
    id", which piles the draws onto the neuron after the largest gap."""
    model_row = lookup.model(session, model)
    everywhere = [key for key in overview.layer_summary(session, model_row) if side in (None, key[1])]
    if run is None and everywhere:
        layer, chosen_side = random.choice(everywhere)
        return urls.neuron(model_row.name, layer, random.randrange(model_row.d_mlp), chosen_side, json=json)
    run_row = lookup.run(session, model_row, run)
    counts = [r for r in queries.neuron_counts_of_run(session, run_row.run_id) if side in (None, r.side)]
    if not counts:
        raise NotFound(f"This run has no computed neurons on side {side!r}.")
    (chosen,) = random.choices(counts, weights=[r.neurons for r in counts])
    neuron = random.choice(queries.neuron_ids(session, run_row.run_id, chosen.layer, chosen.side))
    return urls.neuron(model_row.name, chosen.layer, neuron, chosen.side, run=run, json=json)


# Before the layer page: `/m/{model}/{layer}` would take `random` for a layer and fail its int check.
@router.get(
    "/m/{model}/random",
    tags=["pages"],
    summary="A random neuron (redirect)",
    status_code=303,
    response_class=RedirectResponse,
    responses={303: {"description": "to a neuron page"}} | problem_responses(html=True),
)
def random_neuron(
    request: Request, session: DbSession, model: ModelName, run: RunParam = None, side: Side | None = None
):
    """ "I'm feeling lucky": a uniformly drawn neuron of the model, or of the pinned run."""
    target = _random_target(session, model, run, side, json=False)
    return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})


@router.get(
    "/m/{model}/random.json",
    tags=["json"],
    summary="A random neuron (redirect to its JSON twin)",
    status_code=303,
    response_class=RedirectResponse,
    responses={303: {"description": "to a neuron page's JSON twin"}} | problem_responses(html=False),
)
def random_neuron_json(
    request: Request, session: DbSession, model: ModelName, run: RunParam = None, side: Side | None = None
):
    """The JSON twin of the jump: a redirect to the drawn neuron's `.json`, as the page goes to
    its HTML."""
    target = _random_target(session, model, run, side, json=True)
    return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})


_summaries: dict[tuple[str, int, int], list] = {}


def _summary(session, run_id: int, neurons_done: int) -> list:
    """The run's per layer side aggregates, kept while the run has this many neurons: they
    change only when a shard commits, and aggregating a whole run took 76 ms on a 1.1 M-channel
    store."""
    key = (str(session.get_bind().url), run_id, neurons_done)  # run ids repeat across databases
    if key not in _summaries:
        if len(_summaries) > 64:
            _summaries.clear()
        _summaries[key] = list(queries.layer_side_summary(session, run_id))
    return _summaries[key]


@page(router, "/m/{model}", "model.html", pages.ModelPage, "A model: layer x side heatmaps")
def model_page(request: Request, session: DbSession, model: ModelName, run: RunParam = None) -> Result:
    """Heatmaps of neuron kurtosis and of channels above the junk cut-off, per layer and side,
    for the pinned run or the newest run with neurons."""
    model_row = lookup.model(session, model)
    out = lookup.model_out(model_row)
    runs = [lookup.run_out(model_row.name, r, r) for r in queries.runs_with_progress(session, model_row.id)]
    if run is None:
        run_row = queries.newest_run(session, model_row.id)
    else:
        run_row = lookup.run(session, model_row, run)
    raw = overview.layer_summary(session, model_row)
    if run_row is None and not raw:
        return Result(pages.ModelPage(model=out, run=None, pinning=None, runs=runs, cells=[], random_url=""))
    run_out = next(r for r in runs if r.hash == run_row.hash) if run_row is not None else None
    pin = run if run is not None else None
    computed = {}
    if run_row is not None:
        computed = {(r.layer, r.side): r for r in _summary(session, run_row.run_id, run_out.neurons_done)}
    cells = []
    for layer, side in sorted(set(raw) | set(computed)):
        r, k = computed.get((layer, side)), raw.get((layer, side))
        cells.append(
            pages.LayerSideCell(
                layer=layer,
                side=side,
                url=urls.layer(model_row.name, layer, side, run=pin),
                neurons=r.neurons if r is not None else 0,
                # The raw kurtosis of every vector where the overview has them, else the computed ones.
                vectors=k[2] if k is not None else r.neurons,
                mean_kurtosis=k[0] if k is not None else float(r.mean_kurtosis or 0.0),
                max_kurtosis=k[1] if k is not None else float(r.max_kurtosis or 0.0),
                mean_channels=float(r.mean_channels or 0.0) if r is not None else None,
                best_percentile=float(r.best_percentile or 0.0) if r is not None else None,
            )
        )
    result = pages.ModelPage(
        model=out,
        run=run_out,
        pinning=lookup.pinning(
            run is not None, urls.model(model_row.name, run=run_row.hash if run_row else None)
        ),
        runs=runs,
        cells=cells,
        random_url=urls.random_neuron(model_row.name, run=pin),
    )
    heatmaps = [
        plots.layer_side_heatmap(cells, out.n_layers, out.sides, "mean_kurtosis"),
        plots.layer_side_heatmap(cells, out.n_layers, out.sides, "mean_channels"),
    ]
    return Result(result, plots=heatmaps)


def _cursor(after: str | None) -> tuple[float, int] | None:
    """`after=<sort value>~<neuron>`: the last row of the previous page."""
    if after is None:
        return None
    value, sep, neuron = after.rpartition("~")
    try:
        parsed = (float(value), int(neuron))
    except ValueError:
        parsed = None
    # nan: the last row had no value for the sort (a neuron without channels)
    if not sep or parsed is None or math.isinf(parsed[0]) or not 0 <= parsed[1] < 10**9:
        raise Malformed(f"after must look like 12.5~37 (a sort value and a neuron), not {after!r}")
    return parsed


# The NeuronRow field each sort orders by.
SORT_FIELDS = {
    "score": "score",
    "percentile": "best_percentile",
    "kurtosis": "kurtosis",
    "best_kurtosis": "best_kurtosis",
    "channels": "channel_count",
    "reconstruction": "reconstruction",
}


def _row(
    name, layer, side, pin, neuron: int, kurtosis: float, raw_tokens: str | None, r, channels: int = 0
) -> pages.NeuronRow:
    """A layer table row: the raw kurtosis always, the channel columns where r (a stored neuron
    row of the run, of a run with `channels` per vector) exists. The store keeps 0 as the best
    percentile of a neuron whose channels are all generic; the page says "none"."""
    eligible = r is not None and r.generic_count < channels
    return pages.NeuronRow(
        neuron=neuron,
        url=urls.neuron(name, layer, neuron, side, run=pin),
        kurtosis=kurtosis,
        raw_tokens=raw_tokens,
        has_channels=r is not None,
        best_percentile=r.best_percentile if eligible else None,
        score=r.score if r is not None else None,
        best_kurtosis=r.best_kurtosis if r is not None else None,
        channel_count=r.channel_count if r is not None else None,
        generic_count=r.generic_count if r is not None else None,
        reconstruction=(r.reconstruction[-1] if r.reconstruction else 0.0) if r is not None else None,
        reconstruction_baseline=(r.reconstruction_baseline[-1] if r.reconstruction_baseline else 0.0)
        if r is not None
        else None,
    )


def _best_channels(session, model_row, run_row, layer, side, rows, pin) -> None:
    """Each row's best channel (highest faithfulness percentile, lowest index on ties) and its
    first tokens, so that the table can be skimmed for what its neurons do."""
    found: dict[int, dict[int, list]] = {}
    for r in queries.best_channel_labels(
        session, run_row.run_id, layer, side, [row.neuron for row in rows if row.has_channels]
    ):
        found.setdefault(r.neuron, {}).setdefault(r.channel, [r.faithfulness_percentile, {}])[1][r.rank] = (
            r.token_id
        )
    tokens = lookup.vocab(session, model_row).tokens
    for row in rows:
        channels = found.get(row.neuron)
        if not channels:
            continue
        best = min(channels, key=lambda c: (-channels[c][0], c))
        ids = channels[best][1]
        row.best_channel = best
        row.best_channel_tokens = label([tokens[ids[k]] for k in sorted(ids)])
        row.best_channel_url = urls.channel(model_row.name, layer, row.neuron, side, best, run=run_row.hash)


def _cursor_value(value) -> str:
    return "nan" if value is None else repr(float(value))


def _every_neuron(session, model_row, layer, side, pin, run_row, arrays, sort, order, cursor, limit):
    """All of a layer side's neurons (d_mlp rows from the overview), with the run's channel
    columns where it has them, sorted here: rows without a value for the sort go last in either
    order, ties by neuron id. Keyset pages: `after` names the last row's value and neuron."""
    computed = {}
    if run_row is not None:
        for r in queries.layer_neurons(session, run_row.run_id, layer, side, "kurtosis", True, None, 10**6):
            computed[r.neuron] = r
    name, vocab = model_row.name, lookup.vocab(session, model_row)
    kurtosis = arrays.stats["kurtosis"]
    rows = [
        _row(
            name,
            layer,
            side,
            pin,
            n,
            float(kurtosis[n]),
            label([vocab.tokens[i] for i in arrays.top_ids[n]]),
            computed.get(n),
            run_row.run_channels if run_row is not None else 0,
        )
        for n in range(len(kurtosis))
    ]
    field, sign = SORT_FIELDS[sort], -1.0 if order == "desc" else 1.0

    def key(row):
        value = getattr(row, field)
        return (value is None, 0.0 if value is None else sign * value, row.neuron)

    rows.sort(key=key)
    if cursor is not None:
        value, neuron = cursor
        mark = (value != value, 0.0 if value != value else sign * value, neuron)  # nan: a row without one
        rows = [r for r in rows if key(r) > mark]
    page_rows = rows[:limit]
    last = page_rows[-1] if page_rows else None
    return page_rows, len(rows) > limit, getattr(last, field) if last else None


@page(
    router,
    "/m/{model}/{layer}",
    "layer.html",
    pages.LayerPage,
    "A layer's neurons, sortable",
    redirect="with ?neuron=: to that neuron's page (the jump-to-neuron box)",
)
def layer_page(
    request: Request,
    session: DbSession,
    model: ModelName,
    layer: Layer,
    side: Side = "out",
    sort: Literal["score", "percentile", "kurtosis", "best_kurtosis", "channels", "reconstruction"] = "score",
    order: Literal["desc", "asc"] = "desc",
    after: Annotated[str | None, Query(max_length=64, description="keyset cursor: value~neuron")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    neuron: Annotated[int | None, Query(ge=0, le=10**9, description="jump to this neuron")] = None,
    run: RunParam = None,
):
    """A layer side's neurons sorted by their score (their best channel against random vectors'
    best: the neurons whose channels beat random vectors' come first), best channel faithfulness
    percentile, kurtosis, best channel kurtosis, channel count or
    reconstruction; keyset pagination."""
    model_row = lookup.model(session, model)
    lookup.check(model_row, layer=layer, side=side)
    if neuron is not None:  # the jump-to-neuron box: a GET form cannot put a value in the path
        lookup.check(model_row, neuron=neuron)
        json = request.url.path.endswith(".json")  # the JSON twin jumps to the neuron's JSON twin
        target = urls.neuron(model_row.name, layer, neuron, side, run=lookup.run_hash(run), json=json)
        return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
    cursor = _cursor(after)
    arrays = overview.layer(session, model_row, layer, side)
    if arrays is None or run is not None:
        run_row = lookup.run(session, model_row, run, layer)
    else:  # every neuron is listed; the channel columns come from the newest run, if any
        run_row = queries.newest_run(session, model_row.id, layer)
    run_out = None
    if run_row is not None:
        run_out = lookup.run_out(model_row.name, run_row, queries.run_progress(session, run_row.run_id))
    pin = run if run is not None else None
    name = model_row.name
    if arrays is None:  # only what the run computed: sorted and paged in the database
        if cursor is not None and math.isnan(cursor[0]):
            raise Malformed(f"after must look like 12.5~37 (a sort value and a neuron), not {after!r}")
        rows = queries.layer_neurons(
            session, run_row.run_id, layer, side, sort, order == "desc", cursor, limit + 1
        )
        more = len(rows) > limit
        last_value = rows[min(limit, len(rows)) - 1].sort_value if rows else None  # the stored value
        channels = run_row.run_channels
        rows = [_row(name, layer, side, pin, r.neuron, r.kurtosis, None, r, channels) for r in rows[:limit]]
    else:
        rows, more, last_value = _every_neuron(
            session, model_row, layer, side, pin, run_row, arrays, sort, order, cursor, limit
        )

    def here(**changes) -> str:
        params = {"sort": sort, "order": order, "limit": limit, "run": pin} | changes
        params = {
            "sort": None if params["sort"] == "score" else params["sort"],
            "order": None if params["order"] == "desc" else params["order"],
            "limit": None if params["limit"] == 50 else params["limit"],
            "run": params["run"],
            "after": params.get("after"),
        }
        return urls.layer(name, layer, changes.get("side", side), **params)

    # Links only to layers with something to show on this side (a layer page without the overview
    # or a run is a 404): the pinned run's layers, or the overview's and the run shown here.
    present = (
        set()
        if run is not None
        else {k[0] for k in overview.layer_summary(session, model_row) if k[1] == side}
    )
    if run_row is not None:
        present |= {r.layer for r in queries.neuron_counts_of_run(session, run_row.run_id) if r.side == side}
    if run_row is not None:
        _best_channels(session, model_row, run_row, layer, side, rows, pin)
    last = rows[-1] if rows else None
    result = pages.LayerPage(
        model=lookup.model_out(model_row),
        run=run_out,
        pinning=lookup.pinning(run is not None, here(run=run_row.hash if run_row else None, after=after)),
        layer=layer,
        side=side,
        side_urls={s: here(side=s) for s in model_row.sides.split(",")},
        sort=sort,
        order=order,
        sorts=[
            pages.SortLink(sort=s, label=label, url=here(sort=s, order="desc"), active=s == sort)
            for s, label in SORT_LABELS.items()
        ],
        limit=limit,
        after=after,
        rows=rows,
        first_url=here(),
        next_url=here(after=f"{_cursor_value(last_value)}~{last.neuron}") if more and last else None,
        layer_urls={i: urls.layer(name, i, side, run=pin) for i in sorted(present | {layer})},
    )
    return Result(result)
