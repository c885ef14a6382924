"""The ablation page: switch channels of a neuron off and see what the neuron and the model stop
doing (issue 6). `/m/{model}/{layer}/{neuron}/ablate?run=&side=&channels=0,3&prompt=` and its
`.json` twin; the neuron page's controls (templates/_ablation.html) submit here, and htmx swaps
the result into the page when JavaScript is on.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from channelscope.core import schemas
from channelscope.core.schemas import neuron_side
from channelscope.method import intervention, rotate
from channelscope.web import ablation as A
from channelscope.web import lookup, pages, queries, urls
from channelscope.web.database import session as db_session
from channelscope.web.errors import Malformed
from channelscope.web.responses import Result, page
from channelscope.web.routes.params import Layer, ModelName, Neuron, RunParam, Side
from channelscope.web.runtime import Busy, ModelRuntime, ModelUnavailable
from channelscope.worker import activations

router = APIRouter()

ChannelsParam = Annotated[
    list[str],
    Query(max_length=400, description="channels to ablate, in discovery order from 0: `0,3` (or repeated)"),
]
PromptParam = Annotated[
    str,
    Query(
        max_length=A.MAX_PROMPT_CHARS,
        description=f"text to run the real model on (at most {A.MAX_PROMPT_TOKENS} tokens)",
    ),
]

_runtime_lock = threading.Lock()


def runtime(request: Request) -> ModelRuntime:
    """The app's model runtime, made on first use (tests set app.state.runtime themselves)."""
    found = getattr(request.app.state, "runtime", None)
    if found is None:
        with _runtime_lock:
            found = getattr(request.app.state, "runtime", None)
            if found is None:
                found = request.app.state.runtime = ModelRuntime.from_config()
    return found


@page(
    router,
    "/m/{model}/{layer}/{neuron}/ablate",
    "ablation.html",
    pages.AblationPage,
    "Ablate channels of a neuron: the weight-level preview and the real model's response",
)
def ablation_page(
    request: Request,
    model: ModelName,
    layer: Layer,
    neuron: Neuron,
    session: Annotated[Session, Depends(db_session)],
    side: Side = "out",
    run: RunParam = None,
    channels: ChannelsParam = [],  # noqa: B006 (FastAPI copies defaults)
    prompt: PromptParam = "",
) -> Result:
    """w' = w − α* c_k for each chosen channel (α* from the paper's grid rule, refitted on the
    current w' for every channel after the first): the vocabulary projection before and after
    with selectivity S beside its random-direction baseline, and, given a prompt, the real
    model run with the neuron's vector replaced (forward hooks; the weights are never written)."""
    model_row, row = lookup.neuron_side(session, model, layer, neuron, side, run)
    try:
        chosen = A.parse_channels(channels)
    except ValueError as error:
        raise Malformed(str(error)) from None
    channel_rows = queries.channels(session, [row.id])
    indices = [ch.channel for ch in channel_rows]
    unknown = [c for c in chosen if c not in indices]
    if unknown:
        raise Malformed(
            f"channels: layer {layer} neuron {neuron} ({side}) has channels 0-{len(indices) - 1} in run "
            f"{row.hash}; {', '.join(map(str, unknown))} is not one of them"
        )
    tokens_by_channel = queries.channel_tokens(session, [row.id])
    vocab = lookup.vocab(session, model_row)
    data = neuron_side(
        model_row.name,
        row.hash,
        row,
        channel_rows,
        {ch: pairs for (_, ch), pairs in tokens_by_channel.items()},
        vocab.tokens,
    )
    progress = queries.run_progress(session, row.run_id)
    name = model_row.name
    result = pages.AblationPage(
        model=lookup.model_out(model_row),
        run=lookup.run_out(name, row, progress),
        pinning=lookup.pinning(
            run is not None, urls.ablate(name, layer, neuron, side, row.hash, chosen, prompt)
        ),
        layer=layer,
        neuron=neuron,
        side=side,
        neuron_url=urls.neuron(name, layer, neuron, side, row.hash),
        json_url=urls.ablate(name, layer, neuron, side, row.hash, chosen, prompt, json=True),
        controls=A.controls(name, layer, neuron, side, row.hash, data.channels, chosen, prompt or None),
        applied=[],
        preview=None,
        model_effect=None,
        model_note=None,
        selectivity_definition=A.SELECTIVITY_DEFINITION,
        baseline_definition=A.BASELINE_DEFINITION,
    )
    if not chosen:
        result.model_note = "Choose one or more channels to ablate."
        return Result(result)

    projection, scored = lookup.projection(session, model_row, row)
    seed = rotate.neuron_seed(row.seed, layer, side, neuron)  # the same draws for the same URL
    # The weight-level preview needs no model, so it takes no model slot.
    prepared = A.prepare(row, channel_rows, chosen, projection.matrix, scored, seed)
    result.applied = prepared.applied()
    result.preview = prepared.preview(vocab.tokens)
    result.preview.effect = schemas.effect(side, result.preview.tail)
    if not prompt.strip():
        result.model_note = "Enter a prompt to see the real model's response."
        return Result(result)
    models = runtime(request)
    try:
        with models.slot():
            try:
                lm = models.model(model_row.source, model_row.sha256)
            except ModelUnavailable as error:
                result.model_note = str(error)
                return Result(result)
            ids = lm.encode(prompt)
            if len(ids) > A.MAX_PROMPT_TOKENS:
                raise Malformed(f"prompt: {len(ids)} tokens; at most {A.MAX_PROMPT_TOKENS} are allowed")
            threshold = activations.threshold(session, model_row.id, layer, neuron) if side == "out" else None
            delta, random_deltas, random_targets = prepared.model_deltas(side)

            def work(lm, deadline):
                return intervention.ablation_effect(
                    lm,
                    ids,
                    layer,
                    side,
                    neuron,
                    delta,
                    random_deltas,
                    prepared.targets,
                    random_targets,
                    prepared.scored,
                    threshold.value if threshold else None,
                    deadline,
                )

            started = time.perf_counter()
            effect = models.run(lm, work)
            result.model_effect = A.model_effect(
                effect, vocab.tokens, prepared.targets[0], threshold, time.perf_counter() - started
            )
    except Busy as busy:
        raise HTTPException(
            429,
            "The model is busy with other ablations; try again in a moment.",
            headers={"Retry-After": str(busy.retry_after)},
        ) from None
    except intervention.ModelTimeout:
        raise HTTPException(
            504,
            f"The model run took longer than {models.timeout_s:g} s and was stopped; try a shorter prompt.",
        ) from None
    return Result(result)
