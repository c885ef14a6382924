"""From the parts of a URL to stored rows, or a 404 that says what was not found and why.

Every string from a URL is checked against what it can be (a model slug, a run hash) before it
reaches a query, so hostile input never becomes a database error.
"""

from __future__ import annotations

import re
from pathlib import PurePath

import numpy as np
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from channelscope.core import tables as T
from channelscope.core.coordinates import out_of_range
from channelscope.core.progress import is_complete
from channelscope.web import pages, queries, urls, vocabulary
from channelscope.web.errors import Alias, NotFound

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,99}")  # method.weights.slug
RUN_HASH = re.compile(r"[0-9a-f]{1,16}")


def model_out(row: Row) -> pages.ModelOut:
    return pages.ModelOut(
        name=row.name,
        url=urls.model(row.name),
        file=PurePath(row.source).name,
        sha256=row.sha256,
        n_layers=row.n_layers,
        d_model=row.d_model,
        d_mlp=row.d_mlp,
        vocab_size=row.vocab_size,
        sides=row.sides.split(","),
    )


def run_out(model_name: str, run: Row, progress: Row | None) -> pages.RunOut:
    """The run as pages show it; progress None leaves its progress out (see pages.RunOut)."""
    return pages.RunOut(
        hash=run.hash,
        url=urls.model(model_name, run=run.hash),
        solver=run.solver,
        seed=run.seed,
        channels=run.run_channels,
        projection=run.projection,
        algorithm_version=run.algorithm_version,
        created_at=T.utc(run.run_created_at),  # JSON's date-time needs the zone
        settings=run.settings,
        shards_done=progress.shards_done if progress else None,
        shards_total=progress.shards_total if progress else None,
        neurons_done=progress.neurons_done if progress else None,
        neurons_total=progress.neurons_total if progress else None,
        complete=is_complete(progress.shards_done, progress.shards_total) if progress else None,
    )


def model(session: Session, name: str) -> Row:
    """The model's row; from the app's cache once found (app.main: model rows never change)."""
    cache = session.info.get("models", {})
    found = cache.get(name)
    if found is None and MODEL_NAME.fullmatch(name):
        found = queries.model(session, name)
        if found is not None:
            cache[name] = found
    if found is None:
        # A short name, as the CLI takes it (`smollm2` for smollm2-135m-instruct): the one model
        # whose name starts with it and a dash.
        longer = [m.name for m in queries.models(session) if m.name.startswith(f"{name}-")]
        if len(longer) == 1 and MODEL_NAME.fullmatch(name):
            raise Alias(name, longer[0])
        raise NotFound(f"There is no model named {name!r} here.")
    return found


def check(model_row: Row, *, layer: int | None = None, neuron: int | None = None, side: str | None = None):
    """A 404 for coordinates the model does not have."""
    shape = (model_row.name, model_row.n_layers, model_row.d_mlp, model_row.sides.split(","))
    wrong = out_of_range(*shape, layer=layer, neuron=neuron, side=side)
    if wrong:
        raise NotFound(wrong[0].upper() + wrong[1:] + ".")


def run_hash(value: str | None) -> str | None:
    if value is None:
        return None
    if not RUN_HASH.fullmatch(value):
        raise NotFound(f"There is no run {value!r}: runs are named by a short hexadecimal hash.")
    return value


def run(session: Session, model_row: Row, value: str | None, layer: int | None = None) -> Row:
    """The pinned run, or the newest run with neurons (in this layer, if given)."""
    if value is not None:
        found = queries.run_by_hash(session, model_row.id, run_hash(value))
        if found is None:
            raise NotFound(f"{model_row.name} has no run {value!r}.")
        return found
    found = queries.newest_run(session, model_row.id, layer)
    if found is None:
        where = f" in layer {layer}" if layer is not None else ""
        raise NotFound(f"No neuron of {model_row.name}{where} has been computed yet.")
    return found


def pinning(pinned: bool, permalink: str) -> pages.Pinning:
    return pages.Pinning(pinned=pinned, permalink=permalink)


def vocab(session: Session, model_row: Row) -> vocabulary.Vocabulary:
    return vocabulary.vocabulary(model_row.sha256, lambda: queries.vocabulary_blob(session, model_row.id))


def projection(
    session: Session, model_row: Row, run_row: Row | None
) -> tuple[vocabulary.Projection, np.ndarray]:
    """The run's projection matrix and the tokens it scores (z-scores and top tokens are over
    those only, as the worker computed them); without a run, the overview's: the unembedding
    and the default glitch tokens."""
    which = run_row.projection if run_row is not None else "unembedding"
    proj = vocabulary.projection(
        model_row.sha256,
        which,
        model_row.d_model,
        lambda: queries.projection_blob(session, model_row.id, which),
    )
    settings = (run_row.settings if run_row is not None else None) or {}
    excluded = []
    if settings.get("downweight_generic") and run_row.reference_id is not None:
        excluded = queries.reference_tail_tokens(session, run_row.reference_id)
    kinds = vocab(session, model_row).kinds
    return proj, proj.scored(kinds, float(settings.get("glitch_quantile", 0.99)), excluded)


def neuron_side(
    session: Session,
    model_name: str,
    layer: int,
    neuron: int,
    side: str,
    pinned: str | None,
    missing_ok=False,
):
    """The model row and the neuron side's row joined with its run, or a 404 naming what is
    missing. With missing_ok, a neuron no run has computed gives None for the row (its page
    shows the raw projection instead); a pinned run that lacks it is still a 404."""
    model_row = model(session, model_name)
    check(model_row, layer=layer, neuron=neuron, side=side)
    row = queries.neuron_with_run(session, model_row.id, layer, side, neuron, run_hash(pinned))
    if row is None and missing_ok and pinned is None:
        return model_row, None
    if row is None:
        if pinned is not None:
            run(session, model_row, pinned)  # a 404 for an unknown run first
            raise NotFound(f"Run {pinned} has not computed layer {layer} neuron {neuron} ({side}) yet.")
        raise NotFound(
            f"Layer {layer} neuron {neuron} ({side}) of {model_row.name} has not been computed yet."
        )
    return model_row, row
