"""The Monitor's record handling, driven by scripted kernel records (the one seam we fake).

The real kernel side is tested in tests/kernel; this checks the Python loop's bookkeeping:
ordering, synthesized opens, pre-existing joins, losses and filters.
"""

import ctypes
import struct

import pytest

from busted import Direction, EventsLost, FlowClosed, FlowOpened, LossPlace, Monitor
from busted.ebpf.records import FL, REC_CLOSE, REC_OPEN

FMT = struct.Struct("<IIQQQQQQIIIHHHBB16s16s16s")


def rec(typ, flags, sk, *, ts=2_000, open_ns=1_000, sent=0, recv=0, pid=10, direction=1,
        saddr=(127, 0, 0, 1), daddr=(127, 0, 0, 2), sport=5555, dport=443, comm=b"curl"):
    raw = FMT.pack(typ, flags, ts, open_ns, sk, 7, sent, recv, pid, pid, 0, 2, sport, dport, direction, 0,
                   bytes(saddr) + b"\0" * 12, bytes(daddr) + b"\0" * 12, comm.ljust(16, b"\0"))
    return raw + b"\0" * 4


class FakeProgram:
    def __init__(self):
        self.lost = {1: 0, 2: 0}

    def poll(self, ms):
        pass

    def consume(self):
        pass

    def losses(self):
        return dict(self.lost)

    def close(self):
        pass


def feed(mon, raw):
    buf = ctypes.create_string_buffer(raw, len(raw))
    assert mon._on_record(None, ctypes.addressof(buf), len(raw)) in (0, -1)  # -1: queue full, stop draining


@pytest.fixture
def mon():
    m = Monitor(classify=False, queue_size=8)
    m._program = FakeProgram()
    m._started = True
    return m


def drain(m):
    m._flush_pending()
    out = []
    while (ev := m._pop()) is not None:
        out.append(ev)
    return out


A = FL.ATTRIBUTED | FL.HAVE_TUPLE | FL.OPEN_SENT


def test_open_then_close_carry_one_identity(mon):
    feed(mon, rec(REC_OPEN, A, 0xA))
    feed(mon, rec(REC_CLOSE, A, 0xA, ts=5_000, sent=3, recv=4))
    o, c = drain(mon)
    assert isinstance(o, FlowOpened) and isinstance(c, FlowClosed)
    assert o.flow_id == c.flow_id and (c.bytes_sent, c.bytes_received, c.duration_ns) == (3, 4, 4_000)
    assert (c.pid, c.comm, c.saddr, c.daddr, c.dport) == (10, "curl", "127.0.0.1", "127.0.0.2", 443)


def test_process_gone_before_we_looked_keeps_what_bpf_captured(mon):
    gone = 4_000_000  # above pid_max: no such process
    feed(mon, rec(REC_OPEN, A, 0xAB, pid=gone, comm=b"shortlived"))
    (o,) = drain(mon)
    assert (o.pid, o.comm, o.uid, o.cgroup_id) == (gone, "shortlived", 0, 7)
    assert (o.exe, o.cmdline, o.ppid, o.netns) == (None, None, None, None)


def test_accept_never_attributed_gets_a_synthesized_open(mon):
    feed(mon, rec(REC_CLOSE, FL.HAVE_TUPLE, 0xB, pid=0, direction=2, comm=b""))
    o, c = drain(mon)
    assert isinstance(o, FlowOpened) and o.direction == Direction.ACCEPT and o.pid == 0
    assert c.flow_id == o.flow_id


def test_listener_and_untracked_closes_are_ignored_not_reported(mon):
    feed(mon, rec(REC_CLOSE, FL.UNTRACKED | FL.MIDSTREAM | FL.HAVE_TUPLE, 0xC, dport=0))
    feed(mon, rec(REC_CLOSE, FL.UNTRACKED | FL.MIDSTREAM | FL.HAVE_TUPLE, 0xD))
    assert drain(mon) == [] and mon.stats().ignored == 2


def test_preexisting_flow_close_joins_the_dump_entry(mon):
    pre = FlowOpened(ts_ns=1, wall_time=1.0, flow_id=99, direction=Direction.CONNECT, pid=10, tid=10, uid=0,
                     comm="curl", family=4, saddr="127.0.0.1", sport=5555, daddr="127.0.0.2", dport=443,
                     preexisting=True)
    mon._pre[("127.0.0.1", 5555, "127.0.0.2", 443)] = pre
    feed(mon, rec(REC_CLOSE, FL.MIDSTREAM | FL.ATTRIBUTED | FL.HAVE_TUPLE, 0xE, sent=9))
    (c,) = drain(mon)
    assert c.flow_id == 99 and c.preexisting and c.bytes_sent == 9 and c.duration_ns == 0


def test_queue_overflow_is_counted_and_reported(mon):
    for i in range(20):
        feed(mon, rec(REC_OPEN, A, 0x100 + i))
    got = drain(mon)
    assert len(got) == 8
    assert mon.stats().lost["USER_QUEUE"] == 12
    feed(mon, rec(REC_OPEN, A, 0x200))
    got = drain(mon)
    lost = [e for e in got if isinstance(e, EventsLost)]
    assert lost and lost[0].where == LossPlace.USER_QUEUE and lost[0].count == 12


def test_a_full_queue_stops_the_drain_instead_of_dropping():
    m = Monitor(classify=False, queue_size=40)
    m._program = FakeProgram()
    rets = []
    for i in range(30):
        raw = rec(REC_OPEN, A, 0x300 + i)
        b = ctypes.create_string_buffer(raw, len(raw))
        rets.append(m._on_record(None, ctypes.addressof(b), len(raw)))
    # stops with headroom (16) left for the events one record can still produce
    assert rets[:23] == [0] * 23 and rets[23] == -1


def test_kernel_losses_become_events(mon):
    mon._program.lost[1] = 5
    mon._check_kernel_losses()
    (ev,) = drain(mon)
    assert ev.where == LossPlace.KERNEL_RING and ev.count == 5
    mon._check_kernel_losses()
    assert drain(mon) == []


def test_short_record_is_a_counted_parse_loss(mon):
    feed(mon, b"\x01\x00\x00\x00" + b"\x00" * 10)
    (ev,) = drain(mon)
    assert ev.where == LossPlace.PARSE and mon.stats().lost["PARSE"] == 1


def test_filters_drop_but_count(mon):
    m = Monitor(classify=False, comm="python")
    m._program = FakeProgram()
    feed(m, rec(REC_OPEN, A, 0xF))
    assert drain(m) == [] and m.stats().filtered == 1


def test_fast_constructed_events_equal_normal_ones(mon):
    from busted.events import FlowEvent

    feed(mon, rec(REC_OPEN, A, 0xC1))
    feed(mon, rec(REC_CLOSE, A, 0xC1, ts=9_000, sent=5, recv=6))
    o, c = drain(mon)
    fields = {f: getattr(o, f) for f in FlowEvent.__dataclass_fields__ if f != "kind"}
    assert o == FlowOpened(**fields) and hash(o) == hash(FlowOpened(**fields))
    assert c == FlowClosed(**{**fields, "ts_ns": 9_000, "wall_time": c.wall_time, "bytes_sent": 5,
                              "bytes_received": 6, "duration_ns": 8_000})
    assert repr(o).startswith("FlowOpened(") and o.to_dict()["kind"] == "flow_opened"
