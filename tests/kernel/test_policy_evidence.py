"""The enforcer's evidence paths under attack (issue 18 items 1-6, 10): SNI variants a server
accepts (trailing dot, long names, a ClientHello split over records or segments), a CNAME to a
denied name resolved and connected at once, a musl-style unconnected lookup, one refused
handshake poisoning an address, and a forged DNS answer read from a pipe by an unprivileged user.
Real clients in the lab; the scope is a test cgroup."""

import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest
from conftest import collect
from scopes import scope_cgroup

import busted
from busted import Policy, PolicyDecision

# A real TLS client (Python's ssl over memory BIOs) whose ClientHello leaves the host as told:
# whole, re-framed into two TLS records in one segment, two records in two segments, or one record
# cut across two segments. Then it sends a GET with the marker; prints the status line.
TLS_CLIENT = r"""
import socket, ssl, sys, time
ip, sni, mode, marker = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname=sni)
s = socket.create_connection((ip, 443), timeout=4)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
assert hello[0] == 0x16 and hello[5] == 1, hello[:6]
body = hello[5:]
cut = 40  # inside the random: the server_name extension is in the second part
def rec(b):
    return hello[:3] + len(b).to_bytes(2, "big") + b
if mode == "whole":
    segs = [hello]
elif mode == "records":
    segs = [rec(body[:cut]) + rec(body[cut:])]
elif mode == "record-segments":
    segs = [rec(body[:cut]), rec(body[cut:])]
elif mode == "byte-segments":
    segs = [hello[:5 + cut], hello[5 + cut:]]
else:
    raise SystemExit("mode?")
for seg in segs:
    s.sendall(seg)
    time.sleep(0.05)
while True:
    data = s.recv(65536)
    if not data:
        raise SystemExit("closed during the handshake")
    inc.write(data)
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        pass
    finally:
        pending = out.read()
        if pending:
            s.sendall(pending)
tls.write(f"GET /v1/models?m={marker} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
s.sendall(out.read())
resp = b""
while b"\r\n" not in resp:
    data = s.recv(65536)
    if not data:
        break
    inc.write(data)
    try:
        resp += tls.read(65536)
    except ssl.SSLWantReadError:
        pass
print(resp.split(b"\r\n", 1)[0].decode())
"""

DENY_ANTHROPIC_AND_X = {"default": "audit", "rules": [
    {"name": "no-anthropic", "action": "deny", "provider": "anthropic"},
    {"name": "no-x", "action": "deny", "hostname": "*.x.com"},
]}
LONG_SNI = "a" * 60 + "." + "b" * 58 + ".long-name.x.com"  # 135 characters
NOBODY = 65534


@pytest.fixture(scope="module")
def cgroup():
    with scope_cgroup("busted-evidence-test") as path:
        yield path


def run(lab, argv, cg, timeout=20.0, uid=None):
    def pre() -> None:
        if cg is not None:
            (cg / "cgroup.procs").write_text("0")

    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    t0 = time.monotonic()
    try:
        return subprocess.run(lab.client_cmd(argv), capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, preexec_fn=pre)
    finally:
        print(f"{argv[0]} took {time.monotonic() - t0:.3f}s")


def requests_with(lab, marker):
    return [r for r in lab.http_requests() if marker in str(r)]


def decisions(evs, **want):
    return [d for d in evs if isinstance(d, PolicyDecision)
            and all(getattr(d, k) == v for k, v in want.items())]


def monitor(cgroup, pol=DENY_ANTHROPIC_AND_X):
    return busted.Monitor(policy=Policy.from_dict(pol), enforce=True, policy_scope="/" + cgroup.name)


