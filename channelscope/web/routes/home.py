"""The home page (models and runs, with the progress of runs still being computed), /healthz and
/ping."""

from __future__ import annotations

import logging
import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.exc import SQLAlchemyError

from channelscope.core import db
from channelscope.core.config import config
from channelscope.web import glossary, lookup, pages, queries, urls
from channelscope.web.database import DbSession
from channelscope.web.responses import Result, page

router = APIRouter()
log = logging.getLogger("channelscope.web")


BACKGROUND_PID = "background.pid"  # bin/up writes the pid of the slice it computes behind the site


def background_work() -> str | None:
    """What bin/up is computing behind the site, while it runs: before the overview has stored the
    model, the database alone cannot tell a run that is starting from no run at all."""
    path = config().data_dir / BACKGROUND_PID
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)  # raises if no such process
    except (OSError, ValueError):
        return None
    return (
        "A run is starting: the model is being read and its overview computed (a few minutes on a "
        f"laptop), then the default slice's channels; pages fill in as they come (log: "
        f"{path.with_name('decompose.log').name} in the data folder)."
    )


@page(router, "/", "home.html", pages.HomePage, "Models and runs")
def home(request: Request, session: DbSession) -> Result:
    """Every model, and every run with how far it has got."""
    model_rows = queries.models(session)
    runs_by_model: dict[int, list[pages.RunOut]] = {}
    for row in queries.runs_with_progress(session):
        runs_by_model.setdefault(row.model_id, []).append(lookup.run_out(row.model_name, row, row))
    return Result(
        pages.HomePage(
            models=[
                pages.ModelRuns(model=lookup.model_out(m), runs=runs_by_model.get(m.id, []))
                for m in model_rows
            ],
            search_url=urls.search(),
            starting=background_work(),
        )
    )


@page(router, "/glossary", "glossary.html", pages.GlossaryPage, "What the numbers mean")
def glossary_page(request: Request) -> Result:
    """Channel, excess kurtosis, faithfulness, percentile, generic, alpha*, S and the sign
    convention, each defined once; every number's label on the other pages links here."""
    return Result(pages.GlossaryPage(terms=glossary.TERMS))


@router.get("/ping", response_class=PlainTextResponse, tags=["health"], summary="Liveness (no database)")
async def ping() -> str:
    """The trivial endpoint that bench/web.py measures every page against."""
    return "ok"


@router.get(
    "/healthz",
    response_model=pages.Health,
    tags=["health"],
    summary="Database reachable and migrations current",
    responses={503: {"model": pages.Health, "description": "Database unreachable or not migrated"}},
)
def healthz(request: Request):
    head = request.app.state.head_revision
    try:
        revision = db.current_revision(request.app.state.engine)
    except SQLAlchemyError as error:
        # The driver's message names the host and port: for the log, not for whoever asks.
        log.warning("healthz: %s", str(getattr(error, "orig", None) or error).splitlines()[0])
        body = pages.Health(
            status="unavailable",
            database="unreachable: no answer from the database (the server's log has the reason)",
            revision=None,
            head=head,
        )
        return JSONResponse(body.model_dump(), status_code=503, headers={"Cache-Control": "no-store"})
    if revision != head:
        body = pages.Health(
            status="unavailable",
            database=f"reachable, but at migration {revision} instead of {head}: run the migrations",
            revision=revision,
            head=head,
        )
        return JSONResponse(body.model_dump(), status_code=503, headers={"Cache-Control": "no-store"})
    body = pages.Health(status="ok", database="reachable", revision=revision, head=head)
    return JSONResponse(body.model_dump(), headers={"Cache-Control": "no-store"})
