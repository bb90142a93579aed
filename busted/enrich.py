"""Enrichment: captured payload records -> DnsAnswer / TlsClientHello events, and flow classification.

Sits between the kernel decoder and the typed events (the Monitor owns one). The parsing itself is
done by the sans-I/O parsers in ``busted.classify``; this module only keeps their per-stream state
(bounded) and the name caches, and turns results into events.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from busted.classify import Catalog, Classifier, NameCache
from busted.classify.dns import TcpDnsFramer, parse_dns
from busted.classify.tls import ClientHelloInfo, ClientHelloParser, NeedMore
from busted.ebpf.records import CapRecord
from busted.events import DnsAnswer, Event, Evidence, FlowClassified, FlowEvent, TlsClientHello

__all__ = ["Enricher"]

class _Bounded(OrderedDict):
    """An LRU dict: per-stream parser state must not grow without bound."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        self.evicted = 0

    def get_or(self, key: Any, factory: Any) -> Any:
        v = self.get(key)
        if v is None:
            if len(self) >= self.maxsize:
                self.popitem(last=False)
                self.evicted += 1
            v = self[key] = factory()
        else:
            self.move_to_end(key)
        return v


class Enricher:
    """Turns capture records into events and classifies flows. One per Monitor; not thread-safe."""

    def __init__(self, catalog: Catalog | None = None, *, max_streams: int = 4096) -> None:
        self.catalog = catalog or Catalog.builtin()
        self.cache = NameCache()
        self.classifier = Classifier(self.catalog, self.cache)
        self._hellos: _Bounded = _Bounded(max_streams)  # sk -> ClientHelloParser
        self._framers: _Bounded = _Bounded(max_streams)  # (pid, fd) -> TcpDnsFramer
        self._done: _Bounded = _Bounded(max_streams * 4)  # sk -> True once its hello was answered
        self.parse_errors = 0
        self._memo: dict[tuple[int | None, str, int], tuple[tuple[int, int], tuple]] = {}

    # -- flows -------------------------------------------------------------------------------

    def classify_peer(self, netns: int | None, daddr: str, dport: int,
                      now: float) -> tuple[str | None, str | None, Evidence, float]:
        """(hostname, provider, evidence, confidence) for a new flow's peer, memoized: the answer
        only changes when the name cache gains entries (its insert count) or entries expire (the
        5-second time bucket; TTLs are clamped to >= 30 s)."""
        key = (netns, daddr, dport)
        stamp = (self.cache.stats.inserts, int(now) // 5)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        c = self.classifier.classify(netns, daddr, dport, now=now)
        res = (c.hostname, c.provider, c.evidence, c.confidence)
        if len(self._memo) >= 8192:
            self._memo.clear()
        self._memo[key] = (stamp, res)
        return res

    def classify_flow(self, ev: FlowEvent, now: float | None = None, sni: str | None = None) -> FlowEvent:
        c = self.classifier.classify(ev.netns, ev.daddr, ev.dport, sni=sni,
                                     now=ev.wall_time if now is None else now)
        if c.evidence == Evidence.UNKNOWN and ev.evidence == Evidence.UNKNOWN:
            return ev
        return replace(ev, hostname=c.hostname, provider=c.provider, evidence=c.evidence,
                       confidence=c.confidence)

    # -- captures ----------------------------------------------------------------------------

    def on_dns(self, rec: CapRecord, wall: float, netns: int | None) -> list[Event]:
        if rec.tcp:
            framer = self._framers.get_or((rec.pid, rec.fd), TcpDnsFramer)
            messages = framer.feed(rec.data)
        else:
            messages = [rec.data]
        out: list[Event] = []
        for wire in messages:
            info = parse_dns(wire)
            if info is None:
                self.parse_errors += 1
                continue
            if not info.is_response:
                continue
            self.classifier.observe_dns(netns, info, now=wall)
            out.append(DnsAnswer(
                ts_ns=rec.ts_ns, wall_time=wall, pid=rec.pid, tid=rec.tid, comm=rec.comm, netns=netns,
                transport="tcp" if rec.tcp else "udp", server=rec.peer, qname=info.qname,
                qtype=info.qtype, rcode=info.rcode, answers=tuple(info.records),
                cname_chain=tuple(info.cname_chain),
            ))
        return out

    def on_tls(self, rec: CapRecord, wall: float, flow: FlowEvent | None) -> list[Event]:
        """Feed a client's first writes; on a whole ClientHello, emit it and reclassify the flow."""
        if rec.sk in self._done:  # later writes of a flow whose hello is already parsed
            return []
        parser = self._hellos.get_or(rec.sk, ClientHelloParser)
        res = parser.feed(rec.data)
        if isinstance(res, NeedMore):
            return []
        self._hellos.pop(rec.sk, None)
        self._done.get_or(rec.sk, lambda: True)
        if not isinstance(res, ClientHelloInfo):
            self.parse_errors += 1
            return []
        out: list[Event] = [TlsClientHello(
            ts_ns=rec.ts_ns, wall_time=wall, flow_id=flow.flow_id if flow else 0, pid=rec.pid,
            comm=rec.comm, saddr=flow.saddr if flow else "", sport=flow.sport if flow else 0,
            daddr=flow.daddr if flow else "", dport=flow.dport if flow else 0, sni=res.sni,
            alpn=tuple(res.alpn), versions=tuple(res.versions), ja4=res.ja4,
        )]
        if flow is not None and res.sni:
            self.classifier.observe_sni(flow.netns, flow.daddr, res.sni, now=wall)
            new = self.classify_flow(flow, now=wall, sni=res.sni)
            if (new.hostname, new.provider, new.evidence) != (flow.hostname, flow.provider, flow.evidence):
                fields = {f.name: getattr(new, f.name) for f in dataclasses.fields(FlowEvent)}
                fields.update(ts_ns=rec.ts_ns, wall_time=wall)
                out.append(FlowClassified(**fields))
        return out

    def forget_flow(self, sk: int) -> None:
        self._hellos.pop(sk, None)
        self._done.pop(sk, None)
