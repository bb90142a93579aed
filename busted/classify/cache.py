"""Name caches and the flow classifier: (netns, IP) -> names seen for it -> provider, with evidence.

Pure: time is passed in (``now``, UNIX seconds), nothing is read from the clock or the network.

Precedence: the TLS SNI of the flow itself > a DNS answer seen on this host for the address >
a provider's published CIDR > a local-server port. Confidence says how sure each is. An SNI is
final (a named non-LLM host stays non-LLM); a DNS name that matches no provider still lets the
address (CIDR) or port name one, and is kept as the hostname.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from busted.classify.providers import Catalog
from busted.events import Evidence

__all__ = ["Classification", "Classifier", "NameCache", "NameEntry"]

CONFIDENCE = {Evidence.SNI: 0.95, Evidence.DNS: 0.8, Evidence.CIDR: 0.6, Evidence.PORT: 0.3}


@dataclass(frozen=True)
class NameEntry:
    name: str  # the name the application asked for (or sent as SNI)
    source: str  # "dns" | "sni"
    chain: tuple[str, ...]  # the CNAME chain it came through (qname first)
    observed_at: float
    expires_at: float


@dataclass
class CacheStats:
    inserts: int = 0
    evictions: int = 0  # entries dropped because the cache was full
    expired: int = 0


class NameCache:
    """(netns, ip) -> names, honouring TTLs (clamped) and bounded in keys and names per key.

    A CDN address shared by many hosts keeps several names (up to ``max_names_per_ip``, newest
    kept); nothing is overwritten by an unrelated answer. ``netns=None`` lookups fall back to any
    namespace's entry for the address (when the flow's namespace is unknown).
    """

    def __init__(self, maxsize: int = 65536, *, min_ttl: float = 30.0, max_ttl: float = 3600.0,
                 max_names_per_ip: int = 8) -> None:
        self.maxsize = maxsize
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_names = max_names_per_ip
        self._d: OrderedDict[tuple[int | None, str], dict[str, NameEntry]] = OrderedDict()
        self._by_ip: dict[str, set[int | None]] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._d)

    def put(self, netns: int | None, ip: str, name: str, *, source: str, chain: tuple[str, ...] = (),
            ttl: float | None = None, now: float) -> None:
        ttl = self.max_ttl if ttl is None else min(max(float(ttl), self.min_ttl), self.max_ttl)
        key = (netns, ip)
        names = self._d.get(key)
        if names is None:
            if len(self._d) >= self.maxsize:
                old_key, _ = self._d.popitem(last=False)
                self._drop_index(old_key)
                self.stats.evictions += 1
            names = self._d[key] = {}
            self._by_ip.setdefault(ip, set()).add(netns)
        else:
            self._d.move_to_end(key)
        names.pop(name, None)
        names[name] = NameEntry(name, source, chain or (name,), now, now + ttl)
        while len(names) > self.max_names:
            names.pop(next(iter(names)))
        self.stats.inserts += 1

    def _drop_index(self, key: tuple[int | None, str]) -> None:
        nss = self._by_ip.get(key[1])
        if nss is not None:
            nss.discard(key[0])
            if not nss:
                del self._by_ip[key[1]]

    def get(self, netns: int | None, ip: str, *, now: float) -> list[NameEntry]:
        """Live entries for the address, newest first."""
        keys = [(netns, ip)]
        if netns is None or (netns, ip) not in self._d:
            keys += [(ns, ip) for ns in self._by_ip.get(ip, ()) if ns != netns]
        out: list[NameEntry] = []
        for key in keys:
            names = self._d.get(key)
            if not names:
                continue
            for n, e in list(names.items()):
                if e.expires_at <= now:
                    del names[n]
                    self.stats.expired += 1
            if not names:
                del self._d[key]
                self._drop_index(key)
                continue
            out.extend(names.values())
            if key == (netns, ip) and netns is not None:
                break  # exact namespace found: do not mix in other namespaces' answers
        out.sort(key=lambda e: e.observed_at, reverse=True)
        return out


@dataclass(frozen=True)
class Classification:
    hostname: str | None = None
    provider: str | None = None
    category: str | None = None
    evidence: Evidence = Evidence.UNKNOWN
    confidence: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict, compare=False)


class Classifier:
    """Joins caches and the catalog into a Classification for a flow's peer."""

    def __init__(self, catalog: Catalog | None = None, cache: NameCache | None = None) -> None:
        self.catalog = catalog if catalog is not None else Catalog.builtin()
        self.cache = cache if cache is not None else NameCache()

    def observe_dns(self, netns: int | None, answer: Any, *, now: float) -> int:
        """Record a DNS answer (``DnsInfo`` or ``DnsAnswer``): each address -> the asked name.

        Returns how many (address, name) pairs were stored."""
        chain = tuple(getattr(answer, "cname_chain", ()) or (answer.qname,))
        records: Iterable[Any] = getattr(answer, "records", ()) or getattr(answer, "answers", ())
        end = chain[-1]
        n = 0
        for r in records:
            if r.rtype in ("A", "AAAA") and (r.name == end or r.name in chain):
                self.cache.put(netns, r.value, answer.qname, source="dns", chain=chain, ttl=r.ttl, now=now)
                n += 1
        return n

    def observe_sni(self, netns: int | None, ip: str, sni: str, *, now: float) -> None:
        self.cache.put(netns, ip, sni, source="sni", now=now)

    def _host_match(self, entry: NameEntry) -> Any:
        for name in entry.chain or (entry.name,):
            m = self.catalog.match_host(name)
            if m is not None:
                return m
        return None

    def classify(self, netns: int | None, daddr: str, dport: int, *, sni: str | None = None,
                 now: float) -> Classification:
        if sni:
            m = self.catalog.match_host(sni)
            return Classification(sni, m.id if m else None, m.provider.category if m else None, Evidence.SNI,
                                  CONFIDENCE[Evidence.SNI], {"matched": m.matched if m else None})
        by_name: Classification | None = None
        entries = [e for e in self.cache.get(netns, daddr, now=now) if e.source == "dns"]
        if entries:
            matched = [(e, self._host_match(e)) for e in entries]
            with_provider = [(e, m) for e, m in matched if m is not None]
            e, m = with_provider[0] if with_provider else matched[0]
            conf = CONFIDENCE[Evidence.DNS]
            if len({mm.id for _, mm in with_provider}) > 1:
                conf -= 0.2  # the address is shared by hosts of different providers
            elif len(entries) > 1 and not with_provider:
                conf -= 0.1
            by_name = Classification(e.name, m.id if m else None, m.provider.category if m else None, Evidence.DNS,
                                     round(conf, 2), {"names": [x.name for x in entries], "chain": list(e.chain)})
            if m is not None:
                return by_name
        # A DNS name that is no provider's (an internal alias, a lab name) does not hide what the
        # address or port says; the name is still reported.
        hostname = by_name.hostname if by_name else None
        m = self.catalog.match_ip(daddr)
        if m is not None:
            return Classification(hostname, m.id, m.provider.category, Evidence.CIDR, CONFIDENCE[Evidence.CIDR],
                                  {"cidr": m.matched})
        m = self.catalog.match_port(daddr, dport)
        if m is not None:
            return Classification(hostname, m.id, m.provider.category, Evidence.PORT, CONFIDENCE[Evidence.PORT],
                                  {"port": dport})
        if by_name is not None:
            return by_name
        return Classification()
