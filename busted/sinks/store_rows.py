"""How an event becomes rows: the typed tables' columns, their statements, and the encoding of
an event into its ``events`` row and its typed row (no database access)."""

from __future__ import annotations

import json
import math
import operator
import sqlite3
from collections.abc import Callable
from typing import Any, NamedTuple

from busted.events import (
    DnsAnswer,
    Event,
    EventsLost,
    FlowClassified,
    FlowClosed,
    FlowOpened,
    FlowSummary,
    LlmCall,
    McpMessage,
    TlsClientHello,
)
from busted.sinks._codec import redact, redacted_dict
from busted.sinks.flowview import FlowState, FlowView

_FLOW_COLS = ("flow_id", "opened", "closed", "direction", "pid", "tid", "uid", "ppid", "comm", "exe",
              "cmdline", "cgroup_id", "netns", "family", "saddr", "sport", "daddr", "dport", "preexisting",
              "hostname", "provider", "evidence", "confidence", "bytes_sent", "bytes_received", "duration_ns",
              "ancestry", "agent", "agent_pid", "agent_evidence", "container_id", "container_runtime", "pod_uid",
              "pod_qos", "proc_start_time")
_CLASS_COLS = ("hostname", "provider", "evidence", "confidence")
_IDENT_COLS = ("flow_id", "direction", "pid", "tid", "uid", "comm", "ppid", "exe", "cmdline", "cgroup_id", "netns",
               "family", "saddr", "sport", "daddr", "dport", "preexisting", "hostname", "provider", "evidence",
               "confidence", "ancestry", "agent", "agent_pid", "agent_evidence", "container_id", "container_runtime",
               "pod_uid", "pod_qos", "proc_start_time")
# Every field of the event (a unit test pins them to the dataclasses), after ts (= wall_time) and ts_ns.
_CALL_COLS = ("ts", "ts_ns", *_IDENT_COLS, "api", "operation", "method", "path", "http_version", "stream_id",
              "request_model", "response_model", "stream", "status", "error_type", "input_tokens",
              "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "total_tokens",
              "finish_reason", "tool_calls", "request_bytes", "response_bytes", "time_to_first_token_ns",
              "duration_ns", "user_agent", "complete", "cost_usd", "price_source", "prompt", "completion",
              "ttft_source", "response_id")
_MCP_COLS = ("ts", "ts_ns", *_IDENT_COLS, "direction_sent", "jsonrpc_method", "jsonrpc_id", "session_id", "tool",
             "error_code", "is_notification")
# Every FlowSummary field after ts (= wall_time) and ts_ns.
_SUMMARY_COLS = ("ts", "ts_ns", "pid", "uid", "comm", "exe", "cgroup_id", "direction", "family", "peer", "port",
                 "count", "bytes_sent", "bytes_received", "start_ns", "end_ns", "start_time", "end_time")
_BOOL_COLS = frozenset({"preexisting", "stream", "complete", "direction_sent", "is_notification"})
_CLOSE_COLS = ("closed", "bytes_sent", "bytes_received", "duration_ns")


def _keep_if_null(c: str) -> str:
    return f"{c}=coalesce(excluded.{c}, flows.{c})"


# One upsert for every flow change (the row is FlowView's state): identity from the latest event;
# a classification only when the event carries one; an opened time already known wins (it may
# come from FlowOpened while the state only derived it from the duration); close facts never
# go back to NULL (a FlowOpened replayed after its close keeps them).
_SQL_FLOW = (f"INSERT INTO flows({', '.join(_FLOW_COLS)}) VALUES ({', '.join('?' * len(_FLOW_COLS))}) "
             "ON CONFLICT(flow_id) DO UPDATE SET " + ", ".join(
                 [f"{c}=excluded.{c}" for c in _FLOW_COLS
                  if c not in ("flow_id", "opened", *_CLASS_COLS, *_CLOSE_COLS)]
                 + [f"{c}=CASE WHEN excluded.provider IS NULL AND excluded.hostname IS NULL THEN flows.{c} "
                    f"ELSE excluded.{c} END" for c in _CLASS_COLS]
                 + ["opened=coalesce(flows.opened, excluded.opened)"]
                 + [_keep_if_null(c) for c in _CLOSE_COLS]))
