"""busted.sinks.OtlpSink against real OTLP receivers on loopback (tests/unit/otlp_receiver.py): the
real SDK exporters send, opentelemetry-proto decodes what arrived, byte for byte."""

from __future__ import annotations

import dataclasses
import socket
import sys

import pytest
from events_factory import IDENT, SECRET, sample_calls, sample_events
from otlp_receiver import GrpcReceiver, HttpReceiver  # needs busted[otlp] + dev (bootstrap.sh installs both)

from busted.errors import MissingDependency, UsageError
from busted.events import Direction, EventsLost, LlmCall, LossPlace, PolicyDecision
from busted.sinks import otlp
from busted.sinks.otlp import OtlpSink

RECEIVERS = {"http/protobuf": HttpReceiver, "grpc": GrpcReceiver}
CLIENT, SERVER = 3, 2  # opentelemetry.proto.trace.v1.Span.SpanKind


def _policy(t0: float) -> PolicyDecision:
    return PolicyDecision(ts_ns=20, wall_time=t0 + 0.3, rule="no-deepseek", action="deny", enforced=True,
                          point="connect", matched=(("provider", "deepseek"),), flow_id=None, pid=100, uid=1000,
                          comm="python3", exe="/usr/bin/python3", daddr="10.231.1.70", dport=443,
                          hostname="api.deepseek.com", provider="deepseek")


def test_names_pinned() -> None:
    """The one table of exported names: pinned here, and checked against the semantic-conventions
    package where it defines them. Renaming one is a deliberate change to this test."""
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as g
    from opentelemetry.semconv._incubating.attributes import jsonrpc_attributes as j
    from opentelemetry.semconv._incubating.attributes import mcp_attributes as m
    from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as gm

    assert otlp.SEMCONV_VERSION == "1.44.0" and otlp.NAMES_DATED == "2026-12-06"
    n = otlp.NAMES
    assert {k: v for k, v in n.items() if v.startswith(("gen_ai.", "mcp.", "jsonrpc."))} == {
        "operation": g.GEN_AI_OPERATION_NAME, "provider": g.GEN_AI_PROVIDER_NAME,
        "request_model": g.GEN_AI_REQUEST_MODEL, "response_model": g.GEN_AI_RESPONSE_MODEL,
        "response_id": g.GEN_AI_RESPONSE_ID, "finish_reasons": g.GEN_AI_RESPONSE_FINISH_REASONS,
        "input_tokens": g.GEN_AI_USAGE_INPUT_TOKENS, "output_tokens": g.GEN_AI_USAGE_OUTPUT_TOKENS,
        "cache_read_tokens": g.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
        "cache_write_tokens": g.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
        "reasoning_tokens": g.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, "stream": g.GEN_AI_REQUEST_STREAM,
        "time_to_first_chunk": g.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, "input_messages": g.GEN_AI_INPUT_MESSAGES,
        "output_messages": g.GEN_AI_OUTPUT_MESSAGES, "token_type": g.GEN_AI_TOKEN_TYPE,
        "tool_name": g.GEN_AI_TOOL_NAME, "mcp_method": m.MCP_METHOD_NAME, "mcp_session": m.MCP_SESSION_ID,
        "jsonrpc_id": j.JSONRPC_REQUEST_ID,
    }
    assert otlp.METRICS == {
        gm.GEN_AI_CLIENT_TOKEN_USAGE: ("histogram", "{token}", (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536,
                                                                262144, 1048576, 4194304, 16777216, 67108864),
                                       "Number of input and output tokens used"),
        gm.GEN_AI_CLIENT_OPERATION_DURATION: ("histogram", "s", (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
                                                                 2.56, 5.12, 10.24, 20.48, 40.96, 81.92),
                                              "GenAI operation duration"),
        gm.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK: (
            "histogram", "s", (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                               81.92), "Time to receive the first chunk of a streamed response"),
        "busted.gen_ai.client.cost": ("counter", "USD", None, "Cost of LLM calls at busted's prices"),
    }
    wk = {v.value for v in g.GenAiProviderNameValues}
    assert set(otlp.PROVIDER_NAMES.values()) <= wk  # only well-known values in the map
    assert otlp.PROVIDER_NAMES["google-gemini"] == "gcp.gemini" and otlp.PROVIDER_NAMES["xai"] == "x_ai"
    assert otlp.provider_name("ollama") == "ollama" and otlp.provider_name(None) is None
    # busted's own names: process/container ones from OTel's registry, the rest under "busted."
    assert all(v.startswith(("gen_ai.", "mcp.", "jsonrpc.", "rpc.", "server.", "client.", "error.", "http.",
                             "url.", "user_agent.", "network.", "process.", "user.", "container.", "k8s.",
                             "busted.")) for v in n.values())
    assert len(set(n.values())) == len(n)


