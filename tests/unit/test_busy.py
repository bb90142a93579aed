"""Busy-host mode's user-space half (busted/pipeline/busy.py): the quiet-peer policy, driven by events, and
kernel summaries decoded into FlowSummary events; plus what the sinks and filters make of them.
The kernel half is tested in tests/kernel/test_busy_host.py."""

import dataclasses
import json
import socket

import pytest
from events_factory import IDENT

from busted import Direction, EventsLost, FlowClosed, FlowSummary, LossPlace
from busted.events import (
    DnsAnswer,
    DnsRecord,
    Evidence,
    FlowClassified,
    FlowOpened,
    LlmCall,
    McpMessage,
    PolicyDecision,
    TlsClientHello,
)
from busted.pipeline.busy import Quiet, QuietPeers, Unquiet, kernel_addr, summary_events
from busted.pipeline.flows import FlowTable
from busted.sinks import PrometheusExporter, Store, event_from_dict
from busted.wire.layout import FL, FLOW, REC_CLOSE, REC_HDR, REC_OPEN, SUM_KEY, SUM_VAL

S = 1_000_000_000
V4 = socket.inet_aton("10.0.0.9")
MAPPED = b"\0" * 10 + b"\xff\xff" + V4


def closed(flow_id=1, daddr="10.0.0.9", dport=80, sport=40000, direction=Direction.CONNECT, **kw):
    ident = {**IDENT, "flow_id": flow_id, "daddr": daddr, "dport": dport, "sport": sport, "direction": direction,
             **kw}
    return FlowClosed(ts_ns=1, wall_time=1.0, **ident, bytes_sent=1, bytes_received=2, duration_ns=3)


def dns(addr="10.0.0.9", provider="openai"):
    return DnsAnswer(ts_ns=1, wall_time=1.0, pid=1, qname="api.openai.com", qtype="A", rcode="NOERROR",
                     answers=(DnsRecord("api.openai.com", "A", addr, 60),), provider=provider)


# -- the quiet-peer policy ---------------------------------------------------------------------


def test_a_flow_that_ended_with_nothing_llm_makes_its_peer_quiet_for_the_ttl():
    q = QuietPeers(ttl_s=60)
    acts = q.observe([closed()], now_ns=5 * S)
    assert acts == [Quiet(socket.AF_INET, V4, 80, 1, 65 * S), Quiet(socket.AF_INET6, MAPPED, 80, 1, 65 * S)]
    assert ("10.0.0.9", 80, 1) in q and len(q) == 1


def test_accepted_flows_are_keyed_by_our_listening_port():
    q = QuietPeers()
    acts = q.observe([closed(direction=Direction.ACCEPT, sport=8080, dport=51234)], now_ns=0)
    assert {(a.port, a.direction) for a in acts} == {(8080, 2)}
    assert ("10.0.0.9", 8080, 2) in q


def test_ipv6_peer_is_one_kernel_entry():
    (a,) = QuietPeers().observe([closed(daddr="2001:db8::1", family=6)], now_ns=0)
    assert (a.family, a.addr) == (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "2001:db8::1"))


@pytest.mark.parametrize("loud", [
    lambda fid: LlmCall(ts_ns=1, wall_time=1.0, **{**IDENT, "flow_id": fid}, api="openai.chat"),
    lambda fid: McpMessage(ts_ns=1, wall_time=1.0, **{**IDENT, "flow_id": fid}, direction_sent=True),
    lambda fid: PolicyDecision(ts_ns=1, wall_time=1.0, rule="no-x", action="audit", enforced=False,
                               point="connect", flow_id=fid),
    lambda fid: TlsClientHello(ts_ns=1, wall_time=1.0, flow_id=fid, pid=1, comm="c", daddr="10.0.0.9", dport=80,
                               sni="api.openai.com", provider="openai"),
    lambda fid: FlowClassified(ts_ns=1, wall_time=1.0, **{**IDENT, "flow_id": fid, "daddr": "10.0.0.9"},
                               provider="openai", evidence=Evidence.SNI),
])
def test_a_flow_that_showed_llm_or_mcp_or_a_policy_rule_keeps_its_peer_loud(loud):
    q = QuietPeers()
    assert q.observe([loud(7), closed(flow_id=7)], now_ns=0) == []
    assert len(q) == 0
    assert q.observe([closed(flow_id=8)], now_ns=0)  # another flow to the peer judges it


def test_a_closed_flow_with_a_provider_is_never_quiet():
    q = QuietPeers()
    assert q.observe([closed(provider="openai", evidence=Evidence.CIDR)], now_ns=0) == []
    assert len(q) == 0


