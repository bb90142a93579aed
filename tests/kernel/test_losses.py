"""Losses the kernel side must report exactly: a full flow map counts each flow once, and DNS over
TCP survives a read larger than the capture limit (counted, then back in step)."""

import os
import socket
import struct
import threading
import time

import dns.message
import dns.query
import dns.rrset

import busted
from busted import DnsAnswer, EventsLost, LossPlace


def _drain_until(mon, done, timeout=10.0):
    """Events until ``done(got)`` holds (checked after each short wait), at most ``timeout`` s:
    the test waits for what it expects, not for a fixed time; on timeout ``got`` is returned for
    the assertions to say what was missing."""
    got = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got.extend(mon.events(timeout=0.05))
        if done(got):
            break
    return got


def _kernel_map_losses(mon):
    """The kernel's own cumulative KERNEL_MAP count (the map the Monitor polls)."""
    return mon._program.losses()[int(LossPlace.KERNEL_MAP)]


def _caught_up(mon):
    """The Monitor has read the kernel's loss counters as they are now."""
    target = _kernel_map_losses(mon)
    return lambda got: mon.stats().lost.get("KERNEL_MAP", 0) >= target


def test_full_flow_map_counts_each_untracked_flow_once():
    srv = socket.create_server(("127.0.0.1", 0))
    keep = []
    with busted.Monitor(max_flows=8, preexisting=False, classify=False, pid=os.getpid()) as mon:
        for _ in range(6):  # 12 sockets: more than the map holds
            c = socket.create_connection(srv.getsockname())
            keep += [c, srv.accept()[0]]
        assert _kernel_map_losses(mon) >= 1  # the map is full (counted synchronously by the kernel)
        _drain_until(mon, _caught_up(mon))
        before = mon.stats().lost.get("KERNEL_MAP", 0)
        assert before >= 1
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        for _ in range(500):  # one untracked connection, 500 round trips
            c.sendall(b"x")
            s.recv(1)
            s.sendall(b"y")
            c.recv(1)
        got = _drain_until(mon, _caught_up(mon))  # every count the kernel made is in by then
        after = mon.stats().lost.get("KERNEL_MAP", 0)
        keep += [c, s]
    for k in keep:
        k.close()
    srv.close()
    # the new connection's two sockets, counted once each (before: one per send and receive)
    assert 1 <= after - before <= 2, (before, after)
    assert sum(e.count for e in got if isinstance(e, EventsLost) and e.where == LossPlace.KERNEL_MAP) == after - before


class _TcpDns:
    """A DNS-over-TCP server on 127.0.0.1:53 (loopback only); answers each query on a connection
    in turn; names starting with 'big' get 300 A records (> 4096 bytes)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 53))
        self.sock.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for _ in range(4):  # bounded: the test makes at most 4 connections
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                while True:
                    try:
                        hdr = conn.recv(2, socket.MSG_WAITALL)
                        if len(hdr) < 2:
                            break
                        q = dns.message.from_wire(conn.recv(struct.unpack("!H", hdr)[0], socket.MSG_WAITALL))
                    except (OSError, dns.exception.DNSException):
                        break
                    name = q.question[0].name.to_text()
                    r = dns.message.make_response(q)
                    n = 300 if name.startswith("big") else 1
                    r.answer = [dns.rrset.from_text(name, 60, "IN", "A",
                                                    *(f"10.77.{i // 250}.{i % 250 + 1}" for i in range(n)))]
                    wire = r.to_wire()
                    conn.sendall(struct.pack("!H", len(wire)) + wire)

    def close(self):
        self.sock.close()


def test_dns_over_tcp_read_over_the_capture_limit_is_counted_and_resynced():
    server = _TcpDns()
    try:
        with busted.Monitor(preexisting=False, pid=os.getpid()) as mon:
            # one connection: a big answer (read whole, > 4096 bytes), then a normal one
            sock = socket.create_connection(("127.0.0.1", 53))
            big = dns.query.tcp(dns.message.make_query("big.example.", "A"), "127.0.0.1", sock=sock, timeout=5)
            small = dns.query.tcp(dns.message.make_query("api.openai.com.", "A"), "127.0.0.1", sock=sock, timeout=5)
            sock.close()
            # a new connection (the same fd number, most likely) starts clean
            again = dns.query.tcp(dns.message.make_query("api.anthropic.com.", "A"), "127.0.0.1", timeout=5)
            got = _drain_until(mon, lambda got: any(isinstance(e, DnsAnswer) and e.qname == "api.anthropic.com"
                                                    for e in got))
    finally:
        server.close()
    assert len(big.to_wire()) > 4096 and small.answer and again.answer
    answers = [e for e in got if isinstance(e, DnsAnswer)]
    assert [a.qname for a in answers] == ["api.openai.com", "api.anthropic.com"], answers
    assert answers[0].provider == "openai" and answers[0].transport == "tcp" and answers[0].flow_id is not None
    lost = [e for e in got if isinstance(e, EventsLost) and e.where == LossPlace.PARSE]
    assert len(lost) == 1 and "truncated" in lost[0].detail


def test_a_stalled_consumer_with_a_tiny_queue_on_the_real_reader_path():
    """The reader thread and the BPF ring, not a hand-fed record: with a 32-event queue nobody
    reads, the reader stops taking records (the kernel ring is the buffer) and the queue stays
    bounded; once the ring is full the kernel counts what it drops. When the consumer comes
    back, every connection is either delivered or counted lost: nothing is silent."""
    from busted import FlowOpened

    n = 400
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    with busted.Monitor(queue_size=32, ringbuf_bytes=1 << 14, preexisting=False, classify=False,
                        pid=os.getpid()) as mon:
        depths = []
        for _ in range(n):  # nobody consumes meanwhile
            c = socket.create_connection(("127.0.0.1", port))
            s, _ = srv.accept()
            c.close()
            s.close()
            depths.append(mon.stats().queue_depth)
        assert max(depths) <= 32 and depths[-1] > 0  # filled, and never past its bound
        kernel_lost = mon._program.losses()[int(LossPlace.KERNEL_RING)]
        assert kernel_lost > 0, "the ring never filled: the test did not stall the reader"

        def accounted(got):
            opened = sum(1 for e in got if isinstance(e, FlowOpened) and e.dport == port)
            lost = sum(e.count for e in got if isinstance(e, EventsLost))
            return lost >= kernel_lost and opened + lost >= n

        got = _drain_until(mon, accounted, timeout=20)
        stats = mon.stats()
    srv.close()
    opened = sum(1 for e in got if isinstance(e, FlowOpened) and e.dport == port)
    lost = {p: sum(e.count for e in got if isinstance(e, EventsLost) and e.where == p) for p in LossPlace}
    assert lost[LossPlace.KERNEL_RING] >= kernel_lost > 0  # reported in the stream, as counted
    assert stats.lost.get("KERNEL_RING", 0) == lost[LossPlace.KERNEL_RING]
    assert stats.lost.get("USER_QUEUE", 0) == lost[LossPlace.USER_QUEUE]  # any user-queue drop is in the stream too
    assert 0 < opened < n and opened + sum(lost.values()) >= n, (opened, lost)
