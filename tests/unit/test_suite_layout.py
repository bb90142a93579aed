"""The test suite is collected by basename (no packages): two test files with one name in different
folders break the whole run at collection. Keep them unique."""

from collections import Counter
from pathlib import Path


def test_test_file_basenames_are_unique():
    root = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in root.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
