"""What the web page shows, kept in bounded windows; no I/O, no web framework.

``WebState`` is fed events (live, from the Monitor's stream) or stored dicts (``busted ui --store``)
and answers the page's questions: the recent calls, flows by who talks to where, policy decisions,
MCP messages, losses, and spend over time. Every window is bounded (``deque(maxlen=...)`` or an
evicting dict) and what falls out is counted.

With no tab open the cost per event is small and bounded: an event the page does not show costs a
set lookup; a call, MCP message, decision or loss is appended as it came (turned into a redacted
dict, ``busted.sinks.redact``, the same redaction as every other output, only when a page asks); a
flow close or classification updates its group in place. Live tabs subscribe with ``subscribe()``;
events are encoded for them once per batch, never per tab, and only while one is subscribed.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from busted.events import Direction, Event, Evidence

__all__ = ["FLOW_FIELDS", "SHOWN_KINDS", "Filters", "WebState", "flow_record"]

# Event kinds the page shows; everything else is ignored at the cost of one set lookup.
SHOWN_KINDS = frozenset({"llm_call", "mcp_message", "policy_decision", "events_lost", "flow_classified",
                         "flow_closed"})
_LISTS = {"llm_call": "calls", "mcp_message": "mcp", "policy_decision": "decisions", "events_lost": "losses"}
_KEPT_KINDS = SHOWN_KINDS | {"budget_spend", "budget_exceeded"}
SPEND_KEYS = ("provider", "model", "agent", "container", "comm")


def _as_dict(item: Any) -> dict[str, Any]:
    """An event (live) or a stored dict, as the redacted dict every output writes."""
    if isinstance(item, dict):
        return item
    from busted.sinks import redact

    try:
        return redact(item.to_dict())
    except Exception:  # noqa: BLE001 - an event that will not encode is shown by kind alone
        return {"kind": getattr(item, "kind", "unknown"), "wall_time": getattr(item, "wall_time", 0.0)}


class Filters:
    """The CLI's filters, from a page's query string: pid, comm, provider, agent, container.

    ``provider=none`` matches events with no provider, as ``--provider none`` does."""

    KEYS = ("pid", "comm", "provider", "agent", "container")

    def __init__(self, query: Mapping[str, str]) -> None:
        self.want: dict[str, str] = {}
        for k in self.KEYS:
            v = (query.get(k) or "").strip()
            if v:
                self.want[k] = v[:256]

    def __bool__(self) -> bool:
        return bool(self.want)

    def match(self, d: Mapping[str, Any]) -> bool:
        for k, v in self.want.items():
            field = "container_id" if k == "container" else k
            have = d.get(field)
            if k == "provider" and v == "none":
                if have is not None:
                    return False
            elif have is None or str(have) != v:
                return False
        return True


# Flows are grouped as they come, by who talks to where: (comm, exe, hostname or peer, provider,
# port, direction). A close adds to its group's counts; a classification updates what the group
# shows. Only closes and classifications are shown (not opens: a flow appears once it is tied to a
# provider or ends). The groups are dicts in an LRU map bounded by ``max_flows``: no window of
# events is kept, so the memory is bounded by the groups, not by the event rate.
_FLOW_KINDS = {"flow_closed": True, "flow_classified": False}  # kind -> counts as one flow


class _Attrs(dict):
    """A stored event (a dict as ``to_dict()`` wrote it) read like a live one: ``d.comm``; a
    missing field reads as None (older stores lack newer fields)."""

    __slots__ = ()
    __getattr__ = dict.get


#: The fields of a flow close or classification the flows view groups by, in ``flow_record``'s order.
FLOW_FIELDS = ("kind", "comm", "exe", "hostname", "daddr", "provider", "dport", "direction", "wall_time", "pid",
               "uid", "evidence", "agent", "container_id", "bytes_sent", "bytes_received")


# Enum members by name, one table per enum: an enum's ``name`` is a property, read per flow here
# (and IntEnums of two classes can be equal, so one table would mix them). A stored dict's names
# (strings) are not keys and come back as they are.
_DIRECTION_NAMES: dict[Any, str] = {m: m.name.lower() for m in Direction}
_EVIDENCE_NAMES: dict[Any, str] = {m: m.name.lower() for m in Evidence}


def flow_record(ev: Any) -> tuple[Any, ...]:
    """A flow close or classification (an event, or a stored dict read through ``_Attrs``) as the
    tuple of plain values ``WebState.write_flows`` takes (``FLOW_FIELDS`` order; enums by name)."""
    closed = ev.kind == "flow_closed"
    d, e = ev.direction, ev.evidence
    return (ev.kind, ev.comm, ev.exe, ev.hostname, ev.daddr, ev.provider, ev.dport, _DIRECTION_NAMES.get(d, d),
            ev.wall_time, ev.pid, ev.uid, _EVIDENCE_NAMES.get(e, e), ev.agent, ev.container_id,
            (ev.bytes_sent or 0) if closed else 0, (ev.bytes_received or 0) if closed else 0)


class WebState:
    """Bounded windows of what the page shows. Thread-safe: the Monitor's thread writes, the web
    server's thread reads."""

    def __init__(self, *, max_items: int = 5000, max_flows: int = 2000,
                 stats: Callable[[], Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, collections.deque[Any]] = {
            name: collections.deque(maxlen=max_items) for name in ("calls", "mcp", "decisions", "losses")}
        # the flows view's groups, updated per close/classification (see _FLOW_KINDS), LRU-bounded
        self._flows: collections.OrderedDict[tuple[Any, ...], dict[str, Any]] = collections.OrderedDict()
        self.max_flows = max_flows
        self.flows_evicted = 0  # groups that fell out (the least recently seen) to make room
        self.dropped_window = 0  # items that fell out of a full window (shown on the health view)
        self.seen = 0
        self.started = time.time()
        self._stats = stats
        self._subscribers: list[Callable[[list[dict[str, Any]]], None]] = []
        self.lost_by_place: dict[str, int] = {}
        # budgets (docs/policy.md "Budgets"): the latest spend per budget x scope, bounded
        self._budgets: collections.OrderedDict[tuple[str, str], dict[str, Any]] = collections.OrderedDict()
        self.max_budget_rows = 1000

    # -- writing (the Monitor's thread) -------------------------------------------------------

    def set_stats(self, stats: Callable[[], Any] | None) -> None:
        self._stats = stats

    def write(self, ev: Event | dict[str, Any]) -> None:
        self.write_batch((ev,))

    def write_batch(self, events: Iterable[Event | dict[str, Any]]) -> None:
        """Keep what the page shows; with a tab open, encode the streamed events once and publish.

        The hot path of a monitor with ``--ui``: an event the page does not show costs a set
        lookup; a flow close or classification updates its group in place (no copy, no encoding)."""
        shown: list[Any] = []
        n = 0
        with self._lock:
            subscribed = bool(self._subscribers)
            for orig in events:
                ev: Any = _Attrs(orig) if isinstance(orig, dict) else orig
                kind = ev.kind
                if kind not in _KEPT_KINDS:  # flow opens, DNS, TLS hellos...: the common case
                    continue
                if kind in _FLOW_KINDS:
                    n += 1
                    self._add_flow(flow_record(ev))
                    continue
                name = _LISTS.get(kind)
                if name is None:
                    if kind in ("budget_spend", "budget_exceeded"):
                        self._budget(_as_dict(orig))
                    continue
                n += 1
                q = self._items[name]
                if len(q) == q.maxlen:
                    self.dropped_window += 1  # out of the page's window (every other output has it)
                q.append(orig)
                if kind == "events_lost":
                    d = _as_dict(orig)
                    w = str(d.get("where"))
                    self.lost_by_place[w] = self.lost_by_place.get(w, 0) + int(d.get("count") or 0)
                if subscribed:
                    shown.append(orig)  # flows are not streamed: the page reloads their table
            self.seen += n
            subs = list(self._subscribers) if shown else []
        if subs:
            batch = [_as_dict(ev) for ev in shown]
            for cb in subs:
                cb(batch)

    def write_flows(self, records: Iterable[tuple[Any, ...]]) -> None:
        """Flow closes and classifications as ``flow_record`` tuples (what the page's own process
        gets from the monitor: no event object, no dict per flow)."""
        n = 0
        with self._lock:
            for rec in records:
                self._add_flow(rec)
                n += 1
            self.seen += n

    def _add_flow(self, rec: tuple[Any, ...]) -> None:
        """A close or classification into its group (created on first sight, LRU-bounded). Caller holds the lock."""
        (kind, comm, exe, hostname, daddr, provider, dport, direction, wall_time, pid, uid, evidence, agent,
         container_id, sent, received) = rec
        rows = self._flows
        key = (comm, exe, hostname or daddr, provider, dport, direction)
        row = rows.get(key)
        if row is None:
            if len(rows) >= self.max_flows:
                rows.popitem(last=False)
                self.flows_evicted += 1
            row = rows[key] = {
                "comm": comm, "exe": exe, "pid": pid, "uid": uid, "hostname": hostname, "daddr": daddr,
                "dport": dport, "direction": direction, "provider": provider, "evidence": evidence,
                "agent": agent, "container_id": container_id, "flows": 0, "bytes_sent": 0, "bytes_received": 0,
                "last_seen": 0.0}
        else:
            rows.move_to_end(key)
        row["last_seen"] = wall_time or row["last_seen"]
        row["pid"] = pid
        if evidence and evidence != "unknown":
            row["evidence"] = evidence
        if agent is not None:
            row["agent"] = agent
        if container_id is not None:
            row["container_id"] = container_id
        if _FLOW_KINDS[kind]:  # a close counts the flow and its bytes
            row["flows"] += 1
            row["bytes_sent"] += sent or 0
            row["bytes_received"] += received or 0

    def subscribe(self, cb: Callable[[list[dict[str, Any]]], None]) -> Callable[[], None]:
        """``cb(batch)`` for every published batch (called in the writer's thread: it must not block).
        Returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.append(cb)

        def unsubscribe() -> None:
            with self._lock:
                if cb in self._subscribers:
                    self._subscribers.remove(cb)
        return unsubscribe

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- reading (the web server's thread) ------------------------------------------------------

    def items(self, name: str, filters: Filters | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """The newest ``limit`` items of a view (calls, mcp, decisions, losses), newest first."""
        with self._lock:
            src = list(self._items[name])
        out: list[dict[str, Any]] = []
        for ev in reversed(src):
            d = _as_dict(ev)
            if filters is None or filters.match(d):
                out.append(d)
                if len(out) >= limit:
                    break
        return out

    def flows(self, filters: Filters | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """Who talks to where, one row per group, most recently seen first."""
        with self._lock:
            rows = [dict(r) for r in reversed(self._flows.values())]
        out = []
        for r in rows:  # plain values already (flow_record): nothing to convert
            if filters is None or filters.match(r):
                out.append(r)
                if len(out) >= limit:
                    break
        return out

    def spend(self, by: str = "provider", window_s: float = 3600.0, buckets: int = 60,
              filters: Filters | None = None, now: float | None = None) -> dict[str, Any]:
        """Cost and tokens per group over the last ``window_s`` seconds, in ``buckets`` steps.

        Groups are the ``by`` field of each call (``model`` = the response's model, else the
        request's); the 8 groups that spent most are kept apart, the rest summed as "other"."""
        if by not in SPEND_KEYS:
            by = "provider"
        buckets = max(1, min(int(buckets), 500))
        window_s = max(1.0, min(float(window_s), 366 * 86400.0))
        now = time.time() if now is None else now
        start = now - window_s
        step = window_s / buckets
        totals: dict[str, dict[str, float]] = {}
        series: dict[str, list[float]] = {}
        tokens: dict[str, list[float]] = {}
        for d in self.items("calls", filters, limit=10**9):
            t = d.get("wall_time") or 0.0
            if t < start:
                break  # newest first: the rest is older
            if by == "model":
                g = d.get("response_model") or d.get("request_model")
            elif by == "container":
                g = d.get("container_id")
            else:
                g = d.get(by)
            g = "(none)" if g is None else str(g)
            tot = totals.setdefault(g, {"calls": 0, "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0})
            cost = d.get("cost_usd") or 0.0
            tot["calls"] += 1
            tot["cost_usd"] += cost
            tot["input_tokens"] += d.get("input_tokens") or 0
            tot["output_tokens"] += d.get("output_tokens") or 0
            i = min(buckets - 1, int((t - start) / step))
            series.setdefault(g, [0.0] * buckets)[i] += cost
            tokens.setdefault(g, [0.0] * buckets)[i] += (d.get("input_tokens") or 0) + (d.get("output_tokens") or 0)
        top = sorted(totals, key=lambda g: (-totals[g]["cost_usd"], -totals[g]["calls"], g))
        keep, rest = top[:8], top[8:]

        def top_and_other(per: dict[str, list[float]]) -> dict[str, list[float]]:
            out = {g: per[g] for g in keep}
            if rest:
                other = [0.0] * buckets
                for g in rest:
                    other = [a + b for a, b in zip(other, per[g], strict=True)]
                out["other"] = other
            return out

        return {"by": by, "window_s": window_s, "step_s": step,
                "t": [start + step * (i + 0.5) for i in range(buckets)],
                "series": top_and_other(series), "tokens": top_and_other(tokens),
                "totals": [{"group": g, **totals[g]} for g in top]}

    def _budget(self, d: dict[str, Any]) -> None:
        """Keep the latest spend of a budget x scope; an exceeded event marks its window. Caller holds the lock."""
        key = (str(d.get("budget")), str(d.get("scope")))
        keep = ("budget", "per", "scope", "window_start", "window_end", "tokens", "usd", "limit_tokens",
                "limit_usd", "calls")
        old = self._budgets.get(key)
        same = old if old is not None and old.get("window_end") == d.get("window_end") else None  # this window's
        if d.get("kind") == "budget_exceeded":
            row = dict(same) if same is not None else {k: d.get(k) for k in keep}
            row.update(exceeded=True, action=d.get("action"), enforced=d.get("enforced"))
        else:
            row = {k: d.get(k) for k in keep}
            row.update(exceeded=bool(same is not None and same.get("exceeded")),
                       action=same.get("action") if same is not None else None,
                       enforced=same.get("enforced") if same is not None else None)
        self._budgets[key] = row
        self._budgets.move_to_end(key)
        while len(self._budgets) > self.max_budget_rows:
            self._budgets.popitem(last=False)

    def budgets(self) -> list[dict[str, Any]]:
        """Spend against limits per budget x scope, as last reported (most recently updated first)."""
        with self._lock:
            return [dict(r) for r in reversed(self._budgets.values())]

    def health(self) -> dict[str, Any]:
        """Losses and load, what ``doctor``/``stats()`` would say, as JSON-safe values."""
        h: dict[str, Any] = {"seen": self.seen, "uptime_s": round(time.time() - self.started, 1),
                             "window_dropped": self.dropped_window, "flows_evicted": self.flows_evicted,
                             "lost_events": dict(self.lost_by_place), "tabs": self.subscribers}
        if self._stats is not None:
            try:
                s = self._stats()
            except Exception:  # noqa: BLE001 - a closing Monitor: show what is known
                s = None
            if s is not None:
                h["monitor"] = {
                    "events": getattr(s, "events", None), "queue_depth": getattr(s, "queue_depth", None),
                    "open_flows": getattr(s, "open_flows", None),
                    "lost": {str(getattr(k, "name", k)).lower(): v for k, v in dict(getattr(s, "lost", {})).items()},
                    "plan": {str(k): str(v) for k, v in dict(getattr(s, "plan", {})).items()},
                }
                if getattr(s, "page_dropped", None) is not None:  # the page's own process fell behind
                    h["monitor"]["page_dropped"] = s.page_dropped
        return h
