"""The benchmarks' statistics (bench/benchmath.py): the figures in docs/benchmarks.md rest on them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from benchmath import histogram, paired_ratios, percentile, spread, summary  # noqa: E402


def test_percentile_interpolates_like_numpy_linear():
    xs = [10, 20, 30, 40]
    assert percentile(xs, 0) == 10 and percentile(xs, 100) == 40
    assert percentile(xs, 50) == 25  # halfway between the middle two
    assert percentile(xs, 90) == pytest.approx(37.0)  # rank 2.7
    assert percentile([5], 99) == 5


def test_percentile_ignores_input_order_and_rejects_nonsense():
    assert percentile([3, 1, 2], 50) == 2
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_spread_and_summary():
    xs = list(range(1, 12))  # 1..11
    assert spread(xs) == (2, 10)
    s = summary(xs)
    assert (s["n"], s["median"], s["p10"], s["p90"], s["min"], s["max"]) == (11, 6, 2, 10, 1, 11)


def test_paired_ratios_skip_empty_bases():
    assert paired_ratios([(100, 90), (0, 50), (200, 210)]) == [0.9, 1.05]


def test_histogram_puts_every_value_in_one_bucket():
    rows = histogram([0.5, 1, 1.5, 2, 9, 100], [1, 2, 10])
    assert rows == [("< 1", 1), ("1–2", 2), ("2–10", 2), (">= 10", 1)]
    assert sum(c for _l, c in rows) == 6
    assert histogram([1.5], [1, 2]) == [("1–2", 1)]  # empty open-ended buckets are left out
    with pytest.raises(ValueError):
        histogram([1], [2, 1])
