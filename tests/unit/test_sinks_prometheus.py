"""Prometheus exporter: exact counter values scraped over HTTP, bounded labels, own registry."""

import socket
import urllib.request
from dataclasses import replace

import needs
import pytest
from events_factory import sample_events

from busted.classify.providers import Catalog, Provider
from busted.errors import BustedError, UsageError
from busted.events import Direction, DnsRecord, EventsLost, LossPlace
from busted.sinks import PrometheusExporter, Sink

prometheus_client = needs.module("prometheus_client", module_level=True)

NOWHO = {"agent": "none", "container": "none"}  # no agent recognised, not in a container


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def _value(text, name, **labels):
    """The sample ``name{labels}`` (labels matched exactly), or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, lab = metric.partition("{")
        got = ",".join(sorted(lab.rstrip("}").split(","))) if lab else ""
        if base == name and got == want:
            return float(value)
    return None


def _text(exp):
    return prometheus_client.generate_latest(exp.registry).decode()


def test_counters_over_http():
    exp = PrometheusExporter("127.0.0.1:0").start()
    try:
        assert isinstance(exp, Sink) and exp.port > 0
        for i in range(3):
            for ev in sample_events(flow_id=i):
                exp.observe(ev)
        exp.write(sample_events(flow_id=99)[1])  # one flow still open
        exp.set_queue_depth(17)
        text = _scrape(exp.port)
    finally:
        exp.close()
    assert _value(text, "busted_flows_total", provider="openai", comm="curl", direction="connect", **NOWHO) == 4
    assert _value(text, "busted_bytes_sent_total", provider="openai", comm="curl", **NOWHO) == 3 * 811
    assert _value(text, "busted_bytes_received_total", provider="openai", comm="curl", **NOWHO) == 3 * 2233
    assert _value(text, "busted_dns_answers_total", provider="openai") == 3  # api.openai.com, via the catalog
    assert _value(text, "busted_events_lost_total", where="kernel_ring") == 9
    assert _value(text, "busted_queue_depth") == 17
    assert _value(text, "busted_flows_open") == 1
    assert "process_cpu_seconds_total" not in text  # its own registry, not the global one
    with pytest.raises(OSError):
        _scrape(exp.port)  # closed


def test_a_flow_is_counted_once_with_its_provider():
    exp = PrometheusExporter("127.0.0.1:0")
    dns, opened, hello, classified, closed, _ = sample_events()
    exp.observe(replace(opened, provider=None, hostname=None))  # provider not known yet at open
    assert _value(_text(exp), "busted_flows_total", provider="none", comm="curl", direction="connect", **NOWHO) is None
    exp.observe(hello)
    exp.observe(classified)  # now it is: counted as openai
    exp.observe(closed)
    text = _text(exp)
    assert _value(text, "busted_flows_total", provider="openai", comm="curl", direction="connect", **NOWHO) == 1
    assert _value(text, "busted_flows_total", provider="none", comm="curl", direction="connect", **NOWHO) is None
    # never classified: counted at close, as provider="none"; a close without an open is counted too
    other = replace(opened, flow_id=5, provider=None, hostname=None, direction=Direction.ACCEPT, comm="sshd")
    exp.observe(other)
    exp.observe(replace(closed, flow_id=5, provider=None, hostname=None, direction=Direction.ACCEPT,
                        comm="sshd"))
    exp.observe(replace(closed, flow_id=6, comm="sshd", provider=None, direction=Direction.ACCEPT))
    text = _text(exp)
    assert _value(text, "busted_flows_total", provider="none", comm="sshd", direction="accept", **NOWHO) == 2
    assert _value(text, "busted_bytes_sent_total", provider="none", comm="sshd", **NOWHO) == 2 * 811
    assert _value(text, "busted_flows_open") == 0  # never negative, even for closes of unseen opens


def test_dns_provider_from_qname_or_cname_chain():
    exp = PrometheusExporter()
    base = sample_events()[0]
    exp.observe(replace(base, qname="example.org", cname_chain=("example.org",), answers=()))
    exp.observe(replace(base, qname="chat.example.net", cname_chain=("chat.example.net", "api.anthropic.com"),
                        answers=(DnsRecord("chat.example.net", "CNAME", "api.anthropic.com", 60),)))
    text = _text(exp)
    assert _value(text, "busted_dns_answers_total", provider="none") == 1
    assert _value(text, "busted_dns_answers_total", provider="anthropic") == 1


def test_dns_provider_from_a_custom_catalog():
    """The catalog given to Monitor(catalog=...) is the one that labels DNS answers, not the built-in."""
    cat = Catalog()
    cat.add(Provider(id="inhouse", name="In-house LLM", category="gateway", hostnames=("llm.corp.test",)))
    exp = PrometheusExporter(catalog=cat)
    base = sample_events()[0]
    exp.observe(replace(base, qname="llm.corp.test", cname_chain=("llm.corp.test",), answers=()))
    exp.observe(base)  # api.openai.com: not in this catalog
    text = _text(exp)
    assert _value(text, "busted_dns_answers_total", provider="inhouse") == 1
    assert _value(text, "busted_dns_answers_total", provider="none") == 1
    assert _value(text, "busted_dns_answers_total", provider="openai") is None


def test_dns_provider_learned_from_the_monitors_flows():
    """Without a catalog, a hostname the Monitor tied to a provider (with its own catalog) labels
    later answers for that name; the answer's own provider, when it has one, wins."""
    exp = PrometheusExporter()
    dns, opened = sample_events()[:2]
    answer = replace(dns, qname="llm.corp.test", cname_chain=("llm.corp.test",), answers=())
    exp.observe(answer)  # not known yet: neither learned nor built in
    exp.observe(replace(opened, hostname="llm.corp.test", provider="inhouse"))
    exp.observe(answer)
    text = _text(exp)
    assert _value(text, "busted_dns_answers_total", provider="none") == 1
    assert _value(text, "busted_dns_answers_total", provider="inhouse") == 1

    exp.observe(replace(dns, provider="mine"))  # the answer's own provider (the Monitor's catalog) wins
    assert _value(_text(exp), "busted_dns_answers_total", provider="mine") == 1


