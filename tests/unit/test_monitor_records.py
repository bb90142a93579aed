"""Record handling, driven by plain kernel records (bytes in the declared layout).

The FlowTable is sans-I/O, so most of this needs no Monitor at all; the Monitor tests at the end
check only what it adds (the bounded queue, back-pressure, filters, kernel loss counters). The
real kernel side is tested in tests/kernel.
"""

import collections
import socket

import pytest

import busted
from busted import Direction, EventsLost, FlowClosed, FlowOpened, LossPlace, Monitor
from busted.host.procinfo import ProcInfo
from busted.pipeline.flows import FlowTable
from busted.wire.layout import FL, FLOW, REC_CLOSE, REC_HDR, REC_OPEN


def rec(typ, flags, sk, *, ts=2_000, open_ns=1_000, sent=0, recv=0, pid=10, direction=1,
        saddr=(127, 0, 0, 1), daddr=(127, 0, 0, 2), sport=5555, dport=443, comm=b"curl"):
    return REC_HDR.pack(type=typ, ts_ns=ts, sk=sk) + FLOW.pack(
        open_ns=open_ns, cgroup=7, sent=sent, recv=recv, pid=pid, tid=pid, family=socket.AF_INET,
        sport=sport, dport=dport, direction=direction, flags=flags, saddr=bytes(saddr),
        daddr=bytes(daddr), comm=comm)


A = FL.ATTRIBUTED | FL.HAVE_TUPLE | FL.OPEN_SENT


@pytest.fixture
def table():
    return FlowTable(salt=0x5A17)


def feed(table, *records):
    out = []
    for r in records:
        out.extend(table.feed(r))
    return out


def test_open_then_close_carry_one_identity(table):
    o, c = feed(table, rec(REC_OPEN, A, 0xA), rec(REC_CLOSE, A, 0xA, ts=5_000, sent=3, recv=4))
    assert isinstance(o, FlowOpened) and isinstance(c, FlowClosed)
    assert o.flow_id == c.flow_id == table.flow_id(0xA, 1_000)
    assert (c.bytes_sent, c.bytes_received, c.duration_ns) == (3, 4, 4_000)
    assert (c.pid, c.comm, c.saddr, c.daddr, c.dport, c.cgroup_id) == (10, "curl", "127.0.0.1", "127.0.0.2", 443, 7)
    assert table.open_flows == 0


def test_flow_ids_differ_by_socket_open_time_and_salt():
    t1, t2 = FlowTable(salt=1), FlowTable(salt=2)
    assert t1.flow_id(0xA, 1) != t1.flow_id(0xA, 2) != t1.flow_id(0xB, 1)
    assert t1.flow_id(0xA, 1) != t2.flow_id(0xA, 1)


def test_process_details_come_from_the_proc_function():
    info = ProcInfo(1, "/usr/bin/curl", ("curl", "x"), 4026531840, 5, "curl")
    t = FlowTable(proc=lambda pid: info if pid == 10 else ProcInfo(None, None, None, None, None))
    (o,) = feed(t, rec(REC_OPEN, A, 0xA))
    assert (o.ppid, o.exe, o.cmdline, o.netns) == (1, "/usr/bin/curl", ("curl", "x"), 4026531840)


def test_process_gone_before_we_looked_keeps_what_bpf_captured(table):
    gone = 4_000_000
    (o,) = feed(table, rec(REC_OPEN, A, 0xAB, pid=gone, comm=b"shortlived"))
    assert (o.pid, o.comm, o.uid, o.cgroup_id) == (gone, "shortlived", 0, 7)
    assert (o.exe, o.cmdline, o.ppid, o.netns) == (None, None, None, None)


def test_accept_never_attributed_gets_a_synthesized_open(table):
    o, c = feed(table, rec(REC_CLOSE, FL.HAVE_TUPLE, 0xB, pid=0, direction=2, comm=b""))
    assert isinstance(o, FlowOpened) and o.direction == Direction.ACCEPT and o.pid == 0
    assert isinstance(c, FlowClosed) and c.flow_id == o.flow_id


def test_listener_and_untracked_closes_are_ignored_not_reported(table):
    got = feed(table, rec(REC_CLOSE, FL.UNTRACKED | FL.MIDSTREAM | FL.HAVE_TUPLE, 0xC, dport=0),
               rec(REC_CLOSE, FL.UNTRACKED | FL.MIDSTREAM | FL.HAVE_TUPLE, 0xD))
    assert got == [] and table.ignored == 2


