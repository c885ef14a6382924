"""The JSON layout of a neuron side and its channels: what pages render, what `.json` twins
return and what `channelscope export` writes, so the three cannot drift apart.

Built from stored rows by `neuron_side`; pages wrap these objects with their own context
(links, plots, run information) in web/pages.py."""

from __future__ import annotations

from pydantic import BaseModel

from channelscope.core import tables as T
from channelscope.core.stats import finite_or

SIGN_CONVENTION = (
    "A channel's tail is the side of its projection c @ U where its top tokens lie: +1 when they "
    "have the highest z, -1 when they have the lowest (the sign of its skew). For a positive "
    "activation of the neuron, an `out` channel on the +1 tail promotes its tokens (raises their "
    "logits) and one on the -1 tail suppresses them; a `gate` or `in` channel on the +1 tail fires "
    "on its tokens (they raise the pre-activation) and one on the -1 tail is inhibited by them."
)


def tail_of(skew: float) -> int:
    """+1 or -1: which tail of the projection a channel's top tokens lie on."""
    return 1 if skew >= 0 else -1


def effect(side: str, tail: int) -> str:
    """The one wording of the sign convention (SIGN_CONVENTION): what a channel does to its
    tokens, on the write side or a read side."""
    if side == "out":
        return "promotes" if tail > 0 else "suppresses"
    return "fires on" if tail > 0 else "is inhibited by"


class TokenScore(BaseModel):
    id: int
    token: str  # the decoded text, exactly (escape for display with channelscope.tokens.visible)
    z: float  # signed z-score over the scored tokens


class ChannelOut(BaseModel):
    index: int  # discovery order, from 0
    kurtosis: float
    skew: float
    cos: float
    loss: float
    masked: int  # tokens claimed (|T_k|)
    step: int
    alpha: float
    faithfulness: float
    faithfulness_percentile: float  # against random vectors' channels (isotropic)
    percentile_local: (
        float | None
    )  # against random directions at the same cosine to w; None before measures v2
    generic: bool
    tail: int  # +1 / -1, the sign of the skew: which tail its top tokens lie on (SIGN_CONVENTION)
    effect: str  # what it does to them: promotes / suppresses (out), fires on / is inhibited by
    top_tokens: list[TokenScore]  # on the channel's dominant tail, furthest out first
    history: list[float]  # unweighted kurtosis against optimisation step


class NeuronSideOut(BaseModel):
    model: str
    run: str  # the run hash
    layer: int
    neuron: int
    side: str
    norm: float
    kurtosis: float
    skew: float
    top_tokens: list[TokenScore]
    bottom_tokens: list[TokenScore]
    reconstruction: list[float]
    reconstruction_baseline: list[float]
    coverage: list[float]
    measures_version: int  # method/measures.MEASURES_VERSION its measures were computed under
    # measures.neuron_score: its best percentile among held-out random vectors' (50 = as good as
    # random); None before measures version 3
    score: float | None
    channels: list[ChannelOut]


def neuron_side(
    model_name: str,
    run_hash: str,
    neuron: T.Neuron,
    channels: list[T.Channel],
    channel_tokens: dict[int, list[tuple[int, float]]],
    tokens: list[str],
) -> NeuronSideOut:
    """channel_tokens: channel index -> [(token id, oriented z)] by rank, from channel_tokens rows.
    Stored z is oriented (positive on the channel's tail); here it is signed again by the skew."""

    def scores(pairs) -> list[TokenScore]:
        return [TokenScore(id=i, token=tokens[i], z=z) for i, z in pairs]

    out = []
    for ch in channels:
        sign = tail_of(ch.skew)
        out.append(
            ChannelOut(
                index=ch.channel,
                kurtosis=ch.kurtosis,
                skew=ch.skew,
                cos=ch.cos,
                loss=ch.loss,
                masked=len(T.masked_tokens(ch.masked)),
                step=ch.step,
                alpha=ch.alpha,
                faithfulness=ch.faithfulness,
                faithfulness_percentile=ch.faithfulness_percentile,
                percentile_local=ch.percentile_local,
                generic=ch.generic,
                tail=sign,
                effect=effect(neuron.side, sign),
                top_tokens=scores((i, z * sign) for i, z in channel_tokens.get(ch.channel, [])),
                history=[finite_or(x, 0.0) for x in T.kurtosis_history(ch.history)],
            )
        )
    return NeuronSideOut(
        model=model_name,
        run=run_hash,
        layer=neuron.layer,
        neuron=neuron.neuron,
        side=neuron.side,
        norm=neuron.norm,
        kurtosis=neuron.kurtosis,
        skew=neuron.skew,
        top_tokens=scores(neuron.top_tokens),
        bottom_tokens=scores(neuron.bottom_tokens),
        reconstruction=neuron.reconstruction,
        reconstruction_baseline=neuron.reconstruction_baseline,
        coverage=neuron.coverage,
        measures_version=neuron.measures_version,
        score=neuron.score,
        channels=out,
    )
