"""Search channels by token, and the autocomplete over the vocabulary."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from channelscope.core.schemas import TokenScore
from channelscope.core.tokens import LABEL_TOKENS, label, visible
from channelscope.web import lookup, pages, queries, urls
from channelscope.web.database import DbSession
from channelscope.web.errors import Malformed, NotFound
from channelscope.web.responses import Result, page

router = APIRouter()

MAX_TOKEN = 100  # characters: the longest SmolLM2 token is 64 (a run of spaces)
PAGE = 25  # hits per page; keyset pagination gives the next ones
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


@page(router, "/search", "search.html", pages.SearchPage, "Search channels by token", on_loop=True)
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
    else:
        runs = {m.id: m for m in chosen if m.run_id is not None}
    models_by_id = {m.id: m for m in chosen if m.id in runs}

    targets, vocab_of_run, model_of_run = [], {}, {}
    for model_id, run_row in runs.items():
        model_row = models_by_id[model_id]
        vocab = lookup.vocab(session, model_row)
        vocab_of_run[run_row.run_id], model_of_run[run_row.run_id] = vocab, (model_row.name, run_row.hash)
        for token_id in vocab.find(query.token, exact)[:MAX_VARIANTS]:
            targets.append((run_row.run_id, token_id))
            page_out.matches.append(
                pages.TokenMatch(
                    model=model_row.name, run=run_row.hash, id=token_id, token=vocab.tokens[token_id]
                )
            )

    if not targets:
        where = ", ".join(m.name for m in models_by_id.values()) or "any model with computed channels"
        page_out.message = f"{visible(query.token)} is not a token of {where}" + (
            " (exact match: try without exact)." if exact else "."
        )
        for model_id in runs:
            model_row = models_by_id[model_id]
            vocab = vocab_of_run[runs[model_id].run_id]
            for token_id in vocab.close(query.token, 8):
                text = vocab.tokens[token_id]
                page_out.close.append(
                    pages.CloseToken(
                        model=model_row.name, token=text, url=_here(query, token=text, exact=None)
                    )
                )
        return Result(page_out)

    filters = queries.SearchFilters(
        layer_min=query.layer_min,
        layer_max=query.layer_max,
        side=query.side,
        min_kurtosis=min_kurtosis,
        include_generic=generic,
        by_z=sort == "z",
    )
    rows = queries.search(session, targets, filters, cursor, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    for r in rows:
        vocab = vocab_of_run[r.run_id]
        name, run_hash = model_of_run[r.run_id]
        label_ids = [getattr(r, f"label_{i}") for i in range(LABEL_TOKENS)]
        short = label([vocab.tokens[t] for t in label_ids if t is not None])
        page_out.hits.append(
            pages.SearchHit(
                model=name,
                run=run_hash,
                layer=r.layer,
                side=r.side,
                neuron=r.neuron,
                channel=r.channel,
                url=urls.channel(name, r.layer, r.neuron, r.side, r.channel, run=run_hash),
                token=TokenScore(id=r.token_id, token=vocab.tokens[r.token_id], z=r.z),
                rank=r.rank,
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
    on_loop=True,
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
