"""The cheap filters ahead of /proc and classification (issue 20): ``FlowTable.admit``.

Driven by plain kernel records (no root, no kernel): a table with ``admit`` set must put out
exactly what a table without it puts out once the Monitor's filters have dropped what they drop,
while never reading /proc nor classifying a refused flow that nothing else needs. The Monitor
only sets ``admit`` when no stage must see every flow (a policy, busy-host mode).
"""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from test_flows_capture import HELLO, answer, cap
from test_flows_gaps import SK, call_records, request, response
from test_flows_gaps import table as reader_table

from busted import EventsLost, FlowClosed, FlowOpened, LlmCall, LossPlace, Monitor, TlsClientHello
from busted.host.procinfo import ProcInfo
from busted.pipeline.enrich import Enricher
from busted.pipeline.filters import Filters
from busted.pipeline.flows import FlowTable, ScanProcess
from busted.wire.layout import CAP_DNS_UDP, FL, FLOW, REC_CLOSE, REC_DNS, REC_HDR, REC_OPEN, REC_TLS

A = FL.ATTRIBUTED | FL.HAVE_TUPLE | FL.OPEN_SENT
NO_FILTERS = {"pid": None, "uid": None, "comm": None, "cgroup": None, "port": None, "netns": None, "family": None}


def flow(typ: int, sk: int, *, pid: int = 10, uid: int = 0, comm: bytes = b"curl", sport: int = 40000,
         dport: int = 443, cgroup: int = 7, ts: int = 2_000, sent: int = 0, daddr=(10, 9, 9, 9)) -> bytes:
    return REC_HDR.pack(type=typ, ts_ns=ts, sk=sk) + FLOW.pack(
        open_ns=1_000, cgroup=cgroup, sent=sent, pid=pid, tid=pid, uid=uid, family=socket.AF_INET, sport=sport,
        dport=dport, direction=1, flags=A, saddr=bytes([10, 0, 0, 1]), daddr=bytes(daddr), comm=comm)


def filters(**kw) -> Filters:
    return Filters.build(**{**NO_FILTERS, **kw})