_I_OPENED = _FLOW_COLS.index("opened")
_I_CLASS = tuple(_FLOW_COLS.index(c) for c in _CLASS_COLS)
_I_HOST, _I_PROVIDER = _FLOW_COLS.index("hostname"), _FLOW_COLS.index("provider")
_I_CLOSE = tuple(_FLOW_COLS.index(c) for c in _CLOSE_COLS)


def _merge_flow_rows(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    """One flows row that upserts as ``a`` then ``b`` would (the rules of _SQL_FLOW, applied to
    ``a`` as the stored row): identity from ``b``; the classification of ``b`` if it has one, else
    ``a``'s; the first known opened time; close facts of ``b``, else ``a``'s."""
    m = list(b)
    if b[_I_PROVIDER] is None and b[_I_HOST] is None:
        for i in _I_CLASS:
            m[i] = a[i]
    if a[_I_OPENED] is not None:
        m[_I_OPENED] = a[_I_OPENED]
    for i in _I_CLOSE:
        if m[i] is None:
            m[i] = a[i]
    return tuple(m)


_SQL_EVENT = "INSERT INTO events(ts, kind, flow_id, pid, comm, provider, json) VALUES (?,?,?,?,?,?,?)"
_SQL_DNS = ("INSERT INTO dns_answers(ts, pid, comm, netns, transport, server, qname, qtype, rcode, answers,"
            " cname_chain) VALUES (?,?,?,?,?,?,?,?,?,?,?)")
_SQL_TLS = ("INSERT INTO tls_hellos(ts, flow_id, pid, comm, saddr, sport, daddr, dport, sni, alpn, versions,"
            " ja4) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
_SQL_LOSS = "INSERT INTO losses(ts, place, count, detail) VALUES (?,?,?,?)"
_SQL_CALL = f"INSERT INTO llm_calls({', '.join(_CALL_COLS)}) VALUES ({', '.join('?' * len(_CALL_COLS))})"
_SQL_MCP = f"INSERT INTO mcp_messages({', '.join(_MCP_COLS)}) VALUES ({', '.join('?' * len(_MCP_COLS))})"
_SQL_SUMMARY = (f"INSERT INTO flow_summaries({', '.join(_SUMMARY_COLS)}) "
                f"VALUES ({', '.join('?' * len(_SUMMARY_COLS))})")
# table -> the expression retention compares with a cutoff
_TABLES_WITH_TS = {"events": "ts", "dns_answers": "ts", "tls_hellos": "ts", "losses": "ts",
                   "llm_calls": "ts", "mcp_messages": "ts", "flow_summaries": "ts",
                   "flows": "coalesce(closed, opened)"}
_INT64 = (-(2**63), 2**63 - 1)


def _sql(v: Any) -> Any:
    """A value SQLite takes as is: bools as 0/1, ints beyond int64 as REAL (what an INTEGER column
    makes of them anyway; the exact value stays in ``events.json``), lists/dicts as JSON,
    strings that are not valid UTF-8 (lone surrogates) escaped."""
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, str):
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return v.encode("utf-8", "backslashreplace").decode("utf-8")
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v if _INT64[0] <= v <= _INT64[1] else float(v)
    if isinstance(v, list | tuple | dict):
        return _json(v)
    return str(v)


_LIST_JSON = json.JSONEncoder(default=str)  # = json.dumps(v, default=str), built once
_STRS = frozenset({str})
_JSON_SEEN: dict[tuple[str, ...], str] = {}  # lists of str -> their JSON: bounded, cleared when full


def _c_encoder() -> Callable[[Any, int], Any] | None:
    """The standard library's own C encoder, made once with ``_LIST_JSON``'s settings (its
    ``encode()`` makes one per call); None if this Python has none, or it writes otherwise."""
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]

        # markers None: no cycle check; the values are redact()'s fresh copies (a cycle would have
        # failed there), and _json falls back to the checking encoder on any error anyway
        enc: Callable[[Any, int], Any] = c_make_encoder(None, str, encode_basestring_ascii, None, ": ", ", ",
                                                        False, False, True)
        probe = [{"pid": 1, "comm": "caf\u00e9\ud800", "exe": None, "f": 1e16, "b": True, "n": math.nan,
                  "l": [-(2**70), "x", math.inf]}, "\x1b", (), {}]
        return enc if "".join(enc(probe, 0)) == _LIST_JSON.encode(probe) else None
    except Exception:  # noqa: BLE001 - not CPython's json: the plain encoder
        return None


