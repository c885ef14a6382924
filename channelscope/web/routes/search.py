"""Search channels by token, and the autocomplete over the vocabulary."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from channelscope.core import tables as T
from channelscope.core.schemas import TokenScore, effect, tail_of
from channelscope.core.tokens import LABEL_TOKENS, label, visible
from channelscope.web import lookup, overview, pages, queries, urls
from channelscope.web.database import DbSession
from channelscope.web.errors import Malformed, NotFound
from channelscope.web.responses import Result, page

router = APIRouter()

MAX_TOKEN = 100  # characters: the longest SmolLM2 token is 64 (a run of spaces)
PAGE = 25  # hits per page; keyset pagination gives the next ones
RAW_Z = 4.0  # a raw hit: the token at |z| >= this in the vector's own projection
MAX_VARIANTS = 32  # token ids one query may match per model (case and leading-space variants)
SUGGESTIONS = 10

# Empty form fields arrive as `layer_min=`; they mean "no filter", so these are strings checked
# by pattern here and converted below, not ints that a plain GET form could never leave blank.
OptionalInt = Annotated[str | None, Query(max_length=6, pattern=r"^[0-9]*$")]
OptionalName = Annotated[str | None, Query(max_length=100)]
TokenText = Annotated[str | None, Query(max_length=MAX_TOKEN, description="a token, e.g. Paris")]


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def _cursor(after: str | None) -> tuple[float, float, int, int] | None:
    """`after=<key1>~<key2>~<neuron id>~<channel>`: the last hit of the previous page."""
    if not after:
        return None
    parts = after.split("~")
    try:
        k1, k2, neuron_id, channel = float(parts[0]), float(parts[1]), int(parts[2]), int(parts[3])
    except (ValueError, IndexError):
        raise Malformed(f"after must look like 97.5~8.25~1234~3, not {after!r}") from None
    if len(parts) != 4 or not (math.isfinite(k1) and math.isfinite(k2)) or not (0 <= neuron_id < 2**31):
        raise Malformed(f"after must look like 97.5~8.25~1234~3, not {after!r}")
    if not 0 <= channel < 2**15:
        raise Malformed(f"after must look like 97.5~8.25~1234~3, not {after!r}")
    return k1, k2, neuron_id, channel


@page(router, "/search", "search.html", pages.SearchPage, "Search channels by token")
def search_page(
    request: Request,
    session: DbSession,
    token: TokenText = None,
    exact: bool = False,
    model: OptionalName = None,
    run: Annotated[str | None, Query(max_length=64)] = None,
    layer_min: OptionalInt = None,
    layer_max: OptionalInt = None,
    side: Annotated[str | None, Query(pattern="^(gate|in|out)?$")] = None,
    min_kurtosis: Annotated[float, Query(ge=-1e6, le=1e6, allow_inf_nan=False)] = urls.DEFAULT_MIN_KURTOSIS,
    generic: Annotated[bool, Query(description="include generic channels")] = False,
    sort: Literal["percentile", "z"] = "percentile",
    after: Annotated[str | None, Query(max_length=100)] = None,
    raw_after: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = PAGE,
) -> Result:
    """Every channel whose top tokens include the token, most trustworthy first (faithfulness
    percentile, ties by the token's z; sort=z for z first). Matching ignores case and leading
    spaces unless exact=1; generic channels are left out unless generic=1."""
    cursor = _cursor(after)
    query = pages.SearchQuery(
        token=token or None,
        exact=exact,
        model=model or None,
        run=run or None,
        layer_min=_int(layer_min),
        layer_max=_int(layer_max),
        side=side or None,
        min_kurtosis=min_kurtosis,
        include_generic=generic,
        sort=sort,
        limit=limit,
    )
    # Without ?run=, each model's newest run comes in the same round trip as the models.
    all_models = queries.models(session) if query.run is not None else queries.models_with_newest_run(session)
    page_out = pages.SearchPage(
        query=query,
        models=[m.name for m in all_models],
        matches=[],
        hits=[],
        next_url=None,
        raw_hits=[],
        raw_threshold=RAW_Z,
        raw_next_url=None,
        raw_note=None,
        message=None,
        close=[],
    )
    if query.token is None:
        return Result(page_out)

    chosen = all_models
    if query.model is not None:
        chosen = [m for m in all_models if m.name == query.model]
        if not chosen:
            raise NotFound(f"There is no model named {query.model!r} here.")
    if query.run is not None:
        run_row = queries.run_by_hash(
            session, chosen[0].id if query.model else None, lookup.run_hash(query.run) or ""
        )
        if run_row is None:
            raise NotFound(f"There is no run {query.run!r}" + (f" of {query.model}." if query.model else "."))
        runs = {run_row.model_id: run_row}
        chosen = [m for m in chosen if m.id == run_row.model_id]
    else:
        runs = {m.id: m for m in chosen if m.run_id is not None}

    targets, vocab_of_run, model_of_run = [], {}, {}
    for model_row in chosen:
        vocab = lookup.vocab(session, model_row)
        run_row = runs.get(model_row.id)
        if run_row is not None:
            vocab_of_run[run_row.run_id], model_of_run[run_row.run_id] = vocab, (model_row.name, run_row.hash)
        for token_id in vocab.find(query.token, exact)[:MAX_VARIANTS]:
            if run_row is not None:
                targets.append((run_row.run_id, token_id))
            page_out.matches.append(
                pages.TokenMatch(
                    model=model_row.name,
                    run=run_row.hash if run_row is not None else None,
                    id=token_id,
                    token=vocab.tokens[token_id],
                )
            )

    if not page_out.matches:
        where = ", ".join(m.name for m in chosen) or "any model here"
        page_out.message = f"{visible(query.token)} is not a token of {where}" + (
            " (exact match: try without exact)." if exact else "."
        )
        for model_row in chosen:
            for token_id in lookup.vocab(session, model_row).close(query.token, 8):
                text = lookup.vocab(session, model_row).tokens[token_id]
                page_out.close.append(
                    pages.CloseToken(
                        model=model_row.name, token=text, url=_here(query, token=text, exact=None)
                    )
                )
        return Result(page_out)
    _raw_hits(session, page_out, chosen, _raw_cursor(raw_after))

    filters = queries.SearchFilters(
        layer_min=query.layer_min,
        layer_max=query.layer_max,
        side=query.side,
        min_kurtosis=min_kurtosis,
        include_generic=generic,
        by_z=sort == "z",
    )
    rows = queries.search(session, targets, filters, cursor, limit + 1) if targets else []
    more = len(rows) > limit
    rows = rows[:limit]
    # A channel is listed once, at its best-placed spelling (highest z: the percentile, the first
    # key otherwise, is the channel's own), with the other matched spellings beside it; a row
    # whose channel has a better spelling is that spelling's, on this page or an earlier one.
    spellings: dict[tuple[int, int], list] = {}
    for m in queries.matched_spellings(
        session, [(r.neuron_id, r.channel) for r in rows], [t for _, t in targets]
    ):
        spellings.setdefault((m.neuron_id, m.channel), []).append(m)
    for r in rows:
        mine = sorted(spellings.get((r.neuron_id, r.channel), []), key=lambda m: (-m.z, m.token_id))
        if mine and mine[0].token_id != r.token_id:
            continue
        vocab = vocab_of_run[r.run_id]
        name, run_hash = model_of_run[r.run_id]
        label_ids = [getattr(r, f"label_{i}") for i in range(LABEL_TOKENS)]
        short = label([vocab.tokens[t] for t in label_ids if t is not None])
        tail = tail_of(r.skew)
        page_out.hits.append(
            pages.SearchHit(
                model=name,
                run=run_hash,
                layer=r.layer,
                side=r.side,
                neuron=r.neuron,
                channel=r.channel,
                url=urls.channel(name, r.layer, r.neuron, r.side, r.channel, run=run_hash),
                token=TokenScore(id=r.token_id, token=vocab.tokens[r.token_id], z=r.z * tail),
                rank=r.rank,
                also=[
                    TokenScore(id=m.token_id, token=vocab.tokens[m.token_id], z=m.z * tail) for m in mine[1:]
                ],
                tail=tail,
                effect=effect(r.side, tail),
                kurtosis=r.kurtosis,
                faithfulness_percentile=r.faithfulness_percentile,
                generic=r.generic,
                label=short,
            )
        )
    if more and rows:
        last = rows[-1]
        page_out.next_url = _here(query, after=f"{last.k1!r}~{last.k2!r}~{last.neuron_id}~{last.channel}")
    hidden = []
    if not generic:
        hidden.append("generic channels")
    hidden.append(f"channels with kurtosis below {min_kurtosis:g}")
    if not rows:
        page_out.message = (
            f"No channel has {visible(query.token)} among its top tokens with these filters "
            f"({' and '.join(hidden)} are left out)."
        )
    else:
        page_out.message = f"Left out: {' and '.join(hidden)}."
    return Result(page_out)


def _raw_cursor(after: str | None) -> tuple | None:
    """raw_after=|z|~layer~side code~neuron~model: where the previous page of raw hits ended."""
    if not after:
        return None
    parts = after.split("~", 4)
    try:
        z, layer, code, neuron, model = float(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]), parts[4]
    except (ValueError, IndexError):
        raise Malformed(
            f"raw_after must look like 5.25~12~2~1234~smollm2-135m-instruct, not {after!r}"
        ) from None
    if not math.isfinite(z):
        raise Malformed(f"raw_after must look like 5.25~12~2~1234~smollm2-135m-instruct, not {after!r}")
    return (-z, layer, code, neuron, model)


def _raw_hits(session, page_out: pages.SearchPage, chosen, cursor: tuple | None) -> None:
    """The vectors whose own projection puts a matched token at |z| >= RAW_Z: exact, one product
    of the token's column of U with every vector of the model (web/overview.py), strongest
    first, each vector once (its strongest matched spelling), filtered like the channels."""
    query = page_out.query
    found: dict[tuple, tuple[int, float]] = {}
    missing = []
    for model_row in chosen:
        complete = model_row.overview_parts == model_row.n_layers * len(model_row.sides.split(","))
        vectors = overview.model_vectors(session, model_row) if complete else None
        if vectors is None:
            missing.append(model_row.name)
            continue
        vocab = lookup.vocab(session, model_row)
        projection, scored = lookup.projection(session, model_row, None)
        # Special and glitch tokens are in no token list.
        token_ids = [t for t in vocab.find(query.token, query.exact)[:MAX_VARIANTS] if scored[t]]
        if not token_ids:
            continue
        rows, columns, zs = overview.raw_hits(vectors, projection.matrix[:, token_ids], RAW_Z)
        for i, column, z in zip(rows.tolist(), columns.tolist(), zs.tolist(), strict=True):
            layer, code, neuron = (int(x) for x in vectors.keys[i])
            if query.side is not None and T.SIDES[code] != query.side:
                continue
            if (query.layer_min is not None and layer < query.layer_min) or (
                query.layer_max is not None and layer > query.layer_max
            ):
                continue
            key = (layer, code, neuron, model_row.name)
            known = found.get(key)
            if known is None or abs(z) > abs(known[1]):
                found[key] = (token_ids[column], z)
    ranked = sorted(((-abs(z), *rest), token_id, z) for rest, (token_id, z) in found.items())
    if cursor is not None:
        ranked = [r for r in ranked if r[0] > cursor]
    for key, token_id, z in ranked[: query.limit]:
        _, layer, code, neuron, name = key
        side = T.SIDES[code]
        vocab = lookup.vocab(session, next(m for m in chosen if m.name == name))
        page_out.raw_hits.append(
            pages.RawHit(
                model=name,
                layer=layer,
                side=side,
                neuron=neuron,
                url=urls.neuron(name, layer, neuron, side),
                token=TokenScore(id=token_id, token=vocab.tokens[token_id], z=round(z, 4)),
            )
        )
    if len(ranked) > query.limit:
        last = ranked[query.limit - 1][0]
        page_out.raw_next_url = _here(
            query, raw_after=f"{-last[0]!r}~{last[1]}~{last[2]}~{last[3]}~{last[4]}"
        )
    if missing:
        page_out.raw_note = (
            f"The raw projections of {', '.join(missing)} are not all computed yet "
            "(`channelscope overview`): raw hits leave those models out."
        )


def _here(query: pages.SearchQuery, **changes) -> str:
    """This search's URL with some parameters changed (defaults left out)."""
    params = {
        "token": query.token,
        "exact": 1 if query.exact else None,
        "model": query.model,
        "run": query.run,
        "layer_min": query.layer_min,
        "layer_max": query.layer_max,
        "side": query.side,
        "min_kurtosis": None
        if query.min_kurtosis == urls.DEFAULT_MIN_KURTOSIS
        else f"{query.min_kurtosis:g}",
        "generic": 1 if query.include_generic else None,
        "sort": None if query.sort == "percentile" else query.sort,
        "limit": None if query.limit == PAGE else query.limit,
    } | changes
    return urls.search(**params)


@page(
    router,
    "/search/suggest",
    "_suggest.html",
    pages.SuggestPage,
    "Autocomplete over the vocabulary",
)
def suggest_page(
    request: Request, session: DbSession, token: TokenText = None, model: OptionalName = None
) -> Result:
    """Tokens whose search key starts with what was typed (htmx swaps this list in under the
    search box as one types)."""
    out = pages.SuggestPage(token=token or "", suggestions=[])
    if not token:
        return Result(out)
    for model_row in queries.models(session):
        if model and model_row.name != model:
            continue
        vocab = lookup.vocab(session, model_row)
        for token_id in vocab.suggest(token, SUGGESTIONS):
            text = vocab.tokens[token_id]
            out.suggestions.append(
                pages.Suggestion(
                    model=model_row.name, token=text, url=urls.search(token=text, model=model or None)
                )
            )
    return Result(out)