class CountingProc:
    """The process-facts seam, counting the pids it was asked about."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def __call__(self, pid: int) -> ProcInfo:
        self.asked.append(pid)
        return ProcInfo(1, f"/usr/bin/p{pid}", (f"p{pid}",), 4026531840, 5, f"p{pid}")


class CountingEnricher(Enricher):
    def __init__(self) -> None:
        super().__init__()
        self.peers = 0

    def classify_peer(self, *a, **kw):
        self.peers += 1
        return super().classify_peer(*a, **kw)


def pair(f: Filters, **kw) -> tuple[FlowTable, FlowTable]:
    """(a table without admit, one with ``f.admits``), each with its own counting seams."""
    plain = FlowTable(enricher=CountingEnricher(), proc=CountingProc(), salt=3, **kw)
    pre = FlowTable(enricher=CountingEnricher(), proc=CountingProc(), salt=3, **kw)
    pre.admit = f.admits
    return plain, pre


def run(t: FlowTable, records: list[bytes]) -> list:
    out = []
    for r in records:
        out.extend(t.feed(r))
    return out


def same(a: list, b: list) -> bool:
    return [(type(e), e.to_dict()) for e in a] == [(type(e), e.to_dict()) for e in b]


def test_a_refused_flow_costs_no_proc_read_no_classification_and_no_event():
    f = filters(pid=[10])
    plain, pre = pair(f)
    recs = [flow(REC_OPEN, 0xA, pid=10), flow(REC_OPEN, 0xB, pid=11),
            flow(REC_CLOSE, 0xB, pid=11, ts=3_000, sent=8), flow(REC_CLOSE, 0xA, pid=10, ts=4_000)]
    want = [e for e in run(plain, recs) if f.match(e)]
    got = [e for e in run(pre, recs) if f.match(e)]  # the Monitor still applies match after the table
    assert same(got, want) and [type(e) for e in got] == [FlowOpened, FlowClosed] and got[0].pid == 10
    assert pre._proc.asked == [10] and plain._proc.asked == [10, 11]  # pid 11's /proc never read
    assert (pre.enricher.peers, plain.enricher.peers) == (1, 2)
    assert pre.prefiltered == 2  # pid 11's open and close, never made
    assert pre.open_flows == 0 and pre.commands == []  # no reader: no scan asked


def test_each_cheap_filter_refuses_what_match_drops():
    base = {"pid": 10, "uid": 1000, "comm": b"curl", "sport": 40000, "dport": 443, "cgroup": 7}
    cases = [({"pid": [11]}, {"pid": 11}), ({"uid": [1000]}, {"uid": 0}), ({"comm": ["python"]}, {"comm": b"python"}),
             ({"port": [8443]}, {"sport": 8443, "dport": 80}), ({"cgroup": 9}, {"cgroup": 9}),
             ({"family": 6}, None)]
    for kw, passing in cases:
        f = filters(**kw)
        plain, pre = pair(f)
        recs = [flow(REC_OPEN, 0x1, **base), flow(REC_CLOSE, 0x1, **base, ts=3_000)]
        if passing is not None:
            over = {**base, **passing}
            recs += [flow(REC_OPEN, 0x2, **over), flow(REC_CLOSE, 0x2, **over, ts=3_000)]
        want = [e for e in run(plain, recs) if f.match(e)]
        got = [e for e in run(pre, recs) if f.match(e)]  # the Monitor still applies match after the table
        assert same(got, want), kw
        assert len(got) == (2 if passing is not None else 0), kw
        assert pre.prefiltered == 2, kw  # the first flow's open and close


def test_a_netns_filter_is_left_to_match():
    """netns comes from /proc, not from the record: ``admits`` lets the flow through, ``match`` judges."""
    from busted.wire.records import decode

    f = filters(netns=1)
    assert f.active and not f.cheap and f.admits(decode(flow(REC_OPEN, 1)))
    (ev,) = FlowTable(proc=CountingProc()).feed(flow(REC_OPEN, 1))
    assert not f.match(ev)


def test_a_refused_flows_hello_and_dns_answer_are_reported_as_before():
    """TlsClientHello and DnsAnswer are not flow events: the filters never dropped them. A refused
    flow's hello carries the flow's identity (built from its open record when the hello comes)."""
    f = filters(comm=["python"])
    plain, pre = pair(f)
    recs = [cap(REC_DNS, answer(), transport=CAP_DNS_UDP, ts=1_500), flow(REC_OPEN, 0xA),
            *(cap(REC_TLS, HELLO[i:i + 200], sk=0xA, ts=2_500) for i in range(0, len(HELLO), 200)),
            flow(REC_CLOSE, 0xA, ts=9_000)]
    want = [e for e in run(plain, recs) if f.match(e)]
    got = [e for e in run(pre, recs) if f.match(e)]  # the Monitor still applies match after the table
    assert same(got, want)
    hello = next(e for e in got if isinstance(e, TlsClientHello))
    assert hello.flow_id == plain.flow_id(0xA, 1_000) and hello.provider == "openai"
    assert (hello.saddr, hello.sport, hello.daddr, hello.dport) == ("10.0.0.1", 40000, "10.9.9.9", 443)
    assert pre._proc.asked == [10, 10]  # the DNS answer's netns, then the identity when the hello came
    assert pre.prefiltered == 1  # its open; its FlowClassified and FlowClosed were made (then filtered)


def test_a_refused_flows_llm_call_is_still_read_and_its_process_scanned():
    f = filters(port=[80])
    plain = reader_table()
    pre = reader_table()
    pre.admit = f.admits
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    recs = [flow(REC_OPEN, SK, comm=b"python"), *call_records(request(body), True, 2_000),
            *call_records(response("gpt-4o", 8, 2), False, 3_000), flow(REC_CLOSE, SK, ts=4_000)]
    want = [e for e in run(plain, recs) if f.match(e)]
    got = [e for e in run(pre, recs) if f.match(e)]  # the Monitor still applies match after the table
    assert same(got, want)
    (call,) = [e for e in got if isinstance(e, LlmCall)]
    assert (call.request_model, call.input_tokens, call.output_tokens, call.pid) == ("gpt-4o", 8, 2, 10)
    assert not [e for e in got if isinstance(e, FlowOpened | FlowClosed)]
    # the TLS library scanner still sees the process; the kernel is told the rest as before
    assert pre.take_commands() == [ScanProcess(10), *plain.take_commands()]


def test_the_sweep_still_ends_a_refused_flow_with_a_counted_loss():
    f = filters(uid=[1000])
    plain, pre = pair(f)
    run(plain, [flow(REC_OPEN, 0xD)])
    assert run(pre, [flow(REC_OPEN, 0xD)]) == []
    assert pre.flow(0xD) == plain.flow(0xD)  # the sweep asks for its netns: built on demand
    want = [e for e in plain.expire(0xD, 9_000, 5, 6) if f.match(e)]
    got = pre.expire(0xD, 9_000, 5, 6)
    got = [e for e in got if f.match(e)]
    assert same(got, want) and isinstance(got[0], EventsLost) and got[0].where == LossPlace.KERNEL_MISS
    assert pre.open_flows == 0


def test_eviction_of_refused_flows_is_counted_as_before():
    f = filters(pid=[99])
    plain, pre = pair(f, max_flows=2)
    recs = [flow(REC_OPEN, sk) for sk in (1, 2, 3)]
    want = [e for e in run(plain, recs) if f.match(e)]
    got = [e for e in run(pre, recs) if f.match(e)]  # the Monitor still applies match after the table
    assert same(got, want) and len(got) == 1 and got[0].where == LossPlace.USER_TABLE


_PIDS, _COMMS, _PORTS = (10, 11), (b"curl", b"python"), (443, 8080)


@st.composite
def scripts(draw):
    """Opens, hellos and closes of a few flows, interleaved, each flow with its own process and port."""
    n = draw(st.integers(1, 6))
    flows = [(0x100 + i, draw(st.sampled_from(_PIDS)), draw(st.sampled_from(_COMMS)), draw(st.sampled_from(_PORTS)),
              draw(st.booleans()), draw(st.booleans())) for i in range(n)]
    steps: list[tuple[int, str]] = []
    for sk, _pid, _comm, _port, hello, close in flows:
        steps.append((sk, "open"))
        if hello:
            steps.append((sk, "hello"))
        if close:
            steps.append((sk, "close"))
    order = draw(st.permutations(range(len(steps))))
    by_sk = {f[0]: f for f in flows}
    seq, seen = [], set()
    for i in order:  # keep each flow's own steps in order
        sk = steps[i][0]
        for sk2, what in steps:
            if sk2 == sk and (sk2, what) not in seen:
                seen.add((sk2, what))
                seq.append((sk2, what))
                break
    recs = []
    for ts, (sk, what) in enumerate(seq, start=2):
        _sk, pid, comm, port, _h, _c = by_sk[sk]
        if what == "open":
            recs.append(flow(REC_OPEN, sk, pid=pid, comm=comm, dport=port, ts=ts * 1_000))
        elif what == "hello":
            recs.append(cap(REC_TLS, HELLO, sk=sk, ts=ts * 1_000))
        else:
            recs.append(flow(REC_CLOSE, sk, pid=pid, comm=comm, dport=port, ts=ts * 1_000))
    f = draw(st.sampled_from([{"pid": [10]}, {"comm": ["python"]}, {"port": [8080]}, {"pid": [11], "port": [443]}]))
    return recs, f


@settings(max_examples=200, deadline=None)
@given(scripts())
def test_any_interleaving_gives_what_the_filters_would_have_kept(script):
    recs, kw = script
    f = filters(**kw)
    plain, pre = pair(f)
    want = [e for e in run(plain, recs) if f.match(e)]
    raw = run(pre, recs)
    got = [e for e in raw if f.match(e)]  # the Monitor still applies match after the table
    assert same(got, want)
    made_and_dropped = len([e for e in run(FlowTable(enricher=Enricher(), proc=CountingProc(), salt=3), recs)
                            if not f.match(e)])
    got_dropped = pre.prefiltered + len(raw) - len(got)
    # As many or fewer: a lazily built identity may already hold what a FlowClassified said before.
    assert got_dropped <= made_and_dropped
    assert pre.open_flows == plain.open_flows


# -- the Monitor: when the table may refuse flows ---------------------------------------------------


def _monitor(**kw) -> Monitor:
    m = Monitor(**kw)
    m._table = FlowTable(enricher=Enricher())
    return m


def test_the_monitor_prefilters_only_when_no_stage_needs_every_flow():
    from busted.policy.rules import Policy

    m = _monitor(pid=10)
    m._prefilter()
    assert m._table.admit == m._filters.admits
    for kw in ({}, {"netns": 5}):  # nothing to refuse by the record
        m = _monitor(**kw)
        m._prefilter()
        assert m._table.admit is None
    m = _monitor(pid=10, busy_host=True)  # busy-host mode judges every peer
    m._prefilter()
    assert m._table.admit is None
    pol = Policy.from_dict({"default": "audit", "rules": [{"name": "r", "action": "deny", "provider": "deepseek"}]})
    m = _monitor(pid=10, policy=pol)
    m._start_policy(m._table.enricher)  # what start() does with a policy: the policy judges every flow
    m._prefilter()
    assert m._table.admit is None
    m = _monitor(comm="curl")  # a policy set while running: from then on, every flow is built
    m._prefilter()
    assert m._table.admit is not None
    m._started = True
    m.set_policy(pol)
    assert m._table.admit is None and m.policy is not None
    m._policy_rt.close()


def test_prefiltered_events_count_as_filtered_in_stats():
    m = _monitor(comm="python")
    m._prefilter()
    for r in (flow(REC_OPEN, 0xF), flow(REC_CLOSE, 0xF, ts=3_000), flow(REC_OPEN, 0xE, comm=b"python")):
        m._pending.extend(m._table.feed(r))
    m._flush_pending()
    got = list(m._queue)
    assert [type(e) for e in got] == [FlowOpened] and got[0].comm == "python"
    assert m.stats().filtered == 2 and m._table.prefiltered == 2


def test_records_carry_what_the_events_carry():
    """``admits`` reads the record's fields; the table copies the same fields into every flow event."""
    from busted.wire.records import decode

    raw = flow(REC_OPEN, 0x1, pid=42, uid=7, comm=b"node", sport=1234, dport=443, cgroup=99)
    (ev,) = FlowTable().feed(raw)
    rec = decode(raw)
    assert (ev.pid, ev.uid, ev.comm, ev.sport, ev.dport, ev.cgroup_id, ev.family) == (
        rec.pid, rec.uid, rec.comm, rec.sport, rec.dport, rec.cgroup, rec.family) == (42, 7, "node", 1234, 443, 99, 4)


def test_the_monitor_hands_a_refused_flows_process_to_the_tls_scanner():
    """A refused flow makes no FlowOpened, the event the scanner is told of: ScanProcess tells it."""
    from test_monitor_records import FakeProgram

    seen: list[int] = []

    class Scanner:
        def saw(self, pid: int) -> None:
            seen.append(pid)

    m = Monitor(classify=False, comm="python")
    m._program = FakeProgram()
    m._table = FlowTable(reader=lambda flow, wall: None)  # plaintext followed: a reader factory is given
    m._tls_scanner = Scanner()
    m._started = True
    m._prefilter()
    m._program.ring.extend([flow(REC_OPEN, 0xA, pid=77), flow(REC_OPEN, 0xB, pid=78, comm=b"python")])
    m._drain(0)
    got = list(m._queue)
    assert [(type(e), e.pid) for e in got] == [(FlowOpened, 78)]
    assert seen == [77, 78]  # the refused one through the command, the admitted one at its event
