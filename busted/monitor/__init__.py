"""The Monitor: kernel records -> decoded -> enriched -> typed events -> your code.

    with busted.Monitor() as m:
        for ev in m.events():           # or: async for ev in m  /  m.aevents()
            ...

A reader thread drains the kernel's ring buffer, decodes and enriches each batch (reading /proc
while short-lived processes still exist) and appends the events to a bounded queue. Flow opens
wake it (from softirq context, where a wake-up cannot make our other programs miss); everything
else waits for its next drain (at most every ``drain_interval``, 10 ms), and under load it drains
at most every ``drain_interval / 2``, so a busy host costs a few hundred wake-ups per second, not
one per record. Your loop (``events()``,
``aevents()``, ``run()``) takes from the queue. When the queue is full the reader stops draining
and the kernel ring buffers; what the ring cannot hold is counted and reported as ``EventsLost``
(never silent). Callbacks registered with ``on()`` run in the consuming thread, never
concurrently.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from busted.ebpf.plan import ProbePlan, choose_plan
from busted.ebpf.probe import Capabilities, mount_tracefs, probe
from busted.errors import MonitorClosed, PermissionDenied, TracefsNotMounted
from busted.events import Event
from busted.host.procinfo import ProcCache
from busted.monitor.reader import ReaderLoop
from busted.options import MonitorOptions
from busted.pipeline.filters import Filters
from busted.pipeline.flows import FlowTable

__all__ = ["Monitor", "MonitorStats", "StopEvent"]

E = TypeVar("E", bound=Event)


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
    plaintext_records: int = 0  # TLS/HTTP plaintext chunks received from the kernel
    # Lineage execs whose argv was not in the record and whose process was gone from /proc when
    # the record was decoded (default lineage tiers; docs/agents.md): exe and parent kept, argv None.
    argv_lost: int = 0
    tls_libraries: dict[str, str] = field(default_factory=dict)  # probed file -> "openssl" | "gnutls"
    startup_s: float = 0.0
    compile_s: float = 0.0  # getting the bytecode: from the cache (ms) or a compiler child (s)
    bytecode: str = ""  # "cache" or "compile"
    plan: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""


class Monitor(ReaderLoop):
    """Watch every TCP flow on the host. See the module docstring.

    The Monitor owns the kernel program, the reader thread and the bounded queue; what a record
    means (flows, their ids, parsers, losses) is decided by its ``FlowTable`` (busted.pipeline.flows).

    Its options (filters, probes, outputs of the pipeline, policy, busy-host mode) are those of
    ``busted.options.MonitorOptions``, with their defaults and meaning.
    """

    def __init__(self, options: MonitorOptions | None = None, /, **kw: Any) -> None:
        """``Monitor(**kw)`` or ``Monitor(MonitorOptions(...), **overrides)``: every option, its
        default and its meaning are in ``busted.options.MonitorOptions``. An unknown keyword is a
        ``TypeError``, as for any function."""
        o = options if options is not None else MonitorOptions()
        self.options = o = replace(o, **kw) if kw else o
        self._filters = Filters.build(pid=o.pid, uid=o.uid, comm=o.comm, cgroup=o.cgroup, port=o.port,
                                       netns=o.netns, family=o.family)
        self._queue: collections.deque[Event] = collections.deque()
        self._queue_size = o.queue_size
        # Room kept for the events one record can still produce (a synthesized open + its close, a
        # hello + its classification, ...); at most a quarter of a small queue, or the reader of a
        # queue of 16 or fewer would never take a record (it did: events never came).
        self._headroom = min(16, o.queue_size // 4)
        self._table: FlowTable | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._drain_lock = threading.Lock()
        self._next_loss_check = 0.0
        self._program: Any = None
        self._closed = False
        self._started = False
        self._callbacks: list[tuple[type[Event], Callable[[Any], object]]] = []
        self._proc = ProcCache()
        self._salt = int.from_bytes(hashlib.blake2b(_boot_id(), digest_size=8).digest(), "little")
        self._wall_offset = time.time() - time.monotonic()
        self._stats = MonitorStats(queue_size=self._queue_size)
        self._next_sweep = 0.0
        self._user_lost_pending = 0
        self._user_lost: dict[str, int] = {}
        self.lineage: Any = None  # busted.host.lineage.LineageTable when the lineage probe runs
        self._sweep_failed = False
        # LLM call prices: a PriceBook, or a path to a JSON/TOML override file (checked now, so a bad
        # file fails before anything is loaded); None: genai-prices alone.
        prices = o.prices
        if isinstance(prices, str | os.PathLike):
            from busted.classify.prices import PriceBook

            prices = PriceBook.from_file(os.fsdecode(prices))
        self._prices = prices
        self._tls_scanner: Any = None
        self._pending: list[Event] = []
        self._early: list[bytes] | None = None  # raw records read during start-up
        self._backlog: collections.deque[bytes] = collections.deque()  # ... decoded first afterwards
        self._error: BaseException | None = None
        self.capabilities: Capabilities | None = None
        self.plan: ProbePlan | None = None
        # policy (busted.policy): judged in user space; enforced in the kernel only with
        # enforce=True, under the cgroup v2 path policy_scope (default: the root)
        self._policy = o.policy  # replaced by set_policy()
        self._policy_rt: Any = None
        # busy-host mode (busted.pipeline.busy): flows to quiet peers summed in the kernel, drained as
        # FlowSummary events every summary_interval
        self._quiet: Any = None
        if o.busy_host:
            from busted.pipeline.busy import QuietPeers

            self._quiet = QuietPeers(ttl_s=o.quiet_ttl)
        self._next_summary = 0.0

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
            if not self.options.mount_tracefs or mount_tracefs() is None:
                raise TracefsNotMounted()
            caps = probe()
        self.capabilities = caps
        force = self.options.probes
        if not self.options.classify and not (isinstance(force, ProbePlan) or (force and "capture" in force)):
            force = {**(force or {}), "capture": "off"}
        if not (self.options.classify and self.options.llm_calls) and not (isinstance(force, ProbePlan)
                                                              or (force and "plaintext" in force)):
            force = {**(force or {}), "plaintext": "off"}
        self.plan = choose_plan(caps, force)
        from busted.ebpf.loader import FlowProgram

        # The bytecode comes from the cache or a compiler child process: LLVM never maps here.
        self._program = FlowProgram(self.plan, ringbuf_bytes=self.options.ringbuf_bytes,
                                    max_flows=self.options.max_flows, chunk_bytes=self.options.chunk_bytes,
                                    busy_host=self.options.busy_host)
        self._stats.bytecode = self._program.bytecode_from
        self._stats.compile_s = self._program.compile_s
        # The probes run from here on. Until the flow table exists and the pre-existing flows are
        # in it, the reader thread only moves records out of the kernel ring (a busy host fills
        # 4 MB in well under a second) into a bounded list, decoded once start-up is done.
        self._early = []
        self._thread = threading.Thread(target=self._reader, name="busted-reader", daemon=True)
        self._thread.start()
        try:
            self._start_rest(t0, self.plan)
        except BaseException:
            self.close()
            raise
        return self

    def _start_rest(self, t0: float, plan: ProbePlan) -> None:
        reader = None
        if plan.plaintext == "uprobe":
            from busted.ebpf.tlsscan import TlsScanner
            from busted.pipeline.llmreader import reader_factory

            reader = reader_factory(capture_content=self.options.capture_content, prices=self._prices)
            self._tls_scanner = TlsScanner(self._program)
            self._tls_scanner.scan_all()
        enricher = None
        if self.options.classify:
            from busted.pipeline.enrich import Enricher

            enricher = Enricher(self.options.catalog)
        proc = self._proc.get
        if plan.lineage != "off":
            # Process identity from the kernel's fork/exec records first, /proc second.
            from busted.host.cgroups import CgroupPaths, proc_cgroup_path
            from busted.host.lineage import LineageProc, LineageTable
            from busted.host.procinfo import read_exec_argv

            self.lineage = LineageTable(max_procs=self.options.max_procs, exec_argv=read_exec_argv)
            proc = LineageProc(self.lineage, self._proc.get, agents=self.options.agents,
                               cgroup_path=CgroupPaths().path, proc_cgroup=proc_cgroup_path).get
        self._table = FlowTable(enricher=enricher, proc=proc, salt=self._salt,
                                wall_offset=self._wall_offset, max_flows=4 * self.options.max_flows,
                                reader=reader, lineage=self.lineage)
        self._stats.plan = plan.describe()
        if self._policy is not None:
            self._start_policy(enricher)
        self._prefilter()
        self._started = True
        if self.options.preexisting:
            self._load_preexisting()
        with self._drain_lock:
            # What the reader held during start-up is decoded by the reader, first and under the
            # same back-pressure as the ring (a burst larger than the queue waits, it is not dropped).
            self._backlog = collections.deque(self._early or ())
            self._early = None
            self._flush_pending()
        self._stats.startup_s = time.monotonic() - t0
        if self._tls_scanner is not None:
            self._tls_scanner.start()

    def close(self) -> None:
        """Detach every probe. Idempotent; also runs on ``with`` exit. Safe from another thread:
        a consumer blocked in ``events()`` returns."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._tls_scanner is not None:
            self._tls_scanner.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._drain_lock:
            if self._program is not None:
                self._program.close()
                self._program = None
            if self._policy_rt is not None:
                try:  # the last aggregation windows: their denials are counted, not dropped
                    self._pending.extend(self._policy_rt.consume(final=True))
                    self._flush_pending()
                except Exception:  # noqa: BLE001 - closing goes on
                    pass
                self._policy_rt.close()
                self._policy_rt = None
        self._ready.set()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Monitor:
        return await asyncio.to_thread(self.start)  # the compile must not block the event loop

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
        """Async twin of ``events()``. Starting (0.2 s from the bytecode cache, ~2 s compiling) and waiting happen in a
        worker thread, never on the event loop; events are taken from the queue and ``on()``
        callbacks run in the consuming task."""
        if not self._started:
            await asyncio.to_thread(self.start)
        idle_since = time.monotonic()
        while True:
            ev = self._pop()
            if ev is not None:
                yield ev
                idle_since = time.monotonic()
                continue
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if self._closed or (stop_event is not None and stop_event.is_set()):
                return
            left = None if timeout is None else idle_since + timeout - time.monotonic()
            if left is not None and left <= 0:
                return
            # Wait at most 0.1 s per trip so cancellation and stop_event are noticed promptly.
            await asyncio.to_thread(self._wait_ready, 0.1 if left is None else min(0.1, left))

    def _wait_ready(self, seconds: float) -> None:
        self._ready.clear()
        if not self._queue and self._error is None and not self._closed:
            self._ready.wait(seconds)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.aevents()

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def stats(self) -> MonitorStats:
        s = self._stats
        s.queue_depth = len(self._queue)
        t = self._table
        if t is not None:
            s.open_flows = t.open_flows
            s.records = t.records
            s.ignored = t.ignored
            s.plaintext_records = t.plain_records
        if self._tls_scanner is not None:
            s.tls_libraries = self._tls_scanner.files
        s.proc_reads = self._proc.reads
        if self.lineage is not None:
            s.argv_lost = self.lineage.argv_lost
        lost = dict(t.lost) if t is not None else {}
        for k, v in self._user_lost.items():
            lost[k] = lost.get(k, 0) + v
        return replace(s, lost=lost, plan=dict(s.plan), tls_libraries=dict(s.tls_libraries),
                       filtered=s.filtered + (t.prefiltered if t is not None else 0))  # table's + ours

    # -- policy (busted/policy/rules.py, busted/policy/enforce.py) -------------------------------------------

    def _start_policy(self, enricher: Any) -> None:
        from busted.policy.enforce import PolicyRuntime
        from busted.policy.rules import Policy

        pol = self._policy
        if not isinstance(pol, Policy):
            pol = Policy.load(pol)
        if enricher is None:
            raise ValueError("a policy needs classification (classify=True)")
        self._policy_rt = PolicyRuntime(pol, enricher.catalog, enforce=self.options.enforce,
                                        scope=self.options.policy_scope, budget_spend=self.options.budget_spend)
        self._prefilter()  # the policy judges every flow opened from now on
        enf = self._policy_rt.enforcer
        if enf is not None and self._tls_scanner is not None:
            self._tls_scanner.listeners.append(enf.models.attach_fd)  # model rules: same TLS files
            if enf.models.attached:
                self._tls_scanner.replay(enf.models.attach_fd)  # those found at start, before this

    @property
    def policy(self) -> Any:
        """The policy in force (None without one)."""
        rt = self._policy_rt
        return rt.policy if rt is not None else self._policy

    def budgets(self) -> list[dict[str, Any]]:
        """Spend against limits, one dict per budget x scope with spend in its current window
        (busted.policy.budgets; [] without a policy or budgets)."""
        with self._drain_lock:
            rt = self._policy_rt
            return rt.budgets.snapshot() if rt is not None else []

    def set_policy(self, policy: Any) -> None:
        """Replace the policy (a ``Policy`` or a path): the next connect sees it. An invalid
        policy raises ``PolicyError`` and leaves the previous one in force."""
        from busted.policy.rules import Policy

        pol = policy if isinstance(policy, Policy) else Policy.load(policy)
        with self._drain_lock:
            self._policy = pol
            if self._policy_rt is not None:
                self._policy_rt.set_policy(pol)
            elif self._started and not self._closed:
                self._start_policy(self._table.enricher if self._table is not None else None)

