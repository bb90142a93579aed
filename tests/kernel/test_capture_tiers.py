"""The capture tiers: "cgroup" (the default: cgroup skb + sock_addr programs, no syscall tracepoint)
and "syscall" (forced) read the same ClientHellos, whatever the byte split, over IPv4 and IPv6."""

import sys
from pathlib import Path

import pytest
from conftest import collect

import busted
from busted import FlowClosed, LlmCall, TlsClientHello

PY = sys.executable
_ROOT = str(Path(busted.__file__).resolve().parent.parent)

# A client that sends a real ClientHello (made by Python's ssl with a memory BIO) in `pieces`
# writes with TCP_NODELAY and a pause between them, so each is its own segment; then it waits for
# the server's first bytes and closes. It resolves the name through the lab's DNS.
SPLIT = r"""
import socket, ssl, sys, time
host, fam, pieces = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.create_default_context()
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(inc, out, server_hostname=host)
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
addr = socket.getaddrinfo(host, 443, fam, socket.SOCK_STREAM)[0][4]
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(5)
s.connect(addr)
step = -(-len(hello) // pieces)
for i in range(0, len(hello), step):
    s.send(hello[i:i + step])
    time.sleep(0.02)
try:
    s.recv(1)
except OSError:
    pass
s.close()
print(len(hello))
"""


@pytest.fixture(scope="module", params=["cgroup", "syscall"])
def mon(lab, request):
    with busted.Monitor(probes={"capture": request.param}) as m:
        assert m.plan is not None and m.plan.capture == request.param
        yield m


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("pieces", [1, 3])
def test_a_hello_in_one_or_several_segments_is_read_whole(lab, mon, family, pieces):
    import socket

    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    p = lab.spawn_client([PY, "-I", "-c", SPLIT, "api.anthropic.com", str(int(fam)), str(pieces)])
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert int(out) > 200  # a real hello, split in `pieces` segments
    pid = p.pid
    evs = collect(mon, lambda got: any(isinstance(e, FlowClosed) and e.pid == pid for e in got), timeout=8)
    hellos = [e for e in evs if isinstance(e, TlsClientHello) and e.pid == pid]
    assert len(hellos) == 1, [e for e in evs if getattr(e, "pid", None) == pid]
    h = hellos[0]
    assert h.sni == "api.anthropic.com" and h.provider == "anthropic"
    assert (":" in h.daddr) == (family == "ipv6")
    closed = [e for e in evs if isinstance(e, FlowClosed) and e.pid == pid]
    assert closed and closed[-1].provider == "anthropic" and closed[-1].hostname == "api.anthropic.com"
    assert closed[-1].evidence == busted.Evidence.SNI


GATEWAY_CALL = """
import openai, sys
from busted.lab.core import GATEWAY_NAME, GATEWAY_PORT
c = openai.OpenAI(api_key="sk-lab-tiers-0123456789", base_url=f"http://{GATEWAY_NAME}:{GATEWAY_PORT}/v1",
                  max_retries=0)
prompt = "hi " + "x" * int(sys.argv[1])
s = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}],
                              max_tokens=6, stream=True, stream_options={"include_usage": True})
u = [ch.usage for ch in s if ch.usage][-1]
print(u.prompt_tokens, u.completion_tokens)
"""


@pytest.mark.parametrize("size", [0, 300_000])
def test_plain_http_calls_small_and_agent_sized(lab, mon, size):
    """Plain HTTP (an SDK to a gateway): requests from egress packets, streamed answers from
    ingress packets on the cgroup tier; the same call on both tiers, a 300 KB prompt included (its
    non-blocking send() moves part of the body at a time: the syscall tier copies what was taken)."""
    p = lab.spawn_client([sys.executable, "-c", GATEWAY_CALL, str(size)], env={"PYTHONPATH": _ROOT})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()[-2000:]
    prompt_tokens, completion_tokens = map(int, out.split())
    pid = p.pid
    evs = collect(mon, lambda got: any(isinstance(e, LlmCall) and e.pid == pid for e in got), timeout=15)
    (c,) = [e for e in evs if isinstance(e, LlmCall) and e.pid == pid]
    assert (c.request_model, c.stream, c.status) == ("gpt-4o-mini", True, 200)
    assert (c.input_tokens, c.output_tokens) == (prompt_tokens, completion_tokens)
    assert c.request_bytes > size and c.complete