@pytest.mark.parametrize(("sni", "mode", "rule", "host"), [
    ("api.anthropic.com", "whole", "no-anthropic", "api.anthropic.com"),
    ("api.anthropic.com.", "whole", "no-anthropic", "api.anthropic.com"),
    (LONG_SNI, "whole", "no-x", LONG_SNI),
    ("api.anthropic.com", "records", "no-anthropic", "api.anthropic.com"),
    ("api.anthropic.com", "record-segments", "no-anthropic", "api.anthropic.com"),
    ("api.anthropic.com", "byte-segments", "no-anthropic", "api.anthropic.com"),
], ids=["plain", "trailing-dot", "long-135", "two-records", "two-record-segments", "split-record"])
def test_sni_variants_are_stopped_and_reported(lab, cgroup, sni, mode, rule, host):
    """Connect by address (no DNS answer: only the SNI names the host); the hello must not pass."""
    ip = lab.hosts["api.openai.com"].ipv4
    m = uuid.uuid4().hex
    with monitor(cgroup) as mon:
        r = run(lab, [sys.executable, "-I", "-c", TLS_CLIENT, ip, sni, mode, m], cgroup)
        evs = collect(mon, lambda e: bool(decisions(e, enforced=True)), timeout=5)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert requests_with(lab, m) == []
    d = decisions(evs, enforced=True)
    assert d, "the stop was not reported"
    assert (d[0].rule, d[0].action, d[0].point, d[0].hostname) == (rule, "deny", "tls_client_hello", host)


def test_split_hello_allowed_name_passes(lab, cgroup):
    """Reassembly judges the name, it does not refuse every split hello."""
    ip = lab.hosts["api.openai.com"].ipv4
    m = uuid.uuid4().hex
    with monitor(cgroup):
        for mode in ("records", "record-segments", "byte-segments"):
            r = run(lab, [sys.executable, "-I", "-c", TLS_CLIENT, ip, "api.openai.com", mode, m], cgroup)
            assert r.returncode == 0 and b"200" in r.stdout, (mode, r.stdout, r.stderr)
    assert len(requests_with(lab, m)) == 3


def test_one_refused_hello_does_not_poison_the_address(lab, cgroup):
    """SNI api.anthropic.com sent to api.openai.com's address: that flow is refused and named for
    what it sent; later connections to api.openai.com (by name) are not touched."""
    oa = lab.hosts["api.openai.com"]
    m, bad_m = uuid.uuid4().hex, uuid.uuid4().hex
    curl = ["curl", "-sS", "--fail", "-m", "5"]
    with monitor(cgroup) as mon:
        bad = run(lab, [*curl, "--resolve", f"api.anthropic.com:443:{oa.ipv4}",
                        f"https://api.anthropic.com/v1/models?m={bad_m}"], cgroup)
        oks = [run(lab, [*curl, f"https://api.openai.com/v1/models?m={m}"], cgroup) for _ in range(3)]
        evs = collect(mon, lambda e: bool(decisions(e, enforced=True))
                      and len(decisions(e, provider="openai")) >= 3, timeout=8)
    assert bad.returncode != 0
    assert [o.returncode for o in oks] == [0, 0, 0], [o.stderr for o in oks]
    assert requests_with(lab, bad_m) == [] and len(requests_with(lab, m)) == 3
    d = decisions(evs, enforced=True)
    assert len(d) == 1
    assert (d[0].hostname, d[0].provider, d[0].rule, d[0].daddr) == (
        "api.anthropic.com", "anthropic", "no-anthropic", oa.ipv4)
    assert not decisions(evs, provider="openai", action="deny")


def test_denied_socket_entry_is_dropped_at_close(lab, cgroup):
    """pol_denied_sk forgets a socket when it closes (it was never cleaned: full after ~16 k
    denied hellos, then denied clients hung); the map is an LRU with counted evictions."""
    ip = lab.hosts["api.openai.com"].ipv4
    with monitor(cgroup) as mon:
        enf = mon._policy_rt.enforcer
        t = enf.maps["pol_denied_sk"]
        kind = t.type
        for _ in range(3):
            r = run(lab, [sys.executable, "-I", "-c", TLS_CLIENT, ip, "api.anthropic.com", "whole", "x"], cgroup)
            assert r.returncode != 0
        deadline = time.monotonic() + 3
        while len(list(t.keys())) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = len(list(t.keys()))
    assert left == 0, f"{left} closed sockets still in pol_denied_sk"
    assert kind == 9  # BPF_MAP_TYPE_LRU_HASH


# -- DNS evidence ----------------------------------------------------------------------------

