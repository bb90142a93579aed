"""The flow table: kernel records in, typed events out. Sans-I/O.

``FlowTable.feed(raw)`` takes one ring-buffer record (bytes) and returns the events it makes. The
table owns everything that is per flow: the open flows and those that predate the monitor, flow
ids, the capture parsers' state (a ClientHello split over writes, DNS over TCP framing) and the
loss accounting. It reads nothing by itself: process details come from the ``proc`` function and
classification from an ``Enricher``, both given to it, so it can be driven by plain records in a
test or a notebook. It decides what the kernel should be told (stop copying a judged flow's
plaintext, forget a TLS session) and hands those commands over (``take_commands()``); the Monitor,
which owns the threads, the kernel program and the queue, carries them out.

Flow identity: ``(socket pointer, open time)`` names a flow on one boot; ``flow_id`` mixes it with
a per-boot salt. Every event about a flow carries that id.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from cachetools import LRUCache

from busted.classify.dns import TcpDnsFramer, parse_dns
from busted.classify.tls import ClientHelloInfo, ClientHelloParser, NeedMore
from busted.events import (
    FLOW_IDENTITY,
    Direction,
    DnsAnswer,
    Event,
    EventsLost,
    Evidence,
    FlowClassified,
    FlowClosed,
    FlowEvent,
    FlowIdentity,
    FlowOpened,
    LossPlace,
    TlsClientHello,
)
from busted.host.lineage import NO_LINEAGE
from busted.host.procinfo import ProcInfo, ProcReader
from busted.wire.layout import FL, PT_PACKET, REC_BIND, REC_CLOSE, REC_DNS, REC_OPEN
from busted.wire.records import ArrivalRecord, CapRecord, FlowRecord, LinRecord, PlainRecord, decode, decode_any

if TYPE_CHECKING:
    from busted.classify.dns import DnsInfo

__all__ = ["Classifier", "Command", "FlowReader", "FlowTable", "LineageFeed", "ReaderFactory", "SkipPlaintext",
           "ScanProcess", "UnbindSsl", "UnskipPlaintext"]

E = TypeVar("E", bound=Event)

_DIRECTIONS = {1: Direction.CONNECT, 2: Direction.ACCEPT}
_NO_PROC = ProcInfo(None, None, None, None, None)
_N_IDENTITY = len(FLOW_IDENTITY)


def _no_lineage(info: ProcInfo) -> dict[str, Any]:
    """The lineage fields when lineage is off: only the start time, from /proc."""
    return NO_LINEAGE if info.start_time is None else {**NO_LINEAGE, "proc_start_time": info.start_time}


def _make(cls: type[E], fields: dict[str, Any]) -> E:
    """A frozen event from a dict naming every field, without the dataclass ``__init__`` (one
    ``object.__setattr__`` per field): this runs for every flow. Tests compare the result with a
    normally constructed instance."""
    ev = object.__new__(cls)
    ev.__dict__.update(fields)
    return ev


def _derive(cls: type[E], base: FlowEvent, **changes: Any) -> E:
    """A ``cls`` event with ``base``'s flow identity and ``changes`` (same trick as ``_make``)."""
    ev = object.__new__(cls)
    d = ev.__dict__
    bd = base.__dict__
    if len(bd) == _N_IDENTITY:  # an opened/classified event: its fields are exactly the identity
        d.update(bd)
    else:
        for k in FLOW_IDENTITY:
            d[k] = bd[k]
    d.update(changes)
    return ev


# -- the seams: what the table is given (the Monitor passes busted's own; a test, doubles) -----------


