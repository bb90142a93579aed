"""The pure statistics and ordering helpers of bench/hooks.py (no BPF, no root)."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def hooks():
    sys.path.insert(0, str(_BENCH))  # hooks.py imports its neighbour churn.py
    try:
        spec = importlib.util.spec_from_file_location("bench_hooks", _BENCH / "hooks.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(_BENCH))


def test_quantile_matches_linear_interpolation(hooks):
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert hooks.quantile(xs, 0.0) == 1.0
    assert hooks.quantile(xs, 1.0) == 5.0
    assert hooks.quantile(xs, 0.5) == 3.0
    assert hooks.quantile(xs, 0.1) == pytest.approx(1.4)
    assert hooks.quantile(xs, 0.9) == pytest.approx(4.6)
    assert hooks.quantile([7.0], 0.3) == 7.0
    # Same as the standard library's "inclusive" method at the deciles.
    ys = [0.91, 1.02, 0.97, 1.10, 0.88, 0.99, 1.05, 0.93]
    deciles = statistics.quantiles(ys, n=10, method="inclusive")
    assert hooks.quantile(ys, 0.1) == pytest.approx(deciles[0])
    assert hooks.quantile(ys, 0.9) == pytest.approx(deciles[-1])


def test_quantile_rejects_bad_input(hooks):
    with pytest.raises(ValueError):
        hooks.quantile([], 0.5)
    with pytest.raises(ValueError):
        hooks.quantile([1.0], 1.5)


def test_median_ci_order_statistics(hooks):
    xs = [float(i) for i in range(1, 16)]  # n = 15: the textbook 95 % interval is (x4, x12)
    assert hooks.median_ci(xs) == (4.0, 12.0)
    # Its coverage really is >= 95 %, and one step narrower would not be.
    cover = 1 - 2 * sum(math.comb(15, i) for i in range(4)) / 2**15
    narrower = 1 - 2 * sum(math.comb(15, i) for i in range(5)) / 2**15
    assert cover >= 0.95 > narrower
    # n = 20: (x6, x15); order of input does not matter.
    ys = [float(i) for i in range(20, 0, -1)]
    assert hooks.median_ci(ys) == (6.0, 15.0)


def test_median_ci_small_n_is_the_range(hooks):
    assert hooks.median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert hooks.median_ci([2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError):
        hooks.median_ci([])


def test_paired_ratios_skip_empty_detached_slices(hooks):
    assert hooks.paired_ratios([(90.0, 100.0), (50.0, 0.0), (110.0, 100.0)]) == [0.9, 1.1]


def test_summarize(hooks):
    ratios = [1.0, 0.9, 1.1, 0.95, 1.05]
    s = hooks.summarize(ratios)
    assert s["n"] == 5
    assert s["median"] == 1.0
    assert s["p10"] == pytest.approx(0.92)
    assert s["p90"] == pytest.approx(1.08)
    assert (s["ci_lo"], s["ci_hi"]) == (0.9, 1.1)


def test_slice_order_alternates_and_rotation(hooks):
    assert [hooks.attached_first(i) for i in range(4)] == [True, False, True, False]
    assert hooks.rotate(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert hooks.rotate(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert hooks.rotate([], 2) == []


def test_families_are_well_formed(hooks):
    assert hooks.FAMILIES["noop"][1] == []
    kinds = {kind for _, hs in hooks.FAMILIES.values() for kind, _ in hs}
    assert kinds == {"tp", "raw", "cgroup"}
    for _, hs in hooks.FAMILIES.values():
        for kind, target in hs:
            if kind == "tp":
                assert target.count(":") == 1
            elif kind == "raw":
                assert ":" not in target
            else:
                assert target.startswith("CGROUP_")
    # "all of busted" is the union of its three sets, with nothing twice.
    parts = ["busted-sock-tp", "capture-syscalls", "lineage"]
    union = [h for p in parts for h in hooks.FAMILIES[p][1]]
    assert hooks.FAMILIES["busted-all"][1] == union
    assert len(set(union)) == len(union)


def test_paired_deltas(hooks):
    assert hooks.paired_deltas([(120.0, 100.0), (95.0, 100.0)]) == [20.0, -5.0]
    assert hooks.paired_deltas([]) == []


def test_micro_summary_pairs_each_loop(hooks):
    rows = [{"on": {"getppid_ns": 300.0 + i, "udp_ns": 5000.0 + 10 * i},
             "off": {"getppid_ns": 200.0, "udp_ns": 4900.0}} for i in range(5)]
    m = hooks.micro_summary(rows)
    assert m["getppid_ns"]["delta_median"] == 102.0
    assert m["getppid_ns"]["off_median"] == 200.0
    assert m["udp_ns"]["delta_median"] == 120.0
    assert m["udp_ns"]["delta_p10"] == pytest.approx(104.0)
