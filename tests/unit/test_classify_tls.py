"""ClientHello parser: real captured hellos, JA4, any byte split, records split, fuzzing."""

import hashlib
import json
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busted.classify.tls import (
    MAX_BUFFER,
    NEED_MORE,
    ClientHelloInfo,
    ClientHelloParser,
    NotTls,
    is_grease,
    ja4,
    parse_client_hello,
)

FIX = Path(__file__).with_name("fixtures")
HELLOS = {p.stem.removeprefix("hello_"): bytes.fromhex(p.read_text().strip()) for p in sorted(FIX.glob("hello_*.hex"))}
EXPECT = {p.stem.removeprefix("hello_"): json.loads(p.read_text()) for p in sorted(FIX.glob("hello_*.json"))}


def whole(data: bytes):
    return ClientHelloParser().feed(data)


def test_fixtures_present():
    assert {"openssl", "curl", "gnutls", "python", "node", "python_large"} <= set(HELLOS)
    assert len(HELLOS["python_large"]) > 1500


@pytest.mark.parametrize("name", sorted(HELLOS))
def test_real_client_hellos(name):
    res = whole(HELLOS[name])
    assert isinstance(res, ClientHelloInfo), res
    exp = EXPECT[name]
    assert res.sni == exp["sni"]
    assert list(res.alpn) == exp["alpn"]
    assert res.versions[0] == "TLS1.3" and "TLS1.2" in res.versions


# The exact JA4 and raw JA4 ("JA4_r": the sorted lists that get hashed) of each captured hello,
# computed independently of busted: FoxIO's reference implementation (github.com/FoxIO-LLC/ja4,
# python/ja4.py at commit 0e54bc8, run as `ja4.py hello_X.pcap --ja4`) over tshark 4.0.17's
# dissection of a pcap holding the fixture bytes as one TCP segment of a stream to port 443
# (Debian's tshark 4.0 has no ja4 field of its own). Regenerate the same way if a fixture changes.
JA4_REFERENCE = {
    "curl": (
        "t13d3112h2_e8f1e7e78f70_b26ce05bbdd6",
        "t13d3112h2_002f,0033,0035,0039,003c,003d,0067,006b,009c,009d,009e,009f,00ff,1301,1302,1303,c009,"
        "c00a,c013,c014,c023,c024,c027,c028,c02b,c02c,c02f,c030,cca8,cca9,ccaa_000a,000b,000d,0015,0016,0017,"
        "002b,002d,0031,0033_0403,0503,0603,0807,0808,0809,080a,080b,0804,0805,0806,0401,0501,0601,0303,0301,"
        "0302,0402,0502,0602",
    ),
    "gnutls": (
        "t13d2914h2_723694b0fccc_2cc26d266019",
        "t13d2914h2_002f,0033,0035,0039,009c,009d,009e,009f,1301,1302,1303,1304,c009,c00a,c013,c014,c02b,"
        "c02c,c02f,c030,c09c,c09d,c09e,c09f,c0ac,c0ad,cca8,cca9,ccaa_0005,000a,000b,000d,0016,0017,001c,0023,"
        "002b,002d,0033,ff01_0401,0809,0804,0403,0807,0501,080a,0805,0503,0808,0601,080b,0806,0603,0201,0203",
    ),
    "node": (
        "t13d5911h2_a33745022dd6_1f22a2ca17c4",
        "t13d5911h2_002f,0032,0033,0035,0038,0039,003c,003d,0040,0067,006a,006b,009c,009d,009e,009f,00a2,"
        "00a3,00ff,1301,1302,1303,c009,c00a,c013,c014,c023,c024,c027,c028,c02b,c02c,c02f,c030,c050,c051,c052,"
        "c053,c056,c057,c05c,c05d,c060,c061,c09c,c09d,c09e,c09f,c0a0,c0a1,c0a2,c0a3,c0ac,c0ad,c0ae,c0af,cca8,"
        "cca9,ccaa_000a,000b,000d,0016,0017,0023,002b,002d,0033_0403,0503,0603,0807,0808,0809,080a,080b,0804,"
        "0805,0806,0401,0501,0601,0303,0301,0302,0402,0502,0602",
    ),
    "openssl": (
        "t13d3111h2_e8f1e7e78f70_1f22a2ca17c4",
        "t13d3111h2_002f,0033,0035,0039,003c,003d,0067,006b,009c,009d,009e,009f,00ff,1301,1302,1303,c009,"
        "c00a,c013,c014,c023,c024,c027,c028,c02b,c02c,c02f,c030,cca8,cca9,ccaa_000a,000b,000d,0016,0017,0023,"
        "002b,002d,0033_0403,0503,0603,0807,0808,0809,080a,080b,0804,0805,0806,0401,0501,0601,0303,0301,0302,"
        "0402,0502,0602",
    ),
    "python": (
        "t13d3112h2_e8f1e7e78f70_d41ae481755e",
        "t13d3112h2_002f,0033,0035,0039,003c,003d,0067,006b,009c,009d,009e,009f,00ff,1301,1302,1303,c009,"
        "c00a,c013,c014,c023,c024,c027,c028,c02b,c02c,c02f,c030,cca8,cca9,ccaa_000a,000b,000d,0015,0016,0017,"
        "0023,002b,002d,0033_0403,0503,0603,0807,0808,0809,080a,080b,0804,0805,0806,0401,0501,0601,0303,0301,"
        "0302,0402,0502,0602",
    ),
    "python_large": (
        "t13d3111h2_e8f1e7e78f70_1f22a2ca17c4",
        "t13d3111h2_002f,0033,0035,0039,003c,003d,0067,006b,009c,009d,009e,009f,00ff,1301,1302,1303,c009,"
        "c00a,c013,c014,c023,c024,c027,c028,c02b,c02c,c02f,c030,cca8,cca9,ccaa_000a,000b,000d,0016,0017,0023,"
        "002b,002d,0033_0403,0503,0603,0807,0808,0809,080a,080b,0804,0805,0806,0401,0501,0601,0303,0301,0302,"
        "0402,0502,0602",
    ),
}