class FlowReader(Protocol):
    """One flow's plaintext -> events (``busted.pipeline.llmreader.CallReader``). Optional, looked up
    with getattr: ``take_host() -> str | None`` (the HTTP authority, once) and
    ``arrival(read_ns, arrival_ns)`` (when a read's first byte reached the socket, for TTFT)."""

    flow: FlowIdentity  # the flow's latest identity: the table updates it when the flow is renamed
    interesting: bool | None  # None undecided; False: not an LLM API nor MCP (its plaintext is skipped)

    def feed(self, sent: bool, data: bytes, ts_ns: int, *, start: bool = False,
             arrived: bool = False) -> list[Event]: ...

    def feed_gap(self, sent: bool, size: int, ts_ns: int) -> list[Event]: ...  # bytes not copied

    def take_losses(self) -> list[str]: ...

    def close(self, ts_ns: int) -> Iterable[Event]: ...


# (flow, wall) -> the flow's reader; ``wall`` turns monotonic nanoseconds into UNIX seconds
ReaderFactory = Callable[[FlowEvent, Callable[[int], float]], FlowReader]


class Classifier(Protocol):
    """Names a flow's peer (``busted.pipeline.enrich.Enricher``): from the catalog, DNS answers seen,
    the ClientHello's SNI, the HTTP authority."""

    def classify_peer(self, netns: int | None, daddr: str, dport: int,
                      now: float) -> tuple[str | None, str | None, Evidence, float]: ...

    def classify_flow(self, ev: FlowEvent) -> FlowEvent: ...

    def reclassify(self, flow: FlowEvent, sni: str, now: float) -> FlowEvent | None: ...

    def reclassify_host(self, flow: FlowEvent, authority: str | None) -> FlowEvent | None: ...

    def dns_answer(self, rec: CapRecord, info: DnsInfo, wall: float, netns: int | None,
                   flow_id: int | None) -> DnsAnswer: ...


class LineageFeed(Protocol):
    """Takes the fork/exec/exit records (``busted.host.lineage.LineageTable``)."""

    def feed(self, rec: LinRecord) -> int: ...  # -> running processes forgotten, to report now

    def take_unreported(self) -> int: ...


class _Flow:
    """One open flow: its identity (the latest FlowOpened/FlowClassified) and parser state."""

    __slots__ = ("ev", "rec", "open_ns", "hello", "hello_done", "dns", "reader", "plain_off", "calls")

    def __init__(self, ev: FlowEvent | None) -> None:
        self.ev = ev
        # The open record of a flow the filters passed over (``FlowTable.admit``): its identity is
        # built from it only if something other than its flow events needs it (``_identity``).
        self.rec: FlowRecord | None = None
        self.open_ns = 0  # the kernel's open time: with the socket, it names this flow
        self.hello: ClientHelloParser | None = None
        self.hello_done = False
        self.dns: TcpDnsFramer | None = None
        self.reader: FlowReader | None = None  # plaintext -> LLM calls
        self.plain_off = False  # its plaintext is not followed (judged, or a gap in it)
        # Per direction (0 sent, 1 received): (bytes of the library call / syscall being read, where
        # its next copied piece should start). The kernel copies a bounded head and tail of each call.
        self.calls = [(0, 0), (0, 0)]


class SkipPlaintext(NamedTuple):
    """Stop copying this flow's plaintext: the flow is judged (not an LLM API nor MCP)."""

    sk: int
    open_ns: int


class UnskipPlaintext(NamedTuple):
    """Copy plaintext for this socket again: it ended, and its address may be reused."""

    sk: int


class UnbindSsl(NamedTuple):
    """Forget a TLS session joined to a socket that ended (the SSL* may be reused)."""

    pid: int
    ssl: int


class ScanProcess(NamedTuple):
    """A process opened a flow the filters passed over (no FlowOpened is made for it): the TLS
    library scanner should still look at it, as at any flow's open (its LLM calls are reported)."""

    pid: int


Command = SkipPlaintext | UnskipPlaintext | UnbindSsl | ScanProcess


