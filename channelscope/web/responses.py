"""How a page object becomes a response: HTML from a template or its JSON twin, with the caching
headers a permalink deserves.

- A page pinned to a complete run (`?run=<hash>`, every shard done) is immutable:
  `Cache-Control: public, max-age=31536000, immutable` and an ETag, and its bytes are kept in
  an in-process PageStore that CachedPages serves before routing (no query, no render).
- Everything else revalidates: `Cache-Control: no-cache` and an ETag (a 304 saves the bytes).

A cached page is keyed by what can change it (`page_key`): the origin its absolute links are
built from, its path and the query parameters that some route reads. The ASGI middleware here
wrap the app, outermost first: HeaderLimits (431 for oversized headers), HeadAsGet (HEAD
wherever GET works), CachedPages (hits served before routing), Admission (requests that may
wait on the database, bounded), SecurityHeaders.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import BaseModel

from channelscope.core.config import config
from channelscope.core.schemas import TokenScore
from channelscope.core.tokens import in_text, visible
from channelscope.web import pages, urls

ROOT = Path(__file__).resolve().parents[2]  # the repository: templates/ and static/


def markup_version() -> str:
    """A hash of everything that shapes a page's bytes besides the data: the templates, the static
    files and the web layer's code (with the page schemas of core). It goes into every ETag and
    page cache key and onto the static files' URLs, so a release never answers with markup, or
    a stylesheet, cached under the old one."""
    digest = hashlib.blake2b(digest_size=6)
    package = Path(__file__).resolve().parent
    files = [
        *sorted((ROOT / "templates").rglob("*")),
        *sorted((ROOT / "static").rglob("*")),
        *sorted(package.rglob("*.py")),
        package.parent / "core" / "schemas.py",
    ]
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


MARKUP_VERSION = markup_version()
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# Scripts and styles only from this site: a token string that slipped through escaping still
# could not run. SVG presentation attributes (fill=) are not styles, so plots need no exception.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def _number(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def _z_class(z: float) -> str:
    """A token chip's shade, by how far out on its tail the token is."""
    a = abs(z)
    return "z5" if a >= 12 else "z4" if a >= 9 else "z3" if a >= 6 else "z2" if a >= 4 else "z1"


def _percentile_class(p: float) -> str:
    return "pct-high" if p >= 90 else "pct-mid" if p >= 60 else "pct-low"


def _chip_title(t: TokenScore) -> str:
    return f"token {t.id}, z {_number(t.z)}"