def test_preexisting_flow_close_joins_the_dump_entry(table):
    from busted.host.preexisting import ExistingFlow

    dumped = [ExistingFlow(4, "127.0.0.1", 5555, "127.0.0.2", 443, inode=77, uid=0, listening_port=False),
              ExistingFlow(4, "127.0.0.1", 6666, "127.0.0.2", 443, inode=78, uid=0, listening_port=False)]
    pre = table.preexisting(dumped, {77: 10}, tracked={("127.0.0.1", 6666, "127.0.0.2", 443)}, ts_ns=1)
    assert len(pre) == 1 and pre[0].preexisting and pre[0].pid == 10
    (c,) = feed(table, rec(REC_CLOSE, FL.MIDSTREAM | FL.ATTRIBUTED | FL.HAVE_TUPLE, 0xE, sent=9))
    assert c.flow_id == pre[0].flow_id and c.preexisting and c.bytes_sent == 9 and c.duration_ns == 0


def test_identity_eviction_is_a_counted_table_loss():
    t = FlowTable(max_flows=2)
    got = feed(t, *(rec(REC_OPEN, A, 0x10 + i) for i in range(3)))
    lost = [e for e in got if isinstance(e, EventsLost)]
    assert [(e.where, e.count) for e in lost] == [(LossPlace.USER_TABLE, 1)]
    assert t.open_flows == 2 and t.lost["USER_TABLE"] == 1


def test_kernel_loss_counters_become_events_once(table):
    (ev,) = table.kernel_losses({1: 5, 2: 0}, ts_ns=1)
    assert (ev.where, ev.count) == (LossPlace.KERNEL_RING, 5)
    assert table.kernel_losses({1: 5, 2: 0}, ts_ns=2) == []
    (ev,) = table.kernel_losses({1: 5, 6: 3}, ts_ns=3)
    assert (ev.where, ev.count) == (LossPlace.KERNEL_MISS, 3)


def test_expired_flow_is_closed_with_a_loss(table):
    (o,) = feed(table, rec(REC_OPEN, A, 0xA))
    lost, c = table.expire(0xA, 9_000, sent=4, recv=5)
    assert lost.where == LossPlace.KERNEL_MISS and c.flow_id == o.flow_id and (c.bytes_sent, c.bytes_received) == (4, 5)
    assert table.expire(0xA, 9_001) == [] and table.open_flows == 0


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", b"\x01\x00\x00\x00" + b"\x00" * 10,
                                 b"\x09\x00\x00\x00" + b"\x00" * 200])
def test_short_or_unknown_record_is_a_counted_parse_loss(table, raw):
    (ev,) = table.feed(raw)
    assert ev.where == LossPlace.PARSE and table.lost["PARSE"] == 1


def test_fast_constructed_events_equal_normal_ones(table):
    from busted.events import FLOW_IDENTITY

    o, c = feed(table, rec(REC_OPEN, A, 0xC1), rec(REC_CLOSE, A, 0xC1, ts=9_000, sent=5, recv=6))
    fields = {f: getattr(o, f) for f in FLOW_IDENTITY}
    assert o == FlowOpened(**fields) and hash(o) == hash(FlowOpened(**fields))
    assert c == FlowClosed(**{**fields, "ts_ns": 9_000, "wall_time": c.wall_time, "bytes_sent": 5,
                              "bytes_received": 6, "duration_ns": 8_000})
    assert repr(o).startswith("FlowOpened(") and o.to_dict()["kind"] == "flow_opened"


# -- what the Monitor adds ---------------------------------------------------------------------


class FakeProgram:
    """The kernel side, scripted: ``ring`` holds raw records the Monitor's real reader path
    (``_drain`` -> ``_read_ring`` -> ``_flush_pending``) takes, as it takes them from BPF."""

    def __init__(self):
        self.lost = {1: 0, 2: 0}
        self.ring = collections.deque()

    def wait(self, ms):
        return bool(self.ring)

    def read(self, limit):
        return [self.ring.popleft() for _ in range(min(limit, len(self.ring)))]

    def losses(self):
        return dict(self.lost)

    def flow_entries(self, older_than_ns=None):
        return {}

    def close(self):
        pass


def monitor(**kw):
    m = Monitor(classify=False, **kw)
    m._program = FakeProgram()
    m._table = FlowTable()
    m._prefilter()  # as start() does: the cheap filters in the table when nothing needs every flow
    m._started = True
    return m


def mfeed(m, raw):
    """One record through the reader thread's own path: into the (fake) kernel ring, one drain."""
    m._program.ring.append(raw)
    m._drain(0)


def drain(m):
    m._flush_pending()
    out = []
    while (ev := m._pop()) is not None:
        out.append(ev)
    return out


def test_queue_overflow_is_counted_and_reported():
    m = monitor(queue_size=8)
    for i in range(20):
        m._pending.extend(m._table.feed(rec(REC_OPEN, A, 0x100 + i)))  # bypass back-pressure
    got = drain(m)
    assert len(got) == 8
    assert m.stats().lost["USER_QUEUE"] == 12
    mfeed(m, rec(REC_OPEN, A, 0x200))
    got = drain(m)
    lost = [e for e in got if isinstance(e, EventsLost)]
    assert lost and lost[0].where == LossPlace.USER_QUEUE and lost[0].count == 12