def test_default_policy_decisions_do_not_count_as_loud():
    q = QuietPeers()
    pd = PolicyDecision(ts_ns=1, wall_time=1.0, rule="default", action="allow", enforced=False, point="connect",
                        flow_id=1)
    assert q.observe([pd, closed(flow_id=1)], now_ns=0)


def test_dns_answer_naming_a_provider_unquiets_every_port_and_direction_of_the_address():
    q = QuietPeers()
    q.observe([closed(dport=80), closed(flow_id=2, dport=443),
               closed(flow_id=3, direction=Direction.ACCEPT, sport=22), closed(flow_id=4, daddr="10.0.0.10")], 0)
    assert len(q) == 4
    assert q.observe([dns(provider=None)], now_ns=0) == []  # a name no provider owns changes nothing
    acts = q.observe([dns()], now_ns=0)
    assert all(isinstance(a, Unquiet) for a in acts) and len(acts) == 6  # 3 peers x (AF_INET, v4-mapped)
    assert {(a.port, a.direction) for a in acts} == {(80, 1), (443, 1), (22, 2)}
    assert len(q) == 1 and ("10.0.0.10", 80, 1) in q


def test_sni_or_classification_naming_a_provider_unquiets_at_once():
    q = QuietPeers()
    q.observe([closed()], now_ns=0)
    hello = TlsClientHello(ts_ns=1, wall_time=1.0, flow_id=9, pid=1, comm="c", daddr="10.0.0.9", dport=443,
                           sni="api.openai.com", provider="openai")
    assert [type(a) for a in q.observe([hello], now_ns=0)] == [Unquiet, Unquiet]
    assert len(q) == 0


def test_expire_forgets_judgements_past_their_ttl_only():
    q = QuietPeers(ttl_s=10)
    q.observe([closed(dport=1)], now_ns=0)
    q.observe([closed(flow_id=2, dport=2)], now_ns=5 * S)
    assert q.expire(9 * S) == []
    acts = q.expire(10 * S)
    assert {a.port for a in acts} == {1} and len(q) == 1


def test_rejudging_refreshes_the_expiry():
    q = QuietPeers(ttl_s=10)
    q.observe([closed()], now_ns=0)
    q.observe([closed(flow_id=2)], now_ns=8 * S)
    assert q.expire(12 * S) == [] and len(q) == 1


def test_the_set_is_bounded_oldest_judgement_out_and_the_kernel_told():
    q = QuietPeers(max_peers=2)
    q.observe([closed(dport=1), closed(flow_id=2, dport=2)], now_ns=0)
    acts = q.observe([closed(flow_id=3, dport=3)], now_ns=0)
    assert [(type(a), a.port) for a in acts][:2] == [(Unquiet, 1), (Unquiet, 1)]
    assert len(q) == 2 and ("10.0.0.9", 1, 1) not in q


def test_unusable_peers_are_not_judged():
    q = QuietPeers()
    assert q.observe([closed(daddr=""), closed(flow_id=2, dport=0),
                      closed(flow_id=3, direction=Direction.UNKNOWN)], now_ns=0) == []
    assert kernel_addr("not an address") == [] and kernel_addr("") == []


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        QuietPeers(ttl_s=0)


# -- kernel records -> events -> judgement (FlowTable + QuietPeers, no kernel) -------------------


