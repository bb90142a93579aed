"""Real BPF, real traffic: attribution and byte counts are exact, on every forceable tier."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Peer, collect

import busted
from busted import Direction, EventsLost, FlowClosed, FlowOpened
from busted.ebpf.loader import build_source
from busted.ebpf.plan import ProbePlan

BYTES_TIERS = ["tracepoint", "syscall"]


def _exchange(mon, host: str, n: int, m: int):
    server = Peer("server", host, 0, m, "bst-srv")
    client = Peer("client", host, server.port, n, "bst-cli")
    assert client.wait().split() == ["GOT", str(m)]
    server.wait()
    port = server.port

    def done(evs):
        return sum(isinstance(e, FlowClosed) and port in (e.sport, e.dport) for e in evs) >= 2

    evs = [e for e in collect(mon, done) if port in (getattr(e, "sport", None), getattr(e, "dport", None))]
    return server, client, evs


def _one(evs, cls, direction):
    found = [e for e in evs if type(e) is cls and e.direction == direction]
    assert len(found) == 1, evs
    return found[0]


@pytest.mark.parametrize("tier", BYTES_TIERS)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connect_and_accept_exact(tier, host):
    n, m = 123_457, 65_537
    with busted.Monitor(probes={"bytes": tier}) as mon:
        assert mon.plan.bytes == tier
        server, client, evs = _exchange(mon, host, n, m)
    co = _one(evs, FlowOpened, Direction.CONNECT)
    cc = _one(evs, FlowClosed, Direction.CONNECT)
    ao = _one(evs, FlowOpened, Direction.ACCEPT)
    ac = _one(evs, FlowClosed, Direction.ACCEPT)
    fam = 6 if ":" in host else 4
    for ev in (co, cc):
        assert (ev.pid, ev.comm) == (client.pid, "bst-cli")
        assert (ev.family, ev.saddr, ev.daddr, ev.dport) == (fam, host, host, server.port)
        assert ev.sport > 0 and ev.sport != server.port
        assert not ev.preexisting
    for ev in (ao, ac):
        assert (ev.pid, ev.comm) == (server.pid, "bst-srv")
        assert (ev.family, ev.saddr, ev.sport, ev.daddr, ev.dport) == (fam, host, server.port, host, co.sport)
    assert (cc.bytes_sent, cc.bytes_received) == (n, m)
    assert (ac.bytes_sent, ac.bytes_received) == (m, n)
    assert cc.flow_id == co.flow_id and ac.flow_id == ao.flow_id and co.flow_id != ao.flow_id
    assert cc.duration_ns > 0 and cc.ts_ns >= co.ts_ns
    assert co.ppid == os.getpid() and co.exe and co.cmdline and co.cmdline[-1] == "bst-cli"
    assert co.uid == os.getuid() and co.cgroup_id > 0 and co.netns
    d = cc.to_dict()
    assert d["kind"] == "flow_closed" and d["direction"] == "connect" and d["bytes_sent"] == n


def test_churn_every_connection_reported_or_counted():
    per, procs = 500, 4
    total = per * procs
    with busted.Monitor() as mon:
        server = Peer("many", "127.0.0.1", 0, total, "bst-many")
        clients = [Peer("churn", "127.0.0.1", server.port, per, f"bst-churn{i}") for i in range(procs)]
        pids = {c.pid for c in clients}
        t0 = time.monotonic()
        for c in clients:
            c.wait(timeout=120)
        server.wait(timeout=60)
        elapsed = time.monotonic() - t0
        closed: dict[int, int] = {}
        lost = 0

        def done(evs):
            return sum(closed.values()) + lost >= total

        deadline = time.monotonic() + 30
        while not done(None) and time.monotonic() < deadline:
            for ev in mon.events(timeout=0.5):
                mine = isinstance(ev, FlowClosed) and ev.dport == server.port
                if mine and ev.direction == Direction.CONNECT:
                    closed[ev.pid] = closed.get(ev.pid, 0) + 1
                elif isinstance(ev, EventsLost):
                    lost += ev.count
                if done(None):
                    break
        stats = mon.stats()
    assert set(closed) <= pids, "a connection was attributed to a pid that did not make it"
    assert sum(closed.values()) + lost == total, (closed, lost, stats)
    assert sum(stats.lost.values()) == lost
    print(f"churn: {total} connections in {elapsed:.2f}s, reported {sum(closed.values())}, lost {lost}")


def test_preexisting_flow_reported_once_then_closed():
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    port = srv.getsockname()[1]
    with busted.Monitor(port=port) as mon:
        evs = collect(mon, lambda e: len(e) >= 2, timeout=3)
        pre = [e for e in evs if isinstance(e, FlowOpened)]
        assert len(pre) == 2 and all(e.preexisting and e.pid == os.getpid() for e in pre), evs
        assert {e.direction for e in pre} == {Direction.CONNECT, Direction.ACCEPT}
        c.sendall(b"z" * 10)
        assert a.recv(100) == b"z" * 10
        c.close()
        a.close()
        srv.close()
        evs = collect(mon, lambda e: sum(isinstance(x, FlowClosed) for x in e) >= 2, timeout=5)
    closed = [e for e in evs if isinstance(e, FlowClosed)]
    assert len(closed) == 2 and all(e.preexisting for e in closed), evs
    by_dir = {e.direction: e for e in closed}
    assert by_dir[Direction.CONNECT].bytes_sent == 10
    assert by_dir[Direction.ACCEPT].bytes_received == 10
    assert {e.flow_id for e in closed} == {e.flow_id for e in pre}


def test_filters_only_matching_pid():
    with busted.Monitor(comm="bst-cli") as mon:
        server, client, evs = _exchange(mon, "127.0.0.1", 10, 20)
    assert evs and all(e.comm == "bst-cli" for e in evs)
    assert all(e.direction == Direction.CONNECT for e in evs)


def test_forcing_kprobe_tier_says_why_it_cannot_run():
    with pytest.raises(busted.ProbeUnavailable, match="kprobes"):
        busted.Monitor(probes={"lifecycle": "kprobe"}).start()
    with pytest.raises(busted.ProbeUnavailable, match="unknown bytes tier"):
        busted.Monitor(probes={"bytes": "carrier-pigeon"}).start()


def test_kprobe_tier_compiles_and_verifies():
    """No kprobes here to attach to, but the tier's C must compile and pass the verifier, loaded
    the way the Monitor loads it (bytecode from the compiler child or the cache, no BCC)."""
    from busted.ebpf import bytecode

    src = build_source(ProbePlan(lifecycle="kprobe", bytes="kprobe", flow_end="close-state"))
    comp = bytecode.get_compiled(src)
    loaded = bytecode.create_maps(comp)
    try:
        fns = ("bst_kp_connect", "bst_kp_accept_ret", "bst_kp_close", "bst_kp_send_out", "bst_kp_recv_out")
        for fn in fns:
            fd = bytecode.load_function(comp, loaded, fn, 2)
            # the kernel holds it as a loaded program of that type (an fd >= 0 alone cannot fail)
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
            assert "prog_type:\t2\n" in info, info  # BPF_PROG_TYPE_KPROBE
    finally:
        loaded.close()


def test_close_state_flow_end_tier():
    with busted.Monitor(probes={"flow_end": "close-state"}) as mon:
        assert mon.plan.flow_end == "close-state"
        server, client, evs = _exchange(mon, "127.0.0.1", 1000, 2000)
    cc = _one(evs, FlowClosed, Direction.CONNECT)
    assert cc.pid == client.pid and cc.bytes_sent == 1000


def _bst_progs() -> list[str]:
    import json

    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return [p.get("name", "") for p in json.loads(out.stdout) if p.get("name", "").startswith("bst_")]


CHILD = """
import sys, time, busted
m = busted.Monitor().start()
print("READY", flush=True)
if sys.argv[1] == "normal":
    m.close()
    sys.exit(0)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["normal", "exception", "SIGKILL", "SIGTERM", "SIGINT"])
def test_no_program_left_attached(how):
    before = _bst_progs()
    code = CHILD if how != "exception" else CHILD.replace('print("READY", flush=True)',
                                                           'print("READY", flush=True); raise SystemExit(3)')
    # SIGINT's default action in the child whatever ours is (a shell's background job ignores it,
    # and an ignored SIGINT is inherited: Python would not turn it into KeyboardInterrupt).
    p = subprocess.Popen([sys.executable, "-c", code, how], stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().strip() == "READY"
    assert len(_bst_progs()) > len(before), "the child's programs should be loaded"
    if how.startswith("SIG"):
        p.send_signal(getattr(signal, how))
    p.wait(timeout=20)
    deadline = time.monotonic() + 5
    while _bst_progs() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _bst_progs() == before