_C_JSON = _c_encoder()


def _json(v: list[Any] | tuple[Any, ...] | dict[Any, Any]) -> str:
    """``json.dumps(v, default=str)``. Lists of strings (command lines, ALPN ids, TLS versions,
    CNAME chains) repeat from event to event: their JSON is remembered (at most 4096 of them)."""
    if type(v) is not list or not _STRS.issuperset(map(type, v)):
        if _C_JSON is not None:
            try:
                return "".join(_C_JSON(v, 0))
            except Exception:  # noqa: BLE001 - the checking encoder says what is wrong (a cycle, ...)
                pass
        return _LIST_JSON.encode(v)
    key = tuple(v)
    js = _JSON_SEEN.get(key)
    if js is None:
        if len(_JSON_SEEN) >= 4096:
            _JSON_SEEN.clear()
        js = _JSON_SEEN[key] = _LIST_JSON.encode(v)
    return js


_INT64_LO, _INT64_HI = _INT64
# Exact types sqlite3 binds as they are. Two values of them it refuses, at bind time: an int beyond
# int64 (OverflowError) and a str with a lone surrogate (UnicodeEncodeError); a transaction that
# meets one is done again with every row made strict (_strict: what _sql makes of each value).
_BIND = frozenset({type(None), float, int, str})


def _row(*values: Any) -> tuple[Any, ...]:
    """A row of ``_sql`` values, but for ints and strs, which are left to ``_strict`` if SQLite
    refuses them (rare: the type check is one C-level pass, not a Python step per column)."""
    if _BIND.issuperset(map(type, values)):
        return values
    return tuple([v if type(v) in _BIND else _sql(v) for v in values])


def _row_at(values: tuple[Any, ...], at: tuple[int, ...]) -> tuple[Any, ...]:
    """``_row(*values)``, the columns at ``at`` (the ones a table's lists and bools go to) made
    first, so the rest usually passes the C-level check without a Python step per column."""
    out = list(values)
    for i in at:
        if type(out[i]) not in _BIND:
            out[i] = _sql(out[i])
    return _row(*out)


