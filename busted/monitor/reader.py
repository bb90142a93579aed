"""The Monitor's reader thread: kernel ring -> flow table -> policy -> the bounded queue.

``ReaderLoop`` is the half of ``Monitor`` that runs in the reader thread (and the start-up work
that feeds the same path): it drains the ring in batches while the queue has room, hands each
record to the ``FlowTable``, carries out the table's kernel commands, runs the policy on the
events, applies the filters (the cheap ones already in the table when no policy or busy-host
mode needs every flow), counts what is lost, sweeps flows the kernel never ended, and
reports the flows that predate the Monitor. The public object, its life cycle and the consuming
side are in ``busted/monitor/__init__.py``; the state both halves share is set up there.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

from busted.events import Event, EventsLost, FlowOpened, LossPlace
from busted.pipeline.busy import Quiet
from busted.pipeline.filters import Filters
from busted.pipeline.flows import ScanProcess, SkipPlaintext, UnskipPlaintext

__all__ = ["ReaderLoop"]

_EARLY_MAX = 1 << 17  # records held during start-up (~20 MB at most); beyond, the kernel ring holds them


class ReaderLoop:
    """Mixed into ``Monitor``; uses the attributes ``Monitor.__init__`` sets."""

    options: Any  # busted.options.MonitorOptions
    _stop: threading.Event
    _ready: threading.Event
    _drain_lock: threading.Lock
    _queue: collections.deque[Event]
    _queue_size: int
    _headroom: int
    _pending: list[Event]
    _program: Any  # busted.ebpf.loader.FlowProgram once started
    _table: Any  # busted.pipeline.flows.FlowTable once started
    _stats: Any  # MonitorStats
    _filters: Filters
    _proc: Any  # busted.host.procinfo.ProcCache
    _policy_rt: Any  # busted.policy.enforce.PolicyRuntime with a policy
    _quiet: Any  # busted.pipeline.busy.QuietPeers in busy-host mode
    _tls_scanner: Any  # busted.ebpf.tlsscan.TlsScanner with plaintext capture
    _early: list[bytes] | None
    _backlog: collections.deque[bytes]
    _error: BaseException | None
    _wall_offset: float
    _next_loss_check: float
    _next_summary: float
    _next_sweep: float
    _sweep_failed: bool
    _user_lost_pending: int
    _user_lost: dict[str, int]

    # -- producing (reader thread) -----------------------------------------------------------

    def _reader(self) -> None:
        try:
            ms = max(1, int(self.options.drain_interval * 1000))
            half = self._queue_size // 2
            # At most one drain per ``gap``: under load a wake-up per flow open would cost more
            # (thread switches, GIL hand-offs, a consumer wake-up each) than decoding the record;
            # batches of a few ms cost a few ms of latency.
            gap = self.options.drain_interval / 2
            while not self._stop.is_set():
                if len(self._queue) > half:
                    # Back-pressure: let the consumer catch up (the GIL is shared) while the
                    # kernel ring keeps buffering; dropping decoded events would be a waste.
                    self._stop.wait(self.options.drain_interval)
                    continue
                t0 = time.monotonic()
                self._drain(ms)
                rest = gap - (time.monotonic() - t0)
                if rest > 0:
                    self._stop.wait(rest)
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
            prog.wait(wait_ms)
        with self._drain_lock:
            prog = self._program
            if prog is None:
                return
            early = self._early
            if early is not None:  # start-up: only empty the kernel ring, decode later
                if len(early) < _EARLY_MAX:
                    early.extend(prog.read(_EARLY_MAX - len(early)))
                return
            self._read_ring(prog)
            if self._policy_rt is not None:
                self._pending.extend(self._policy_rt.consume())
            now = time.monotonic()
            if self._quiet is not None:
                self._busy(now, final=wait_ms == 0 and self._stop.is_set())
            if now >= self._next_loss_check:
                self._next_loss_check = now + 0.5
                self._check_kernel_losses()
            self._flush_pending()

    def _read_ring(self, prog: Any) -> None:
        """Decode ring records in batches while the queue has room: what does not fit stays in
        the kernel ring (the ring is the buffer; decoded events are never dropped)."""
        feed = self._table.feed
        policy = self._policy_rt
        pending = self._pending
        backlog = self._backlog
        for _ in range(64):  # bounded: the reader also has losses and the policy to look at
            # Headroom: one record can become a few events (a synthesized open + its close, a
            # hello + its classification, several DNS messages in one TCP read).
            room = self._queue_size - self._headroom - len(pending) - len(self._queue)
            if room <= 0:
                return
            n = min(room // 4 + 1, 4096)
            if backlog:  # records read during start-up come before the ring's
                batch = [backlog.popleft() for _ in range(min(n, len(backlog)))]
            else:
                batch = prog.read(n)
            if not batch:
                return
            for raw in batch:
                evs = feed(raw)
                if evs:
                    pending.extend(policy.feed(evs) if policy is not None else evs)
            if self._table.commands:  # once per batch: the kernel acts on them as late as on any record
                self._carry_out(self._table.take_commands())

    def _prefilter(self) -> None:
        """Let the table refuse flows by the cheap filters before /proc and classification, unless
        a stage must see every flow: a policy judges each one, busy-host mode each peer."""
        if self._table is not None:
            every = self._policy_rt is not None or self._quiet is not None or not self._filters.cheap
            self._table.admit = None if every else self._filters.admits

    def _carry_out(self, commands: list[Any]) -> None:
        """The flow table's decisions, told to the kernel program."""
        prog = self._program
        for c in commands:
            if isinstance(c, SkipPlaintext):
                prog.skip_plaintext(c.sk, c.open_ns)
            elif isinstance(c, UnskipPlaintext):
                prog.unskip_plaintext(c.sk)
            elif isinstance(c, ScanProcess):
                if self._tls_scanner is not None:  # as _flush_pending does for a FlowOpened
                    self._tls_scanner.saw(c.pid)
            else:
                prog.unbind_ssl(c.pid, c.ssl)

    def _busy(self, now: float, final: bool) -> None:
        """Busy-host mode: judge peers from this drain's events, tell the kernel, and every
        ``summary_interval`` (and on the way out) turn its summaries into events."""
        prog = self._program
        now_ns = time.monotonic_ns()
        changes = self._quiet.observe(self._pending, now_ns)
        if now >= self._next_summary or final:
            self._next_summary = now + self.options.summary_interval
            changes += self._quiet.expire(now_ns)
            from busted.pipeline.busy import summary_events

            proc = self._proc
            self._pending.extend(summary_events(prog.drain_summaries(), now_ns, self._wall_offset,
                                                lambda pid: proc.get(pid).exe))
        for c in changes:
            if isinstance(c, Quiet):
                prog.set_quiet_peer(c.family, c.addr, c.port, c.expiry_ns, c.direction)
            else:
                prog.clear_quiet_peer(c.family, c.addr, c.port, c.direction)

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
        scanner = self._tls_scanner
        for ev in pending:
            if scanner is not None and isinstance(ev, FlowOpened):
                scanner.saw(ev.pid)  # a process new to us may use a TLS library not probed yet
            if not self._filters.match(ev):
                self._stats.filtered += 1
                continue
            if room <= 0:
                self._user_lost_pending += 1
                self._user_lost["USER_QUEUE"] = self._user_lost.get("USER_QUEUE", 0) + 1
                continue
            q.append(ev)
            room -= 1
            self._stats.events += 1
        self._ready.set()

    def _loss_event(self, where: LossPlace, count: int, detail: str = "") -> EventsLost:
        ns = time.monotonic_ns()
        return EventsLost(ts_ns=ns, wall_time=ns / 1e9 + self._wall_offset, where=where, count=count,
                          detail=detail)

    def _check_kernel_losses(self) -> None:
        prog = self._program
        if prog is None or self._table is None:
            return
        now = time.monotonic_ns()
        self._pending.extend(self._table.kernel_losses(prog.losses(), now))
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.options.sweep_interval
            self._sweep(now)
        self._flush_pending()

    def _sweep(self, now_ns: int) -> None:
        """End flows whose socket no longer exists although the kernel never reported their end
        (a BPF program the kernel skipped under load): without this the kernel map and our
        table keep them forever. A flow is stale when no socket holds its 4-tuple any more
        (sock_diag, asked after the flow was read from the kernel map)."""
        prog = self._program
        table = self._table
        try:
            candidates = prog.flow_entries(older_than_ns=now_ns - int(self.options.sweep_interval * 1e9))
            if not candidates:
                return
            from busted.host.preexisting import absent_tuples

            own = self._proc.get(os.getpid()).netns
            # The dump sees this network namespace only: flows of others are left alone.
            mine = {sk: c for sk, c in candidates.items()
                    if (flow := table.flow(sk)) is not None and flow.netns == own}
            gone = absent_tuples({tup for tup, _s, _r in mine.values()})
        except Exception as exc:  # no sock_diag: nothing to compare with, say so once
            if not self._sweep_failed:
                self._sweep_failed = True
                self._pending.append(self._loss_event(LossPlace.UNKNOWN, 0, f"stale-flow sweep off: {exc}"))
            return
        for sk, (tup, sent, recv) in mine.items():
            if tup in gone and prog.forget_flow(sk):
                self._pending.extend(table.expire(sk, now_ns, sent, recv))

    # -- flows that predate us ---------------------------------------------------------------

    def _load_preexisting(self) -> None:
        from busted.host.preexisting import dump_established, inode_owners

        try:
            existing = dump_established()
        except Exception as exc:  # sock_diag unavailable: say so in the stream, keep going
            self._pending.append(self._loss_event(LossPlace.UNKNOWN, 0, f"preexisting flows not dumped: {exc}"))
            self._flush_pending()
            return
        # Flows established after attach are already in the kernel map: not preexisting.
        tracked = {tup for tup, _s, _r in self._program.flow_entries().values()}
        owners = inode_owners({e.inode for e in existing if e.inode})
        self._pending.extend(self._table.preexisting(existing, owners, tracked, time.monotonic_ns()))
        self._flush_pending()