def test_a_full_queue_stops_the_drain_instead_of_dropping():
    """The reader takes records from the ring only while the queue has room (headroom 16 for the
    events one record can still produce); the rest wait in the ring, nothing is dropped."""
    m = monitor(queue_size=64)
    m._program.ring.extend(rec(REC_OPEN, A, 0x300 + i) for i in range(60))
    m._drain(0)
    assert len(m._queue) == 64 - 16 and len(m._program.ring) == 60 - 48
    m._drain(0)  # still full: nothing more is taken
    assert len(m._queue) == 48 and len(m._program.ring) == 12
    got = drain(m)  # the consumer takes; the next drain reads the rest
    m._drain(0)
    got += drain(m)
    assert len(got) == 60 and all(isinstance(e, FlowOpened) for e in got) and len({e.flow_id for e in got}) == 60
    assert m.stats().lost.get("USER_QUEUE", 0) == 0 and not m._program.ring


@pytest.mark.parametrize("size", [1, 4, 8, 16])
def test_a_small_queue_still_reads(size):
    """The 16-event headroom made a queue of 16 or fewer never take a record from the ring."""
    m = monitor(queue_size=size)
    got = []
    for i in range(2 * size):
        mfeed(m, rec(REC_OPEN, A, 0x600 + i))
        got += drain(m)
    assert len(got) == 2 * size and m.stats().lost.get("USER_QUEUE", 0) == 0
    with pytest.raises(busted.UsageError, match="queue_size=0"):
        Monitor(queue_size=0)


def test_kernel_losses_reach_the_stream():
    m = monitor()
    m._program.lost[1] = 5
    m._check_kernel_losses()
    (ev,) = drain(m)
    assert ev.where == LossPlace.KERNEL_RING and ev.count == 5 and m.stats().lost["KERNEL_RING"] == 5
    m._check_kernel_losses()
    assert drain(m) == []


def test_filters_drop_but_count():
    m = monitor(comm="python")
    mfeed(m, rec(REC_OPEN, A, 0xF))
    assert drain(m) == [] and m.stats().filtered == 1


def test_aevents_runs_callbacks_in_the_consuming_task():
    import asyncio
    import threading

    m = monitor()
    seen = []
    m.on(FlowOpened, lambda ev: seen.append(threading.get_ident()))
    for i in range(3):
        mfeed(m, rec(REC_OPEN, A, 0x400 + i))
    m._flush_pending()

    async def consume():
        got = []
        async for ev in m.aevents(timeout=0.3):
            got.append(ev)
        return got, threading.get_ident()

    got, loop_thread = asyncio.run(consume())
    assert len(got) == 3 and seen == [loop_thread] * 3


def test_async_start_does_not_block_the_event_loop(monkeypatch):
    """The BPF compile (1-2 s) runs in a worker thread: the loop keeps ticking meanwhile."""
    import asyncio
    import time as _time

    m = Monitor(classify=False)

    def slow_start():
        _time.sleep(0.5)
        m._program, m._table, m._started = FakeProgram(), FlowTable(), True
        return m

    monkeypatch.setattr(m, "start", slow_start)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        t = asyncio.create_task(ticker())
        async with m:
            pass
        t.cancel()
        return ticks

    assert asyncio.run(main()) >= 10


def test_price_overrides_from_a_file(tmp_path):
    from busted.errors import UsageError

    good = tmp_path / "prices.toml"
    good.write_text('[openai."gpt-4o"]\ninput_per_mtok = 2.0\noutput_per_mtok = 10.0\n')
    m = Monitor(prices=good)
    c = m._prices.cost(model="gpt-4o-2024-08-06", input_tokens=1_000_000, output_tokens=100_000, provider="openai")
    assert c is not None and abs(c.usd - 3.0) < 1e-9 and "override" in c.source
    bad = tmp_path / "bad.toml"
    bad.write_text('[openai."gpt-4o"]\ncolour = 1\n')
    with pytest.raises(UsageError, match="unknown key"):
        Monitor(prices=bad)


def test_records_held_during_start_up_wait_for_room_instead_of_being_dropped():
    import collections

    m = monitor(queue_size=40)
    m._backlog = collections.deque(rec(REC_OPEN, A, 0x500 + i) for i in range(100))
    m._read_ring(m._program)
    m._flush_pending()
    first = drain(m)
    assert 0 < len(first) <= 40 and len(m._backlog) == 100 - len(first)
    while m._backlog:  # the consumer takes, the reader goes on
        m._read_ring(m._program)
        m._flush_pending()
        first.extend(drain(m))
    assert len(first) == 100 and not [e for e in first if isinstance(e, EventsLost)]
    assert m.stats().lost.get("USER_QUEUE", 0) == 0