def dns_query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack(">HH", qtype, 1)


def dns_answer_a(name: str, addr: str) -> bytes:
    q = dns_query(name)
    hdr = struct.pack(">HHHHHH", 0x1234, 0x8180, 1, 1, 0, 0)
    return hdr + q[12:] + struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(addr)


MUSL_LOOKUP = r"""
import socket, sys, struct
dns, name, qhex = sys.argv[1], sys.argv[2], sys.argv[3]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never connect()ed, as musl does it
u.settimeout(3)
u.sendto(bytes.fromhex(qhex), (dns, 53))
data, _ = u.recvfrom(2048)
an = struct.unpack(">H", data[6:8])[0]
off = 12
while data[off]:
    off += data[off] + 1
off += 5
addr = None
for _ in range(an):
    off += 2 if data[off] & 0xC0 == 0xC0 else 0
    typ, _c, _t, rdl = struct.unpack(">HHIH", data[off:off + 10])
    off += 10
    if typ == 1:
        addr = socket.inet_ntoa(data[off:off + 4])
    off += rdl
t = socket.socket()
t.settimeout(3)
try:
    t.connect((addr, 443))
except OSError as e:
    print("refused", e.errno)
    raise SystemExit(3)
print("connected", addr)
"""


def test_musl_style_unconnected_lookup_then_connect(lab, cgroup):
    with monitor(cgroup) as mon:
        r = run(lab, [sys.executable, "-I", "-c", MUSL_LOOKUP, lab.dns_addr, "api.anthropic.com",
                      dns_query("api.anthropic.com").hex()], cgroup)
        evs = collect(mon, lambda e: bool(decisions(e, enforced=True)), timeout=5)
    assert r.returncode == 3 and b"refused 1" in r.stdout, (r.stdout, r.stderr)
    d = decisions(evs, enforced=True)
    assert d and (d[0].rule, d[0].point, d[0].daddr) == ("no-anthropic", "connect", lab.hosts["api.anthropic.com"].ipv4)


def test_cname_to_a_denied_name_then_connect(lab, cgroup):
    """x.openai.azure.com is a CNAME chain ending at lab-edge.trafficmanager.net: a rule on the
    chain's end must stop the first connect after the lookup."""
    from busted.lab.core import AZURE_CHAIN, AZURE_NAME

    pol = {"default": "audit", "rules": [{"name": "no-edge", "action": "deny", "hostname": AZURE_CHAIN[-1]}]}
    m = uuid.uuid4().hex
    with monitor(cgroup, pol) as mon:
        mon._policy_rt.enforcer.learn_dns = lambda ev, uid=None: None  # only the kernel is in time
        r = run(lab, ["curl", "-sS", "-4", "--fail", "-m", "5", f"https://{AZURE_NAME}/v1/models?m={m}"], cgroup)
        evs = collect(mon, lambda e: bool(decisions(e, enforced=True)), timeout=5)
    assert r.returncode == 7, r.stderr  # connect() refused
    assert requests_with(lab, m) == []
    d = decisions(evs, enforced=True)
    assert d and (d[0].rule, d[0].point) == ("no-edge", "connect")


FORGE = r"""
import os, socket, sys
answer = bytes.fromhex(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", 53))
r, w = os.pipe()
os.write(w, answer)
os.dup2(r, s.fileno())  # the fd the capture saw connect to :53 is now a pipe
print(len(os.read(s.fileno(), 512)))
"""


def test_forged_dns_by_nobody_changes_nothing_for_root(lab, cgroup):
    """uid 65534 'reads an answer' api.deepseek.com -> api.openai.com's address from a pipe on a
    fd once connected to :53, and also receives a real answer; root's connects are unaffected."""
    oa = lab.hosts["api.openai.com"]
    pol = {"default": "audit", "rules": [{"name": "no-deepseek", "action": "deny", "provider": "deepseek"}]}
    m = uuid.uuid4().hex
    with monitor(cgroup, pol) as mon:
        f = run(lab, [sys.executable, "-I", "-c", FORGE, dns_answer_a("api.deepseek.com", oa.ipv4).hex()],
                cgroup, uid=NOBODY)
        assert f.returncode == 0, f.stderr
        time.sleep(0.5)  # past user space's learning too
        assert mon._policy_rt.enforcer.addr_mask(oa.ipv4) == 0
        r = run(lab, ["curl", "-sS", "--fail", "-m", "5", f"https://api.openai.com/v1/models?m={m}"], cgroup)
        evs = collect(mon, lambda e: bool(decisions(e, provider="openai")), timeout=5)
    assert r.returncode == 0, r.stderr
    assert len(requests_with(lab, m)) == 1
    assert not decisions(evs, action="deny")