def test_label_cardinality_is_bounded():
    exp = PrometheusExporter(max_label_sets=5)
    opened, closed = sample_events()[1], sample_events()[4]
    for i in range(20):
        exp.observe(replace(opened, flow_id=i, comm=f"c{i}"))
        exp.observe(replace(closed, flow_id=i, comm=f"c{i}"))
    text = _text(exp)
    assert _value(text, "busted_flows_total", provider="openai", comm="other", direction="connect", **NOWHO) == 15
    assert _value(text, "busted_flows_total", provider="openai", comm="c0", direction="connect", **NOWHO) == 1
    assert _value(text, "busted_bytes_sent_total", provider="openai", comm="other", **NOWHO) == 15 * 811
    assert "busted_llm_calls_total{" not in text  # no calls seen: no call series
    series = [ln for ln in text.splitlines() if ln.startswith("busted_flows_total{")]
    assert len(series) == 6
    exp.observe(replace(opened, flow_id=100, comm="c3"))  # a known comm keeps its own series
    assert _value(_text(exp), "busted_flows_total", provider="openai", comm="c3", direction="connect", **NOWHO) == 2


def test_losses_by_place():
    exp = PrometheusExporter()
    for where, n in ((LossPlace.KERNEL_RING, 3), (LossPlace.USER_QUEUE, 2), (LossPlace.KERNEL_RING, 4)):
        exp.observe(EventsLost(ts_ns=1, wall_time=1.0, where=where, count=n))
    text = _text(exp)
    assert _value(text, "busted_events_lost_total", where="kernel_ring") == 7
    assert _value(text, "busted_events_lost_total", where="user_queue") == 2


