"""The Monitor's filters (pid, uid, comm, cgroup, port, netns, family) over flow events."""

from __future__ import annotations

from typing import Any

from busted.events import Event, FlowEvent, FlowSummary

__all__ = ["Filters"]


class Filters:
    """A flow must match every filter given; a repeatable one matches any of its values."""

    __slots__ = ("pid", "uid", "comm", "cgroup", "port", "netns", "family", "active")
    pid: frozenset[Any] | None
    uid: frozenset[Any] | None
    comm: frozenset[Any] | None
    port: frozenset[Any] | None
    cgroup: int | None
    netns: int | None
    family: int | None
    active: bool

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
        f.active = any(x is not None for x in (f.pid, f.uid, f.comm, f.port, f.cgroup, f.netns, f.family))
        return f

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
