"""The Monitor's filters (pid, uid, comm, cgroup, port, netns, family) over flow events.

``match(ev)`` judges an event (the last stage before the queue). ``admits(rec)`` is the same test
on the fields a kernel flow record already carries (everything but ``netns``, which comes from
/proc): the flow table asks it at a flow's open, before reading /proc or classifying, when no
stage needs to see every flow (docs/architecture.md, "Filters").
"""

from __future__ import annotations

from typing import Any

from busted.events import Event, FlowEvent, FlowSummary
from busted.wire.records import FlowRecord

__all__ = ["Filters"]


class Filters:
    """A flow must match every filter given; a repeatable one matches any of its values."""

    __slots__ = ("pid", "uid", "comm", "cgroup", "port", "netns", "family", "active", "cheap")
    pid: frozenset[Any] | None
    uid: frozenset[Any] | None
    comm: frozenset[Any] | None
    port: frozenset[Any] | None
    cgroup: int | None
    netns: int | None
    family: int | None
    active: bool
    cheap: bool  # a filter the kernel record can answer is given (``admits`` can say no)

    @staticmethod
    def _set(v: Any) -> frozenset | None:
        if v is None:
            return None
        if isinstance(v, int | str):
            return frozenset([v])
        return frozenset(v)

    @classmethod
    def build(cls, **kw: Any) -> Filters:
        f = cls()
        f.pid = cls._set(kw["pid"])
        f.uid = cls._set(kw["uid"])
        f.comm = cls._set(kw["comm"])
        f.port = cls._set(kw["port"])
        f.cgroup = kw["cgroup"]
        f.netns = kw["netns"]
        f.family = kw["family"]
        f.cheap = any(x is not None for x in (f.pid, f.uid, f.comm, f.port, f.cgroup, f.family))
        f.active = f.cheap or f.netns is not None
        return f

    def _keeps(self, pid: int, uid: int, comm: str, sport: int, dport: int, cgroup: int, family: int) -> bool:
        """The cheap filters' one rule, whether the facts come from a kernel record or an event."""
        return ((self.pid is None or pid in self.pid) and (self.uid is None or uid in self.uid)
                and (self.comm is None or comm in self.comm)
                and (self.port is None or sport in self.port or dport in self.port)
                and (self.cgroup is None or cgroup == self.cgroup)
                and (self.family is None or family == self.family))

    def admits(self, rec: FlowRecord) -> bool:
        """False when a flow opened by ``rec`` cannot match: every flow event of that flow carries
        the record's pid, uid, comm, ports, cgroup and family (busted.pipeline.flows builds them
        from it), so ``match`` would drop them all. ``netns`` is left to ``match``."""
        return self._keeps(rec.pid, rec.uid, rec.comm, rec.sport, rec.dport, rec.cgroup, rec.family)

    def match(self, ev: Event) -> bool:
        if not self.active:
            return True
        if isinstance(ev, FlowSummary):
            # A summary has one port (the peer's for a connect, ours for an accept) and no netns:
            # a netns filter drops it.
            return self.netns is None and self._keeps(ev.pid, ev.uid, ev.comm, ev.port, ev.port, ev.cgroup_id,
                                                      ev.family)
        if not isinstance(ev, FlowEvent):
            return True
        return ((self.netns is None or ev.netns == self.netns)
                and self._keeps(ev.pid, ev.uid, ev.comm, ev.sport, ev.dport, ev.cgroup_id, ev.family))
