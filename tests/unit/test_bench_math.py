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


def test_the_markdown_table_names_skips_and_failures():
    import all as bench_all

    ab_row = {"config": "busted", "pairs": 3, "ratio_median": 0.8, "ratio_p10": 0.7, "ratio_p90": 0.9,
              "ratios": [0.7, 0.8, 0.9], "detached_conn_per_s": 1000, "events_per_s": 4000, "lost": 0,
              "lost_total": 5, "tracer_cpu_cores": 0.3}
    r = {"machine": {"nproc": 2, "kernel": "6.x", "python": "3.11", "commit": "abc", "date": "today"},
         "params": bench_all.QUICK,
         "offline": [{"us_per_event": 4.4, "events": 10}, {"us_per_event": 16.0, "events": 12}],
         "live": {"failed": "RuntimeError: no READY line"},
         "p2": {"failed": "boom"}, "cpu500": {"failed": "boom"}, "p5": {"failed": "boom"},
         "memory": {"failed": "boom"},
         "ab": {"procs": 4, "table": [ab_row, {"config": "busted-busyhost", "skipped": "not in this busted"}]}}
    md = bench_all.markdown(r, "bench/all.py --quick")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 0.800 | p10–p90 0.700–0.900 over 3 pairs" in rows["churn ratio, default Monitor (flows, DNS/TLS "
                                                                 "capture, plaintext on)"]
    assert "| skipped | not in this busted |" in rows["churn ratio, busy-host mode"]
    assert "| 4.4 / 16.0 µs |" in md
    assert "RuntimeError: no READY line" in md and md.count("| failed |") == 5
    assert "- busted (1000 conn/s): 0.700, 0.800, 0.900" in md
