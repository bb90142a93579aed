"""Busy-host mode, user-space half: which peers are quiet, and kernel summaries -> events. Sans-I/O.

In busy-host mode (``Monitor(busy_host=True)``, docs/kernel.md) the kernel sums flows to *quiet*
peers per process x peer instead of reporting each one. ``QuietPeers`` decides which peers are
quiet from the events the Monitor already makes: a flow that ended with no provider, no LLM call,
no MCP message, no policy rule and no ClientHello naming a provider makes its peer quiet for
``ttl_s``; a DNS answer, SNI or classification naming a provider for the address makes it loud
again at once. It returns what to tell the kernel (``Quiet`` / ``Unquiet``), and never touches
it. ``summary_events`` turns the drained ``summaries`` map into ``FlowSummary`` events.

A peer is (address, service port, direction): the port is the peer's for a connect and this
host's listening port for an accept, so "clients of my web server" and "my connections to a web
server" are judged apart.
"""

from __future__ import annotations

import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import NamedTuple

from cachetools import LRUCache

from busted.events import (
    Direction,
    DnsAnswer,
    Event,
    EventsLost,
    FlowClassified,
    FlowClosed,
    FlowOpened,
    FlowSummary,
    LlmCall,
    LossPlace,
    McpMessage,
    PolicyDecision,
    TlsClientHello,
)
from busted.wire.layout import QUIET_MAX, SUM_KEY, SUM_VAL

__all__ = ["DEFAULT_TTL_S", "Quiet", "QuietPeers", "Unquiet", "kernel_addr", "summary_events"]

DEFAULT_TTL_S = 60.0
_V4MAPPED = b"\x00" * 10 + b"\xff\xff"


class Quiet(NamedTuple):
    """Tell the kernel: aggregate new flows to this peer until ``expiry_ns`` (CLOCK_MONOTONIC)."""

    family: int  # AF_INET / AF_INET6 (the kernel's numbering)
    addr: bytes  # 4 or 16 bytes
    port: int
    direction: int
    expiry_ns: int


class Unquiet(NamedTuple):
    """Tell the kernel: report this peer's flows in full again."""

    family: int
    addr: bytes
    port: int
    direction: int


_Key = tuple[str, int, int]  # (address text, service port, direction)


def kernel_addr(text: str) -> list[tuple[int, bytes]]:
    """The (family, address bytes) forms the kernel may see for an address: an IPv4 peer is
    also reached through a v4-mapped IPv6 socket. [] for text that is not an address."""
    try:
        if ":" in text:
            return [(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))]
        raw = socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):
        return []
    return [(socket.AF_INET, raw), (socket.AF_INET6, _V4MAPPED + raw)]


