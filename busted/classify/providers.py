"""The provider catalog: which hostnames, address ranges and local ports belong to which LLM provider.

The built-in catalog ships as ``busted/classify/data/providers.json``; users extend or override it
from a file (``Catalog.from_file``) or from Python (``catalog.add(Provider(...))``). An entry with
the id of a built-in one replaces it.

Lookups are dictionary probes, not scans: a hostname is checked exactly, then each of its label
suffixes (longest first), then against the few glob patterns; an address is checked against one
dict per prefix length (longest first). This runs for every flow.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from cachetools import LRUCache

from busted.classify import catalogfile
from busted.classify.names import normalize_name
from busted.errors import CatalogError

__all__ = ["CATEGORIES", "Catalog", "Provider", "ProviderMatch", "parse_ip"]

CATEGORIES = ("hosted", "cloud", "gateway", "local")


@dataclass(frozen=True)
class Provider:
    id: str
    name: str
    category: str  # one of CATEGORIES
    hostnames: tuple[str, ...] = ()  # exact API hostnames
    suffixes: tuple[str, ...] = ()  # any name ending in ".<suffix>" (or equal to it)
    patterns: tuple[str, ...] = ()  # globs, "*" = one or more characters within a label
    cidrs: tuple[str, ...] = ()  # published address ranges
    ports: tuple[int, ...] = ()  # local servers: matched on loopback/private/link-local addresses only
    source: str = ""  # where the hostnames/ranges are documented

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise CatalogError("provider id must be a non-empty string")
        if self.category not in CATEGORIES:
            raise CatalogError(f"provider {self.id!r}: category {self.category!r} is not one of {CATEGORIES}")
        if not (self.hostnames or self.suffixes or self.patterns or self.cidrs or self.ports):
            raise CatalogError(f"provider {self.id!r}: needs at least one of hostnames/suffixes/patterns/cidrs/ports")
        for c in self.cidrs:
            try:
                ipaddress.ip_network(c, strict=False)
            except (TypeError, ValueError) as exc:
                raise CatalogError(f"provider {self.id!r}: bad CIDR {c!r} ({exc})") from exc
        for p in self.ports:
            if not isinstance(p, int) or not 0 < p < 65536:
                raise CatalogError(f"provider {self.id!r}: bad port {p!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provider:
        known = {f for f in cls.__dataclass_fields__}
        extra = set(d) - known
        if extra:
            raise CatalogError(f"unknown provider field(s) {sorted(extra)}")
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        kw["hostnames"] = tuple(_norm(h) for h in kw.get("hostnames", ()))
        kw["suffixes"] = tuple(_norm(h) for h in kw.get("suffixes", ()))
        kw["patterns"] = tuple(_norm(h) for h in kw.get("patterns", ()))
        return cls(**kw)


@dataclass(frozen=True)
class ProviderMatch:
    provider: Provider
    via: str  # "hostname" | "suffix" | "pattern" | "cidr" | "port"
    matched: str = ""  # the rule that matched

    @property
    def id(self) -> str:
        return self.provider.id


class _Miss(enum.Enum):  # a memo's "not there" (None is a cached answer); an enum so `is` narrows the type
    MISS = 0


_MISS: Final = _Miss.MISS


def parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address, with v4-mapped IPv6 (::ffff:a.b.c.d) as IPv4; None if it is not one."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def _is_local(ip: str) -> bool:
    """Loopback, private or link-local: where a local model server would listen."""
    addr = parse_ip(ip)
    return addr is not None and (addr.is_loopback or addr.is_private or addr.is_link_local)


def _norm(name: str) -> str:
    return normalize_name(name)


def _glob_re(pat: str) -> re.Pattern[str]:
    return re.compile("^" + "[^.]+".join(re.escape(p) for p in pat.split("*")) + "$")


@dataclass
class Catalog:
    providers: dict[str, Provider] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reindex()

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def builtin(cls) -> Catalog:
        text = resources.files("busted.classify").joinpath("data/providers.json").read_text()
        return cls._from_json(json.loads(text), "built-in catalog")

    @classmethod
    def from_file(cls, path: str | Path, *, base: Catalog | None = None) -> Catalog:
        """Load providers from JSON or TOML (``{"providers": [...]}``) on top of ``base`` (default:
        the built-in catalog; pass ``Catalog()`` for none). Raises CatalogError (a ValueError) naming the problem."""
        data = catalogfile.read(path, "provider catalog")
        cat = cls(dict((base if base is not None else cls.builtin()).providers))
        cat.extend(cls._from_json(data, str(path)).providers.values())
        return cat

    @classmethod
    def _from_json(cls, data: Any, where: str) -> Catalog:
        return cls({p.id: p for p in catalogfile.entries(data, "providers", where, Provider.from_dict)})

    def add(self, provider: Provider) -> None:
        """Add or replace (same id) one provider."""
        self.providers[provider.id] = provider
        self._reindex()

    def extend(self, providers: Iterable[Provider]) -> None:
        for p in providers:
            self.providers[p.id] = p
        self._reindex()

    def __len__(self) -> int:
        return len(self.providers)

    def _reindex(self) -> None:
        self._exact: dict[str, Provider] = {}
        self._suffix: dict[str, Provider] = {}
        self._patterns: list[tuple[re.Pattern[str], str, Provider]] = []
        self._nets: dict[int, dict[tuple[int, int], tuple[Provider, str]]] = {}
        self._ports: dict[int, Provider] = {}
        for p in self.providers.values():
            for h in p.hostnames:
                self._exact[h] = p
            for s in p.suffixes:
                self._suffix[s] = p
            for pat in p.patterns:
                self._patterns.append((_glob_re(pat), pat, p))
            for c in p.cidrs:
                net = ipaddress.ip_network(c, strict=False)
                self._nets.setdefault(net.prefixlen + (0 if net.version == 4 else 1000), {})[
                    (net.version, int(net.network_address))] = (p, c)
            for port in p.ports:
                self._ports[port] = p
        self._port_set = frozenset(self._ports)
        self._prefixes = sorted(self._nets, reverse=True)
        # Addresses repeat and parsing them is the cost: a bounded memo.
        self._ip_memo: LRUCache[str, ProviderMatch | None] = LRUCache(maxsize=8192)

    # -- matching ----------------------------------------------------------------------------

    def match_host(self, name: str | None) -> ProviderMatch | None:
        if not name:
            return None
        n = _norm(name)
        p = self._exact.get(n)
        if p is not None:
            return ProviderMatch(p, "hostname", n)
        labels = n.split(".")
        for i in range(len(labels)):  # longest suffix first
            s = ".".join(labels[i:])
            p = self._suffix.get(s)
            if p is not None:
                return ProviderMatch(p, "suffix", s)
        for rx, pat, p in self._patterns:
            if rx.match(n):
                return ProviderMatch(p, "pattern", pat)
        return None

    def match_ip(self, ip: str | None) -> ProviderMatch | None:
        if not ip or not self._prefixes:
            return None
        hit = self._ip_memo.get(ip, _MISS)
        if hit is not _MISS:
            return hit
        res = self._ip_memo[ip] = self._match_ip(ip)
        return res

    def _match_ip(self, ip: str) -> ProviderMatch | None:
        addr = parse_ip(ip)
        if addr is None:
            return None
        value, bits = int(addr), (32 if addr.version == 4 else 128)
        for key in self._prefixes:
            plen = key if key < 1000 else key - 1000
            if (key < 1000) != (addr.version == 4):
                continue
            hit = self._nets[key].get((addr.version, value >> (bits - plen) << (bits - plen)))
            if hit is not None:
                return ProviderMatch(hit[0], "cidr", hit[1])
        return None

    @property
    def ports(self) -> frozenset[int]:
        """The ports some provider is known by (local servers such as Ollama): the only ports a
        classification depends on."""
        return self._port_set

    def match_port(self, ip: str | None, port: int) -> ProviderMatch | None:
        p = self._ports.get(port)
        if p is None or not ip or not _is_local(ip):
            return None
        return ProviderMatch(p, "port", str(port))
