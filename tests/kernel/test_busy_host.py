"""Busy-host mode on real BPF and loopback traffic: the first flow to a peer is reported in full,
later ones only in exact FlowSummary events, and a DNS answer naming a provider for the peer's
address brings full events back."""

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading

import dns.message
import dns.rrset
from conftest import Peer, collect

import busted
from busted import Direction, DnsAnswer, FlowClosed, FlowOpened, FlowSummary
from busted.ebpf.loader import FlowProgram
from busted.ebpf.plan import ProbePlan
from busted.wire.layout import QUIET_KEY, SUM_KEY, SUM_VAL

DNS_ADDR = "127.0.0.2"  # a loopback address of its own, so a local resolver on :53 is no obstacle


def _dns_server(stop: threading.Event, ready: threading.Event) -> None:
    """Answers one kind of question: api.openai.com A -> 127.0.0.1 (bounded by ``stop``)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((DNS_ADDR, 53))
    s.settimeout(0.2)
    ready.set()
    with s:
        while not stop.is_set():
            try:
                wire, addr = s.recvfrom(4096)
            except TimeoutError:
                continue
            q = dns.message.from_wire(wire)
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", "127.0.0.1"))
            s.sendto(r.to_wire(), addr)


def _offsets(ctype) -> dict[str, int]:
    return {name: getattr(ctype, name).offset for name, _t in ctype._fields_}


def test_bcc_compiled_the_busy_host_layouts_with_every_capability():
    plan = ProbePlan(plaintext="uprobe", lineage="syscall")  # capture, plaintext, lineage (argv too): all in
    prog = FlowProgram(plan, ringbuf_bytes=1 << 16, max_flows=64, busy_host=True)
    try:
        from bcc import BPF  # the compiler's own description of the types (bytecode.py keeps it)

        q, s = prog.maps["quiet_peers"], prog.maps["summaries"]
        for desc, lay in ((q.key_desc, QUIET_KEY), (s.key_desc, SUM_KEY), (s.leaf_desc, SUM_VAL)):
            ctype = BPF._decode_table_type(json.loads(desc))
            assert ctypes.sizeof(ctype) == lay.size and _offsets(ctype) == lay.offsets()
        prog.set_quiet_peer(socket.AF_INET, socket.inet_aton("10.1.2.3"), 443, 123, 1)
        assert list(q.keys()) == [QUIET_KEY.pack(family=socket.AF_INET, port=443, direction=1,
                                                 addr=socket.inet_aton("10.1.2.3"))]
        prog.clear_quiet_peer(socket.AF_INET, socket.inet_aton("10.1.2.3"), 443, 1)
        assert len(q) == 0 and prog.drain_summaries() == []
    finally:
        prog.close()


def _ours(evs, port):
    return [e for e in evs if isinstance(e, FlowOpened | FlowClosed) and port in (e.sport, e.dport)]


def test_quiet_peer_summarised_then_loud_again_after_dns():
    n = 20
    with busted.Monitor(busy_host=True, summary_interval=0.3) as mon:
        server = Peer("many", "127.0.0.1", 0, 1 + n + 1, "bst-busy-srv")
        port = server.port

        # 1. The first flow to a new peer: full events, both ends.
        first = Peer("churn", "127.0.0.1", port, 1, "bst-busy-1")
        first.wait()
        evs = collect(mon, lambda e: sum(isinstance(x, FlowClosed) for x in _ours(e, port)) >= 2)
        full = _ours(evs, port)
        assert sorted((type(e).__name__, e.direction) for e in full) == sorted([
            ("FlowOpened", Direction.CONNECT), ("FlowClosed", Direction.CONNECT),
            ("FlowOpened", Direction.ACCEPT), ("FlowClosed", Direction.ACCEPT)]), full
        assert all(e.provider is None for e in full)

        # 2. Judged quiet: n more flows appear only in summaries, with exact counts and bytes.
        churn = Peer("churn", "127.0.0.1", port, n, "bst-busy-n")
        churn.wait()

        def summed(evs, direction):
            return [e for e in evs if isinstance(e, FlowSummary) and e.port == port and e.direction == direction]

        def done(evs):
            return (sum(e.count for e in summed(evs, Direction.CONNECT)) >= n
                    and sum(e.count for e in summed(evs, Direction.ACCEPT)) >= n)

        evs = collect(mon, done, timeout=15)
        assert not _ours(evs, port), _ours(evs, port)  # no flow event for any of them
        conn, acc = summed(evs, Direction.CONNECT), summed(evs, Direction.ACCEPT)
        assert {e.pid for e in conn} == {churn.pid} and {e.comm for e in conn} == {"bst-busy-n"}
        assert {e.pid for e in acc} == {server.pid}
        assert sum(e.count for e in conn) == n and sum(e.count for e in acc) == n
        assert sum(e.bytes_sent for e in conn) == n and sum(e.bytes_received for e in conn) == n
        assert sum(e.bytes_sent for e in acc) == n and sum(e.bytes_received for e in acc) == n
        c = conn[0]
        assert (c.peer, c.family) == ("127.0.0.1", 4) and c.start_ns <= c.end_ns
        # the server is still alive at the drain: its executable comes from /proc
        assert acc[0].exe and os.path.realpath(acc[0].exe) == os.path.realpath(sys.executable)
        assert c.to_dict()["kind"] == "flow_summary" and c.to_dict()["direction"] == "connect"

        # 3. A DNS answer maps the peer's address to a provider: full events again, classified.
        stop, ready = threading.Event(), threading.Event()
        t = threading.Thread(target=_dns_server, args=(stop, ready), daemon=True)
        t.start()
        try:
            assert ready.wait(5)
            code = ("import dns.message, dns.query; q = dns.message.make_query('api.openai.com', 'A');"
                    f"dns.query.udp(q, '{DNS_ADDR}', timeout=3)")
            subprocess.run([sys.executable, "-c", code], check=True, timeout=20)
            evs = collect(mon, lambda e: any(isinstance(x, DnsAnswer) and x.provider for x in e))
        finally:
            stop.set()
            t.join(5)
        ans = [e for e in evs if isinstance(e, DnsAnswer) and e.provider]
        assert ans and ans[0].provider == "openai" and "127.0.0.1" in ans[0].addresses
        last = Peer("churn", "127.0.0.1", port, 1, "bst-busy-3")
        last.wait()
        server.wait()
        evs = collect(mon, lambda e: sum(isinstance(x, FlowClosed) for x in _ours(e, port)) >= 2)
    full = _ours(evs, port)
    opened = [e for e in full if isinstance(e, FlowOpened) and e.direction == Direction.CONNECT]
    assert len(opened) == 1 and opened[0].pid == last.pid and opened[0].provider == "openai", full
    closed = [e for e in full if isinstance(e, FlowClosed) and e.direction == Direction.CONNECT]
    assert len(closed) == 1 and (closed[0].bytes_sent, closed[0].bytes_received) == (1, 1)
