"""TTFT as the host saw it: a kernel arrival time (REC_ARRIVAL, busted/ebpf/arrival.c) times the
chunk its read delivered, and the call says which clock its TTFT ends at (``ttft_source``)."""

from test_call_completeness import BODY, FLOW, _NoPrices
from test_flows_capture import flow_rec

from busted.events import LlmCall
from busted.pipeline.enrich import Enricher
from busted.pipeline.flows import FlowTable
from busted.pipeline.llmreader import CallReader
from busted.wire.layout import PT_HDR, PT_PACKET, REC_ARRIVAL, REC_OPEN, REC_PLAIN, RX_REC
from busted.wire.records import ArrivalRecord, decode_any

MS = 1_000_000
REQ_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
REQ = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n"
       b"Content-Length: %d\r\n\r\n%s" % (len(REQ_BODY), REQ_BODY))
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
T0 = 1_000 * MS  # the request is written
READ = T0 + 1_000 * MS  # the client reads the answer a second later


def call(arrivals=(), split: bool = False) -> LlmCall:
    r = CallReader(FLOW, lambda ns: ns / 1e9, prices=_NoPrices())
    out = r.feed(True, REQ, T0)
    for read_ns, arrival_ns in arrivals:
        r.arrival(read_ns, arrival_ns)
    parts = [RESP[:40], RESP[40:]] if split else [RESP]
    for p in parts:  # pieces of one read carry the read's time
        out += r.feed(False, p, READ)
    (c,) = [e for e in out if isinstance(e, LlmCall)]
    return c


def test_a_late_read_is_timed_by_the_arrival():
    c = call([(READ - 20_000, T0 + 120 * MS)])
    assert (c.time_to_first_token_ns, c.ttft_source, c.complete) == (120 * MS, "socket", True)
    c = call([(READ - 20_000, T0 + 120 * MS)], split=True)
    assert (c.time_to_first_token_ns, c.ttft_source) == (120 * MS, "socket")
    # the last report before the read wins (its last socket read delivered the answer's first byte)
    c = call([(READ - 90_000, T0 + 1 * MS), (READ - 20_000, T0 + 120 * MS)])
    assert (c.time_to_first_token_ns, c.ttft_source) == (120 * MS, "socket")


def test_without_a_usable_arrival_the_read_time_stands():
    assert (call().time_to_first_token_ns, call().ttft_source) == (1_000 * MS, "read")
    # a report for a read that delivered no plaintext long before, or for a later read, is not used
    assert call([(READ - 50 * MS, T0 + 120 * MS)]).ttft_source == "read"
    assert call([(READ + 1, T0 + 120 * MS)]).ttft_source == "read"


def test_arrival_records_reach_the_flow_reader():
    raw = RX_REC.pack(type=REC_ARRIVAL, ts_ns=READ - 20_000, sk=0xA1, arrival_ns=T0 + 120 * MS)
    assert decode_any(raw) == ArrivalRecord(REC_ARRIVAL, READ - 20_000, 0xA1, T0 + 120 * MS)
    table = FlowTable(enricher=Enricher(), salt=1, reader=lambda f, wall: CallReader(f, wall, prices=_NoPrices()))
    table.feed(flow_rec(REC_OPEN, 0xA1, dport=80))
    out = []
    for sent, data, ts in ((True, REQ, T0), (None, raw, 0), (False, RESP, READ)):
        if sent is None:
            out += table.feed(data)
            continue
        out += table.feed(PT_HDR.pack(type=REC_PLAIN, len=len(data), ts_ns=ts, sk=0xA1, pid=10, tid=10,
                                      wire_len=len(data), direction=0 if sent else 1, source=3) + data)
    (c,) = [e for e in out if isinstance(e, LlmCall)]
    assert (c.time_to_first_token_ns, c.ttft_source) == (120 * MS, "socket")
    assert table.feed(RX_REC.pack(type=REC_ARRIVAL, sk=0xBEEF)) == []  # no such flow: nothing


def _packet(sent: bool, data: bytes, ts: int, *, offset: int = 0, wire: int | None = None, cut: int = 0) -> bytes:
    """A plaintext record of the cgroup capture tier: one TCP segment's payload (source PT_PACKET)."""
    return PT_HDR.pack(type=REC_PLAIN, len=len(data), ts_ns=ts, sk=0xA2, pid=10, tid=10,
                       wire_len=len(data) + offset if wire is None else wire, offset=offset,
                       direction=0 if sent else 1, source=PT_PACKET, cut=cut) + data


def _table() -> FlowTable:
    table = FlowTable(enricher=Enricher(), salt=1, reader=lambda f, wall: CallReader(f, wall, prices=_NoPrices()))
    table.feed(flow_rec(REC_OPEN, 0xA2, dport=80))
    return table


def test_packets_are_timed_at_arrival_without_an_arrival_record():
    """Segments read at cgroup skb ingress carry the time they reached the socket: TTFT says so."""
    table = _table()
    cut = RESP.index(b"\r\n\r\n") + 10  # the head and the body's first bytes, then the rest
    out = table.feed(_packet(True, REQ, T0))
    out += table.feed(_packet(False, RESP[:cut], T0 + 80 * MS))
    out += table.feed(_packet(False, RESP[cut:], T0 + 81 * MS))
    (c,) = [e for e in out if isinstance(e, LlmCall)]
    assert (c.time_to_first_token_ns, c.ttft_source, c.complete) == (80 * MS, "socket", True)


def test_a_hole_before_a_segment_is_a_counted_gap_not_misread_bytes():
    """A segment after bytes never seen (cut bit 4, the hole's size as its offset): the reader skips
    exactly that many bytes, so the body's end still lines up and the call is read (incomplete)."""
    hole = 30
    body_at = RESP.index(b"\r\n\r\n") + 4
    table = _table()
    out = table.feed(_packet(True, REQ, T0))
    out += table.feed(_packet(False, RESP[:body_at + 5], T0 + 10 * MS))
    # the next segment (RESP[body_at+5 : body_at+5+hole]) never reached us
    rest = RESP[body_at + 5 + hole:]
    out += table.feed(_packet(False, rest, T0 + 12 * MS, offset=hole, cut=4))
    calls = [e for e in out if isinstance(e, LlmCall)]
    lost = [e for e in out if type(e).__name__ == "EventsLost"]
    assert not [e for e in lost if "does not follow" in e.detail], lost  # the flow is still parsed
    assert len(calls) == 1 and calls[0].request_model == "gpt-4o-mini"
    # the same bytes with no hole flag: a piece that does not follow, the flow stops being parsed
    table = _table()
    table.feed(_packet(True, REQ, T0))
    table.feed(_packet(False, RESP[:body_at + 5], T0 + 10 * MS))
    out = table.feed(_packet(False, rest, T0 + 12 * MS, offset=hole))
    assert [e for e in out if type(e).__name__ == "EventsLost" and "does not follow" in e.detail]
