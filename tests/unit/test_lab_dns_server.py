"""The lab's DNS server (busted/lab/dns_server.py) on loopback, ephemeral ports, no namespaces, no root."""

import json
import socket
import threading

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from busted.lab.core import AZURE_CHAIN, AZURE_NAME
from busted.lab.dns_server import Server

OPENAI = ("198.51.100.65", "2001:db8::65")
EDGE = ("198.51.100.68", "2001:db8::68")
RECORDS = {
    "api.openai.com.": {"A": [OPENAI[0]], "AAAA": [OPENAI[1]]},
    AZURE_CHAIN[-1] + ".": {"A": [EDGE[0]], "AAAA": [EDGE[1]]},
    # the lab's Azure chain, built as Lab does: name -> privatelink -> edge
    **{a + ".": {"CNAME": b + "."} for a, b in zip((AZURE_NAME, *AZURE_CHAIN), AZURE_CHAIN, strict=False)},
    "loop-a.test.": {"CNAME": "loop-b.test."},
    "loop-b.test.": {"CNAME": "loop-a.test."},
}


@pytest.fixture(scope="module")
def dns_srv(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("dns") / "dns.json"
    cfg.write_text(json.dumps({"listen": [["127.0.0.1", 0]], "ttl": 60, "max_seconds": 120, "records": RECORDS}))
    server = Server(str(cfg))
    ports = {proto: port for proto, _, port in server.bind()}
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    yield ports
    server.stop.set()
    th.join(5)
    assert not th.is_alive()


def ask(ports: dict, proto: str, name: str, rtype: str) -> dns.message.Message:
    q = dns.message.make_query(name, rtype)
    if proto == "udp":
        return dns.query.udp(q, "127.0.0.1", port=ports["udp"], timeout=3)
    return dns.query.tcp(q, "127.0.0.1", port=ports["tcp"], timeout=3)


def rows(resp: dns.message.Message) -> list[tuple[str, str, int, str]]:
    return [(rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype), rr.ttl, rd.to_text())
            for rr in resp.answer for rd in rr]


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_a_and_aaaa(dns_srv, proto):
    a = ask(dns_srv, proto, "api.openai.com", "A")
    assert a.rcode() == dns.rcode.NOERROR and a.flags & dns.flags.AA
    assert rows(a) == [("api.openai.com.", "A", 60, OPENAI[0])]
    aaaa = ask(dns_srv, proto, "API.OpenAI.COM", "AAAA")  # names are case-insensitive
    assert [r[1:] for r in rows(aaaa)] == [("AAAA", 60, OPENAI[1])]


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_cname_chain(dns_srv, proto):
    resp = ask(dns_srv, proto, AZURE_NAME, "A")
    assert rows(resp) == [
        (AZURE_NAME + ".", "CNAME", 60, AZURE_CHAIN[0] + "."),
        (AZURE_CHAIN[0] + ".", "CNAME", 60, AZURE_CHAIN[1] + "."),
        (AZURE_CHAIN[1] + ".", "A", 60, EDGE[0]),
    ]
    assert rows(ask(dns_srv, proto, AZURE_NAME, "AAAA"))[-1] == (AZURE_CHAIN[1] + ".", "AAAA", 60, EDGE[1])
    # asked for the CNAME itself: just that link
    assert rows(ask(dns_srv, proto, AZURE_NAME, "CNAME")) == [(AZURE_NAME + ".", "CNAME", 60, AZURE_CHAIN[0] + ".")]


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_nxdomain_nodata_and_loops(dns_srv, proto):
    nx = ask(dns_srv, proto, "no-such.example.invalid", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.answer == []
    nodata = ask(dns_srv, proto, "api.openai.com", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and nodata.answer == []
    assert ask(dns_srv, proto, "loop-a.test", "A").rcode() == dns.rcode.SERVFAIL  # bounded chain walk


def test_malformed_udp_gets_formerr(dns_srv):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff", ("127.0.0.1", dns_srv["udp"]))
        reply, _ = s.recvfrom(512)
    assert reply[:2] == b"\x12\x34" and reply[2] & 0x80 and reply[3] & 0x0F == dns.rcode.FORMERR