# A ClientHello whose server_name comes after 2,100 bytes of padding: past the kernel's
# reassembly bound (2,048 bytes), so the kernel cannot read the SNI. Not a usable hello for a real
# server (one cipher suite, no key share): only what the kernel does with it is looked at.
OVERSIZE_HELLO = r"""
import socket, sys, time
ip, sni, lookups = sys.argv[1], sys.argv[2].encode(), sys.argv[3:]
for n in lookups:
    socket.getaddrinfo(n, 443, type=socket.SOCK_STREAM)
pad = b"\x00\x15" + (2100).to_bytes(2, "big") + b"\0" * 2100
sn = b"\x00\x00" + (len(sni) + 5).to_bytes(2, "big") + (len(sni) + 3).to_bytes(2, "big") + b"\x00" \
    + len(sni).to_bytes(2, "big") + sni
ext = pad + sn
body = b"\x03\x03" + b"\x01" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + len(ext).to_bytes(2, "big") + ext
hs = b"\x01" + len(body).to_bytes(3, "big") + body
s = socket.create_connection((ip, 443), timeout=3)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rec = b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs
s.sendall(rec[:1400])  # two segments: the name is in the second
time.sleep(0.05)
s.sendall(rec[1400:])
try:
    print("answered", len(s.recv(100)))
except OSError as e:
    print("failed", e)
    raise SystemExit(3)
"""


def test_unreadable_sni_fails_closed_on_an_ambiguous_address_and_is_reported_elsewhere(lab, cgroup):
    """The stated rule for a hello the kernel cannot read: dropped when the address is ambiguous
    or denied for the socket's owner, let through otherwise; a decision with a reason either way."""
    shared = lab.hosts["api.openai.com"]
    if "api.deepseek.com" not in lab.hosts:
        lab.add_server_ip("api.deepseek.com", ip=shared.ipv4, ip6=shared.ipv6)
    pol = {"default": "audit", "rules": [{"name": "no-deepseek", "action": "deny", "provider": "deepseek"}]}
    with monitor(cgroup, pol) as mon:
        passed = run(lab, [sys.executable, "-I", "-c", OVERSIZE_HELLO, shared.ipv4, "api.deepseek.com"], cgroup)
        evs = collect(mon, lambda e: bool(decisions(e, point="tls_client_hello")), timeout=5)
        dropped = run(lab, [sys.executable, "-I", "-c", OVERSIZE_HELLO, shared.ipv4, "api.deepseek.com",
                            "api.openai.com", "api.deepseek.com"], cgroup)
        assert passed.returncode == 0, (passed.stdout, passed.stderr)
        assert dropped.returncode == 3, (dropped.stdout, dropped.stderr)
        evs += collect(mon, lambda e: bool(decisions(e, enforced=True)), timeout=5)
        counts = mon._policy_rt.enforcer.counts()
    assert passed.returncode == 0, (passed.stdout, passed.stderr)
    assert dropped.returncode == 3, (dropped.stdout, dropped.stderr)
    why = ("reason", "sni_beyond_reassembly_bound")
    p = decisions(evs, point="tls_client_hello", enforced=False)
    assert p and (p[0].action, p[0].daddr) == ("audit", shared.ipv4) and why in p[0].matched
    d = decisions(evs, point="tls_client_hello", enforced=True)
    assert d and (d[0].rule, d[0].action, d[0].daddr) == ("no-deepseek", "deny", shared.ipv4) and why in d[0].matched
    assert counts["sni_unjudged"] >= 2 and counts["dns_learned"] >= 2