def test_two_exporters_do_not_share_metrics():
    a, b = PrometheusExporter(), PrometheusExporter()
    a.observe(sample_events()[1])
    assert _value(_text(b), "busted_flows_total", provider="openai", comm="curl", direction="connect", **NOWHO) is None


def test_addresses_and_bind_errors():
    assert (PrometheusExporter().host, PrometheusExporter().port) == ("127.0.0.1", 9464)
    assert (PrometheusExporter(":9100").host, PrometheusExporter("9100").port) == ("127.0.0.1", 9100)
    assert PrometheusExporter("[::1]:9100").host == "::1"
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        PrometheusExporter("localhost:http")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(BustedError, match=f"cannot serve metrics on 127.0.0.1:{busy}"):
            PrometheusExporter(f"127.0.0.1:{busy}").start()


def test_close_is_idempotent():
    exp = PrometheusExporter("127.0.0.1:0").start()
    assert exp.start() is exp  # already serving
    exp.close()
    exp.close()


def test_llm_call_and_mcp_counters():
    from events_factory import sample_calls

    call, req, resp = sample_calls()
    unknown = replace(call, input_tokens=None, output_tokens=0, cache_read_tokens=None, reasoning_tokens=None,
                      cost_usd=None, status=None, request_model="llama3", response_model=None, provider=None)
    cut = replace(call, complete=False, status=200)
    err = replace(call, status=429, input_tokens=None, output_tokens=None, cache_read_tokens=None,
                  reasoning_tokens=None, cost_usd=None)
    exp = PrometheusExporter("127.0.0.1:0").start()
    try:
        for ev in (call, call, req, resp, unknown, cut, err):
            exp.observe(ev)
        text = _scrape(exp.port)
    finally:
        exp.close()
    lab = dict(provider="openai", model="gpt-4o-mini-2024-07-18", comm="python3")
    assert _value(text, "busted_llm_calls_total", **lab, status_class="2xx", **NOWHO) == 2
    assert _value(text, "busted_llm_calls_total", **lab, status_class="incomplete", **NOWHO) == 1
    assert _value(text, "busted_llm_calls_total", **lab, status_class="4xx", **NOWHO) == 1
    assert _value(text, "busted_llm_tokens_total", **lab, type="input", **NOWHO) == 3 * 120  # call x2 + cut; err: None
    assert _value(text, "busted_llm_tokens_total", **lab, type="output", **NOWHO) == 3 * 45
    assert _value(text, "busted_llm_tokens_total", **lab, type="cache_read", **NOWHO) == 3 * 100
    assert _value(text, "busted_llm_tokens_total", **lab, type="reasoning", **NOWHO) == 3 * 7
    assert _value(text, "busted_llm_tokens_total", **lab, type="cache_write", **NOWHO) is None  # never reported
    assert _value(text, "busted_llm_cost_usd_total", **lab, **NOWHO) == pytest.approx(3 * 0.0000435)
    local = dict(provider="none", model="llama3", comm="python3")
    assert _value(text, "busted_llm_calls_total", **local, status_class="unknown", **NOWHO) == 1
    assert _value(text, "busted_llm_tokens_total", **local, type="output", **NOWHO) == 0  # reported zero: a series
    assert _value(text, "busted_llm_tokens_total", **local, type="input", **NOWHO) is None  # unknown: none
    assert _value(text, "busted_llm_cost_usd_total", **local, **NOWHO) is None
    assert _value(text, "busted_mcp_messages_total", method="tools/call", comm="python3") == 1
    assert _value(text, "busted_mcp_messages_total", method="response", comm="python3") == 1


def test_llm_labels_are_bounded_and_masked():
    from events_factory import SECRET, sample_calls

    call = sample_calls()[0]
    exp = PrometheusExporter("127.0.0.1:0", max_label_sets=3)
    for i in range(50):
        exp.observe(replace(call, response_model=f"model-{i}", comm=f"c{i}"))
    exp.observe(replace(call, response_model=SECRET, comm="x"))
    text = _text(exp)
    assert SECRET not in text
    calls = [line for line in text.splitlines() if line.startswith("busted_llm_calls_total")]
    assert len(calls) <= 4  # 3 label sets, then the folded one
    assert _value(text, "busted_llm_calls_total", provider="openai", model="other", comm="other",
                  status_class="2xx", **NOWHO) == 48


