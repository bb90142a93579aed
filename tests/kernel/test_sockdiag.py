"""The sock_diag reader behind pre-existing flows and the stale-flow sweep (busted/host/preexisting.py),
against real sockets of this namespace and against ``ss``, the tool people check it with."""

from __future__ import annotations

import socket
import subprocess
import tracemalloc

from busted.host import preexisting
from tests import needs


def _pair(listener: socket.socket, family: int, host: str) -> tuple[socket.socket, socket.socket]:
    c = socket.socket(family)
    c.connect((host, listener.getsockname()[1]))
    a, _ = listener.accept()
    return c, a


def test_established_live_and_time_wait() -> None:
    needs.root("sock_diag of every socket")
    ss = needs.tool("ss")
    v4 = socket.socket()
    v4.bind(("127.0.0.1", 0))
    v4.listen(512)
    v6 = socket.socket(socket.AF_INET6)  # dual stack: an IPv4 client arrives v4-mapped
    v6.bind(("::", 0))
    v6.listen(16)
    keep: list[socket.socket] = [v4, v6]
    try:
        pairs = [_pair(v4, socket.AF_INET, "127.0.0.1"), _pair(v6, socket.AF_INET6, "::1"),
                 _pair(v6, socket.AF_INET, "127.0.0.1")]
        keep += [s for p in pairs for s in p]
        # 300 closed connections: the client side (which closed first) sits in TIME_WAIT
        gone = []
        for _ in range(300):
            c, a = _pair(v4, socket.AF_INET, "127.0.0.1")
            gone.append(c.getsockname()[1])
            c.close()
            a.close()
        ports = {v4.getsockname()[1], v6.getsockname()[1]}

        est = [f for f in preexisting.dump_established() if f.sport in ports or f.dport in ports]
        got = {(f.saddr, f.sport, f.daddr, f.dport) for f in est}
        want = set()
        for c, a in pairs:
            for s in (c, a):
                src, dst = s.getsockname()[:2], s.getpeername()[:2]
                want.add((src[0].removeprefix("::ffff:"), src[1], dst[0].removeprefix("::ffff:"), dst[1]))
        assert got == want
        # the v4 client of the dual-stack listener is IPv4 on both ends (as kernel records say it)
        assert {f.family for f in est if f.saddr == "127.0.0.1"} == {4}
        assert {f.family for f in est if f.saddr == "::1"} == {6}
        # accepted sides are the ones whose sport is a listening port
        assert {(f.sport in ports) for f in est} == {True, False}
        assert all(f.listening_port == (f.sport in ports) for f in est)
        assert all(f.uid == 0 and f.inode > 0 for f in est)

        # the same sockets, as ss sees them (state established, our two ports)
        out = subprocess.run([ss, "-Htn", "state", "established"], capture_output=True, text=True, timeout=30).stdout
        seen = set()
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            (sh, _, sp), (dh, _, dp) = parts[-2].rpartition(":"), parts[-1].rpartition(":")
            norm = [h.strip("[]").removeprefix("::ffff:") for h in (sh, dh)]
            if int(sp) in ports or int(dp) in ports:
                seen.add((norm[0], int(sp), norm[1], int(dp)))
        assert seen == got

        # the sweep's question: which of these tuples does no socket hold any more?
        tw_tuples = {("127.0.0.1", p, "127.0.0.1", v4.getsockname()[1]) for p in gone}
        fake = {("127.0.0.1", 1, "127.0.0.1", 2), ("::1", 1, "::1", 2), ("10.255.255.1", 9, "127.0.0.1", 7)}
        assert preexisting.absent_tuples(want | tw_tuples | fake) == fake
        with preexisting._Diag() as nl:  # each tuple by itself, the v4-mapped ones included
            assert all(nl.exists(t) for t in want | tw_tuples) and not any(nl.exists(t) for t in fake)
        # TIME_WAIT sockets are found by their tuple (a shutdown() socket can still be open in
        # its process), not by the dump, which skips them
        assert len(tw_tuples) == 300
        dumped = {(r[2], r[3], r[4], r[5]) for r in preexisting._diag(preexisting._LIVE_STATES)}
        assert want <= dumped and not dumped & tw_tuples
        tw = subprocess.run([ss, "-Htn", "state", "time-wait"], capture_output=True, text=True, timeout=30).stdout
        assert sum(1 for line in tw.splitlines() if line.split() and line.split()[-2].endswith(
            tuple(f":{p}" for p in gone))) >= 250, "the test did not make the TIME_WAIT sockets it means to skip"
    finally:
        for s in keep:
            s.close()


def test_dump_memory_is_per_answer_not_per_socket() -> None:
    """A host with connection churn holds thousands of TIME_WAIT sockets; the sweep's dump must not
    build an object per socket it skips (pyroute2 did: a 70 MB peak for 24,700 sockets)."""
    needs.root("sock_diag of every socket")
    v4 = socket.socket()
    v4.bind(("127.0.0.1", 0))
    v4.listen(512)
    try:
        for _ in range(3000):
            c, a = _pair(v4, socket.AF_INET, "127.0.0.1")
            c.close()
            a.close()
        c, a = _pair(v4, socket.AF_INET, "127.0.0.1")
        held = (*c.getsockname(), *c.getpeername())
        tracemalloc.start()
        try:
            gone = preexisting.absent_tuples({held, ("127.0.0.1", 1, "127.0.0.1", 2)})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            c.close()
            a.close()
        assert gone == {("127.0.0.1", 1, "127.0.0.1", 2)}
        # 3,000 TIME_WAIT sockets skipped by the kernel's state filter: the peak is the few live ones
        assert peak < 1_000_000, f"{peak} bytes"
    finally:
        v4.close()
