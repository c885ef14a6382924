"""The web app: `create_app()` builds it around one database engine.

    channelscope serve            uvicorn on this factory (channelscope/cli/serve.py)
    create_app("sqlite:///...")   what the tests and bench/web.py use

A thin layer: routes (web/routes/) turn a URL into page objects (web/pages.py) with queries
(web/queries.py), and web/responses.py renders each as HTML or as its JSON twin.
"""

from __future__ import annotations

import gc

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from channelscope.core import db
from channelscope.core.config import config
from channelscope.method.precision import cores, set_threads
from channelscope.web import errors
from channelscope.web.demand import Demand
from channelscope.web.responses import (
    ROOT,
    Admission,
    CachedPages,
    HeadAsGet,
    HeaderLimits,
    PageStore,
    SecurityHeaders,
    query_parameters,
    render_html,
)
from channelscope.web.routes import ablation, home, models, neurons, search, text

# A statement the server has not answered this long after its own statement_timeout has fired
# never will: the server or the link is hung, and the app cuts the connection (core/db.py).
ANSWER_MARGIN_SECONDS = 2.0
# Requests that may wait on the database at once: as many as the pool has connections
# (core/db.py: 10 + 20 overflow); fewer than anyio's 40 threads, which static files need too.
DATABASE_REQUESTS = 30


def create_app(
    database_url: str | None = None, page_cache_bytes: int = 64 * 2**20, on_demand: bool = False
) -> FastAPI:
    """on_demand: opening a neuron without channels asks for them (web/demand.py); `channelscope
    serve` turns it on unless CHANNELSCOPE_ON_DEMAND=0, tests where they test it."""
    app = FastAPI(
        title="Channelscope",
        summary="MLP neurons of a language model, browsed through their vocabulary channels (ROTATE).",
        version="0.1.0",
        docs_url=None,  # FastAPI's /docs loads Swagger UI from a CDN; ours is drawn server-side
        redoc_url=None,
    )
    # Pages only read, and a shard's rows are committed whole and never change: each query can
    # see its own snapshot, and autocommit saves the BEGIN and ROLLBACK round trips of a request.
    timeout = config().query_timeout
    engine = db.make_engine(database_url, answer_seconds=timeout + ANSWER_MARGIN_SECONDS)
    engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    if engine.dialect.name == "postgresql":

        @event.listens_for(engine, "connect")
        def _timeout(connection, _record):
            # A page query that runs longer is stopped by the server and answered with 504.
            with connection.cursor() as cursor:
                cursor.execute(f"SET statement_timeout = {round(timeout * 1000)}")
            connection.commit()

    app.state.engine = engine
    # The web process's own torch work (the ablation page's model runs) leaves cores to a worker
    # that may share the machine.
    set_threads(config().threads or max(1, cores() // 2))
    # Model rows are written once and never changed or deleted (worker/store.ensure_model), so
    # every session shares one cache of them by name (lookup.model): a page saves a round trip.
    app.state.sessions = sessionmaker(bind=engine, expire_on_commit=False, info={"models": {}})
    app.state.head_revision = db.head_revision()
    # Where the activation pass left its per-token sums (text pages read them by memory map).
    app.state.data_dir = config().data_dir
    app.state.pages = PageStore(page_cache_bytes)
    app.state.demand = Demand(
        engine,
        enabled=on_demand,
        device=config().device,
        cache_dir=config().data_dir / "references",
        url=database_url,
    )

    errors.install(app)
    for module in (home, models, neurons, search, ablation, text):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    app.state.pages.parameters = query_parameters(app)

    @app.get("/docs", response_class=HTMLResponse, tags=["pages"], summary="The API, from its OpenAPI schema")
    def docs(request: Request):
        """Every route with its parameters, from /openapi.json, as a plain page (no CDN, no JS)."""
        return HTMLResponse(render_html("docs.html", request, schema=app.openapi()))

    # Everything imported and built so far (torch, SQLAlchemy, the templates) lives as long as
    # the process: frozen, full collections stop walking it, and they no longer pause every
    # request in flight (one over the ~340,000 objects here took up to 150 ms).
    gc.collect()
    gc.freeze()

    # The last added is the outermost (responses.py describes each).
    app.add_middleware(Admission, limit=DATABASE_REQUESTS, wait_seconds=db.POOL_TIMEOUT_SECONDS)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(CachedPages, store=app.state.pages)  # a hit skips everything below
    app.add_middleware(HeadAsGet)
    if config().trusted_proxies:
        # Only here, never in the server: from anyone else, X-Forwarded-Proto would change the
        # scheme of every link in a page, and the page is in the cache under that scheme.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=config().trusted_proxies)
    app.add_middleware(HeaderLimits)
    return app


def served_app() -> FastAPI:
    """What `channelscope serve` runs: the configured database, channels on demand as configured."""
    return create_app(on_demand=config().on_demand)