templates = Environment(
    loader=FileSystemLoader(ROOT / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,  # a misspelt field is an error in tests, not a blank on the page
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["visible"] = visible
templates.filters["in_text"] = in_text
templates.filters["num"] = _number
templates.filters["zclass"] = _z_class
templates.filters["token_search"] = urls.token_search
templates.filters["chip_title"] = _chip_title
templates.filters["pct_class"] = _percentile_class


@dataclass
class Result:
    """What a page builder returns: the page object, and whether it may be cached forever."""

    page: BaseModel
    immutable: bool = False
    plots: Any = None  # template-only geometry derived from the page (web/plots.py)
    status: int = 200  # a whole page can still answer 429 or 503 (channels on demand)
    headers: dict[str, str] | None = None  # Retry-After, Refresh


def _header(scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def page_origin(scope) -> str:
    """The scheme and host that a page's absolute links are made of: CHANNELSCOPE_PUBLIC_URL
    when the operator sets it (a server bound to 0.0.0.0 cannot know its public name), else the
    request's own scheme and Host."""
    public = config().public_url.rstrip("/")
    if public:
        return public
    host = _header(scope, b"host")
    if not host:
        server_host, server_port = scope.get("server") or ("localhost", 80)
        host = f"{server_host}:{server_port}"
    return f"{scope['scheme']}://{host}"


def page_query(scope, parameters: frozenset[str]) -> str:
    """The query with only the parameters some route reads, sorted by name (a repeated
    parameter keeps the order of its values): a tracking parameter on a shared link, or junk,
    neither changes the page nor makes another copy of it."""
    pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    return urlencode(sorted(((k, v) for k, v in pairs if k in parameters), key=lambda kv: kv[0]))


def page_key(scope, parameters: frozenset[str]) -> str:
    """Everything a cached page depends on (the route reads nothing else of the request)."""
    return f"{MARKUP_VERSION}:{page_origin(scope)}{scope['path']}?{page_query(scope, parameters)}"


def canonical_url(request: Request) -> str:
    """This page's absolute URL, as og:url gives it: the cache key's parts, so a page cached for
    everyone never carries what one visitor added to its URL."""
    query = page_query(request.scope, request.app.state.pages.parameters)
    return page_origin(request.scope) + request.url.path + (f"?{query}" if query else "")


templates.globals["canonical_url"] = canonical_url
templates.globals["origin"] = lambda request: page_origin(request.scope)
templates.globals["markup_version"] = MARKUP_VERSION


def query_parameters(app: FastAPI) -> frozenset[str]:
    """Every query parameter that some route of the app reads, from its OpenAPI schema."""
    operations = [op for path in app.openapi()["paths"].values() for op in path.values()]
    return frozenset(p["name"] for op in operations for p in op.get("parameters", []) if p["in"] == "query")


class PageStore:
    """Rendered bytes of immutable pages by `page_key`; least recently used out first once the
    entries pass max_bytes. An entry counts its key as well as its body: keys come from
    requests, and only what is counted is bounded."""

    ENTRY_BYTES = 250  # an entry's own objects beside its key and body (the tuple, strings, the slot)

    def __init__(self, max_bytes: int = 64 * 2**20):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[bytes, bytes, bytes, int]] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()
        self.parameters: frozenset[str] = frozenset()  # set by create_app: query_parameters(app)

    def key(self, scope) -> str:
        return page_key(scope, self.parameters)

    def get(self, key: str) -> tuple[bytes, bytes, bytes] | None:
        with self.lock:
            hit = self.entries.get(key)
            if hit is None:
                return None
            self.entries.move_to_end(key)
            return hit[:3]

    def put(self, key: str, body: bytes, etag: str, media_type: str) -> None:
        size = len(key.encode()) + len(body) + len(etag) + len(media_type) + self.ENTRY_BYTES
        if size > self.max_bytes // 8:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = (body, etag.encode(), media_type.encode(), size)
            self.size += size
            while self.size > self.max_bytes:
                _, (*_, old) = self.entries.popitem(last=False)
                self.size -= old


class CachedPages:
    """ASGI middleware: a GET whose page_key is in the PageStore is answered from it before
    routing, so a shared permalink costs no query and no render."""

    def __init__(self, app, store: PageStore):
        self.app, self.store = app, store

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        hit = self.store.get(self.store.key(scope))
        if hit is None:
            return await self.app(scope, receive, send)
        body, etag, media_type = hit
        headers = [(b"etag", etag), (b"cache-control", IMMUTABLE.encode()), *SECURITY_HEADERS]
        if any(name == b"if-none-match" and etag in value for name, value in scope["headers"]):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers += [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _plain(send, status: int, text: str, headers: list | None = None) -> None:
    body = text.encode()
    start = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*start, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class HeaderLimits:
    """ASGI middleware: a request whose headers take more than MAX_BYTES is answered 431 before
    anything reads them (the server's own limit, if any, depends on how it is run)."""

    MAX_BYTES = 16 * 1024  # h11's limit on a whole request head; browsers send ~1 KiB here

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > self.MAX_BYTES:
            return await _plain(send, 431, "Request headers too large.\n", SECURITY_HEADERS)
        await self.app(scope, receive, send)


class HeadAsGet:
    """ASGI middleware: HEAD is answered wherever GET is, as the GET's status and headers
    without its body (RFC 9110, 9.3.2). Routes, the page cache and static files see a GET."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def without_body(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class Admission:
    """ASGI middleware: at most `limit` requests at once past this point, where a request may
    wait on the database in a worker thread; the next ones wait up to `wait_seconds` for a
    place, then get a 503. The thread pool that static files are read in (anyio's default, 40
    threads) stays larger than `limit`, so a stalled database never takes every thread:
    /ping, static files and cached pages keep answering."""

    UNGATED = ("/ping", "/static/")

    def __init__(self, app, limit: int, wait_seconds: float):
        self.app = app
        self.limiter = anyio.CapacityLimiter(limit)
        self.wait_seconds = wait_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(self.UNGATED):
            return await self.app(scope, receive, send)
        admitted = False
        with anyio.move_on_after(self.wait_seconds):
            await self.limiter.acquire()
            admitted = True
        if admitted:
            try:
                return await self.app(scope, receive, send)
            finally:
                self.limiter.release()
        retry = [(b"retry-after", b"5"), (b"cache-control", b"no-store")]
        await _plain(send, 503, "Too many requests are waiting for the database; try again shortly.\n", retry)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response, errors and static files included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                present = {name for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def render_html(template: str, request: Request, **context) -> str:
    return templates.get_template(template).render(request=request, **context)


def finish(
    request: Request,
    body: bytes,
    media_type: str,
    immutable: bool,
    status: int = 200,
    extra: dict[str, str] | None = None,
) -> Response:
    """ETag and Cache-Control; 304 when the client already has these bytes; remember immutable
    pages in the PageStore."""
    etag = f'"{MARKUP_VERSION}-{hashlib.blake2b(body, digest_size=12).hexdigest()}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE if immutable and status == 200 else REVALIDATE}
    headers |= extra or {}
    if immutable and status == 200:
        store: PageStore | None = getattr(request.app.state, "pages", None)
        if store is not None:
            store.put(store.key(request.scope), body, etag, media_type)
    if status == 200 and etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def problem_responses(html: bool) -> dict:
    content = {"text/html": {"schema": {"type": "string"}}} if html else None
    out = {}
    for status, description in [
        (404, "Unknown model, layer, neuron, side, channel or run"),
        (422, "A malformed query value"),
        (503, "The database is unreachable"),
    ]:
        out[status] = {"description": description}
        if content:
            out[status]["content"] = content
        else:
            out[status]["model"] = pages.Problem
    return out


def page(
    router: APIRouter,
    path: str,
    template: str,
    model: type[BaseModel],
    summary: str,
    redirect: str | None = None,
):
    """Registers a page builder twice: `path` renders `template` as HTML and `path.json`
    returns the same page object as JSON. The JSON route is added first: `{neuron}` would
    otherwise swallow `5.json` and fail its integer check. `redirect` documents a 303 the
    builder may answer with instead (what it leads to).

    Both run in a worker thread, never on the event loop: a page that waits on the database
    (or computes) holds up only itself, so /ping, static files and cached pages keep answering
    while the database stalls. The price, measured with bench/web.py: bench/README.md, "Web"."""

    def register(build: Callable[..., Result]):
        signature = inspect.signature(build, eval_str=True)  # annotations are strings here

        def as_json(request: Request, **params):
            result = build(request=request, **params)
            if isinstance(result, Response):  # a redirect (the jump-to-neuron box)
                return result
            body = result.page.model_dump_json().encode()
            return finish(request, body, "application/json", result.immutable, result.status, result.headers)

        def as_html(request: Request, **params):
            result = build(request=request, **params)
            if isinstance(result, Response):
                return result
            body = render_html(template, request, page=result.page, plots=result.plots).encode()
            return finish(
                request, body, "text/html; charset=utf-8", result.immutable, result.status, result.headers
            )

        moved = {303: {"description": redirect}} if redirect else {}
        for endpoint, suffix in ((as_json, "_json"), (as_html, "")):
            endpoint.__signature__ = signature
            endpoint.__name__ = build.__name__ + suffix
            endpoint.__doc__ = build.__doc__
        router.add_api_route(
            path + ".json",
            as_json,
            methods=["GET"],
            response_model=model,
            response_class=JSONResponse,
            summary=summary + " (JSON)",
            responses=problem_responses(html=False) | moved,
            tags=["json"],
        )
        router.add_api_route(
            path,
            as_html,
            methods=["GET"],
            response_class=HTMLResponse,
            summary=summary,
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}}
            | problem_responses(html=True)
            | moved,
            tags=["pages"],
        )
        return build

    return register
