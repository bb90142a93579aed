"""The flow table with classification on: captured ClientHellos and DNS answers, fed as plain
capture records (no root). Joins (flow_id, provider), reassembly across writes, DNS over TCP per
connection with a truncated read, and parse losses."""

import dataclasses
import socket
import struct
from pathlib import Path

import dns.message
import dns.rrset

from busted import DnsAnswer, EventsLost, Evidence, FlowClassified, FlowOpened, LossPlace, TlsClientHello
from busted.pipeline.enrich import Enricher
from busted.pipeline.flows import FlowTable
from busted.wire.layout import (
    CAP_DNS_TCP,
    CAP_DNS_UDP,
    CAP_HDR,
    FL,
    FLOW,
    REC_CLOSE,
    REC_DNS,
    REC_HDR,
    REC_OPEN,
    REC_TLS,
)

HELLO = bytes.fromhex(Path(__file__).with_name("fixtures").joinpath("hello_curl.hex").read_text().strip())
A = FL.ATTRIBUTED | FL.HAVE_TUPLE | FL.OPEN_SENT


def flow_rec(typ, sk, *, daddr=(10, 9, 9, 9), dport=443, ts=2_000, sent=0):
    return REC_HDR.pack(type=typ, ts_ns=ts, sk=sk) + FLOW.pack(
        open_ns=1_000, pid=10, tid=10, family=socket.AF_INET, sport=40000, dport=dport, direction=1,
        flags=A, saddr=bytes([10, 0, 0, 1]), daddr=bytes(daddr), comm=b"curl", sent=sent)


def cap(typ, data, *, sk=0, transport=0, wire_len=None, ts=3_000, peer=(10, 0, 0, 53)):
    hdr = CAP_HDR.pack(type=typ, len=len(data), ts_ns=ts, sk=sk, pid=10, tid=10, fd=5,
                       wire_len=len(data) if wire_len is None else wire_len, family=socket.AF_INET,
                       port=53, transport=transport, addr=bytes(peer), comm=b"curl")
    return hdr + data


def answer(qname="api.openai.com", addr="10.9.9.9"):
    q = dns.message.make_query(qname, "A")
    r = dns.message.make_response(q)
    r.answer = [dns.rrset.from_text(qname + ".", 60, "IN", "A", addr)]
    return r.to_wire()


def table():
    return FlowTable(enricher=Enricher(), salt=1)


def feed(t, *records):
    out = []
    for r in records:
        out.extend(t.feed(r))
    return out


def test_hello_split_over_writes_classifies_its_flow_and_carries_the_join():
    t = table()
    (o,) = feed(t, flow_rec(REC_OPEN, 0xA))
    assert o.provider is None and o.evidence == Evidence.UNKNOWN
    got = feed(t, *(cap(REC_TLS, HELLO[i:i + 100], sk=0xA) for i in range(0, len(HELLO), 100)))
    hello, cls = got
    assert isinstance(hello, TlsClientHello) and isinstance(cls, FlowClassified)
    assert (hello.flow_id, hello.sni, hello.provider, hello.hostname) == (o.flow_id, "api.openai.com", "openai",
                                                                          "api.openai.com")
    assert (hello.saddr, hello.sport, hello.daddr, hello.dport) == ("10.0.0.1", 40000, "10.9.9.9", 443)
    assert (cls.flow_id, cls.provider, cls.evidence) == (o.flow_id, "openai", Evidence.SNI)
    # built without __init__ on the hot path: every field set, the same as a normally constructed event
    assert set(vars(hello)) == {f.name for f in dataclasses.fields(hello)}
    assert hello == TlsClientHello(**{f.name: getattr(hello, f.name) for f in dataclasses.fields(hello)})
    assert hello.to_dict() == TlsClientHello(**{f.name: getattr(hello, f.name)
                                                for f in dataclasses.fields(hello)}).to_dict()
    assert feed(t, cap(REC_TLS, HELLO, sk=0xA)) == []  # later writes: the hello is done
    (c,) = feed(t, flow_rec(REC_CLOSE, 0xA, ts=9_000, sent=5))
    assert (c.flow_id, c.provider, c.evidence, c.bytes_sent) == (o.flow_id, "openai", Evidence.SNI, 5)


def test_hello_without_a_known_flow_says_none_not_zero():
    (hello,) = feed(table(), cap(REC_TLS, HELLO, sk=0xB))
    assert hello.flow_id is None and hello.daddr is None and hello.sni == "api.openai.com"


def test_hello_before_its_open_is_kept_for_the_flow():
    t = table()
    assert feed(t, cap(REC_TLS, HELLO[:50], sk=0xC)) == []
    feed(t, flow_rec(REC_OPEN, 0xC))
    hello, cls = feed(t, cap(REC_TLS, HELLO[50:], sk=0xC))
    assert hello.flow_id == cls.flow_id == t.flow_id(0xC, 1_000)


