"""Honest evidence: no provider from a generic port; a plain-HTTP flow named by its Host header."""

import pytest

from busted.classify import Catalog, Classifier, NameCache, Provider
from busted.events import Direction, Evidence, FlowClassified, FlowOpened, LlmCall
from busted.pipeline.enrich import Enricher, host_name
from busted.pipeline.flows import FlowTable
from busted.pipeline.llmreader import CallReader

# Ports many unrelated servers use by default: dev servers, gateways, MCP (`mcp`'s default 8000).
GENERIC = (80, 443, 1234, 3000, 5000, 8000, 8008, 8080, 8081, 8443, 8888, 9000)


@pytest.mark.parametrize("port", GENERIC)
def test_no_builtin_provider_by_a_generic_port(port):
    cat = Catalog.builtin()
    assert cat.match_port("127.0.0.1", port) is None and port not in cat.ports
    c = Classifier(cat, NameCache()).classify(None, "10.0.0.7", port, now=1.0)
    assert (c.provider, c.evidence) == (None, Evidence.UNKNOWN)


def test_distinctive_port_kept_and_user_port_rules_honoured():
    cat = Catalog.builtin()
    assert cat.ports == frozenset({11434}) and cat.match_port("10.0.0.7", 11434).id == "ollama"
    # A user who knows their host may still say so, for any port.
    cat.add(Provider(id="vllm", name="vLLM on the GPU box", category="local", ports=(8000,)))
    assert cat.match_port("10.0.0.7", 8000).id == "vllm"


@pytest.mark.parametrize("value,name", [
    ("gw.internal:8000", "gw.internal"), ("LLM-GW.Lab.Internal.", "llm-gw.lab.internal"),
    ("api.openai.com", "api.openai.com"), ("10.0.0.1:80", None), ("[fd00::1]:8000", None), ("fd00::1", None),
    ("a b", None), ("x" * 300, None), ("-x.test", None), ("a..b", None), ("1.2.3", None), ("", None),
    (None, None), ("host\x1b[31m", None), ("h.test:80:80", None),
])
def test_host_name_lets_only_well_formed_names_through(value, name):
    assert host_name(value) == name


def flow(**kw) -> FlowOpened:
    base = dict(ts_ns=1, wall_time=1.0, flow_id=9, direction=Direction.CONNECT, pid=10, tid=10, uid=0, comm="python3",
                family=4, saddr="10.0.0.1", sport=40000, daddr="10.0.0.7", dport=8000)
    return FlowOpened(**{**base, **kw})


def test_reclassify_host_fills_only_what_nothing_named():
    enr = Enricher()
    new = enr.reclassify_host(flow(), "llm-gw.lab.internal:8000")
    assert (new.hostname, new.provider, new.evidence) == ("llm-gw.lab.internal", None, Evidence.HTTP_HOST)
    assert 0 < new.confidence < 0.8
    # a catalogued name (a plain-HTTP forward proxy request) names its provider
    new = enr.reclassify_host(flow(), "api.openai.com")
    assert (new.provider, new.evidence) == ("openai", Evidence.HTTP_HOST)
    # a port that named the provider keeps its evidence; the name is added
    f = flow(dport=11434, provider="ollama", evidence=Evidence.PORT, confidence=0.3)
    new = enr.reclassify_host(f, "ollama.box:11434")
    assert (new.hostname, new.provider, new.evidence) == ("ollama.box", "ollama", Evidence.PORT)
    # a name known already (DNS, SNI), an accepted flow, an IP literal: nothing to add
    assert enr.reclassify_host(flow(hostname="x.test", evidence=Evidence.DNS, confidence=0.8), "other.test") is None
    assert enr.reclassify_host(flow(evidence=Evidence.SNI, confidence=0.95), "other.test") is None
    assert enr.reclassify_host(flow(direction=Direction.ACCEPT), "gw.test") is None
    assert enr.reclassify_host(flow(), "10.0.0.7:8000") is None


REQ = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: llm-gw.lab.internal:8000\r\nContent-Type: application/json\r\n"
       b"Content-Length: 47\r\n\r\n" + b'{"model":"qwen2","messages":[],"max_tokens":3}\n')
RESP_BODY = (b'{"id":"x","object":"chat.completion","model":"qwen2","choices":[{"index":0,"message":'
             b'{"role":"assistant","content":"a b c"},"finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}')
RESP = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(RESP_BODY), RESP_BODY))


class _Prices:
    def cost(self, **_kw):
        return None


def test_flow_table_names_a_plain_http_flow_by_its_host_header():
    """Through the FlowTable with kernel records, as the Monitor feeds it: the request's Host header
    classifies the flow (FlowClassified before the call), the call carries the name and no provider."""
    from test_flows_capture import flow_rec

    from busted.wire.layout import PT_HDR, REC_OPEN, REC_PLAIN

    table = FlowTable(enricher=Enricher(), salt=1, reader=lambda f, wall: CallReader(f, wall, prices=_Prices()))
    sk = 0xFFFF0001
    (opened,) = table.feed(flow_rec(REC_OPEN, sk, daddr=(10, 0, 0, 7), dport=8000))
    assert (opened.hostname, opened.provider, opened.evidence) == (None, None, Evidence.UNKNOWN)
    out = []
    for sent, data, ts in ((True, REQ, 10_000), (False, RESP, 20_000)):
        out += table.feed(PT_HDR.pack(type=REC_PLAIN, len=len(data), ts_ns=ts, sk=sk, pid=10, tid=10,
                                      wire_len=len(data), direction=0 if sent else 1, source=3) + data)
    kinds = [type(e).__name__ for e in out]
    assert kinds == ["FlowClassified", "LlmCall"], kinds
    fc, call = out
    assert isinstance(fc, FlowClassified) and isinstance(call, LlmCall) and fc.flow_id == opened.flow_id
    assert (fc.hostname, fc.provider, fc.evidence) == ("llm-gw.lab.internal", None, Evidence.HTTP_HOST)
    assert (call.hostname, call.provider, call.api, call.output_tokens) == ("llm-gw.lab.internal", None,
                                                                             "openai.chat", 3)
    assert table.flow(sk) is fc
