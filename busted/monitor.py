"""The Monitor: kernel records -> decoded -> enriched -> typed events -> your code.

    with busted.Monitor() as m:
        for ev in m.events():           # or: async for ev in m  /  m.aevents()
            ...

A reader thread drains the kernel's ring buffer, decodes and enriches each batch (reading /proc
while short-lived processes still exist) and appends the events to a bounded queue. Only flow
opens wake it; ends and payload captures wait for its next drain (every ``drain_interval``, 20 ms),
so bursts cost few wake-ups. Your loop (``events()``, ``aevents()``, ``run()``) takes from the
queue. When the queue is full the reader stops draining and the kernel ring buffers; what the
ring cannot hold is counted and reported as ``EventsLost`` (never silent). Callbacks
registered with ``on()`` run in the consuming thread, never concurrently.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from busted.ebpf.plan import ProbePlan, choose_plan
from busted.ebpf.probe import Capabilities, mount_tracefs, probe
from busted.ebpf.records import FL, REC_CLOSE, REC_DNS, REC_OPEN, FlowRecord, decode, decode_capture
from busted.errors import MonitorClosed, PermissionDenied, TracefsNotMounted
from busted.events import (
    Direction,
    Event,
    EventsLost,
    Evidence,
    FlowClassified,
    FlowClosed,
    FlowEvent,
    FlowOpened,
    LossPlace,
)
from busted.procinfo import ProcCache

__all__ = ["Monitor", "MonitorStats", "StopEvent"]

E = TypeVar("E", bound=Event)


_IDENTITY_FIELDS = tuple(f.name for f in dataclasses.fields(FlowEvent))


class StopEvent(Protocol):
    """Anything with ``is_set()``: threading.Event, asyncio.Event, anyio.Event."""

    def is_set(self) -> bool: ...


@dataclass
class MonitorStats:
    """Counters since start. ``lost`` is keyed by LossPlace name; all losses are also events."""

    records: int = 0  # kernel records decoded
    events: int = 0  # events put on the queue (after filters)
    filtered: int = 0  # events dropped by the Monitor's filters (asked for, not lost)
    ignored: int = 0  # kernel records for sockets never tracked (listeners, pre-start leftovers)
    lost: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0
    queue_size: int = 0
    open_flows: int = 0
    proc_reads: int = 0
    startup_s: float = 0.0
    plan: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_DIRECTIONS = {1: Direction.CONNECT, 2: Direction.ACCEPT}


def _make(cls: type[E], fields: dict[str, Any]) -> E:
    """Build a frozen event from a dict naming every field, without the dataclass ``__init__``
    (one ``object.__setattr__`` per field): this runs for every flow. Tests compare the result
    with a normally constructed instance."""
    ev = object.__new__(cls)
    ev.__dict__.update(fields)
    return ev


def _derive(cls: type[E], base: FlowEvent, **changes: Any) -> E:
    """A ``cls`` event with ``base``'s flow identity and ``changes``, without re-running the frozen
    dataclass ``__init__`` (25 ``object.__setattr__`` calls): the fields are the same names."""
    ev = object.__new__(cls)
    d = ev.__dict__
    bd = base.__dict__
    for k in _IDENTITY_FIELDS:
        d[k] = bd[k]
    d.update(changes)
    return ev


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""


class Monitor:
    """Watch every TCP flow on the host. See the module docstring.

    Filters (all optional; a flow must match every one given): ``pid``, ``uid``, ``comm`` (exact),
    ``cgroup`` (cgroup v2 id), ``port`` (either end), ``netns`` (inode), ``family`` (4 or 6).
    ``probes`` forces tiers, e.g. ``{"bytes": "syscall"}`` (see ``busted doctor``).
    """

    def __init__(
        self,
        *,
        probes: Mapping[str, str] | ProbePlan | None = None,
        pid: int | Iterable[int] | None = None,
        uid: int | Iterable[int] | None = None,
        comm: str | Iterable[str] | None = None,
        cgroup: int | None = None,
        port: int | Iterable[int] | None = None,
        netns: int | None = None,
        family: int | None = None,
        preexisting: bool = True,
        queue_size: int = 16384,
        drain_interval: float = 0.02,
        ringbuf_bytes: int = 4 << 20,
        max_flows: int = 65536,
        mount_tracefs: bool = False,
        classify: bool = True,
        catalog: Any = None,
    ) -> None:
        self._force = probes
        self._filters = _Filters.build(pid=pid, uid=uid, comm=comm, cgroup=cgroup, port=port,
                                       netns=netns, family=family)
        self._want_pre = preexisting
        self._queue: collections.deque[Event] = collections.deque()
        self._queue_size = queue_size
        self._drain_interval = drain_interval
        self._ringbuf_bytes = ringbuf_bytes
        self._max_flows = max_flows
        self._mount = mount_tracefs
        self._classify = classify
        self._catalog = catalog
        self._enricher: Any = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._drain_lock = threading.Lock()
        self._next_loss_check = 0.0
        self._program: Any = None
        self._closed = False
        self._started = False
        self._callbacks: list[tuple[type[Event], Callable[[Any], object]]] = []
        self._open: dict[int, FlowEvent] = {}  # sk -> the flow's FlowOpened (identity)
        self._pre: dict[tuple[str, int, str, int], FlowEvent] = {}
        self._proc = ProcCache()
        self._salt = int.from_bytes(hashlib.blake2b(_boot_id(), digest_size=8).digest(), "little")
        self._wall_offset = time.time() - time.monotonic()
        self._stats = MonitorStats(queue_size=self._queue_size)
        self._kernel_lost: dict[int, int] = {}
        self._user_lost_pending = 0
        self._pending: list[Event] = []
        self._error: BaseException | None = None
        self.capabilities: Capabilities | None = None
        self.plan: ProbePlan | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Monitor:
        """Load and attach the probes, report pre-existing flows, start reading. Idempotent."""
        if self._closed:
            raise MonitorClosed()
        if self._started:
            return self
        t0 = time.monotonic()
        caps = probe()
        if not caps.privileged:  # checked first: unprivileged users cannot even see tracefs
            raise PermissionDenied(f"euid {os.geteuid()}")
        if caps.tracefs is None:
            if not self._mount or mount_tracefs() is None:
                raise TracefsNotMounted()
            caps = probe()
        self.capabilities = caps
        force = self._force
        if not self._classify and not (isinstance(force, ProbePlan) or (force and "capture" in force)):
            force = {**(force or {}), "capture": "off"}
        self.plan = choose_plan(caps, force)
        from busted.ebpf.loader import FlowProgram

        # Compile first: LLVM's peak is the process's peak, so nothing else should be loaded yet;
        # then hand the compiler's freed heap back to the OS.
        self._program = FlowProgram(self.plan, ringbuf_bytes=self._ringbuf_bytes,
                                    max_flows=self._max_flows)
        _trim_heap()
        if self._classify:
            from busted.enrich import Enricher

            self._enricher = Enricher(self._catalog)
        self._stats.plan = self.plan.describe()
        self._program.open_ring(self._on_record)
        self._started = True
        if self._want_pre:
            self._load_preexisting()
        self._stats.startup_s = time.monotonic() - t0
        self._thread = threading.Thread(target=self._reader, name="busted-reader", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Detach every probe. Idempotent; also runs on ``with`` exit. Safe from another thread:
        a consumer blocked in ``events()`` returns."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._drain_lock:
            if self._program is not None:
                self._program.close()
                self._program = None
        self._ready.set()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Monitor:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- consuming ---------------------------------------------------------------------------

    def on(self, event_type: type[E], callback: Callable[[E], object]) -> Callable[[], None]:
        """Call ``callback(ev)`` for every event of ``event_type`` (or a subclass) as it is consumed.

        Returns a function that unregisters it.
        """
        entry = (event_type, callback)
        self._callbacks.append(entry)

        def off() -> None:
            if entry in self._callbacks:
                self._callbacks.remove(entry)

        return off

    def _dispatch(self, ev: Event) -> None:
        for typ, cb in self._callbacks:
            if isinstance(ev, typ):
                cb(ev)

    def _pop(self) -> Event | None:
        try:
            ev = self._queue.popleft()
        except IndexError:
            return None
        self._dispatch(ev)
        return ev

    def _next(self, timeout: float | None, stop_event: StopEvent | None, idle_since: float) -> Event | None:
        """The next event, or None when the caller should stop; waits at most ~0.1 s per call."""
        while True:
            ev = self._pop()
            if ev is not None:
                return ev
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if self._closed or (stop_event is not None and stop_event.is_set()):
                return None
            left = None if timeout is None else idle_since + timeout - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._ready.clear()
            if self._queue:
                continue
            self._ready.wait(0.1 if left is None else min(0.1, left))

    def events(self, timeout: float | None = None, stop_event: StopEvent | None = None) -> Iterator[Event]:
        """Yield events as they come. Ends after ``timeout`` seconds without an event (None: never),
        when ``stop_event.is_set()``, or when the Monitor is closed."""
        if not self._started:
            self.start()
        idle_since = time.monotonic()
        while (ev := self._next(timeout, stop_event, idle_since)) is not None:
            yield ev
            idle_since = time.monotonic()

    def run(self, timeout: float | None = None, stop_event: StopEvent | None = None) -> None:
        """Consume events only to feed ``on()`` callbacks, until timeout/stop/close."""
        for _ in self.events(timeout=timeout, stop_event=stop_event):
            pass

    async def aevents(self, timeout: float | None = None,
                      stop_event: StopEvent | None = None) -> AsyncIterator[Event]:
        """Async twin of ``events()``: waiting happens in a worker thread, never in the loop."""
        if not self._started:
            self.start()
        loop = asyncio.get_running_loop()
        idle_since = time.monotonic()
        while True:
            ev = self._pop()
            if ev is None:
                # _next waits at most ~0.1 s, so cancellation is noticed promptly
                ev = await loop.run_in_executor(None, self._next, min(timeout, 0.1) if timeout is not None
                                                else 0.1, stop_event, time.monotonic())
            if ev is not None:
                yield ev
                idle_since = time.monotonic()
                continue
            if self._closed or (stop_event is not None and stop_event.is_set()):
                return
            if timeout is not None and time.monotonic() - idle_since >= timeout:
                return

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.aevents()

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def stats(self) -> MonitorStats:
        s = self._stats
        s.queue_depth = len(self._queue)
        s.open_flows = len(self._open)
        s.proc_reads = self._proc.reads
        return replace(s, lost=dict(s.lost), plan=dict(s.plan))

    # -- producing (reader thread) -----------------------------------------------------------

    def _reader(self) -> None:
        try:
            ms = max(1, int(self._drain_interval * 1000))
            half = self._queue_size // 2
            while not self._stop.is_set():
                if len(self._queue) > half:
                    # Back-pressure: let the consumer catch up (the GIL is shared) while the
                    # kernel ring keeps buffering; dropping decoded events would be a waste.
                    self._stop.wait(self._drain_interval)
                    continue
                self._drain(ms)
            self._drain(0)
        except BaseException as exc:  # surfaced to the consumer, never swallowed
            self._error = exc
        finally:
            self._ready.set()

    def _drain(self, wait_ms: int) -> None:
        """Wait up to ``wait_ms`` for a flow open (the only records that wake us), then read all
        the kernel submitted and queue the events."""
        prog = self._program
        if prog is None:
            return
        if wait_ms:
            prog.poll(wait_ms)  # consumes too when woken
        with self._drain_lock:
            prog = self._program
            if prog is None:
                return
            prog.consume()
            now = time.monotonic()
            if now >= self._next_loss_check:
                self._next_loss_check = now + 0.5
                self._check_kernel_losses()
            self._flush_pending()

    def _on_record(self, _ctx: int, data: int, size: int) -> int:
        # Called by BCC through ctypes: an exception here would only be printed, so keep it.
        raw = ctypes.string_at(data, size)
        try:
            if raw[0] >= REC_DNS:
                self._on_capture(raw)
                return self._room_left()
            rec = decode(raw)
        except Exception:
            self._count_loss(LossPlace.PARSE, 1, "short kernel record")
            return 0
        self._stats.records += 1
        try:
            self._pending.extend(self._handle(rec))
        except Exception as exc:
            self._error = exc
            self._stop.set()
            return -1  # stops ring_buffer_consume; the consumer raises the error
        return self._room_left()

    def _room_left(self) -> int:
        """0 to go on; -1 stops this drain (libbpf leaves the rest in the kernel ring) when the
        queue could not take more: the ring is the buffer, decoded events are never dropped."""
        # Headroom: one record can become a few events (a synthesized open + its close, a hello
        # + its classification, several DNS messages in one TCP read).
        return -1 if len(self._pending) + len(self._queue) >= self._queue_size - 16 else 0

    def _on_capture(self, raw: bytes) -> int:
        self._stats.records += 1
        enr = self._enricher
        if enr is None:
            return 0
        rec = decode_capture(raw)
        wall = self._wall(rec.ts_ns)
        before = enr.parse_errors
        try:
            if rec.type == REC_DNS:
                info = self._proc.get(rec.pid)
                self._pending.extend(enr.on_dns(rec, wall, info.netns))
            else:
                flow = self._open.get(rec.sk)
                evs = enr.on_tls(rec, wall, flow)
                for ev in evs:
                    if isinstance(ev, FlowClassified):
                        self._open[rec.sk] = ev  # the close carries the classification
                self._pending.extend(evs)
        except Exception as exc:  # a parser bug must not stop the monitor: count it
            enr.parse_errors += 1
            self._count_loss(LossPlace.PARSE, 1, f"{type(exc).__name__}: {exc}")
            return 0
        if enr.parse_errors > before:
            self._count_loss(LossPlace.PARSE, enr.parse_errors - before,
                             "malformed DNS answer" if rec.type == REC_DNS else "malformed TLS ClientHello")
        return 0

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        q = self._queue
        room = self._queue_size - len(q)
        if self._user_lost_pending and room > 0:
            q.append(self._loss_event(LossPlace.USER_QUEUE, self._user_lost_pending))
            self._user_lost_pending = 0
            room -= 1
        for ev in pending:
            if not self._filters.match(ev):
                self._stats.filtered += 1
                continue
            if room <= 0:
                self._user_lost_pending += 1
                self._stats.lost["USER_QUEUE"] = self._stats.lost.get("USER_QUEUE", 0) + 1
                continue
            q.append(ev)
            room -= 1
            self._stats.events += 1
        self._ready.set()

    def _loss_event(self, where: LossPlace, count: int, detail: str = "") -> EventsLost:
        ns = time.monotonic_ns()
        return EventsLost(ts_ns=ns, wall_time=ns / 1e9 + self._wall_offset, where=where, count=count,
                          detail=detail)

    def _count_loss(self, where: LossPlace, n: int, detail: str = "") -> None:
        self._stats.lost[where.name] = self._stats.lost.get(where.name, 0) + n
        self._pending.append(self._loss_event(where, n, detail))

    def _check_kernel_losses(self) -> None:
        prog = self._program
        if prog is None:
            return
        for place, total in prog.losses().items():
            prev = self._kernel_lost.get(place, 0)
            if total > prev:
                self._kernel_lost[place] = total
                where = LossPlace(place)
                self._count_loss(where, total - prev,
                                 "ring buffer full" if where == LossPlace.KERNEL_RING else "flow map full")
        self._flush_pending()

    # -- record -> events --------------------------------------------------------------------

    def _flow_id(self, sk: int, open_ns: int) -> int:
        # (socket pointer, open time) is unique on this boot; the boot id salt keeps ids from two
        # boots apart in one store. A multiplicative mix, not a hash call: this runs per flow.
        return ((sk * 0x9E3779B97F4A7C15) ^ (open_ns * 0xC2B2AE3D27D4EB4F) ^ self._salt) & 0x7FFFFFFFFFFFFFFF

    def _wall(self, ns: int) -> float:
        return ns / 1e9 + self._wall_offset

    def _opened(self, rec: FlowRecord, *, preexisting: bool = False) -> FlowEvent:
        info = self._proc.get(rec.pid) if rec.flags & FL.ATTRIBUTED else None
        ts = rec.open_ns or rec.ts_ns
        wall = self._wall(ts)
        netns = info.netns if info else None
        if self._enricher is not None:
            hostname, provider, evidence, confidence = self._enricher.classify_peer(netns, rec.daddr, rec.dport, wall)
        else:
            hostname, provider, evidence, confidence = None, None, Evidence.UNKNOWN, 0.0
        return _make(FlowOpened, {
            "ts_ns": ts, "wall_time": wall, "flow_id": self._flow_id(rec.sk, rec.open_ns),
            "direction": _DIRECTIONS.get(rec.direction, Direction.UNKNOWN),
            "pid": rec.pid, "tid": rec.tid, "uid": rec.uid, "comm": rec.comm,
            "ppid": info.ppid if info else None, "exe": info.exe if info else None,
            "cmdline": info.cmdline if info else None, "cgroup_id": rec.cgroup, "netns": netns,
            "family": rec.family, "saddr": rec.saddr, "sport": rec.sport, "daddr": rec.daddr, "dport": rec.dport,
            "preexisting": preexisting, "hostname": hostname, "provider": provider, "evidence": evidence,
            "confidence": confidence,
        })

    def _closed_from(self, opened: FlowEvent, rec: FlowRecord) -> FlowClosed:
        # Same identity as the open (or latest classification), new time and counts. Built by
        # copying the frozen instance's fields directly: this runs for every flow.
        return _derive(FlowClosed, opened, ts_ns=rec.ts_ns, wall_time=self._wall(rec.ts_ns),
                       bytes_sent=rec.sent, bytes_received=rec.recv,
                       duration_ns=0 if opened.preexisting else max(0, rec.ts_ns - opened.ts_ns))

    def _handle(self, rec: FlowRecord) -> list[Event]:
        if rec.type == REC_OPEN:
            ev = self._opened(rec)
            if len(self._open) >= 4 * self._max_flows:  # a lost close must not grow us forever
                self._open.pop(next(iter(self._open)))
                self._count_loss(LossPlace.KERNEL_RING, 1, "flow end never seen; identity evicted")
            self._open[rec.sk] = ev
            return [ev]
        if rec.type != REC_CLOSE:
            self._count_loss(LossPlace.PARSE, 1, f"unknown record type {rec.type}")
            return []
        opened = self._open.pop(rec.sk, None)
        if self._enricher is not None:
            self._enricher.forget_flow(rec.sk)
        if opened is not None:
            return [self._closed_from(opened, rec)]
        key = (rec.saddr, rec.sport, rec.daddr, rec.dport)
        if rec.flags & FL.MIDSTREAM:
            pre = self._pre.pop(key, None)
            if pre is None:
                if rec.flags & FL.UNTRACKED or not rec.dport:
                    self._stats.ignored += 1  # listener, or a socket we never saw carry data
                    return []
                # began before we started, ended before the dump saw it: report what we know
                pre = self._opened(rec, preexisting=True)
                return [pre, self._closed_from(pre, rec)]
            if rec.flags & FL.ATTRIBUTED and pre.pid == 0:
                pre = replace(pre, pid=rec.pid, tid=rec.tid, uid=rec.uid, comm=rec.comm)
            return [self._closed_from(pre, rec)]
        # An accepted flow nobody attributed before it ended (never read, written or closed by a
        # process we saw): announce it now, then its end, so every close has an open.
        opened = self._opened(rec)
        return [opened, self._closed_from(opened, rec)]

    # -- flows that predate us ---------------------------------------------------------------

    def _load_preexisting(self) -> None:
        from busted.preexisting import dump_established, inode_owners

        try:
            existing = dump_established()
        except Exception as exc:  # sock_diag unavailable: say so in the stream, keep going
            self._count_loss(LossPlace.UNKNOWN, 0, f"preexisting flows not dumped: {exc}")
            return
        # Flows established after attach are already in the kernel map: not preexisting.
        tracked = self._kernel_tuples()
        owners = inode_owners({e.inode for e in existing if e.inode})
        now = time.monotonic_ns()
        for e in existing:
            key = (e.saddr, e.sport, e.daddr, e.dport)
            if key in tracked:
                continue
            pid = owners.get(e.inode, 0)
            info = self._proc.get(pid) if pid else None
            comm = ""
            if pid:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    pass
            ev: FlowEvent = FlowOpened(
                ts_ns=now, wall_time=self._wall(now),
                flow_id=self._flow_id(e.inode, 0),
                direction=Direction.ACCEPT if e.listening_port else Direction.CONNECT,
                pid=pid, tid=pid, uid=e.uid, comm=comm,
                ppid=info.ppid if info else None, exe=info.exe if info else None,
                cmdline=info.cmdline if info else None, netns=info.netns if info else None,
                family=e.family, saddr=e.saddr, sport=e.sport, daddr=e.daddr, dport=e.dport,
                preexisting=True,
            )
            if self._enricher is not None:
                ev = self._enricher.classify_flow(ev)
            self._pre[key] = ev
            self._pending.append(ev)
        self._flush_pending()

    def _kernel_tuples(self) -> set[tuple[str, int, str, int]]:
        from busted.ebpf.records import _addr

        out = set()
        try:
            for _k, v in self._program.bpf[b"flows"].items():
                if v.flags & FL.HAVE_TUPLE and not v.flags & FL.MIDSTREAM:
                    _, s = _addr(v.family, bytes(v.saddr))
                    _, d = _addr(v.family, bytes(v.daddr))
                    out.add((s, v.sport, d, v.dport))
        except Exception:
            pass
        return out


class _Filters:
    __slots__ = ("pid", "uid", "comm", "cgroup", "port", "netns", "family", "active")

    @staticmethod
    def _set(v: Any) -> frozenset | None:
        if v is None:
            return None
        if isinstance(v, int | str):
            return frozenset([v])
        return frozenset(v)

    @classmethod
    def build(cls, **kw: Any) -> _Filters:
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
        if not self.active or not isinstance(ev, FlowEvent):
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


