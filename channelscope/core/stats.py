"""Summaries of measured values, one definition each: what counts as a finite value, medians and
shares over them. Measures can be undefined (a random draw that leaves S without a denominator,
a channel with no tokens), so every summary here skips None, nan and inf instead of failing."""

from __future__ import annotations

import math
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
