"""DNS answer parsing and the TCP framer: CNAME chains in any order, splits, fuzzing."""

import random
import struct

import dns.flags
import dns.message
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from busted.classify.dns import TcpDnsFramer, parse_dns


def response(qname="x.openai.azure.com", qtype="A", chain=("x.privatelink.openai.azure.com", "edge.tm.net"),
             addrs=("10.1.2.3", "10.1.2.4"), rcode=0, shuffle=None):
    q = dns.message.make_query(qname, qtype)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    names = [n + "." for n in (qname, *chain)]
    rrsets = [dns.rrset.from_text(a, 300, "IN", "CNAME", b) for a, b in zip(names, names[1:], strict=False)]
    if addrs:
        rrsets.append(dns.rrset.from_text(names[-1], 60, "IN", qtype, *addrs))
    if shuffle is not None:
        random.Random(shuffle).shuffle(rrsets)
    r.answer = rrsets
    return r.to_wire()


def test_cname_chain_and_addresses():
    info = parse_dns(response())
    assert info.is_response and info.qname == "x.openai.azure.com" and info.qtype == "A" and info.rcode == "NOERROR"
    assert info.cname_chain == ("x.openai.azure.com", "x.privatelink.openai.azure.com", "edge.tm.net")
    assert sorted(info.addresses) == ["10.1.2.3", "10.1.2.4"]  # an rrset is a set: order is not kept
    assert [(r.rtype, r.ttl) for r in info.records] == [("CNAME", 300), ("CNAME", 300), ("A", 60), ("A", 60)]


def test_chain_order_independent():
    for seed in range(10):
        info = parse_dns(response(shuffle=seed))
        assert info.cname_chain[-1] == "edge.tm.net" and sorted(info.addresses) == ["10.1.2.3", "10.1.2.4"]


def test_aaaa_nxdomain_query_and_loop():
    info = parse_dns(response("api.anthropic.com", "AAAA", chain=(), addrs=("fd00::1",)))
    assert info.qtype == "AAAA" and info.addresses == ("fd00::1",)
    nx = parse_dns(response("nope.test", chain=(), addrs=(), rcode=3))
    assert nx.rcode == "NXDOMAIN" and nx.records == ()
    q = parse_dns(dns.message.make_query("api.openai.com", "A").to_wire())
    assert q is not None and not q.is_response
    loop = dns.message.make_response(dns.message.make_query("a.test", "A"))
    loop.answer = [dns.rrset.from_text("a.test.", 60, "IN", "CNAME", "b.test."),
                   dns.rrset.from_text("b.test.", 60, "IN", "CNAME", "a.test.")]
    info = parse_dns(loop.to_wire())
    assert info.cname_chain == ("a.test", "b.test")


