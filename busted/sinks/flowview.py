"""One reducer for the latest state of each flow, shared by the outputs that need it.

    view = FlowView(max_flows=65536)
    for ev in events:
        change = view.update(ev)          # None: not a flow event, or nothing changed
        if change is not None:
            change.before, change.after   # FlowState | None, FlowState

Fed ``FlowOpened`` / ``FlowClassified`` / ``FlowClosed`` (other events are ignored). It keeps one
``FlowState`` per open flow and forgets a flow once it is closed, so memory follows the open flows;
beyond ``max_flows`` the least recently updated flow is evicted (its close was lost, or it is idle)
and counted in ``evicted``. The Prometheus exporter and the SQLite store use it; ``busted top`` can
key its rows on ``(after.comm, after.provider)`` and move a flow when that key differs from
``before``'s.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass

from busted.errors import UsageError
from busted.events import Event, FlowClassified, FlowClosed, FlowEvent, FlowOpened

__all__ = ["FlowChange", "FlowState", "FlowView"]


@dataclass(frozen=True)
class FlowState:
    """What is known of one flow. ``flow`` is the latest flow event (identity: process, addresses),
    with the classification (hostname, provider, evidence, confidence) merged in: a later event that
    carries none keeps the one known. ``opened``/``closed`` are wall-clock seconds (``opened`` is
    None when the open was not seen and the duration is unknown, e.g. pre-existing flows). Bytes
    and duration are known once closed."""

    flow: FlowEvent
    opened: float | None = None
    closed: float | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    duration_ns: int | None = None

    @property
    def flow_id(self) -> int:
        return self.flow.flow_id

    @property
    def provider(self) -> str | None:
        return self.flow.provider

    @property
    def hostname(self) -> str | None:
        return self.flow.hostname

    @property
    def comm(self) -> str:
        return self.flow.comm

    @property
    def is_open(self) -> bool:
        return self.closed is None


@dataclass(frozen=True)
class FlowChange:
    """One update: the state ``before`` it (None: the flow was not known, e.g. first seen, or its
    open was evicted or never seen) and ``after`` it. ``kind`` is the event's kind."""

    kind: str
    before: FlowState | None
    after: FlowState

    @property
    def provider_learned(self) -> bool:
        """The provider became known with this update (it was not known before)."""
        return bool(self.after.provider) and not (self.before is not None and self.before.provider)


_FLOW_EVENTS = (FlowOpened, FlowClassified, FlowClosed)  # a tuple: isinstance with X | Y builds the union per call


def _classification(ev: FlowEvent) -> tuple[object, ...]:
    return ev.hostname, ev.provider, ev.evidence, ev.confidence


def _classified(ev: FlowEvent) -> bool:
    return ev.provider is not None or ev.hostname is not None


class FlowView:
    """Latest state per flow_id, bounded (LRU). Not thread-safe: feed it from one thread or under
    the caller's lock. ``evicted`` counts open flows forgotten to stay within ``max_flows``."""

    def __init__(self, max_flows: int = 65536) -> None:
        if max_flows <= 0:
            raise UsageError("FlowView needs max_flows > 0")
        self.max_flows = max_flows
        self.evicted = 0
        self._flows: collections.OrderedDict[int, FlowState] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, flow_id: object) -> bool:
        return flow_id in self._flows

    def get(self, flow_id: int) -> FlowState | None:
        return self._flows.get(flow_id)

    def open_flows(self) -> list[FlowState]:
        """The open flows, least recently updated first."""
        return list(self._flows.values())

    def update(self, ev: Event) -> FlowChange | None:
        """Apply one event. Returns what changed, or None (not a flow event, or a repeat that
        changes nothing, e.g. a duplicate FlowOpened)."""
        if not isinstance(ev, _FLOW_EVENTS):
            return None
        before = self._flows.get(ev.flow_id)
        flow: FlowEvent = ev
        if before is not None and not _classified(ev) and _classified(before.flow):
            old = before.flow
            flow = dataclasses.replace(ev, hostname=old.hostname, provider=old.provider, evidence=old.evidence,
                                       confidence=old.confidence)
        if isinstance(ev, FlowClosed):
            self._flows.pop(ev.flow_id, None)
            opened = before.opened if before is not None else None
            if opened is None and ev.duration_ns:
                opened = ev.wall_time - ev.duration_ns / 1e9
            return FlowChange(ev.kind, before, FlowState(flow, opened, ev.wall_time, ev.bytes_sent,
                                                         ev.bytes_received, ev.duration_ns))
        if isinstance(ev, FlowOpened):
            if before is not None:
                self._flows.move_to_end(ev.flow_id)
                return None  # a repeated open (e.g. seen live and in the start-up dump)
            after = FlowState(flow, opened=ev.wall_time)
        else:  # FlowClassified
            if before is not None and _classification(before.flow) == _classification(flow):
                self._flows.move_to_end(ev.flow_id)
                return None  # nothing new
            after = FlowState(flow, opened=before.opened if before is not None else None)
        self._flows[ev.flow_id] = after
        self._flows.move_to_end(ev.flow_id)
        while len(self._flows) > self.max_flows:
            self._flows.popitem(last=False)
            self.evicted += 1
        return FlowChange(ev.kind, before, after)
