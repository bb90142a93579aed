"""A flow that crosses network namespaces (pyroute2 lab): attribution and bytes stay exact."""

import os
import subprocess

import pytest
from conftest import Peer, collect

import busted
from busted import Direction, FlowClosed, FlowOpened


@pytest.fixture(scope="module")
def lab():
    from busted.lab import Lab

    with Lab() as lab:
        yield lab
    # torn down: no namespace of this lab remains
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.client_ns not in names and lab.server_ns not in names


@pytest.mark.parametrize("family", [4, 6])
def test_root_ns_client_to_lab_server(lab, family):
    n, m = 50_001, 7_777
    host = lab.hosts["api.openai.com"]
    addr = host.ipv4 if family == 4 else host.ipv6
    port = 9100 + family
    with busted.Monitor(port=port) as mon:
        sink = lab.start_tcp_sink(port, reply_bytes=m)
        client = Peer("client", addr, port, n, "bst-labcli")
        assert client.wait().split() == ["GOT", str(m)]
        evs = collect(mon, lambda e: sum(isinstance(x, FlowClosed) for x in e) >= 2, timeout=10)
        lab.stop_tcp_sink(sink)
    out = {(type(e), e.direction): e for e in evs if isinstance(e, FlowOpened | FlowClosed)}
    cc = out[(FlowClosed, Direction.CONNECT)]
    ac = out[(FlowClosed, Direction.ACCEPT)]
    assert (cc.pid, cc.comm, cc.daddr, cc.dport, cc.family) == (client.pid, "bst-labcli", addr, port, family)
    assert (cc.bytes_sent, cc.bytes_received) == (n, m)
    # the server side: the sink's own pid, inside the lab's namespace
    assert ac.pid == sink and ac.saddr == addr and ac.sport == port and ac.daddr == cc.saddr
    assert (ac.bytes_sent, ac.bytes_received) == (m, n)
    root_ns = os.stat("/proc/self/ns/net").st_ino
    assert cc.netns == root_ns and ac.netns not in (None, root_ns)
    assert out[(FlowOpened, Direction.ACCEPT)].netns == ac.netns
