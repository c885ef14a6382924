"""The types of the path and query parameters that several routes share, checked by FastAPI
before a route runs (a 422 with the reason otherwise)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path, Query

from channelscope.core.tables import SIDES

ModelName = Annotated[
    str, Path(max_length=200, description="the model's URL name, e.g. smollm2-135m-instruct")
]
Layer = Annotated[int, Path(ge=0, le=100_000)]
Neuron = Annotated[int, Path(ge=0, le=10**9)]
Side = Literal[SIDES]  # gate, in, out
RunParam = Annotated[str | None, Query(max_length=64, description="a run hash: pins the page to that run")]
MinKurtosis = Annotated[
    float,
    Query(
        ge=-1e6,
        le=1e6,
        allow_inf_nan=False,
        description="the junk cut-off: channels below it are folded away",
    ),
]
