"""Pure statistics for the benchmarks: percentiles, medians of paired ratios, spreads, histograms.

No I/O and no busted imports, so tests/unit/test_bench_math.py checks it without root.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["histogram", "paired_ratios", "percentile", "spread", "summary"]


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) with linear interpolation between closest ranks (numpy's default).

    Raises ValueError on an empty sequence or p outside [0, 100]: a figure from nothing is a bug.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def spread(values: Sequence[float], lo: float = 10, hi: float = 90) -> tuple[float, float]:
    """(p10, p90) by default: the band most runs fall in, less sensitive than min/max to one outlier."""
    return percentile(values, lo), percentile(values, hi)


def paired_ratios(pairs: Sequence[tuple[float, float]]) -> list[float]:
    """attached / detached for each adjacent (detached, attached) pair; pairs with a zero base are skipped
    (a slice that completed nothing measured nothing)."""
    return [a / d for d, a in pairs if d > 0]


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, p10, p90, min, max and n of a sample."""
    p10, p90 = spread(values)
    return {"n": len(values), "median": percentile(values, 50), "p10": p10, "p90": p90,
            "min": min(values), "max": max(values)}


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[tuple[str, int]]:
    """Counts per bucket [e[i], e[i+1]) for ascending ``edges``, plus "< e0" and ">= e_last" buckets
    (only when non-empty), as (label, count) rows. Every value lands in exactly one row."""
    if list(edges) != sorted(edges) or len(set(edges)) != len(edges) or not edges:
        raise ValueError("edges must be strictly ascending and non-empty")
    counts = [0] * (len(edges) + 1)
    for v in values:
        i = 0
        while i < len(edges) and v >= edges[i]:
            i += 1
        counts[i] += 1
    rows = []
    if counts[0]:
        rows.append((f"< {edges[0]:g}", counts[0]))
    for i in range(len(edges) - 1):
        rows.append((f"{edges[i]:g}–{edges[i + 1]:g}", counts[i + 1]))
    if counts[-1]:
        rows.append((f">= {edges[-1]:g}", counts[-1]))
    return rows
