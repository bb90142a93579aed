"""pandas view of events: one row per event, ``to_dict()`` flattened. pandas is an optional extra.

    df = busted.to_dataframe(events)          # or Store.open_readonly(p).dataframe("events")
    df[df.kind == "flow_closed"].groupby("provider").bytes_received.sum()
    df[df.kind == "llm_call"].groupby(["comm", "request_model"])[["output_tokens", "cost_usd"]].sum()
    spend_by(df, "agent")                     # calls, tokens and spend per agent (docs/agents.md)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from busted.errors import MissingDependency
from busted.events import Event
from busted.sinks._codec import redact

__all__ = ["frame_from_dicts", "spend_by", "to_dataframe"]

_FIRST = ["time", "kind", "ts_ns", "wall_time"]
# LlmCall counts: nullable integers, so an unreported count stays <NA> (not 0, not a float NaN) and
# sums stay exact.
_COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
           "total_tokens", "tool_calls", "request_bytes", "response_bytes", "time_to_first_token_ns", "status",
           "error_code")


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError as exc:
        raise MissingDependency("pandas", "pandas", "busted's DataFrame output") from exc
    return pd


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become ``parent.child`` columns; lists (answers, alpn, cmdline) stay one cell."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def frame_from_dicts(rows: Iterable[dict[str, Any]]) -> Any:
    """A DataFrame from ``to_dict()``-shaped dicts (any kind, known to this version or not)."""
    pd = _pandas()
    flat = [_flatten(redact(r)) for r in rows]
    cols: dict[str, None] = dict.fromkeys(_FIRST[1:])
    for r in flat:
        cols.update(dict.fromkeys(r))
    df = pd.DataFrame(flat, columns=list(cols))
    for c in _COUNTS:
        if c in df.columns:
            try:
                df[c] = df[c].astype("Int64")
            except (TypeError, ValueError):
                pass  # a kind this version does not know put something else there: leave it as is
    df.insert(0, "time", pd.to_datetime(df["wall_time"].astype("float64"), unit="s", utc=True))
    return df


def to_dataframe(events: Iterable[Event]) -> Any:
    """One row per event: ``time`` (pandas datetime, UTC, from ``wall_time``), ``kind``, then every
    field of every kind present (a field a kind lacks is NaN/None). Enums are their lower-case
    names, as in ``to_dict()``; tuples are lists; credential-named keys are masked, and so are
    credentials in an LlmCall's path, user agent and captured content. LlmCall token counts (and
    status, TTFT, body sizes) are nullable integers (``Int64``): unreported is ``<NA>``, not 0."""
    return frame_from_dicts(e.to_dict() for e in events)


def spend_by(frame: Any, by: str | list[str] = "agent", *, unknown: str = "(none)") -> Any:
    """Calls, tokens and spend per ``by`` (``agent``, ``container_id``, ``comm``, ... or a list)
    of the LLM calls in ``frame``: a ``to_dataframe`` frame (its ``llm_call`` rows are taken) or
    ``Store.dataframe("llm_calls")``. One row per group, most spend first (then most calls):
    ``calls``, ``input_tokens``, ``output_tokens``, ``cost_usd`` and ``unpriced`` (calls without a
    price, whose cost is not in ``cost_usd``). A sum over only unreported counts stays ``<NA>``
    (unknown is not zero); a missing group value (no agent) is ``unknown``."""
    pd = _pandas()
    keys = [by] if isinstance(by, str) else list(by)
    calls = frame[frame["kind"] == "llm_call"] if "kind" in frame.columns else frame
    cols = ("input_tokens", "output_tokens", "cost_usd")
    if calls.empty:
        return pd.DataFrame(columns=["calls", *cols, "unpriced"], index=pd.Index([], name=keys[0]))
    calls = calls.assign(**{k: calls[k].astype("object").where(calls[k].notna(), unknown) for k in keys})
    for c in cols:
        if c not in calls.columns:
            calls = calls.assign(**{c: pd.NA})
    g = calls.groupby(keys, sort=False)
    out = pd.DataFrame({"calls": g.size()})
    for c in ("input_tokens", "output_tokens"):
        out[c] = g[c].sum(min_count=1).astype("Int64")
    out["cost_usd"] = g["cost_usd"].sum(min_count=1)
    out["unpriced"] = g["cost_usd"].apply(lambda s: int(s.isna().sum()))
    return out.sort_values(["cost_usd", "calls"], ascending=False, na_position="last")
