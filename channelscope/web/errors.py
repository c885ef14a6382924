"""Errors as pages: a 404, 422, 503 or 504 is an HTML page or, under a `.json` path, a Problem
object. Never a stack trace, and never the driver's words (they name hosts, ports and paths):
the log has those, the page says what is wrong in its own words.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from channelscope.web.pages import Problem
from channelscope.web.responses import render_html

log = logging.getLogger("channelscope.web")

TITLES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    422: "Malformed query",
    500: "Internal error",
    503: "Database unavailable",
    504: "Query timed out",
}


class NotFound(HTTPException):
    """A 404 whose detail is written for a person ("layer 40 is out of range: ...")."""

    def __init__(self, detail: str):
        super().__init__(404, detail)


class Alias(HTTPException):
    """A model asked for by a short name (the CLI's `smollm2`): a permanent redirect to the same
    path under its full name, so that every page keeps one address."""

    def __init__(self, name: str, full: str):
        super().__init__(308, f"{name} is {full}")
        self.name, self.full = name, full


class Malformed(HTTPException):
    def __init__(self, detail: str):
        super().__init__(422, detail)


def wants_json(request: Request) -> bool:
    path = request.url.path
    return path.endswith(".json") or path in ("/healthz", "/openapi.json")


def problem(request: Request, status: int, detail: str, headers: dict | None = None) -> Response:
    body = Problem(status=status, title=TITLES.get(status, "Error"), detail=detail)
    headers = {"Cache-Control": "no-store", **(headers or {})}
    if wants_json(request):
        return JSONResponse(body.model_dump(), status_code=status, headers=headers)
    html = render_html("error.html", request, problem=body)
    return HTMLResponse(html, status_code=status, headers=headers)


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(x) for x in item.get("loc", ()) if x not in ("query", "path"))
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "malformed request"


def _is_timeout(error: DBAPIError) -> bool:
    # PostgreSQL's statement_timeout (SQLSTATE 57014, query_canceled).
    return getattr(error.orig, "sqlstate", None) == "57014"


UNREACHABLE = (
    "The database cannot be reached right now. Pages come back by themselves once it is up "
    "again; /healthz says when."
)


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        if isinstance(error, Alias):
            prefix = f"/m/{quote(error.name)}"
            rest = request.url.path[len(prefix) :]
            target = f"/m/{quote(error.full)}{rest}" + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(target, status_code=308, headers={"Cache-Control": "no-store"})
        return problem(request, error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return problem(request, 422, _validation_detail(error))

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, error: DBAPIError):
        if _is_timeout(error):
            return problem(request, 504, "The query took too long and was stopped; narrow the filters.")
        if isinstance(error, OperationalError | InterfaceError) or error.connection_invalidated:
            log.warning("database unavailable: %s", str(error.orig).splitlines()[0] if error.orig else error)
            return problem(request, 503, UNREACHABLE, {"Retry-After": "5"})
        log.exception("database error")
        return problem(request, 500, "Something went wrong on our side; it has been logged.")

    @app.exception_handler(PoolTimeout)
    async def no_connection(request: Request, error: PoolTimeout):
        # Every connection of the pool is busy, most likely waiting on a stalled database.
        log.warning("no database connection free: %s", error)
        return problem(request, 503, UNREACHABLE, {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def any_error(request: Request, error: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return problem(request, 500, "Something went wrong on our side; it has been logged.")