def test_malformed_hello_is_a_parse_loss():
    t = table()
    feed(t, flow_rec(REC_OPEN, 0xD))
    (ev,) = feed(t, cap(REC_TLS, b"\x16\x03\x01\x00\x05" + b"\x02" * 5, sk=0xD))
    assert isinstance(ev, EventsLost) and ev.where == LossPlace.PARSE and t.lost["PARSE"] == 1


def test_dns_answer_names_its_provider_and_classifies_later_flows():
    t = table()
    (a,) = feed(t, cap(REC_DNS, answer(), transport=CAP_DNS_UDP))
    assert isinstance(a, DnsAnswer) and a.provider == "openai" and a.flow_id is None and a.server == "10.0.0.53"
    (o,) = feed(t, flow_rec(REC_OPEN, 0xE))
    assert isinstance(o, FlowOpened) and (o.provider, o.hostname, o.evidence) == ("openai", "api.openai.com",
                                                                                   Evidence.DNS)
    (b,) = feed(t, cap(REC_DNS, answer("example.org", "10.8.8.8"), transport=CAP_DNS_UDP))
    assert b.provider is None


def test_dns_over_tcp_is_framed_per_connection_and_survives_a_truncated_read():
    t = table()
    (o,) = feed(t, flow_rec(REC_OPEN, 0x53, dport=53))
    m1, m2 = answer(), answer("api.anthropic.com", "10.7.7.7")
    framed = struct.pack("!H", len(m1)) + m1
    # the first message arrives in two reads
    assert feed(t, cap(REC_DNS, framed[:7], sk=0x53, transport=CAP_DNS_TCP)) == []
    (a,) = feed(t, cap(REC_DNS, framed[7:], sk=0x53, transport=CAP_DNS_TCP))
    assert a.transport == "tcp" and a.flow_id == o.flow_id and a.qname == "api.openai.com"
    # a 6000-byte message read in one go: only 4096 bytes were copied
    big = b"\x00" * 6000
    lost = feed(t, cap(REC_DNS, (struct.pack("!H", len(big)) + big)[:4096], sk=0x53, transport=CAP_DNS_TCP,
                       wire_len=6002))
    assert [(e.where, e.count) for e in lost] == [(LossPlace.PARSE, 1)]
    # the next message on the same connection is still read
    (b,) = feed(t, cap(REC_DNS, struct.pack("!H", len(m2)) + m2, sk=0x53, transport=CAP_DNS_TCP))
    assert b.qname == "api.anthropic.com" and b.provider == "anthropic"


def test_a_new_connection_starts_with_fresh_framing():
    t = table()
    feed(t, flow_rec(REC_OPEN, 0x60, dport=53))
    m = answer()
    framed = struct.pack("!H", len(m)) + m
    assert feed(t, cap(REC_DNS, framed[:5], sk=0x60, transport=CAP_DNS_TCP)) == []
    feed(t, flow_rec(REC_CLOSE, 0x60, dport=53))  # ends mid-message
    feed(t, flow_rec(REC_OPEN, 0x61, dport=53))  # same fd number, new socket
    (a,) = feed(t, cap(REC_DNS, framed, sk=0x61, transport=CAP_DNS_TCP))
    assert a.qname == "api.openai.com"


def test_truncated_udp_answer_is_counted_not_parsed():
    t = table()
    m = answer()
    (ev,) = feed(t, cap(REC_DNS, m[:20], transport=CAP_DNS_UDP, wire_len=len(m)))
    assert ev.where == LossPlace.PARSE and "truncated" in ev.detail


def test_garbage_dns_is_a_parse_loss():
    t = table()
    (ev,) = feed(t, cap(REC_DNS, b"\x00\x01garbage", transport=CAP_DNS_UDP))
    assert ev.where == LossPlace.PARSE


def test_without_an_enricher_captures_are_ignored():
    t = FlowTable()
    assert t.feed(cap(REC_TLS, HELLO, sk=1)) == [] and t.records == 1


def test_the_flow_table_runs_on_recorded_records_without_root():
    """Issue 20: the flow table is driven by plain records, no kernel, no privilege: this module's
    own tests (and the plaintext gap and pre-filter tests) pass as uid 65534."""
    import subprocess
    import sys

    import needs

    needs.root("to run as uid 65534")
    setpriv = needs.tool("setpriv")
    here = Path(__file__).resolve().parent
    r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "pytest",
                        "-q", "-p", "no:cacheprovider", "-k", "not without_root", str(here / "test_flows_capture.py"),
                        str(here / "test_flows_gaps.py"), str(here / "test_flows_prefilter.py")],
                       capture_output=True, text=True, cwd=here.parents[1], timeout=300,
                       env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0 and " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
