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

    def admits(self, rec: FlowRecord) -> bool:
        """False when a flow opened by ``rec`` cannot match: every flow event of that flow carries
        the record's pid, uid, comm, ports, cgroup and family (busted.pipeline.flows builds them
        from it), so ``match`` would drop them all. ``netns`` is left to ``match``."""
        if self.pid is not None and rec.pid not in self.pid:
            return False
        if self.uid is not None and rec.uid not in self.uid:
            return False
        if self.comm is not None and rec.comm not in self.comm:
            return False
        if self.port is not None and rec.sport not in self.port and rec.dport not in self.port:
            return False
        if self.cgroup is not None and rec.cgroup != self.cgroup:
            return False
        return self.family is None or rec.family == self.family

    def match(self, ev: Event) -> bool:
        if not self.active:
            return True
        if isinstance(ev, FlowSummary):
            return self._match_summary(ev)
        if not isinstance(ev, FlowEvent):
            return True
        if self.pid is not None and ev.pid not in self.pid:
            return False
        if self.uid is not None and ev.uid not in self.uid:
            return False
        if self.comm is not None and ev.comm not in self.comm:
            return False
        if self.port is not None and ev.sport not in self.port and ev.dport not in self.port:
            return False
        if self.cgroup is not None and ev.cgroup_id != self.cgroup:
            return False
        if self.netns is not None and ev.netns != self.netns:
            return False
        if self.family is not None and ev.family != self.family:
            return False
        return True

    def _match_summary(self, ev: FlowSummary) -> bool:
        # A summary has no local port for a connect nor a netns: those filters drop it.
        return ((self.pid is None or ev.pid in self.pid) and (self.uid is None or ev.uid in self.uid)
                and (self.comm is None or ev.comm in self.comm) and (self.port is None or ev.port in self.port)
                and (self.cgroup is None or ev.cgroup_id == self.cgroup) and self.netns is None
                and (self.family is None or ev.family == self.family))