@pytest.mark.parametrize("protocol", list(RECEIVERS))
def test_calls_exported_exactly(protocol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    t0 = 1_700_000_000.5
    call, req, resp = sample_calls(t0)
    with RECEIVERS[protocol]() as r:
        sink = OtlpSink(r.endpoint, protocol)
        for ev in [*sample_events(), call, req, resp, _policy(t0)]:
            sink.write(ev)
        sink.close()
        rep = sink.report()
        spans, metrics, logs = r.spans(), r.metrics(), r.logs()
    assert rep["spans"] == 2 and rep["logs"] == 2 and rep["lost"] == 0, rep
    by_name = {s["name"]: s for s in spans}
    assert sorted(by_name) == ["chat gpt-4o-mini", "tools/call search"]
    s = by_name["chat gpt-4o-mini"]
    assert s["kind"] == CLIENT
    end = int(t0 * 1e9)
    assert (s["start"], s["end"]) == (end - 900_000_000, end)
    a = s["attrs"]
    assert {k: v for k, v in a.items() if k.startswith("gen_ai.")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18", "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 45,
        "gen_ai.usage.cache_read.input_tokens": 100, "gen_ai.usage.reasoning.output_tokens": 7,
        "gen_ai.request.stream": True, "gen_ai.response.time_to_first_chunk": 0.15,
        "gen_ai.response.id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "gen_ai.input.messages": '[{"role": "user", "parts": [{"type": "text", "content": "hello"}]}]',
        "gen_ai.output.messages": '[{"role": "assistant", "parts": [{"type": "text", "content": "hi"}], '
                                  '"finish_reason": "stop"}]',
    }
    assert a["server.address"] == "api.openai.com" and a["server.port"] == 443
    assert a["http.response.status_code"] == 200 and "error.type" not in a
    assert a["process.pid"] == 100 and a["process.executable.path"] == "/usr/bin/curl"
    assert a["process.command_args"] == list(IDENT["cmdline"]) and a["user.id"] == "1000"
    assert a["busted.flow.id"] == 4242 and a["busted.evidence"] == "sni" and a["busted.api"] == "openai.chat"
    assert a["busted.cost.usd"] == pytest.approx(0.0000435) and a["busted.cost.price_source"] == "builtin:2025-06"
    res = s["resource"]
    assert res["service.name"] == "busted" and res["os.type"] == "linux" and "os.version" in res
    assert res["host.name"] == socket.gethostname() and res["deployment.environment.name"] == "test"
    assert s["schema_url"] == otlp.SCHEMA_URL
    mcp = by_name["tools/call search"]  # request and its error response: one span
    assert mcp["kind"] == CLIENT and (mcp["start"], mcp["end"]) == (int((t0 + 0.1) * 1e9), int((t0 + 0.2) * 1e9))
    assert {k: mcp["attrs"][k] for k in ("mcp.method.name", "mcp.session.id", "jsonrpc.request.id",
                                         "gen_ai.tool.name", "rpc.response.status_code", "error.type")} == {
        "mcp.method.name": "tools/call", "mcp.session.id": "s-1", "jsonrpc.request.id": "7",
        "gen_ai.tool.name": "search", "rpc.response.status_code": "-32601", "error.type": "-32601"}
    assert mcp["status"] == 2  # STATUS_CODE_ERROR
    # metrics: one call -> one duration, one TTFC, an input and an output token point
    usage = {p["attrs"]["gen_ai.token.type"]: p for p in metrics["gen_ai.client.token.usage"]}
    assert (usage["input"]["count"], usage["input"]["sum"]) == (1, 120)
    assert (usage["output"]["count"], usage["output"]["sum"]) == (1, 45)
    assert usage["input"]["bounds"] == list(otlp.METRICS["gen_ai.client.token.usage"][2])
    assert usage["input"]["attrs"]["gen_ai.provider.name"] == "openai"
    (dur,) = metrics["gen_ai.client.operation.duration"]
    assert (dur["count"], dur["sum"], dur["unit"]) == (1, pytest.approx(0.9), "s")
    (ttfc,) = metrics["gen_ai.client.operation.time_to_first_chunk"]
    assert (ttfc["count"], ttfc["sum"]) == (1, pytest.approx(0.15))
    (cost,) = metrics["busted.gen_ai.client.cost"]
    assert cost["value"] == pytest.approx(0.0000435)
    # log records: the kernel ring's loss and the deny
    by_event = {rec["event_name"]: rec for rec in logs}
    assert by_event["busted.events_lost"]["attrs"] == {"busted.lost.where": "kernel_ring", "busted.lost.count": 3}
    deny = by_event["busted.policy_decision"]
    assert deny["severity"] == "WARN" and deny["attrs"]["busted.policy.rules.action"] == "deny"
    assert deny["attrs"]["busted.policy.rules.enforced"] is True and deny["attrs"]["gen_ai.provider.name"] == "deepseek"


def test_server_kind_error_and_no_content(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call this host accepted is a SERVER span (server.* = this host); an error status sets
    error.type and the span's status; without captured content no message attribute is sent."""
    (call, _, _) = sample_calls()
    call = dataclasses.replace(call, direction=Direction.ACCEPT, status=429, prompt=None, completion=None,
                               stream=False, request_model="llama3", response_model=None, provider="ollama",
                               operation=None)
    with HttpReceiver() as r:
        sink = OtlpSink(r.endpoint)
        sink.write(call)
        sink.close()
        (s,) = r.spans()
    a = s["attrs"]
    assert s["name"] == "chat llama3" and s["kind"] == SERVER and s["status"] == 2
    assert a["error.type"] == "429" and a["gen_ai.provider.name"] == "ollama"
    assert (a["server.address"], a["server.port"], a["client.address"]) == ("10.0.0.1", 40000, "10.231.1.65")
    assert not {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.response.time_to_first_chunk"} & set(a)


def test_no_secret_in_any_exported_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key planted in the header option, OTEL_EXPORTER_OTLP_HEADERS, a command line (raw, bypassing
    the events' own redaction), the path, user agent, content and model: the headers reach the
    collector as headers (that is their use), and no request body holds the key."""
    other = "sk-ant-api03-Xy7Qw2Er5Ty8Ui1Op4As7Df0Gh3Jk6Lz"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-api-key={other}")
    call, req, resp = sample_calls(secret=SECRET)
    call = dataclasses.replace(call, cmdline=("curl", "-H", f"Authorization: Bearer {SECRET}", "--api-key", SECRET,
                                              f"OPENAI_API_KEY={SECRET}"), request_model=f"m-{SECRET}")
    lost = EventsLost(ts_ns=1, wall_time=1.0, where=LossPlace.PARSE, count=1, detail=f"bad body key={SECRET}")
    for protocol, recv in RECEIVERS.items():
        with recv() as r:
            errors: list[str] = []
            sink = OtlpSink(r.endpoint, protocol, headers={"authorization": f"Bearer {SECRET}"},
                            on_error=errors.append)
            for ev in (call, req, resp, lost, _policy(1.0)):
                sink.write(ev)
            sink.close()
            body = r.all_bytes()
            assert r.spans() and r.logs() and r.metrics()
            assert SECRET.encode() not in body and other.encode() not in body
            assert SECRET[8:].encode() not in body  # not even a tail of it
            assert all(h.get("authorization") == f"Bearer {SECRET}" for _, h, _ in r.raw)
            assert SECRET not in sink.report()["text"] and not errors
            (s,) = [s for s in r.spans() if s["name"].startswith("chat")]
            assert "[REDACTED]" in s["attrs"]["process.command_args"]
            # a key planted in the response id (bypassing the parser's own check) is masked here too
            assert s["attrs"]["gen_ai.response.id"] == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG-[REDACTED]"


def test_missing_extra_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in [m for m in sys.modules if m.startswith("opentelemetry.sdk")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    with pytest.raises(MissingDependency) as exc:
        OtlpSink("http://127.0.0.1:4318")
    assert "pip install 'busted[otlp]'" in str(exc.value)


def test_bad_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="protocol"):
        OtlpSink("http://127.0.0.1:4318", "http/json")
    with pytest.raises(UsageError, match="expected http"):
        OtlpSink("ftp://127.0.0.1:4318")


def _calls(n: int) -> list[LlmCall]:
    (call, _, _) = sample_calls()
    return [dataclasses.replace(call, flow_id=i, ts_ns=i) for i in range(n)]


@pytest.mark.parametrize("protocol", list(RECEIVERS))
def test_blocked_collector_never_blocks_writes(protocol: str) -> None:
    """The collector holds every request: write() still returns at once for every call (else this
    test hangs until its timeout), the queue stays bounded, and every call is accounted for:
    exported or counted lost, nothing silent."""
    n = 300
    with RECEIVERS[protocol](mode="block") as r:
        told: list[str] = []
        sink = OtlpSink(r.endpoint, protocol, max_queue_size=32, max_export_batch_size=8, schedule_delay=0.05,
                        timeout=20, shutdown_timeout=1.0, on_error=told.append)
        for ev in _calls(n):
            sink.write(ev)
        mid = sink.report()["traces"]
        assert mid["dropped"] >= n - 32 - 8, mid  # at most a queue and a batch in the pipeline
        r.gate.set()  # the collector answers again
        sink.close()
        rep = sink.report()["traces"]
    assert rep["exported"] + rep["lost"] == n, rep
    assert rep["exported"] >= 1 and rep["lost"] >= n - 40
    assert any("queue" in m and "full" in m for m in told) and len(told) <= 2  # rate-limited


@pytest.mark.parametrize(("protocol", "mode"), [("http/protobuf", "503"), ("grpc", "exhausted")])
def test_refusing_collector_losses_counted_then_reported(protocol: str, mode: str) -> None:
    """503 / RESOURCE_EXHAUSTED: the SDK retries with backoff until its timeout, the batch is counted
    lost, the owner is told (once), and when the collector accepts again an EventsLost (place SINK)
    log record carries the count to it."""
    with RECEIVERS[protocol](mode=mode) as r:
        told: list[str] = []
        sink = OtlpSink(r.endpoint, protocol, timeout=1.0, schedule_delay=0.05, on_error=told.append)
        for ev in _calls(5):
            sink.write(ev)
        assert r.wait(lambda: sink.report()["traces"]["failed"] >= 5, timeout=20), sink.report()
        assert r.refused >= 1 and told and "failed" in told[0]
        r.mode = "ok"
        for ev in _calls(2):  # a success clears the failure; the next write sends the loss record
            sink.write(ev)
            r.wait(lambda: sink.report()["spans"] >= 1, timeout=10)
        sink.write(_calls(1)[0])
        sink.close()
        rep = sink.report()
        lost_logs = [rec for rec in r.logs() if rec["attrs"].get("busted.lost.where") == "sink"]
    assert rep["traces"]["failed"] == 5 and rep["spans"] == 3, rep
    assert len(lost_logs) == 1 and lost_logs[0]["attrs"]["busted.lost.count"] == 5
    assert any("succeed again" in m for m in told)


def test_dead_collector_close_within_timeout() -> None:
    """Nothing listens: close() returns within its timeout (pytest's timeout would catch a hang) and
    what was not sent is counted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connection refused
    sink = OtlpSink(f"http://127.0.0.1:{port}", timeout=30, shutdown_timeout=1.0, on_error=lambda m: None)
    for ev in _calls(10):
        sink.write(ev)
    sink.close()
    rep = sink.report()
    assert rep["exported"] == 0 and rep["lost"] == 10, rep
    sink.write(_calls(1)[0])  # after close: ignored, no error
    assert sink.report()["lost"] == 10


def test_wire_encoder_writes_the_official_message() -> None:
    """The spans busted.sinks._otlpwire writes in write() parse (opentelemetry-proto) to exactly the
    message the official encoder builds for the same spans (ReadableSpans made from what was
    decoded: ids, name, kind, times, status, every attribute with its type, resource, scope), for
    calls, SERVER and error spans, MCP spans, every attribute type; and our bytes are the
    canonical serialization of that message."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
    from otlp_receiver import attrs

    from busted.sinks._otlpwire import WireSpan, encode_request

    call, req, resp = sample_calls(secret=SECRET)
    server = dataclasses.replace(call, direction=Direction.ACCEPT, status=500, input_tokens=-1, cost_usd=1e-300,
                                 request_model="modèle-ü\u2028", tool_calls=2**62, flow_id=2**48 + 3,
                                 response_id=None, prompt=None, completion=None, saddr=None)
    sink = OtlpSink("http://127.0.0.1:9", schedule_delay=3600, shutdown_timeout=0.5)
    got: list = []
    sink._span_proc.on_end = got.append  # the spans as the batch processor would get them
    for ev in (call, req, resp, server, *_calls(3)):
        sink.write(ev)
    sink.close()
    assert len(got) == 6 and all(type(s) is WireSpan for s in got)
    for batch in (got, got[:1], got[3:4], got[4:]):
        raw = encode_request(batch)
        mine = ExportTraceServiceRequest.FromString(raw)
        assert mine.SerializeToString() == raw
        (rs,) = mine.resource_spans
        (ss,) = rs.scope_spans
        assert len(ss.spans) == len(batch)
        ref = [ReadableSpan(
            sp.name, context=SpanContext(int.from_bytes(sp.trace_id, "big"), int.from_bytes(sp.span_id, "big"),
                                         is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)),
            resource=sink._resource_obj, attributes=attrs(sp.attributes), kind=SpanKind(sp.kind - 1),
            status=Status(StatusCode(sp.status.code)), start_time=sp.start_time_unix_nano,
            end_time=sp.end_time_unix_nano, instrumentation_scope=sink._scope) for sp in ss.spans]
        assert mine == official(ref)
    ids = [(sp.trace_id, sp.span_id) for s in got for sp in
           ExportTraceServiceRequest.FromString(encode_request([s])).resource_spans[0].scope_spans[0].spans]
    assert len(set(ids)) == 6 and all(len(t) == 16 and len(i) == 8 for t, i in ids)
    (srv,) = [sp for s in got for sp in
              ExportTraceServiceRequest.FromString(encode_request([s])).resource_spans[0].scope_spans[0].spans
              if sp.kind == SERVER]
    a = attrs(srv.attributes)
    assert a["gen_ai.usage.input_tokens"] == -1 and a["busted.tool_calls"] == 2**62
    assert a["busted.flow.id"] == 2**48 + 3 and "server.address" not in a and srv.status.code == 2


def test_standard_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT / _PROTOCOL / _HEADERS, OTEL_SERVICE_NAME, and the
    OTEL_{METRICS,LOGS}_EXPORTER=none switches (a traces-only backend) are honoured."""
    with GrpcReceiver() as r:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=blue")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "fleet-audit")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        monkeypatch.setenv("OTEL_LOGS_EXPORTER", "none")
        sink = OtlpSink()
        assert (sink.protocol, sink.endpoint, sink.metrics, sink.logs) == ("grpc", r.endpoint, False, False)
        for ev in [*sample_events(), *sample_calls()]:
            sink.write(ev)
        sink.close()
        spans = r.spans()
        assert len(spans) == 2 and not r.requests["metrics"] and not r.requests["logs"]
        assert spans[0]["resource"]["service.name"] == "fleet-audit"  # the variable wins over service_name
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    with HttpReceiver() as r:
        sink = OtlpSink(r.endpoint, "http/protobuf", service_name="audit-7", metrics=False, logs=False)
        sink.write(sample_calls()[0])
        sink.close()
        assert r.spans()[0]["resource"]["service.name"] == "audit-7"
        assert all(h.get("x-tenant") == "blue" for _, h, _ in r.raw)


def test_cli_refuses_bad_otlp_options_before_the_probes(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed endpoint, or --otlp-protocol without --otlp: exit 2 with the reason, before any
    probe loads (the outputs are opened first)."""
    from busted.cli import main

    assert main(["monitor", "--otlp", "ftp://127.0.0.1:4318", "--duration", "1"]) == 2
    assert "expected http(s)://HOST:PORT" in capsys.readouterr().err
    assert main(["monitor", "--otlp-protocol", "grpc", "--duration", "1"]) == 2
    assert "--otlp-protocol needs --otlp" in capsys.readouterr().err