def test_policy_decisions_are_counted():
    from busted.events import PolicyDecision

    exp = PrometheusExporter()
    d = PolicyDecision(ts_ns=1, wall_time=1.0, rule="no-deepseek", action="deny", enforced=True, point="connect",
                       flow_id=None, pid=7, comm="curl", provider="deepseek")
    exp.observe(d)
    exp.observe(d)
    exp.observe(PolicyDecision(ts_ns=2, wall_time=2.0, rule="default", action="audit", enforced=False,
                               point="tls_client_hello", flow_id=3, provider="openai"))
    text = _text(exp)
    assert _value(text, "busted_policy_decisions_total", rule="no-deepseek", action="deny", enforced="true",
                  point="connect") == 2
    assert _value(text, "busted_policy_decisions_total", rule="default", action="audit", enforced="false",
                  point="tls_client_hello") == 1


def test_agent_and_container_labels_never_a_pid():
    from events_factory import sample_calls

    from busted.events import Ancestor

    cid = "3f1c0a9e2b7d4c5e8f6a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a"
    who = dict(agent="claude-code", agent_pid=4321, agent_evidence="exe:claude", container_id=cid,
               container_runtime="docker", ancestry=(Ancestor(100, "curl", "/usr/bin/curl"),))
    exp = PrometheusExporter()
    for ev in sample_events():
        exp.observe(replace(ev, **who) if hasattr(ev, "agent") else ev)
    exp.observe(replace(sample_calls()[0], **who))
    text = _text(exp)
    mine = dict(agent="claude-code", container=cid[:12])
    assert _value(text, "busted_flows_total", provider="openai", comm="curl", direction="connect", **mine) == 1
    assert _value(text, "busted_bytes_received_total", provider="openai", comm="curl", **mine) == 2233
    assert _value(text, "busted_llm_calls_total", provider="openai", model="gpt-4o-mini-2024-07-18",
                  comm="python3", status_class="2xx", **mine) == 1
    assert "4321" not in text and cid not in text  # no pid, and the id is cut to 12 characters
    assert "pid=" not in text


def test_agent_and_container_values_are_capped_and_folds_counted():
    exp = PrometheusExporter(max_label_values=4)
    opened, closed = sample_events()[1], sample_events()[4]
    for i in range(10):
        who = dict(agent=f"agent-{i}", container_id=f"{i:012x}" * 2)
        exp.observe(replace(opened, flow_id=i, **who))
        exp.observe(replace(closed, flow_id=i, **who))
    exp.observe(replace(opened, flow_id=99))  # no agent, no container: "none" never counts against the cap
    text = _text(exp)
    assert _value(text, "busted_flows_total", provider="openai", comm="curl", direction="connect",
                  agent="agent-3", container=f"{3:012x}") == 1
    assert _value(text, "busted_flows_total", provider="openai", comm="curl", direction="connect",
                  agent="other", container="other") == 6
    assert _value(text, "busted_flows_total", provider="openai", comm="curl", direction="connect", **NOWHO) == 1
    agents = {ln.split('agent="')[1].split('"')[0] for ln in text.splitlines() if ln.startswith("busted_flows_total{")}
    assert agents == {"agent-0", "agent-1", "agent-2", "agent-3", "other", "none"}
    # each folded event counts once per label: 6 flows counted (their open) + 6 closes (their bytes)
    assert _value(text, "busted_label_values_folded_total", label="agent") == 12
    assert _value(text, "busted_label_values_folded_total", label="container") == 12
    assert _value(text, "busted_bytes_sent_total", provider="openai", comm="curl", agent="other",
                  container="other") == 6 * 811
