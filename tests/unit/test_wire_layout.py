"""The wire layouts: golden records (hex written by hand from the C structs), the generated C,
and the dispatch by record type. tests/kernel/test_layout.py checks the offsets against BCC."""

import struct

import pytest

from busted.wire.layout import CAP_HDR, FLOW, REC_DNS, REC_HDR, REC_TLS, c_definitions
from busted.wire.records import CapRecord, FlowRecord, decode, decode_any, decode_capture

# struct rec { rec_hdr h; flow f; } for a close of 127.0.0.1:1234 -> 10.0.0.2:443 (v4-mapped v6)
GOLDEN_CLOSE = bytes.fromhex(
    "02000000" "00000000" "0a00000000000000" "bc0a000000000000"  # type, pad, ts_ns=10, sk=0xabc
    "0500000000000000" "0100000000000000"  # open_ns=5, cgroup=1
    "6400000000000000" "c800000000000000" "0000000000000000"  # sent=100, recv=200, fdkey=0
    "2a000000" "2b000000" "e8030000"  # pid=42, tid=43, uid=1000
    "0a00" "d204" "bb01" "01" "07"  # family=AF_INET6, sport=1234, dport=443, direction, flags
    + "00" * 10 + "ffff" + "7f000001"  # saddr ::ffff:127.0.0.1
    + "00" * 10 + "ffff" + "0a000002"  # daddr ::ffff:10.0.0.2
    + "6375726c" + "00" * 12  # comm "curl"
    + "00000000"  # tail padding to 8-byte alignment
)

# struct cap_hdr + 3 payload bytes: a DNS answer over TCP on socket 0x77, from 1.2.3.4:53
GOLDEN_DNS = bytes.fromhex(
    "03000000" "03000000" "0b00000000000000" "7700000000000000"  # type, len=3, ts=11, sk
    "05000000" "06000000" "00000000" "09000000" "40000000"  # pid, tid, uid, fd=9, wire_len=64
    "0200" "3500" "02"  # family=AF_INET, port=53, transport=TCP
    + "01020304" + "00" * 12  # addr
    + "646967" + "00" * 13  # comm "dig"
    + "00" * 7  # tail padding
    + "aabbcc"  # payload
)


def test_golden_flow_record():
    assert len(GOLDEN_CLOSE) == REC_HDR.size + FLOW.size == 136
    r = decode(GOLDEN_CLOSE)
    assert r == FlowRecord(type=2, flags=7, ts_ns=10, open_ns=5, sk=0xABC, cgroup=1, sent=100, recv=200,
                           pid=42, tid=43, uid=1000, family=4, sport=1234, dport=443, direction=1,
                           saddr="127.0.0.1", daddr="10.0.0.2", comm="curl")
    assert decode_any(GOLDEN_CLOSE) == r
    with pytest.raises(struct.error):
        decode(GOLDEN_CLOSE[:50])


def test_golden_capture_record():
    assert CAP_HDR.size == 88
    c = decode_capture(GOLDEN_DNS)
    assert c == CapRecord(type=REC_DNS, ts_ns=11, sk=0x77, pid=5, tid=6, uid=0, fd=9, peer="1.2.3.4",
                          peer_port=53, tcp=True, comm="dig", data=b"\xaa\xbb\xcc", wire_len=64)
    assert decode_any(GOLDEN_DNS) == c


def test_pack_round_trips_through_the_decoders():
    raw = REC_HDR.pack(type=1, ts_ns=3, sk=9) + FLOW.pack(pid=7, family=2, saddr=bytes([1, 2, 3, 4]),
                                                          daddr=bytes([5, 6, 7, 8]), comm=b"x")
    r = decode(raw)
    assert (r.type, r.sk, r.pid, r.saddr, r.daddr, r.comm) == (1, 9, 7, "1.2.3.4", "5.6.7.8", "x")
    with pytest.raises(KeyError):
        FLOW.pack(nope=1)


def test_unknown_record_type_is_an_error():
    with pytest.raises(ValueError, match="unknown record type 9"):
        decode_any(b"\x09\x00\x00\x00" + b"\0" * 200)
    with pytest.raises(struct.error):
        decode_any(b"\x04\x00")
    assert decode_any(CAP_HDR.pack(type=REC_TLS, len=0)).type == REC_TLS


def test_c_text_declares_each_layout_in_order_with_explicit_padding():
    c = c_definitions()
    body = c[c.index("struct flow {"): c.index("};", c.index("struct flow {"))]
    names = [line.split()[1].split("[")[0].rstrip(";") for line in body.splitlines()[1:]]
    assert names == list(FLOW.names()) and names[-1] == "_pad0"
    assert "struct rec {\n    struct rec_hdr h;\n    struct flow f;\n};" in c
    assert "#define REC_OPEN 1" in c and "#define FL_MIDSTREAM 8" in c and "#define LOSS_MAP 2" in c
    assert FLOW.offsets()["saddr"] == 60 and CAP_HDR.offsets()["addr"] == 49


def test_golden_arrival_record():
    """REC_ARRIVAL (arrival.c's struct rx_rec): type, 4 bytes of padding, read time, socket, arrival."""
    from busted.wire.layout import REC_ARRIVAL, RX_REC
    from busted.wire.records import ArrivalRecord

    golden = bytes.fromhex("0c000000" "00000000" "e803000000000000" "bb0a000000000000" "6400000000000000")
    assert RX_REC.size == len(golden) == 32 and RX_REC.offsets()["ts_ns"] == 8
    assert decode_any(golden) == ArrivalRecord(REC_ARRIVAL, 1000, 0xABB, 100)
    c = c_definitions()
    assert "#define REC_ARRIVAL 12" in c and "struct rx_rec {" in c
