"""Do a channel's tokens show up where the neuron fires on real text? (docs/method.md, "Behaviour
on real text"). Pure numpy and scipy: the stored top contexts and corpus token counts in, one
small verdict per channel out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from channelscope.core.stats import median

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
    """Untestable (passed None) with fewer than MIN_POSITIONS positions, or no random set to
    compare with (sets of tokens the corpus never holds have no figure)."""
    typical = median(random.tolist())
    p = _percentile(value, random)
    if positions < MIN_POSITIONS or not np.isfinite(p):
        return Tested(value, typical, float("nan"), positions, None)
    return Tested(value, typical, p, positions, bool(p >= PASS))


@dataclass(frozen=True)
class TokenStats:
    """One layer's pass over the corpus, summed per token: enough to test any token set against
    any vector of the layer without the positions (docs/method.md, "Behaviour on real text").
    Read sides are linear in x, so sums of x serve every neuron and every direction; the
    activation is not, so its sums are per neuron. Per-token rows are compact: `rows[t]` is
    token t's row, -1 for a token the corpus never holds."""

    rows: np.ndarray  # [V] int64
    count: np.ndarray  # [Vc] positions holding the token
    next_count: np.ndarray  # [Vc] positions followed (in their document) by the token
    x_sum: np.ndarray  # [Vc, d] the MLP input x summed over the positions holding the token
    x_mean: np.ndarray  # [d] over every position
    x_cov: np.ndarray  # [d, d] float64 covariance of x over every position
    act_next_sum: np.ndarray  # [d_mlp, Vc] act(g) * u summed over the positions followed by the token
    act_mean: np.ndarray  # [d_mlp] over every position
    act_std: np.ndarray  # [d_mlp]


def _gather(stats: TokenStats, sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sets [S, T] token ids -> their rows [S, T] (0 where absent) and presence [S, T]."""
    rows = stats.rows[sets]
    return np.where(rows >= 0, rows, 0), rows >= 0


def read_effect(stats: TokenStats, w: np.ndarray, sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardised mean pre-activation x . w at the positions holding a token of each set:
    (mean over them - mean over all) / sd over all.  w [d], sets [S, T] -> (effect [S], positions [S])."""
    rows, present = _gather(stats, sets)
    w = w.astype(np.float64)
    unique, inverse = np.unique(rows, return_inverse=True)  # one row read per token (x_sum may be on disk)
    per_token = np.asarray(stats.x_sum[unique], np.float64) @ w  # [U]
    projected = np.where(present, per_token[inverse.reshape(rows.shape)], 0.0)  # [S, T]
    n = np.where(present, stats.count[rows], 0).sum(-1)  # [S]
    sd = float(np.sqrt(max(w @ stats.x_cov @ w, 1e-30)))
    with np.errstate(invalid="ignore", divide="ignore"):
        effect = (projected.sum(-1) / n - float(stats.x_mean @ w)) / sd
    return effect, n


def write_effect(stats: TokenStats, neuron: int, sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardised mean activation at the positions whose next token is in each set.
    sets [S, T] -> (effect [S], positions [S])."""
    rows, present = _gather(stats, sets)
    sums = np.where(present, np.asarray(stats.act_next_sum[neuron], np.float64)[rows], 0.0).sum(-1)  # [S]
    n = np.where(present, stats.next_count[rows], 0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        effect = (sums / n - stats.act_mean[neuron]) / max(float(stats.act_std[neuron]), 1e-30)
    return effect, n


def every_position(
    stats: TokenStats,
    side: str,
    neuron: int,
    w: np.ndarray,  # [d] the neuron's vector on a read side (unused on `out`)
    channel_tokens: np.ndarray,  # [T] distinct
    raises: bool,
    random_sets: np.ndarray,  # [S, T] frequency-matched (matched_sets)
) -> Tested:
    """The channel's set against the random sets, oriented by its sign: a channel that lowers the
    neuron (or its tokens) passes when its positions sit low."""
    sets = np.concatenate([channel_tokens[None], random_sets]).astype(np.int64)
    effect, n = write_effect(stats, neuron, sets) if side == "out" else read_effect(stats, w, sets)
    sign = 1.0 if raises else -1.0
    return _tested(sign * float(effect[0]), sign * effect[1:], int(n[0]))