def test_flow_table_events_drive_the_policy():
    t = FlowTable(salt=1)
    flags = FL.ATTRIBUTED | FL.HAVE_TUPLE | FL.OPEN_SENT

    def rec(typ):
        return REC_HDR.pack(type=typ, ts_ns=5, sk=0xA) + FLOW.pack(
            open_ns=1, pid=10, tid=10, family=socket.AF_INET, sport=40000, dport=8080, direction=1, flags=flags,
            saddr=socket.inet_aton("127.0.0.1"), daddr=socket.inet_aton("127.0.0.1"), comm=b"curl")

    evs = t.feed(rec(REC_OPEN)) + t.feed(rec(REC_CLOSE))
    acts = QuietPeers().observe(evs, now_ns=0)
    assert [(a.family, a.addr, a.port, a.direction) for a in acts] == [
        (socket.AF_INET, socket.inet_aton("127.0.0.1"), 8080, 1),
        (socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1"), 8080, 1)]


# -- summaries -> FlowSummary ------------------------------------------------------------------


def pair(tgid=42, family=socket.AF_INET, addr=V4, port=80, direction=1, count=3, sent=30, recv=300, first=2 * S,
         last=3 * S, comm=b"curl"):
    return (SUM_KEY.pack(tgid=tgid, family=family, port=port, direction=direction, addr=addr),
            SUM_VAL.pack(count=count, sent=sent, recv=recv, first_ns=first, last_ns=last, uid=1000, cgroup=7,
                         comm=comm))


def test_summaries_decode_exactly():
    (ev,) = summary_events([pair()], ts_ns=4 * S, wall_offset=1000.0, exe={42: "/usr/bin/curl"}.get)
    assert ev == FlowSummary(ts_ns=4 * S, wall_time=1004.0, pid=42, uid=1000, comm="curl", exe="/usr/bin/curl",
                             cgroup_id=7, direction=Direction.CONNECT, family=4, peer="10.0.0.9", port=80, count=3,
                             bytes_sent=30, bytes_received=300, start_ns=2 * S, end_ns=3 * S, start_time=1002.0,
                             end_time=1003.0)
    d = ev.to_dict()
    assert d["kind"] == "flow_summary" and d["direction"] == "connect"
    assert event_from_dict(json.loads(json.dumps(d))) == ev


def test_summary_addresses_v4_mapped_and_v6():
    evs = summary_events([pair(family=socket.AF_INET6, addr=MAPPED),
                          pair(family=socket.AF_INET6, addr=socket.inet_pton(socket.AF_INET6, "::1"), direction=2)],
                         ts_ns=0, wall_offset=0.0)
    assert [(e.family, e.peer, e.direction) for e in evs] == [(4, "10.0.0.9", Direction.CONNECT),
                                                              (6, "::1", Direction.ACCEPT)]


def test_summary_of_an_unattributed_flow_has_no_exe_lookup():
    seen = []
    (ev,) = summary_events([pair(tgid=0)], ts_ns=0, wall_offset=0.0, exe=lambda p: seen.append(p) or "x")
    assert ev.pid == 0 and ev.exe is None and seen == []


def test_a_short_summary_is_a_counted_loss_not_an_exception():
    k, v = pair()
    evs = summary_events([(k[:5], v), (k, v[:10]), (k, v)], ts_ns=0, wall_offset=0.0)
    assert [type(e) for e in evs] == [FlowSummary, EventsLost]
    assert evs[1].where == LossPlace.PARSE and evs[1].count == 2


# -- sinks and filters -------------------------------------------------------------------------


def a_summary(**kw):
    (ev,) = summary_events([pair(**kw)], ts_ns=4 * S, wall_offset=1_700_000_000.0)
    return ev


def test_store_keeps_summaries_in_their_own_table(tmp_path):
    p = tmp_path / "s.db"
    ev = a_summary()
    with Store(p) as s:
        s.write(ev)
    with Store.open_readonly(p) as r:
        (row,) = r.summaries()
        assert [e for e in r.events(kinds=["flow_summary"])] == [ev]
    want = {f.name: getattr(ev, f.name) for f in dataclasses.fields(ev)}
    want.update(ts=ev.wall_time, direction="connect")
    del want["wall_time"]
    assert row == want


def test_prometheus_counts_summaries_as_flows_and_bytes_of_provider_none():
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    exp = PrometheusExporter(registry=reg)
    exp.observe(a_summary())
    exp.observe(a_summary(count=2, sent=5, recv=6))
    text = generate_latest(reg).decode()

    def value(name):
        line = next(x for x in text.splitlines() if x.startswith(name + "{") and 'provider="none"' in x)
        return float(line.rsplit(" ", 1)[1])

    assert value("busted_flows_total") == 5
    assert value("busted_bytes_sent_total") == 35 and value("busted_bytes_received_total") == 306


def test_monitor_filters_apply_to_summaries():
    from busted.pipeline.filters import Filters

    def f(**kw):
        base = dict(pid=None, uid=None, comm=None, cgroup=None, port=None, netns=None, family=None)
        return Filters.build(**{**base, **kw})

    ev = a_summary()
    assert f(pid=42).match(ev) and not f(pid=43).match(ev)
    assert f(port=80).match(ev) and not f(port=81).match(ev)
    assert f(comm="curl").match(ev) and not f(family=6).match(ev)
    assert not f(netns=1).match(ev)  # a summary has no netns: a netns filter cannot vouch for it


def test_cli_renders_a_summary_line_and_filters_it_as_provider_none():
    from busted.cli import _wants, render

    line = render(a_summary())
    assert "summary" in line and "10.0.0.9:80" in line and "3 flows" in line
    assert _wants(a_summary(), ["none"]) and not _wants(a_summary(), ["openai"])


def test_flow_opened_to_a_provider_is_not_judged_even_without_close_provider():
    # The open named a provider; the close (e.g. reclassified by a weaker source) did not.
    q = QuietPeers()
    op = FlowOpened(ts_ns=1, wall_time=1.0, **{**IDENT, "flow_id": 5, "daddr": "10.0.0.9"}, provider="openai")
    assert q.observe([op, closed(flow_id=5)], now_ns=0) == []


def test_busy_host_needs_classification():
    from busted import Monitor

    with pytest.raises(ValueError, match="classif"):
        Monitor(busy_host=True, classify=False)