class FlowTable:
    """Kernel records -> events, and commands for the kernel. Not thread-safe: one reader feeds it.

    ``proc(pid)`` returns a ``ProcInfo`` (the Monitor passes its /proc cache); ``enricher`` (None:
    no classification, no capture parsing) classifies peers. ``max_flows`` bounds the open-flow
    table (4x the kernel map's size: the kernel is the first bound); an identity evicted before its
    end was seen is a counted ``USER_TABLE`` loss.
    """

    def __init__(self, *, enricher: Classifier | None = None, proc: ProcReader | None = None,
                 salt: int = 0, wall_offset: float = 0.0, max_flows: int = 4 * 65536,
                 max_streams: int = 4096, reader: ReaderFactory | None = None,
                 max_pending: int = 64, lineage: LineageFeed | None = None) -> None:
        self.enricher = enricher
        self.lineage = lineage  # a busted.host.lineage.LineageTable fed the fork/exec/exit records
        # Plaintext: ``reader(flow, wall)`` makes the per-flow object that turns plaintext into events
        # (``feed(sent, data, ts_ns, start=) -> list[Event]``, ``feed_gap(sent, size, ts_ns)`` for bytes
        # not copied, ``take_losses() -> list[str]``, ``close(ts_ns)``, ``interesting``: None
        # undecided / False not an LLM API nor MCP).
        self._reader = reader
        # What the kernel should be told, decided here and carried out by the Monitor
        # (``take_commands()`` after each ``feed``): the table itself never touches the kernel.
        self.commands: list[Command] = []
        self._ssl_sk: LRUCache[tuple[int, int], int] = LRUCache(maxsize=65536)  # (pid, SSL*) -> sk
        self._sk_ssl: dict[int, set[tuple[int, int]]] = {}  # sk -> its sessions
        # Chunks of sessions not joined to a socket yet (memory-BIO stacks write before they send).
        self._ssl_pending: LRUCache[tuple[int, int], list[PlainRecord]] = LRUCache(maxsize=max_streams)
        self._max_pending = max_pending
        self.plain_records = 0
        self._proc = proc or (lambda _pid: _NO_PROC)
        self._salt = salt
        self._wall_offset = wall_offset
        self._max_flows = max_flows
        self._open: dict[int, _Flow] = {}  # sk -> flow
        self._pre: dict[tuple[str, int, str, int], FlowEvent] = {}  # 4-tuple -> pre-existing flow
        # Capture state for sockets with no open flow (its open was filtered out or lost).
        self._orphans: LRUCache[int, _Flow] = LRUCache(maxsize=max_streams)
        self.lost: Counter[str] = Counter()
        self.records = 0
        self.ignored = 0  # records for sockets never tracked (listeners, pre-start leftovers)
        self._kernel_seen: dict[int, int] = {}
        # The cheap filters, asked at a flow's open before /proc and classification (the Monitor's
        # ``Filters.admits``; None: every flow is built). A flow it refuses makes no FlowOpened and
        # no FlowClosed: only set it when nothing downstream must see every flow (no policy, no
        # busy-host mode). Its other events (TLS hello, LLM calls, DNS answers, losses) are made
        # as before, from an identity built when first needed.
        self.admit: Callable[[FlowRecord], bool] | None = None
        self.prefiltered = 0  # flow events never made because ``admit`` refused their flow

    def take_commands(self) -> list[Command]:
        """What the kernel should be told since the last call (``SkipPlaintext``,
        ``UnskipPlaintext``, ``UnbindSsl``, ``ScanProcess``), oldest first."""
        cmds, self.commands = self.commands, []
        return cmds

    # -- in ------------------------------------------------------------------------------------

    def feed(self, raw: bytes) -> list[Event]:
        """Events made by one kernel record. Never raises for bad input: it is a counted loss."""
        self.records += 1
        try:
            typ = int.from_bytes(raw[:4], "little")
            if typ == REC_OPEN:  # the common records first, without the general dispatch
                return self._on_open(decode(raw))
            if typ == REC_CLOSE:
                return self._on_close(decode(raw))
            rec = decode_any(raw)
        except (struct.error, ValueError, IndexError) as exc:
            return [self.loss(LossPlace.PARSE, 1, f"kernel record: {exc}")]
        if isinstance(rec, CapRecord):
            return self._capture(rec)
        if isinstance(rec, PlainRecord):
            return self._plain(rec)
        if isinstance(rec, ArrivalRecord):
            self._arrival(rec)
            return []
        if isinstance(rec, LinRecord):
            n = self.lineage.feed(rec) if self.lineage is not None else 0
            return [self._lineage_loss(n, rec.ts_ns)] if n else []
        if rec.type == REC_OPEN:
            return self._on_open(rec)
        return self._on_close(rec)

    @property
    def open_flows(self) -> int:
        return len(self._open)

    def flow(self, sk: int) -> FlowEvent | None:
        """The latest identity of the open flow on socket ``sk``."""
        f = self._open.get(sk)
        return self._identity(f) if f is not None else None

    def _identity(self, flow: _Flow) -> FlowEvent | None:
        """``flow.ev``; for a flow ``admit`` refused, built now from its open record (/proc and
        the peer's classification as they are now) the first time an event needs it."""
        if flow.ev is None and flow.rec is not None:
            flow.ev = self._opened(flow.rec)
            flow.rec = None
        return flow.ev

    # -- losses --------------------------------------------------------------------------------

    def loss(self, where: LossPlace, count: int, detail: str = "", ts_ns: int = 0) -> EventsLost:
        """Count a loss and return the event that reports it."""
        self.lost[where.name] += count
        return EventsLost(ts_ns=ts_ns, wall_time=self.wall(ts_ns) if ts_ns else 0.0, where=where,
                          count=count, detail=detail)

    def kernel_losses(self, totals: Mapping[int, int], ts_ns: int) -> list[Event]:
        """Events for the growth of the kernel's cumulative loss counters (by LossPlace value)."""
        out: list[Event] = []
        details = {LossPlace.KERNEL_RING: "ring buffer full",
                   LossPlace.KERNEL_MAP: "a BPF map full (flows; busy-host summaries)",
                   LossPlace.KERNEL_MISS: "BPF program skipped by the kernel (recursion)",
                   LossPlace.TLS_LIBRARY: "TLS library not probed (the bound on probed files, an attach failure, "
                                          "or the scan queue)"}
        for place, total in totals.items():
            prev = self._kernel_seen.get(place, 0)
            if total > prev:
                self._kernel_seen[place] = total
                where = LossPlace(place)
                out.append(self.loss(where, total - prev, details.get(where, ""), ts_ns))
        if self.lineage is not None and (n := self.lineage.take_unreported()):  # a batch not yet due
            out.append(self._lineage_loss(n, ts_ns))
        return out

    def _lineage_loss(self, n: int, ts_ns: int) -> EventsLost:
        return self.loss(LossPlace.USER_TABLE, n, "process lineage table full: processes not seen "
                         "exiting were forgotten", ts_ns)

    def wall(self, ns: int) -> float:
        return ns / 1e9 + self._wall_offset

    # -- flows ---------------------------------------------------------------------------------

    def flow_id(self, sk: int, open_ns: int) -> int:
        # A multiplicative mix, not a hash call: this runs per flow. The salt (from the boot id)
        # keeps ids of two boots apart in one store.
        return ((sk * 0x9E3779B97F4A7C15) ^ (open_ns * 0xC2B2AE3D27D4EB4F) ^ self._salt) & 0x7FFFFFFFFFFFFFFF

    def _opened(self, rec: FlowRecord, *, preexisting: bool = False) -> FlowEvent:
        info = self._proc(rec.pid) if rec.flags & FL.ATTRIBUTED else _NO_PROC
        ts = rec.open_ns or rec.ts_ns
        wall = self.wall(ts)
        netns = info.netns
        enr = self.enricher
        if enr is not None:
            hostname, provider, evidence, confidence = enr.classify_peer(netns, rec.daddr, rec.dport, wall)
        else:
            hostname, provider, evidence, confidence = None, None, Evidence.UNKNOWN, 0.0
        return _make(FlowOpened, {
            "ts_ns": ts, "wall_time": wall, "flow_id": self.flow_id(rec.sk, rec.open_ns),
            "direction": _DIRECTIONS.get(rec.direction, Direction.UNKNOWN),
            "pid": rec.pid, "tid": rec.tid, "uid": rec.uid, "comm": rec.comm,
            "ppid": info.ppid, "exe": info.exe, "cmdline": info.cmdline, "cgroup_id": rec.cgroup,
            "netns": netns, "family": rec.family, "saddr": rec.saddr, "sport": rec.sport,
            "daddr": rec.daddr, "dport": rec.dport, "preexisting": preexisting, "hostname": hostname,
            "provider": provider, "evidence": evidence, "confidence": confidence,
            **(info.lineage or _no_lineage(info)),
        })

    def _closed(self, opened: FlowEvent, rec: FlowRecord) -> FlowClosed:
        return _derive(FlowClosed, opened, ts_ns=rec.ts_ns, wall_time=self.wall(rec.ts_ns),
                       bytes_sent=rec.sent, bytes_received=rec.recv,
                       duration_ns=0 if opened.preexisting else max(0, rec.ts_ns - opened.ts_ns))

    def _on_open(self, rec: FlowRecord) -> list[Event]:
        admit = self.admit
        if admit is not None and not admit(rec):  # filtered out: no /proc, no classification
            ev = None
            self.prefiltered += 1
            out: list[Event] = []
            if self._reader is not None:
                self.commands.append(ScanProcess(rec.pid))
        else:
            ev = self._opened(rec)
            out = [ev]
        if len(self._open) >= self._max_flows:  # a lost end must not grow us forever
            self._open.pop(next(iter(self._open)))
            out.append(self.loss(LossPlace.USER_TABLE, 1, "flow end never seen; identity evicted", rec.ts_ns))
        flow = (self._orphans.pop(rec.sk, None) if self._orphans else None) or _Flow(None)
        flow.ev = ev
        flow.rec = rec if ev is None else None
        flow.open_ns = rec.open_ns
        self._open[rec.sk] = flow
        return out

    def _on_close(self, rec: FlowRecord) -> list[Event]:
        if rec.type != REC_CLOSE:
            return [self.loss(LossPlace.PARSE, 1, f"unknown record type {rec.type}", rec.ts_ns)]
        if self._orphans:
            self._orphans.pop(rec.sk, None)
        flow = self._open.pop(rec.sk, None)
        if self._sk_ssl:
            self._unbind(rec.sk)
        if flow is not None and (flow.ev is not None or flow.rec is not None):
            if flow.plain_off:
                self.commands.append(UnskipPlaintext(rec.sk))  # the socket address may be reused
            if flow.ev is None:  # filtered out at its open and never needed since: so is its end
                self.prefiltered += 1
                return []
            if flow.reader is not None:  # calls cut short by the end of the flow come first
                return [*self._read_close(flow, rec.ts_ns), self._closed(flow.ev, rec)]
            return [self._closed(flow.ev, rec)]
        key = (rec.saddr, rec.sport, rec.daddr, rec.dport)
        if rec.flags & FL.MIDSTREAM:
            pre = self._pre.pop(key, None)
            if pre is None:
                if rec.flags & FL.UNTRACKED or not rec.dport:
                    self.ignored += 1  # a listener, or a socket we never saw carry data
                    return []
                # Began before we started, ended before the dump saw it: report what we know.
                pre = self._opened(rec, preexisting=True)
                return [pre, self._closed(pre, rec)]
            if rec.flags & FL.ATTRIBUTED and pre.pid == 0:
                pre = _derive(FlowOpened, pre, pid=rec.pid, tid=rec.tid, uid=rec.uid, comm=rec.comm)
            return [self._closed(pre, rec)]
        # An accepted flow nobody attributed before it ended (never read, written or closed by a
        # process we saw): announce it now, then its end, so every close has an open.
        opened = self._opened(rec)
        return [opened, self._closed(opened, rec)]

    def expire(self, sk: int, ts_ns: int, sent: int = 0, recv: int = 0) -> list[Event]:
        """End the open flow on ``sk`` whose end the kernel never reported (its socket is gone):
        its close, with the bytes last counted, and a counted loss saying so."""
        flow = self._open.pop(sk, None)
        self._orphans.pop(sk, None)
        ident = self._identity(flow) if flow is not None else None
        if ident is None:
            return []
        rec = FlowRecord(REC_CLOSE, 0, ts_ns, 0, sk, 0, sent, recv, 0, 0, 0, 0, 0, 0, 0, "", "", "")
        return [self.loss(LossPlace.KERNEL_MISS, 1, "flow end missed by the kernel; closed by the sweep",
                          ts_ns), self._closed(ident, rec)]

    # -- flows that predate the monitor ----------------------------------------------------------

    def preexisting(self, existing: Iterable[Any], owners: Mapping[int, int],
                    tracked: set[tuple[str, int, str, int]], ts_ns: int) -> list[Event]:
        """FlowOpened(preexisting=True) for each dumped flow (``ExistingFlow``) the kernel does not
        already track; ``owners`` maps socket inodes to pids."""
        out: list[Event] = []
        wall = self.wall(ts_ns)
        for e in existing:
            key = (e.saddr, e.sport, e.daddr, e.dport)
            if key in tracked:
                continue
            pid = owners.get(e.inode, 0)
            info = self._proc(pid) if pid else _NO_PROC
            ev: FlowEvent = FlowOpened(
                ts_ns=ts_ns, wall_time=wall, flow_id=self.flow_id(e.inode, 0),
                direction=Direction.ACCEPT if e.listening_port else Direction.CONNECT,
                pid=pid, tid=pid, uid=e.uid, comm=getattr(info, "comm", None) or "",
                ppid=info.ppid, exe=info.exe, cmdline=info.cmdline, netns=info.netns,
                family=e.family, saddr=e.saddr, sport=e.sport, daddr=e.daddr, dport=e.dport,
                preexisting=True, **(info.lineage or _no_lineage(info)),
            )
            if self.enricher is not None:
                ev = self.enricher.classify_flow(ev)
            self._pre[key] = ev
            out.append(ev)
        return out

    # -- captured payloads -------------------------------------------------------------------------

    def _state(self, sk: int) -> _Flow:
        flow = self._open.get(sk)
        if flow is None:
            flow = self._orphans.get(sk)
            if flow is None:
                flow = self._orphans[sk] = _Flow(None)
        return flow

    def _capture(self, rec: CapRecord) -> list[Event]:
        enr = self.enricher
        if enr is None:
            return []
        try:
            if rec.type == REC_DNS:
                return self._dns(rec, enr)
            return self._tls(rec, enr)
        except Exception as exc:  # a parser bug must not stop the monitor: count it
            return [self.loss(LossPlace.PARSE, 1, f"{type(exc).__name__}: {exc}", rec.ts_ns)]

    def _dns(self, rec: CapRecord, enr: Classifier) -> list[Event]:
        truncated = rec.wire_len > len(rec.data)
        out: list[Event] = []
        flow = None
        if rec.tcp:
            flow = self._state(rec.sk) if rec.sk else None
            framer = flow.dns if flow is not None else None
            if framer is None:
                framer = TcpDnsFramer()
                if flow is not None:
                    flow.dns = framer
            messages = framer.feed(rec.data, missing=rec.wire_len - len(rec.data))
            if truncated:
                out.append(self.loss(LossPlace.PARSE, 1, f"DNS over TCP read of {rec.wire_len} bytes "
                                     f"truncated to {len(rec.data)}; framing resynchronised", rec.ts_ns))
        else:
            if truncated:  # a UDP datagram cut short cannot be parsed
                return [self.loss(LossPlace.PARSE, 1, f"DNS answer of {rec.wire_len} bytes truncated "
                                  f"to {len(rec.data)}", rec.ts_ns)]
            messages = [rec.data]
        wall = self.wall(rec.ts_ns)
        netns = self._proc(rec.pid).netns
        ident = self._identity(flow) if flow is not None else None
        flow_id = ident.flow_id if ident is not None else None
        for wire in messages:
            info = parse_dns(wire)
            if info is None:
                out.append(self.loss(LossPlace.PARSE, 1, "malformed DNS answer", rec.ts_ns))
                continue
            if not info.is_response:
                continue
            out.append(enr.dns_answer(rec, info, wall, netns, flow_id))
        return out

    def _tls(self, rec: CapRecord, enr: Classifier) -> list[Event]:
        flow = self._state(rec.sk)
        if flow.hello_done:  # later writes of a flow whose hello is already parsed
            return []
        if flow.hello is None:
            flow.hello = ClientHelloParser()
        res = flow.hello.feed(rec.data)
        if isinstance(res, NeedMore):
            return []
        flow.hello = None
        flow.hello_done = True
        if not isinstance(res, ClientHelloInfo):
            return [self.loss(LossPlace.PARSE, 1, "malformed TLS ClientHello", rec.ts_ns)]
        wall = self.wall(rec.ts_ns)
        opened = self._identity(flow)
        new = None
        if opened is not None and res.sni:
            new = enr.reclassify(opened, res.sni, wall)
        cur = new or opened
        out: list[Event] = [_make(TlsClientHello, {  # every field named (a test checks)
            "ts_ns": rec.ts_ns, "wall_time": wall, "flow_id": cur.flow_id if cur else None, "pid": rec.pid,
            "comm": rec.comm, "saddr": cur.saddr if cur else None, "sport": cur.sport if cur else None,
            "daddr": cur.daddr if cur else None, "dport": cur.dport if cur else None, "sni": res.sni,
            "alpn": tuple(res.alpn), "versions": tuple(res.versions), "ja4": res.ja4,
            "hostname": cur.hostname if cur else None, "provider": cur.provider if cur else None,
        })]
        if new is not None and opened is not None:
            flow.ev = _derive(FlowClassified, new, ts_ns=rec.ts_ns, wall_time=wall)
            out.append(flow.ev)
        return out

    # -- plaintext (TLS libraries, plain HTTP) -------------------------------------------------------

    def _plain(self, rec: PlainRecord) -> list[Event]:
        self.plain_records += rec.type != REC_BIND
        key = (rec.pid, rec.ssl)
        if rec.type == REC_BIND:
            self._bind(key, rec.sk)
            out: list[Event] = []
            for r in self._ssl_pending.pop(key, ()):
                out.extend(self._plain_chunk(r, rec.sk))
            return out
        sk = rec.sk or (self._ssl_sk.get(key, 0) if rec.ssl else 0)
        if not sk:
            pending = self._ssl_pending.get(key)
            if pending is None:
                pending = self._ssl_pending[key] = []
            if len(pending) >= self._max_pending:
                return [self.loss(LossPlace.PLAINTEXT, 1, "plaintext of a session never joined to its socket",
                                  rec.ts_ns)]
            pending.append(rec)
            return []
        if rec.ssl and rec.sk and self._ssl_sk.get(key) != rec.sk:
            self._bind(key, rec.sk)
        return self._plain_chunk(rec, sk)

    def _bind(self, key: tuple[int, int], sk: int) -> None:
        self._ssl_sk[key] = sk
        if sk in self._open:  # only sockets whose end will come and clean up
            self._sk_ssl.setdefault(sk, set()).add(key)

    def _unbind(self, sk: int) -> None:
        for key in self._sk_ssl.pop(sk, ()):
            if self._ssl_sk.get(key) == sk:
                del self._ssl_sk[key]
                self.commands.append(UnbindSsl(*key))

    def _plain_chunk(self, rec: PlainRecord, sk: int) -> list[Event]:
        flow = self._open.get(sk)
        if flow is None or flow.plain_off or self._reader is None or (ev := self._identity(flow)) is None:
            return []  # a flow we do not know (it predates us) or do not follow
        if flow.reader is None:
            flow.reader = self._reader(ev, self.wall)
        reader = flow.reader
        d = 0 if rec.sent else 1
        call_len, nxt = flow.calls[d]
        gap = 0
        if rec.offset == 0:
            gap = call_len - nxt  # the previous call's last pieces never came (ring full)
        elif rec.cut & 4:  # a packet after bytes never seen (cgroup capture tier): the hole is its offset
            gap = call_len - nxt + rec.offset
        elif call_len == rec.wire_len and rec.offset >= nxt:
            gap = rec.offset - nxt  # the bytes the kernel did not copy (the middle of a long call)
        else:  # a piece that does not follow: the bytes in between are unknown
            flow.calls[d] = (0, 0)
            flow.plain_off = True
            return [self.loss(LossPlace.PLAINTEXT, 1, f"a plaintext piece at {rec.offset} of {rec.wire_len} "
                              "bytes does not follow the last one; flow no longer parsed", rec.ts_ns),
                    *self._read_close(flow, rec.ts_ns)]
        end = rec.offset + len(rec.data)
        after = rec.wire_len - end if rec.cut & 2 else 0  # the call's other buffers: not copied, no piece follows
        flow.calls[d] = (0, 0) if end >= rec.wire_len or after else (rec.wire_len, end)
        try:
            out = reader.feed_gap(rec.sent, gap, rec.ts_ns) if gap > 0 else []
            out.extend(reader.feed(rec.sent, rec.data, rec.ts_ns, start=rec.offset == 0 or bool(rec.cut & 4),
                                   arrived=rec.source == PT_PACKET))
            if after > 0:
                out.extend(reader.feed_gap(rec.sent, after, rec.ts_ns))
            lost = reader.take_losses()
        except Exception as exc:  # a parser bug must not stop the monitor
            flow.plain_off = True
            return [self.loss(LossPlace.PARSE, 1, f"plaintext: {type(exc).__name__}: {exc}", rec.ts_ns)]
        take_host = getattr(reader, "take_host", None)
        if take_host is not None and self.enricher is not None and (host := take_host()) is not None:
            out[:0] = self._http_host(flow, reader, self.enricher, host, rec.ts_ns)
        for why in lost:  # exchanges (or the connection) the parsers could not follow: counted, with why
            out.append(self.loss(LossPlace.PLAINTEXT, 1, why, rec.ts_ns))
        if reader.interesting is False:
            flow.plain_off = True
            self.commands.append(SkipPlaintext(sk, flow.open_ns))
        return out

    def _arrival(self, rec: ArrivalRecord) -> None:
        """When the first byte of a read on a followed flow reached its socket: for its reader's TTFT."""
        flow = self._open.get(rec.sk)
        arrival = getattr(flow.reader, "arrival", None) if flow is not None else None
        if arrival is not None:
            arrival(rec.ts_ns, rec.arrival_ns)

    def _http_host(self, flow: _Flow, reader: FlowReader, enr: Classifier, authority: str,
                   ts_ns: int) -> list[Event]:
        """A request's Host header named a flow nothing else named (docs/classification.md);
        ``reader`` is the flow's."""
        assert flow.ev is not None
        new = enr.reclassify_host(flow.ev, authority)
        if new is None:
            return []
        flow.ev = _derive(FlowClassified, new, ts_ns=ts_ns, wall_time=self.wall(ts_ns))
        reader.flow = flow.ev  # the calls read from now on carry the name
        return [flow.ev]

    def _read_close(self, flow: _Flow, ts_ns: int) -> list[Event]:
        reader, flow.reader = flow.reader, None
        if reader is None:
            return []
        try:
            return list(reader.close(ts_ns))
        except Exception as exc:
            return [self.loss(LossPlace.PARSE, 1, f"plaintext: {type(exc).__name__}: {exc}", ts_ns)]
