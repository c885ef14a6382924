"""Summaries of measured values, one definition each: what counts as a finite value, medians and
shares over them. Measures can be undefined (a random draw that leaves S without a denominator,
a channel with no tokens), so every summary here skips None, nan and inf instead of failing."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable


def finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def finite_or(x: float | None, default):
    """x as a float, or `default` where it is None, nan or inf (a stored column is not nullable)."""
    return float(x) if x is not None and math.isfinite(x) else default


def median(values: Iterable[float | None]) -> float:
    """The median of the finite values; nan if there are none."""
    values = finite(values)
    return statistics.median(values) if values else math.nan


def share(flags: Iterable[bool]) -> float:
    """The share of true flags; nan for none."""
    flags = list(flags)
    return sum(flags) / len(flags) if flags else math.nan


def interval(
    values: Iterable[float | bool], statistic=statistics.median, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of `statistic` (median by default; `share` for flags)
    over the finite values; (nan, nan) for fewer than 2. Seeded: a report regenerates the same."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(values) < 2:
        return math.nan, math.nan
    rng = random.Random(seed)
    found = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(draws))
    return found[int(0.025 * draws)], found[int(0.975 * draws) - 1]
