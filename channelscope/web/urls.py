"""The URL scheme, in one place: every link a page holds is built here.

    /                                        models and runs
    /m/{model}                               layer x side overview
    /m/{model}/{layer}                       a layer's neurons (?side=, ?sort=, ?after=)
    /m/{model}/{layer}/{neuron}              a neuron (?side=gate|in|out, ?min_kurtosis=)
    /m/{model}/{layer}/{neuron}/{side}/{c}   one channel
    /m/{model}/{layer}/{neuron}/compare      two runs of one neuron (?a=RUN&b=RUN)
    /m/{model}/{layer}/{neuron}/text         what it does on real text (top contexts, density)
    /search                                  channels by token
Each has a JSON twin at the same path + `.json`; `?run=<hash>` pins a run anywhere.
"""

from __future__ import annotations

import functools
from urllib.parse import quote, urlencode

from channelscope.core.tables import JUNK_KURTOSIS

DEFAULT_SIDE = "out"  # what the neuron writes: its direct effect on the next-token logits
DEFAULT_MIN_KURTOSIS = JUNK_KURTOSIS  # the pages' default cut-off is the stored one


def with_query(path: str, **params) -> str:
    """path?k=v..., leaving out parameters that are None or at their default (so a URL stays as
    short as the state it names)."""
    query = {k: v for k, v in params.items() if v is not None}
    return f"{path}?{urlencode(query)}" if query else path


def home(json: bool = False) -> str:
    return "/.json" if json else "/"


def model(name: str, run: str | None = None, json: bool = False) -> str:
    return with_query(f"/m/{quote(name)}{'.json' if json else ''}", run=run)


def layer(name: str, layer_: int, side: str | None = None, run: str | None = None, **params) -> str:
    return with_query(
        f"/m/{quote(name)}/{layer_}", side=None if side == DEFAULT_SIDE else side, run=run, **params
    )


def neuron(
    name: str,
    layer_: int,
    neuron_: int,
    side: str | None = None,
    run: str | None = None,
    min_kurtosis: float | None = None,
    json: bool = False,
) -> str:
    path = f"/m/{quote(name)}/{layer_}/{neuron_}{'.json' if json else ''}"
    cut = None if min_kurtosis in (None, DEFAULT_MIN_KURTOSIS) else f"{min_kurtosis:g}"
    return with_query(path, side=None if side == DEFAULT_SIDE else side, run=run, min_kurtosis=cut)


def text(name: str, layer_: int, neuron_: int, json: bool = False) -> str:
    return f"/m/{quote(name)}/{layer_}/{neuron_}/text{'.json' if json else ''}"


def histogram(name: str, layer_: int, neuron_: int, side: str, run: str | None) -> str:
    return with_query(f"/m/{quote(name)}/{layer_}/{neuron_}/histogram.svg", side=side, run=run)


def channel(
    name: str, layer_: int, neuron_: int, side: str, channel_: int, run: str | None = None, json: bool = False
) -> str:
    return with_query(
        f"/m/{quote(name)}/{layer_}/{neuron_}/{side}/{channel_}{'.json' if json else ''}", run=run
    )


def compare(
    name: str, layer_: int, neuron_: int, side: str, a: str | None = None, b: str | None = None
) -> str:
    return with_query(
        f"/m/{quote(name)}/{layer_}/{neuron_}/compare", side=None if side == DEFAULT_SIDE else side, a=a, b=b
    )


def random_neuron(name: str, run: str | None = None) -> str:
    return with_query(f"/m/{quote(name)}/random", run=run)


def search(**params) -> str:
    return with_query("/search", **params)


@functools.lru_cache(maxsize=65536)
def token_search(token: str, model: str) -> str:
    """A token chip's link: every channel with exactly this token. Written out rather than
    through urlencode: a neuron page holds a couple of hundred of these."""
    return f"/search?token={quote(token, safe='')}&exact=1&model={quote(model, safe='')}"


def ablate_path(name: str, layer_: int, neuron_: int, json: bool = False) -> str:
    """Where the ablation form submits (its query names the ablation)."""
    return f"/m/{quote(name)}/{layer_}/{neuron_}/ablate{'.json' if json else ''}"


def ablate(
    name: str,
    layer_: int,
    neuron_: int,
    side: str,
    run: str,
    channels: list[int],
    prompt: str = "",
    json: bool = False,
) -> str:
    """The permalink of an ablation: everything that determines its numbers is in the query."""
    query = {"run": run, "side": side, "channels": ",".join(map(str, channels))}
    if prompt:
        query["prompt"] = prompt
    return with_query(ablate_path(name, layer_, neuron_, json), **query)
