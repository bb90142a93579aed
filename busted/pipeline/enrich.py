"""Enrichment: classification of flows and captured payloads against the name caches and catalog.

The FlowTable (busted.pipeline.flows) owns every per-flow state, including the parsers'; this module holds
what is shared by all flows: the name cache fed by DNS answers and ClientHellos, the classifier
and the provider catalog. It turns parser results into events and never reads anything itself.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

from busted.classify import Catalog, Classifier, NameCache
from busted.classify.dns import DnsInfo
from busted.events import Direction, DnsAnswer, Evidence, FlowEvent
from busted.wire.records import CapRecord

__all__ = ["Enricher", "host_name"]

_MEMO_MAX = 8192
HTTP_HOST_CONFIDENCE = 0.7  # the client's own word for this flow, but in cleartext anyone may write
_HOSTNAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*\.?")
# Below a name: what a Host header may add to (an address range or a port named no hostname).
_NAMELESS = frozenset((Evidence.UNKNOWN, Evidence.PORT, Evidence.CIDR))


def host_name(authority: str | None) -> str | None:
    """The hostname of a Host header / :authority value (port and trailing dot removed, lower
    case); None when it is empty, an IP literal, or not a well-formed DNS name (it is the
    peer's bytes: nothing else is let through)."""
    if not authority or len(authority) > 260:
        return None
    host = authority.strip().lower()
    if host.startswith("["):
        return None  # [v6]:port
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if not host or len(host) > 254 or not _HOSTNAME.fullmatch(host):
        return None
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    return host if not host.replace(".", "").isdigit() else None


class Enricher:
    """Classifies flows and DNS answers. One per Monitor (or FlowTable); not thread-safe."""

    def __init__(self, catalog: Catalog | None = None) -> None:
        self.catalog = catalog or Catalog.builtin()
        self.cache = NameCache()
        self.classifier = Classifier(self.catalog, self.cache)
        # Plain dict, emptied when full: a hit costs one lookup (an LRU's bookkeeping cost more
        # than the classification it saved), and a memo loses nothing by being emptied.
        self._memo: dict[tuple[int | None, str, int], tuple[tuple[int, int], tuple]] = {}

    def classify_peer(self, netns: int | None, daddr: str, dport: int,
                      now: float) -> tuple[str | None, str | None, Evidence, float]:
        """(hostname, provider, evidence, confidence) for a new flow's peer, memoized: the answer
        only changes when the name cache gains entries (its insert count) or entries expire (the
        5-second time bucket; TTLs are clamped to >= 30 s)."""
        # A port no provider is known by changes nothing (Classifier.classify): keyed as one, an
        # accepted flow's peer (a new ephemeral port per connection) hits instead of missing.
        key = (netns, daddr, dport if dport in self.catalog.ports else -1)
        stamp = (self.cache.stats.inserts, int(now) // 5)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        c = self.classifier.classify(netns, daddr, dport, now=now)
        res = (c.hostname, c.provider, c.evidence, c.confidence)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[key] = (stamp, res)
        return res

    def classify_flow(self, ev: FlowEvent, now: float | None = None, sni: str | None = None) -> FlowEvent:
        """``ev`` with the classification its peer (and ``sni``) has now."""
        c = self.classifier.classify(ev.netns, ev.daddr, ev.dport, sni=sni,
                                     now=ev.wall_time if now is None else now)
        if c.evidence == Evidence.UNKNOWN and ev.evidence == Evidence.UNKNOWN:
            return ev
        return replace(ev, hostname=c.hostname, provider=c.provider, evidence=c.evidence,
                       confidence=c.confidence)

    def reclassify(self, flow: FlowEvent, sni: str, now: float) -> FlowEvent | None:
        """Learn ``sni`` for the flow's peer; the flow reclassified if that changed anything."""
        self.classifier.observe_sni(flow.netns, flow.daddr, sni, now=now)
        new = self.classify_flow(flow, now=now, sni=sni)
        if (new.hostname, new.provider, new.evidence) == (flow.hostname, flow.provider, flow.evidence):
            return None
        return new

    def reclassify_host(self, flow: FlowEvent, authority: str | None) -> FlowEvent | None:
        """What the Host header (``authority``) of a request on ``flow`` adds: the flow's hostname
        when nothing named one (no SNI, no DNS answer: a plain-HTTP flow to a name from /etc/hosts,
        or joined by address or port only), and the provider when the catalog knows that name.
        The flow anew, or None when it adds nothing. Only for flows this host opened: on an
        accepted flow the Host header names this host, not the peer."""
        if flow.direction == Direction.ACCEPT or flow.hostname is not None or flow.evidence not in _NAMELESS:
            return None
        name = host_name(authority)
        if name is None:
            return None
        m = self.catalog.match_host(name)
        if m is not None:
            return replace(flow, hostname=name, provider=m.id, evidence=Evidence.HTTP_HOST,
                           confidence=HTTP_HOST_CONFIDENCE)
        if flow.provider is not None:  # the address or port named the provider: the name is added
            return replace(flow, hostname=name)
        return replace(flow, hostname=name, evidence=Evidence.HTTP_HOST, confidence=HTTP_HOST_CONFIDENCE)

    def provider_of(self, names: tuple[str, ...]) -> str | None:
        for name in names:
            m = self.catalog.match_host(name)
            if m is not None:
                return m.id
        return None

    def dns_answer(self, rec: CapRecord, info: DnsInfo, wall: float, netns: int | None,
                   flow_id: int | None) -> DnsAnswer:
        """Learn a DNS answer's addresses and report it."""
        self.classifier.observe_dns(netns, info, now=wall)
        chain = tuple(info.cname_chain)
        return DnsAnswer(
            ts_ns=rec.ts_ns, wall_time=wall, pid=rec.pid, tid=rec.tid, comm=rec.comm, netns=netns,
            transport="tcp" if rec.tcp else "udp", server=rec.peer, qname=info.qname,
            qtype=info.qtype, rcode=info.rcode, answers=tuple(info.records), cname_chain=chain,
            provider=self.provider_of(chain or (info.qname,)), flow_id=flow_id,
        )
