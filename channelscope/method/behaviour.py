"""Do a channel's tokens show up where the neuron fires on real text? (docs/method.md, "Behaviour
on real text"). Pure numpy and scipy: the stored top contexts and corpus token counts in, one
small verdict per channel out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

ALPHA = 0.05  # the test's level; a page says "no evidence" above it, never "fails"


@dataclass(frozen=True)
class AtPeaks:
    """How many of the neuron's top contexts hold one of the channel's tokens at the position
    that side is about, against the chance that a corpus position holds one."""

    position: str  # "peak" (read sides: the token where the pre-activation peaks) or "next" (out)
    contexts: int  # top contexts with a token at that position
    hits: int  # of those, how many hold one of the channel's tokens there
    chance: float  # share of the corpus's positions holding one of the channel's tokens
    expected: float  # contexts * chance
    low: float  # 95 % Clopper-Pearson interval of hits / contexts
    high: float
    p_value: float  # two-sided exact binomial test of hits against chance
    expected_direction: str  # "more" when the channel raises the neuron (or the token), else "fewer"
    verdict: str  # "as expected", "opposite", "no evidence", "untestable"


def position_for(side: str) -> str:
    """Read sides respond to the token in the residual stream at the peak; `out` writes to the
    logits of the next token, so its evidence is the token that follows the peak."""
    return "next" if side == "out" else "peak"


def at_peaks(
    window_tokens: np.ndarray,  # [K, W] token ids of the top contexts, -1 off the document
    peak: int,  # index of the peak inside a window
    side: str,
    channel_tokens: np.ndarray,  # [T] the channel's top token ids
    token_counts: np.ndarray,  # [V] corpus occurrences of each token
    raises: bool,  # the channel's effect on the neuron (read) or on its tokens (out) is positive
) -> AtPeaks:
    position = position_for(side)
    column = window_tokens[:, peak + (1 if position == "next" else 0)]  # [K]
    column = column[column >= 0]
    hits = int(np.isin(column, channel_tokens).sum())
    total = max(int(token_counts.sum()), 1)
    chance = float(token_counts[channel_tokens].sum()) / total
    direction = "more" if raises else "fewer"
    n = int(column.size)
    if n == 0 or chance <= 0.0:
        # The corpus never holds these tokens: nothing the top contexts show could test them.
        return AtPeaks(position, n, hits, chance, n * chance, 0.0, 1.0, 1.0, direction, "untestable")
    test = binomtest(hits, n, min(chance, 1.0), alternative="two-sided")
    interval = test.proportion_ci(confidence_level=0.95, method="exact")
    observed_more = hits > n * chance
    if test.pvalue >= ALPHA:
        verdict = "no evidence"
    elif observed_more == raises:
        verdict = "as expected"
    else:
        verdict = "opposite"
    return AtPeaks(
        position=position,
        contexts=n,
        hits=hits,
        chance=chance,
        expected=n * chance,
        low=float(interval.low),
        high=float(interval.high),
        p_value=float(test.pvalue),
        expected_direction=direction,
        verdict=verdict,
    )
