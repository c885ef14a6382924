"""A model's layer x side overview, a layer's table of neurons, and the random-neuron jump."""

from __future__ import annotations

import math
import random
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse

from channelscope.web import lookup, pages, plots, queries, urls
from channelscope.web.database import DbSession
from channelscope.web.errors import Malformed, NotFound
from channelscope.web.responses import Result, page, problem_responses
from channelscope.web.routes.params import Layer, ModelName, RunParam, Side

router = APIRouter()

SORT_LABELS = {
    "percentile": "best faithfulness percentile",
    "kurtosis": "neuron kurtosis",
    "best_kurtosis": "best channel kurtosis",
    "channels": "channels above the cut-off",
    "reconstruction": "reconstruction",
}


# Before the layer page: `/m/{model}/{layer}` would take `random` for a layer and fail its int check.
@router.get(
    "/m/{model}/random",
    tags=["pages"],
    summary="A random computed neuron (redirect)",
    status_code=303,
    response_class=RedirectResponse,
    responses={303: {"description": "to a neuron page"}} | problem_responses(html=True),
)
def random_neuron(
    request: Request, session: DbSession, model: ModelName, run: RunParam = None, side: Side | None = None
):
    """ "I'm feeling lucky": a uniformly drawn layer side that has neurons, then a uniformly
    drawn neuron id, moved to the next computed one."""
    model_row = lookup.model(session, model)
    run_row = lookup.run(session, model_row, run)
    choices = [r for r in queries.layer_sides_of_run(session, run_row.run_id) if side in (None, r.side)]
    if not choices:
        raise NotFound(f"This run has no computed neurons on side {side!r}.")
    layer, chosen_side = random.choice(choices)
    neuron = queries.random_neuron(
        session, run_row.run_id, layer, chosen_side, random.randrange(model_row.d_mlp)
    )
    target = urls.neuron(model_row.name, layer, neuron, chosen_side, run=run)
    return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})


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
    if run_row is None:
        return Result(pages.ModelPage(model=out, run=None, pinning=None, runs=runs, cells=[], random_url=""))
    run_out = next(r for r in runs if r.hash == run_row.hash)
    pin = run if run is not None else None
    cells = [
        pages.LayerSideCell(
            layer=r.layer,
            side=r.side,
            url=urls.layer(model_row.name, r.layer, r.side, run=pin),
            neurons=r.neurons,
            mean_kurtosis=float(r.mean_kurtosis or 0.0),
            max_kurtosis=float(r.max_kurtosis or 0.0),
            mean_channels=float(r.mean_channels or 0.0),
            best_percentile=float(r.best_percentile or 0.0),
        )
        for r in sorted(queries.layer_side_summary(session, run_row.run_id), key=lambda r: (r.layer, r.side))
    ]
    result = pages.ModelPage(
        model=out,
        run=run_out,
        pinning=lookup.pinning(run is not None, urls.model(model_row.name, run=run_row.hash)),
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
    if not sep or parsed is None or not math.isfinite(parsed[0]) or not 0 <= parsed[1] < 10**9:
        raise Malformed(f"after must look like 12.5~37 (a sort value and a neuron), not {after!r}")
    return parsed


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
    sort: Literal["percentile", "kurtosis", "best_kurtosis", "channels", "reconstruction"] = "percentile",
    order: Literal["desc", "asc"] = "desc",
    after: Annotated[str | None, Query(max_length=64, description="keyset cursor: value~neuron")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    neuron: Annotated[int | None, Query(ge=0, le=10**9, description="jump to this neuron")] = None,
    run: RunParam = None,
):
    """A layer side's neurons sorted by best channel faithfulness percentile (the neurons whose
    channels are real come first), kurtosis, best channel kurtosis, channel count or
    reconstruction; keyset pagination."""
    model_row = lookup.model(session, model)
    lookup.check(model_row, layer=layer, side=side)
    if neuron is not None:  # the jump-to-neuron box: a GET form cannot put a value in the path
        lookup.check(model_row, neuron=neuron)
        json = request.url.path.endswith(".json")  # the JSON twin jumps to the neuron's JSON twin
        target = urls.neuron(model_row.name, layer, neuron, side, run=lookup.run_hash(run), json=json)
        return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
    cursor = _cursor(after)
    run_row = lookup.run(session, model_row, run, layer)
    progress = queries.run_progress(session, run_row.run_id)
    run_out = lookup.run_out(model_row.name, run_row, progress)
    rows = queries.layer_neurons(
        session, run_row.run_id, layer, side, sort, order == "desc", cursor, limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    pin = run if run is not None else None
    name = model_row.name

    def here(**changes) -> str:
        params = {"sort": sort, "order": order, "limit": limit, "run": pin} | changes
        params = {
            "sort": None if params["sort"] == "percentile" else params["sort"],
            "order": None if params["order"] == "desc" else params["order"],
            "limit": None if params["limit"] == 50 else params["limit"],
            "run": params["run"],
            "after": params.get("after"),
        }
        return urls.layer(name, layer, changes.get("side", side), **params)

    last = rows[-1] if rows else None
    result = pages.LayerPage(
        model=lookup.model_out(model_row),
        run=run_out,
        pinning=lookup.pinning(run is not None, here(run=run_row.hash, after=after)),
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
        rows=[
            pages.NeuronRow(
                neuron=r.neuron,
                url=urls.neuron(name, layer, r.neuron, side, run=pin),
                kurtosis=r.kurtosis,
                best_percentile=r.best_percentile,
                best_kurtosis=r.best_kurtosis,
                channel_count=r.channel_count,
                generic_count=r.generic_count,
                reconstruction=r.reconstruction[-1] if r.reconstruction else 0.0,
                reconstruction_baseline=r.reconstruction_baseline[-1] if r.reconstruction_baseline else 0.0,
            )
            for r in rows
        ],
        first_url=here(),
        next_url=here(after=f"{last.sort_value!r}~{last.neuron}") if more and last else None,
        layer_urls={i: urls.layer(name, i, side, run=pin) for i in range(model_row.n_layers)},
    )
    return Result(result)
