"""pandas view of events: one row per event, ``to_dict()`` flattened. pandas is an optional extra."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from busted.errors import EnvironmentProblem
from busted.events import Event

__all__ = ["to_dataframe"]


def to_dataframe(events: Iterable[Event]) -> Any:
    """A DataFrame with a ``kind`` column, every event field as a column (missing -> NaN/None) and
    ``time`` (pandas datetime, UTC) from ``wall_time``."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise EnvironmentProblem("to_dataframe needs pandas: pip install 'busted[pandas]'") from exc
    rows = [e.to_dict() for e in events]
    df = pd.DataFrame(rows)
    if "wall_time" in df:
        df["time"] = pd.to_datetime(df["wall_time"], unit="s", utc=True)
    return df