@pytest.mark.parametrize("name", sorted(HELLOS))
def test_ja4_exact_against_the_reference_implementation(name):
    res = whole(HELLOS[name])
    ref, raw = JA4_REFERENCE[name]
    assert res.ja4 == ref
    # The parsed fields behind it, against the reference's raw form: ciphers sorted, extensions
    # sorted without SNI (0000) and ALPN (0010), signature algorithms in wire order; GREASE dropped.
    part_a, ciphers, exts, sigs = raw.split("_")
    assert part_a == ref.split("_")[0]
    assert ",".join(sorted(f"{c:04x}" for c in res.cipher_suites if not is_grease(c))) == ciphers
    assert ",".join(sorted(f"{e:04x}" for e in res.extensions if not is_grease(e) and e not in (0, 0x10))) == exts
    assert ",".join(f"{a:04x}" for a in res.signature_algorithms if not is_grease(a)) == sigs
    # and the reference's own hashes are sha256[:12] of those strings (the spec's definition)
    assert ref.split("_")[1:] == [hashlib.sha256(ciphers.encode()).hexdigest()[:12],
                                  hashlib.sha256(f"{exts}_{sigs}".encode()).hexdigest()[:12]]


@pytest.mark.parametrize("name", sorted(HELLOS))
def test_byte_at_a_time_equals_whole(name):
    data = HELLOS[name]
    p = ClientHelloParser()
    results = [p.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(r is NEED_MORE for r in results[:-1])
    assert results[-1] == whole(data)


def reframe(data: bytes, cut: int) -> bytes:
    """The same handshake message split over two TLS records (legal, and what big hellos do)."""
    assert data[0] == 0x16
    n = struct.unpack(">H", data[3:5])[0]
    body = data[5 : 5 + n]
    ver = data[1:3]
    return (b"\x16" + ver + struct.pack(">H", cut) + body[:cut]
            + b"\x16" + ver + struct.pack(">H", len(body) - cut) + body[cut:])


@given(cut=st.integers(1, 2000), splits=st.lists(st.integers(1, 4000), max_size=6))
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_hello_over_two_records_and_any_writes(cut, splits):
    data = HELLOS["python_large"]
    framed = reframe(data, min(cut, len(data) - 6))
    p = ClientHelloParser()
    pos, res = 0, NEED_MORE
    for s in sorted(set(splits)) + [len(framed)]:
        if s <= pos:
            continue
        res = p.feed(framed[pos:s])
        pos = s
    assert res == whole(data)


def _shuffled_extensions(data: bytes, seed: int) -> bytes:
    """Re-encode a hello with its extensions in another order (as Chrome does per connection)."""
    hs = data[5:]
    body = hs[4:]
    i = 2 + 32
    i += 1 + body[i]
    i += 2 + struct.unpack(">H", body[i : i + 2])[0]
    i += 1 + body[i]
    head, ext_len = body[:i], struct.unpack(">H", body[i : i + 2])[0]
    exts, j = [], i + 2
    while j < i + 2 + ext_len:
        t, n = struct.unpack(">HH", body[j : j + 4])
        exts.append(body[j : j + 4 + n])
        j += 4 + n
    random.Random(seed).shuffle(exts)
    new_body = head + struct.pack(">H", ext_len) + b"".join(exts)
    new_hs = b"\x01" + len(new_body).to_bytes(3, "big") + new_body
    return data[:3] + struct.pack(">H", len(new_hs)) + new_hs


@given(seed=st.integers(0, 10_000))
@settings(max_examples=30)
def test_extension_order_does_not_change_sni_alpn_or_ja4(seed):
    orig = whole(HELLOS["curl"])
    shuf = whole(_shuffled_extensions(HELLOS["curl"], seed))
    assert (shuf.sni, shuf.alpn, shuf.ja4) == (orig.sni, orig.alpn, orig.ja4)


def test_ja4_matches_the_spec_example():
    """FoxIO's published example: t13d1516h2_8daaf6152771_e5627efa2ab1 (GREASE values ignored)."""
    ciphers = (0x0A0A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014,
               0x009C, 0x009D, 0x002F, 0x0035)
    exts = (0x1A1A, 0x0000, 0x0017, 0xFF01, 0x000A, 0x000B, 0x0023, 0x0010, 0x0005, 0x000D, 0x0012, 0x0033,
            0x002D, 0x002B, 0x001B, 0x4469, 0x0015, 0x2A2A)
    sig = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
    h = ClientHelloInfo(sni="example.com", alpn=("h2", "http/1.1"), versions=("TLS1.3",), legacy_version=0x0303,
                        cipher_suites=ciphers, extensions=exts, signature_algorithms=sig,
                        supported_versions=(0x3A3A, 0x0304, 0x0303), ja4="")
    assert ja4(h) == "t13d1516h2_8daaf6152771_e5627efa2ab1"


def test_not_tls_and_bounded():
    assert isinstance(whole(b"GET / HTTP/1.1\r\n\r\n"), NotTls)
    assert isinstance(whole(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"), NotTls)  # a ServerHello
    p = ClientHelloParser()
    huge = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + b"\x00" * 100
    assert isinstance(p.feed(huge), NotTls)
    p = ClientHelloParser()
    res = NEED_MORE
    rec = b"\x16\x03\x01\x3f\xff" + b"\x01\x00\xff\xff"
    res = p.feed(rec)
    for _ in range(40):
        if res is not NEED_MORE:
            break
        res = p.feed(b"\x00" * 1000)
    assert isinstance(res, NotTls) and len(p._buf) <= MAX_BUFFER
    with pytest.raises(ValueError):
        parse_client_hello(b"\x03\x03")


@given(st.binary(max_size=3000), st.lists(st.integers(1, 3000), max_size=8))
@settings(max_examples=300)
def test_fuzz_random_bytes_never_raise(data, cuts):
    p = ClientHelloParser()
    pos = 0
    for c in sorted(set(cuts)) + [len(data)]:
        if c > pos:
            r = p.feed(data[pos:c])
            assert r is NEED_MORE or isinstance(r, ClientHelloInfo | NotTls)
            pos = c
    assert len(p._buf) <= MAX_BUFFER


@given(name=st.sampled_from(sorted(HELLOS)), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)),
                                                            max_size=12), cut=st.integers(0, 4000))
@settings(max_examples=300)
def test_fuzz_mutated_real_hellos_never_raise(name, flips, cut):
    data = bytearray(HELLOS[name])
    for pos, val in flips:
        data[pos % len(data)] = val
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    r = whole(data)
    assert r is NEED_MORE or isinstance(r, ClientHelloInfo | NotTls)