class QuietPeers:
    """The quiet-peer policy. ``observe(events, now_ns)`` returns the kernel changes they imply;
    ``expire(now_ns)`` those for judgements whose TTL ran out. At most ``max_peers`` peers are
    quiet (the oldest judgement goes first); each IPv4 peer takes two kernel entries."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_peers: int = QUIET_MAX // 2,
                 max_flows: int = 65536) -> None:
        if ttl_s <= 0 or max_peers <= 0:
            raise ValueError("ttl_s and max_peers must be positive")
        self.ttl_ns = int(ttl_s * 1e9)
        self.max_peers = max_peers
        self._quiet: OrderedDict[_Key, int] = OrderedDict()  # key -> expiry, oldest judgement first
        self._by_addr: dict[str, set[_Key]] = {}
        # Flows that showed something worth full events (LLM, MCP, a provider, a policy rule).
        self._loud_flows: LRUCache[int, bool] = LRUCache(maxsize=max_flows)

    def __len__(self) -> int:
        return len(self._quiet)

    def __contains__(self, key: object) -> bool:
        return key in self._quiet

    def observe(self, events: Iterable[Event], now_ns: int) -> list[Quiet | Unquiet]:
        out: list[Quiet | Unquiet] = []
        for ev in events:
            if isinstance(ev, FlowClosed):
                loud = self._loud_flows.pop(ev.flow_id, False)
                if ev.provider is not None:
                    out += self._unquiet_addr(ev.daddr)
                elif not loud:
                    out += self._quiet_flow(ev, now_ns)
            elif isinstance(ev, DnsAnswer):
                if ev.provider is not None:
                    for a in ev.addresses:
                        out += self._unquiet_addr(a)
            elif isinstance(ev, FlowOpened | FlowClassified | TlsClientHello):
                if ev.provider is not None:
                    if ev.flow_id is not None:
                        self._loud_flows[ev.flow_id] = True
                    if ev.daddr:
                        out += self._unquiet_addr(ev.daddr)
            elif isinstance(ev, LlmCall | McpMessage):
                self._loud_flows[ev.flow_id] = True
            elif isinstance(ev, PolicyDecision):
                if ev.flow_id is not None and ev.rule != "default":
                    self._loud_flows[ev.flow_id] = True
        return out

    def expire(self, now_ns: int) -> list[Unquiet]:
        """Forget judgements past their TTL (the kernel already ignores them): keeps its map small."""
        out: list[Unquiet] = []
        while self._quiet:
            key, exp = next(iter(self._quiet.items()))
            if exp > now_ns:
                break
            out += self._drop(key)
        return out

    def _quiet_flow(self, ev: FlowClosed, now_ns: int) -> list[Quiet | Unquiet]:
        if ev.direction == Direction.CONNECT:
            port = ev.dport
        elif ev.direction == Direction.ACCEPT:
            port = ev.sport
        else:
            return []
        forms = kernel_addr(ev.daddr)
        if not forms or not port:
            return []
        key = (ev.daddr, port, int(ev.direction))
        out: list[Quiet | Unquiet] = []
        self._quiet.pop(key, None)
        while len(self._quiet) >= self.max_peers:
            out += self._drop(next(iter(self._quiet)))
        exp = now_ns + self.ttl_ns
        self._quiet[key] = exp
        self._by_addr.setdefault(ev.daddr, set()).add(key)
        out += [Quiet(fam, raw, port, key[2], exp) for fam, raw in forms]
        return out

    def _unquiet_addr(self, addr: str) -> list[Unquiet]:
        out: list[Unquiet] = []
        for key in list(self._by_addr.get(addr, ())):
            out += self._drop(key)
        return out

    def _drop(self, key: _Key) -> list[Unquiet]:
        self._quiet.pop(key, None)
        keys = self._by_addr.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_addr[key[0]]
        return [Unquiet(fam, raw, key[1], key[2]) for fam, raw in kernel_addr(key[0])]


_SK = SUM_KEY.struct
_SV = SUM_VAL.struct
_DIRS = {1: Direction.CONNECT, 2: Direction.ACCEPT}


def _peer(family: int, raw: bytes) -> tuple[int, str]:
    if family == socket.AF_INET:
        return 4, socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        if raw[:12] == _V4MAPPED:
            return 4, socket.inet_ntop(socket.AF_INET, raw[12:16])
        return 6, socket.inet_ntop(socket.AF_INET6, raw)
    return 0, ""


def summary_events(pairs: Iterable[tuple[bytes, bytes]], ts_ns: int, wall_offset: float,
                   exe: Callable[[int], str | None] = lambda _pid: None) -> list[Event]:
    """``FlowSummary`` events for drained (key, value) pairs of the kernel's ``summaries`` map
    (SUM_KEY / SUM_VAL bytes). ``exe(pid)`` names the process's executable (the Monitor's process
    cache). A pair that does not decode is a counted PARSE loss, never an exception."""
    out: list[Event] = []
    bad = 0
    for k, v in pairs:
        try:
            tgid, fam, port, direction, _p, addr = _SK.unpack_from(k)
            count, sent, recv, first, last, uid, _p2, cgroup, comm = _SV.unpack_from(v)
        except struct.error:
            bad += 1
            continue
        family, peer = _peer(fam, addr)
        out.append(FlowSummary(
            ts_ns=ts_ns, wall_time=ts_ns / 1e9 + wall_offset, pid=tgid, uid=uid,
            comm=comm.split(b"\0", 1)[0].decode("utf-8", "replace"), exe=exe(tgid) if tgid else None,
            cgroup_id=cgroup, direction=_DIRS.get(direction, Direction.UNKNOWN), family=family, peer=peer,
            port=port, count=count, bytes_sent=sent, bytes_received=recv, start_ns=first, end_ns=last,
            start_time=first / 1e9 + wall_offset, end_time=last / 1e9 + wall_offset,
        ))
    if bad:
        out.append(EventsLost(ts_ns=ts_ns, wall_time=ts_ns / 1e9 + wall_offset, where=LossPlace.PARSE,
                              count=bad, detail="flow summary of the wrong size"))
    return out