def _strict(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with every value as ``_sql`` makes it (ints beyond int64 as REAL, lone surrogates
    escaped): what ``_row`` leaves to SQLite, for the transaction it refused."""
    out = []
    for v in row:
        t = type(v)
        if v is None or t is float or t is str and v.isascii() or t is int and _INT64_LO <= v <= _INT64_HI:
            out.append(v)
        else:
            out.append(_sql(v))
    return tuple(out)


_GET_FLOW = operator.itemgetter(*_FLOW_COLS)
_FLOW_AT = tuple(i for i, c in enumerate(_FLOW_COLS) if c in ("cmdline", "ancestry", *_BOOL_COLS))


def _flow_row(st: FlowState, ev: Event, d: dict[str, Any]) -> tuple[Any, ...]:
    # d is redact(ev.to_dict()): the state's flow is usually the event itself (else a copy of it
    # with the known classification merged in, encoded here).
    d = {**(d if st.flow is ev else redacted_dict(st.flow)), "opened": st.opened, "closed": st.closed,
         "bytes_sent": st.bytes_sent, "bytes_received": st.bytes_received, "duration_ns": st.duration_ns}
    try:
        return _row_at(_GET_FLOW(d), _FLOW_AT)
    except KeyError:  # a flow class without every identity field
        return _row(*(d.get(c) for c in _FLOW_COLS))


def _spread(d: dict[str, Any]) -> tuple[str, tuple[Any, ...]] | None:
    """The llm_calls / mcp_messages row of a (redacted) ``to_dict()`` of an LlmCall or McpMessage."""
    d = {**d, "ts": d.get("wall_time")}
    if d.get("kind") == LlmCall.kind:
        return _SQL_CALL, _row(*(d.get(c) for c in _CALL_COLS))
    if d.get("kind") == McpMessage.kind:
        return _SQL_MCP, _row(*(d.get(c) for c in _MCP_COLS))
    return None


def _backfill(db: sqlite3.Connection) -> None:
    """Spread the calls and messages an older store kept only in ``events`` into their tables."""
    cur = db.execute("SELECT json FROM events WHERE kind IN (?, ?) ORDER BY id", (LlmCall.kind, McpMessage.kind))
    for (js,) in cur.fetchall():
        try:
            typed = _spread(redact(json.loads(js)))
        except (ValueError, TypeError):
            continue  # unreadable JSON stays where it is, in `events`
        if typed is not None:  # every value made here: an old event's JSON may hold any int or string
            db.execute(typed[0], _strict(typed[1]))


_FLOW_EVENTS = (FlowOpened, FlowClassified, FlowClosed)  # a tuple: isinstance with X | Y builds the union per call
_CALLS = (LlmCall, McpMessage)
_LISTS_AT = (9, 10)  # the list columns of a dns_answers row (answers, cname_chain), a tls_hellos one (alpn, versions)


def _typed(ev: Event, d: dict[str, Any], flows: FlowView) -> tuple[str, tuple[Any, ...]] | None:
    """The typed-table statement for one event (None: it lives only in ``events``)."""
    ts = ev.wall_time
    if isinstance(ev, _FLOW_EVENTS):
        change = flows.update(ev)
        return None if change is None else (_SQL_FLOW, _FlowRow(change.after, ev, d, change.before is not None))
    if isinstance(ev, DnsAnswer):
        return _SQL_DNS, _row_at((ts, ev.pid, ev.comm, ev.netns, ev.transport, ev.server, ev.qname, ev.qtype,
                                  ev.rcode, d["answers"], d["cname_chain"]), _LISTS_AT)
    if isinstance(ev, TlsClientHello):
        return _SQL_TLS, _row_at((ts, ev.flow_id, ev.pid, ev.comm, ev.saddr, ev.sport, ev.daddr, ev.dport, ev.sni,
                                  d["alpn"], d["versions"], ev.ja4), _LISTS_AT)
    if isinstance(ev, EventsLost):
        return _SQL_LOSS, _row(ts, d["where"], ev.count, ev.detail)
    if isinstance(ev, _CALLS):
        return _spread(d)
    if isinstance(ev, FlowSummary):
        d = {**d, "ts": ts}
        return _SQL_SUMMARY, _row(*(d.get(c) for c in _SUMMARY_COLS))
    return None  # any other kind (including future ones): kept in `events`


class _FlowRow(NamedTuple):
    """A flows row not built yet: a batch writes one row per flow, built from its last state
    (``_flow_rows``). ``chained``: FlowView knew the flow before this event."""

    state: FlowState
    event: Event
    data: dict[str, Any]
    chained: bool

    def build(self) -> tuple[Any, ...]:
        return _flow_row(self.state, self.event, self.data)


def _flow_rows(changes: list[_FlowRow]) -> tuple[Any, ...]:
    """The one flows row that upserts as ``changes`` (one flow's, in order) would, one by one.
    When FlowView carried the flow from each change to the next, the last state holds everything
    the earlier rows would have written (classification merged, opened time kept, close facts
    only at the end): build that one. Otherwise (the flow was forgotten in between: a replayed
    open after its close, an eviction) build them all and merge them as the upsert does."""
    if all(c.chained for c in changes[1:]):
        return changes[-1].build()
    row = changes[0].build()
    for c in changes[1:]:
        row = _merge_flow_rows(row, c.build())
    return row


class _Row(NamedTuple):
    """One encoded event: its ``events`` row, its typed-table statement, and for the store's own
    loss record (``src`` None) the number of drops it records."""

    src: Event | None
    event: tuple[Any, ...]
    typed: tuple[str, tuple[Any, ...]] | None
    lost: int
