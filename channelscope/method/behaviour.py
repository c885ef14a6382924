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
    hit_rows: list[int]  # the contexts (rows of window_tokens) that hold one of them there


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
    inside = column >= 0  # the next token can run off the document
    hit_rows = np.flatnonzero(inside & np.isin(column, channel_tokens)).tolist()
    hits = len(hit_rows)
    total = max(int(token_counts.sum()), 1)
    chance = float(token_counts[channel_tokens].sum()) / total
    direction = "more" if raises else "fewer"
    n = int(inside.sum())
    if n == 0 or chance <= 0.0:
        # The corpus never holds these tokens: nothing the top contexts show could test them.
        return AtPeaks(
            position, n, hits, chance, n * chance, 0.0, 1.0, 1.0, direction, "untestable", hit_rows
        )
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
        hit_rows=hit_rows,
    )


# --- every position: the behavioural test of reports/behaviour.md -----------------------------------

RANDOM_SETS = 200  # frequency-matched random token sets per channel
PASS = 95.0  # a channel passes at this percentile among them (one-sided, 5 % by chance)
MIN_POSITIONS = 5  # fewer positions holding a token of the set: untestable


def frequency_bins(counts: np.ndarray) -> np.ndarray:
    """[V] a token's frequency bin: floor(log2(count + 1)), so a random replacement is about as
    common in the corpus as the token it replaces."""
    return np.floor(np.log2(counts.astype(np.float64) + 1)).astype(np.int64)


MIN_BIN = 20  # candidates a replacement is drawn from, at least: bins widen until they hold this many


def matched_sets(
    tokens: np.ndarray, bins: np.ndarray, count: int, generator: np.random.Generator
) -> np.ndarray:
    """[count, len(tokens)] random token sets, each token replaced by a random token of its
    frequency bin that is not in `tokens`. The most frequent tokens have bins of their own: a bin
    widens one step each way until it holds MIN_BIN others (those are then matched less closely)."""
    others = ~np.isin(np.arange(len(bins)), tokens)  # a random set holds none of the channel's tokens
    columns = []
    for t in tokens:
        width = 0
        while True:
            candidates = np.flatnonzero((np.abs(bins - bins[t]) <= width) & others)
            if len(candidates) >= MIN_BIN or width > int(bins.max()):
                break
            width += 1
        columns.append(generator.choice(candidates, size=count))
    return np.stack(columns, 1) if columns else np.zeros((count, 0), dtype=np.int64)


@dataclass(frozen=True)
class Tested:
    """One channel's behavioural figure against its frequency-matched random sets."""

    value: float  # the figure, oriented so that higher means "as the channel's sign says"
    random_median: float  # the same for the random sets
    percentile: float  # of value among the random sets' (ties half)
    positions: int  # positions the figure rests on (holding a token of the set)
    passed: bool | None  # percentile >= PASS; None when untestable


def _percentile(value: float, reference: np.ndarray) -> float:
    reference = reference[np.isfinite(reference)]
    if reference.size == 0 or not np.isfinite(value):
        return float("nan")
    return float(100.0 * ((reference < value).sum() + 0.5 * (reference == value).sum()) / reference.size)


def _tested(value: float, random: np.ndarray, positions: int) -> Tested:
    if positions < MIN_POSITIONS or not np.isfinite(value):
        return Tested(
            value, float(np.nanmedian(random)) if random.size else float("nan"), float("nan"), positions, None
        )
    p = _percentile(value, random)
    return Tested(value, float(np.nanmedian(random)), p, positions, bool(p >= PASS))


class ReadSide:
    """AUROC of a pre-activation [N] for positions whose token is in a set against the rest, for
    any number of sets from one ranking: rank sums per token make each set O(|set|)."""

    def __init__(self, values: np.ndarray, tokens: np.ndarray, vocab_size: int):
        from scipy.stats import rankdata

        ranks = rankdata(values)  # [N], ties averaged
        self.total = len(values)
        self.rank_sum = np.bincount(tokens, weights=ranks, minlength=vocab_size)  # [V]
        self.count = np.bincount(tokens, minlength=vocab_size)  # [V]

    def auroc(self, sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """sets [S, T] (distinct tokens per row assumed) -> (AUROC [S], positives [S])."""
        n = self.count[sets].sum(-1).astype(np.float64)
        r = self.rank_sum[sets].sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (r - n * (n + 1) / 2) / (n * (self.total - n))
        return auc, n.astype(np.int64)

    def test(self, channel_tokens: np.ndarray, raises: bool, random_sets: np.ndarray) -> Tested:
        (auc,), (n,) = self.auroc(channel_tokens[None])
        random, _ = self.auroc(random_sets)
        sign = 1.0 if raises else -1.0
        # Oriented around 0.5: a channel that lowers the neuron should sit at low AUROC.
        return _tested(0.5 + sign * (auc - 0.5), 0.5 + sign * (random - 0.5), int(n))


class WriteSide:
    """Among positions where the neuron is active, the share whose next token is in a set."""

    def __init__(self, active: np.ndarray, next_tokens: np.ndarray, vocab_size: int):
        kept = next_tokens[active & (next_tokens >= 0)]
        self.active = max(int(kept.size), 1)
        self.count = np.bincount(kept, minlength=vocab_size)  # [V]

    def share(self, sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hits = self.count[sets].sum(-1)
        return hits / self.active, hits

    def test(self, channel_tokens: np.ndarray, raises: bool, random_sets: np.ndarray) -> Tested:
        (share,), (hits,) = self.share(channel_tokens[None])
        random, random_hits = self.share(random_sets)
        sign = 1.0 if raises else -1.0
        # A suppressing channel passes with few hits: what it rests on is the hits chance expects.
        expected = float(np.median(random_hits)) if random_hits.size else 0.0
        return _tested(sign * float(share), sign * random, int(max(hits, round(expected))))