def test_truncated_and_garbage():
    wire = response()
    assert parse_dns(wire[: len(wire) // 2]) is None
    assert parse_dns(b"") is None and parse_dns(b"\x00" * 5) is None


def framed(*msgs):
    return b"".join(len(m).to_bytes(2, "big") + m for m in msgs)


def test_framer_byte_at_a_time():
    msgs = [response(), response("api.openai.com", chain=(), addrs=("10.0.0.1",))]
    f = TcpDnsFramer()
    out = []
    for b in framed(*msgs):
        out += f.feed(bytes([b]))
    assert out == msgs and f.buffered == 0


@given(st.lists(st.integers(1, 400), max_size=10))
def test_framer_any_split(cuts):
    msgs = [response(shuffle=1), response("api.anthropic.com", "AAAA", chain=(), addrs=("fd00::2",))]
    data = framed(*msgs)
    f, out, pos = TcpDnsFramer(), [], 0
    for c in sorted(set(cuts)) + [len(data)]:
        if c > pos:
            out += f.feed(data[pos:c])
            pos = c
    assert out == msgs


@given(st.binary(max_size=2000))
@settings(max_examples=400)
def test_fuzz_parse_and_framer_never_raise(data):
    parse_dns(data)
    f = TcpDnsFramer()
    for m in f.feed(data):
        parse_dns(m)
    assert f.buffered <= TcpDnsFramer.MAX


@given(flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=10), cut=st.integers(0, 400))
@settings(max_examples=400)
def test_fuzz_mutated_answers_never_raise(flips, cut):
    data = bytearray(response())
    for pos, val in flips:
        data[pos % len(data)] = val
    info = parse_dns(bytes(data[: cut % (len(data) + 1)]))
    assert info is None or isinstance(info.qname, str)


# -- records of a class other than IN (issue: AttributeError dropped the whole message) -----------

REPRO = bytes.fromhex("00018180000100010000000003617069066f70656e616903636f6d0000010001"
                      "c00c000100ff0000003c000401020304")


def _wire_name(name: str) -> bytes:
    return b"".join(len(p).to_bytes(1, "big") + p.encode() for p in name.split(".")) + b"\x00"


def raw_response(qname: str, answers: list[tuple[str, int, int, bytes]]) -> bytes:
    """A response built byte by byte, so any class/type pairing is possible: (owner, type, class, rdata)."""
    head = struct.pack(">HHHHHH", 0x1234, 0x8180, 1, len(answers), 0, 0)
    out = head + _wire_name(qname) + struct.pack(">HH", 1, 1)
    for owner, rtype, rclass, rdata in answers:
        out += _wire_name(owner) + struct.pack(">HHIH", rtype, rclass, 60, len(rdata)) + rdata
    return out


def test_reproducer_class_any_a_record_does_not_raise():
    info = parse_dns(REPRO)
    assert info is not None and info.qname == "api.openai.com" and info.qtype == "A"
    assert info.records == () and info.addresses == ()


def test_valid_records_kept_next_to_class_any_and_none():
    wire = raw_response("api.openai.com", [
        ("api.openai.com", 1, 255, bytes([1, 2, 3, 4])),  # A, class ANY: skipped
        ("api.openai.com", 5, 1, _wire_name("edge.openai.com")),  # CNAME, IN: kept
        ("edge.openai.com", 1, 254, bytes([5, 6, 7, 8])),  # A, class NONE: skipped
        ("edge.openai.com", 1, 1, bytes([10, 0, 0, 1])),  # A, IN: kept
        ("edge.openai.com", 28, 3, bytes(16)),  # AAAA, class CH: skipped
        ("edge.openai.com", 28, 1, bytes.fromhex("fd000000000000000000000000000001")),  # AAAA, IN: kept
    ])
    info = parse_dns(wire)
    assert info is not None
    assert [(r.name, r.rtype, r.value) for r in info.records] == [
        ("api.openai.com", "CNAME", "edge.openai.com"),
        ("edge.openai.com", "A", "10.0.0.1"),
        ("edge.openai.com", "AAAA", "fd00::1"),
    ]
    assert info.cname_chain == ("api.openai.com", "edge.openai.com")
    assert sorted(info.addresses) == ["10.0.0.1", "fd00::1"]  # IN addresses at the end of the chain only


@given(junk=st.lists(st.tuples(st.sampled_from([1, 5, 28]), st.integers(2, 65535), st.binary(max_size=20)),
                     max_size=6),
       good=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=4),
       seed=st.integers(0, 1000))
@settings(max_examples=300)
def test_non_in_records_skipped_in_records_kept(junk, good, seed):
    """Any mix of non-IN A/CNAME/AAAA records (any rdata, even malformed lengths) around valid IN A
    records: parse_dns never raises, and if the message decodes, exactly the IN records are kept."""
    answers = [("api.openai.com", 1, 1, bytes([10, 0, a, b])) for a, b in good]
    answers += [("api.openai.com", t, c, rd) for t, c, rd in junk]
    random.Random(seed).shuffle(answers)
    info = parse_dns(raw_response("api.openai.com", answers))
    if all(len(rd) == 4 for t, c, rd in junk if t == 1) and all(len(rd) == 16 for t, c, rd in junk if t == 28) \
            and not any(t == 5 for t, c, rd in junk):
        # every rdata is well-formed for its type: the message must decode
        assert info is not None
    if info is not None:
        assert sorted(r.value for r in info.records) == sorted(f"10.0.{a}.{b}" for a, b in good)
        assert all(r.rtype == "A" for r in info.records)
