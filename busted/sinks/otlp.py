"""OTLP export: every ``LlmCall`` as an OpenTelemetry GenAI span, with the GenAI metrics beside it.

Built on the official ``opentelemetry-sdk`` and ``opentelemetry-exporter-otlp-proto-http`` /
``-grpc`` packages (``pip install 'busted[otlp]'``): what every OTLP backend is tested against,
with the retries, backoff, compression and ``OTEL_*`` environment handling the spec asks for.
Two of their general mechanisms cost what a per-call audit cannot pay, and are replaced while
their sending stays: each span's protobuf bytes are written in ``write()`` straight from the event
by ``busted.sinks._otlpwire`` (the same message the official encoder builds, pinned by a test) and
carried by the SDK's batch processor, and metrics are aggregated here into the SDK's metric data
model (docs/outputs.md, "Why these libraries"; docs/benchmarks.md).

* ``LlmCall`` -> one span, kind CLIENT (SERVER for a call this host accepted), named
  ``"{gen_ai.operation.name} {gen_ai.request.model}"``, from the request's first byte to the
  response's end, attributes per the GenAI semantic conventions (``NAMES``), plus what only busted
  knows (process, container, agent, evidence, cost, flow) under the OTel or ``busted.`` names.
* ``McpMessage`` -> spans per the MCP conventions: a request and its response (same flow and
  JSON-RPC id) make one span; a notification, or a request whose answer never came, a span of its own.
* ``PolicyDecision`` and ``EventsLost`` -> log records (a deny is an alert's trigger).
* Metrics: ``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration``,
  ``gen_ai.client.operation.time_to_first_chunk`` (the spec's buckets) and a cost counter.

Never in the way: ``write()`` only builds the span's bytes and hands them to the SDK's batch
processors, whose own threads join them into requests and send. Their queues are bounded; when
the collector is slow or down the newest spans are dropped and counted (``report()``), a failed
export is counted too, the owner is told once per ``warn_interval`` (``on_error``), and the count
goes to the collector as an ``EventsLost`` (place ``SINK``) log record once it answers again.
``close()`` flushes for at most ``shutdown_timeout`` seconds. Exported strings pass through
busted's redaction; header values (``headers=``, ``OTEL_EXPORTER_OTLP_HEADERS``) travel only as
request headers.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import platform
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from busted.errors import MissingDependency, UsageError
from busted.events import Direction, Event, EventsLost, LlmCall, LossPlace, McpMessage, PolicyDecision
from busted.redact import redact_argv, redact_id, redact_text
from busted.sinks import _otlpwire as wire

__all__ = ["METRICS", "NAMES", "PROTOCOLS", "PROVIDER_NAMES", "SEMCONV_VERSION", "OtlpSink"]

# -- every exported name, in one place ----------------------------------------------------------------
# The GenAI conventions are still moving (a new GenAI repository, metric renames proposed). These
# follow semconv 1.44.0 (opentelemetry-semantic-conventions 0.66b2), read 2026-12-06; a unit test
# pins them (tests/unit/test_sinks_otlp.py::test_names_pinned), so a rename is a deliberate change.
SEMCONV_VERSION = "1.44.0"
NAMES_DATED = "2026-12-06"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
NAMES: dict[str, str] = {
    # GenAI spans
    "operation": "gen_ai.operation.name",
    "provider": "gen_ai.provider.name",
    "request_model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "response_id": "gen_ai.response.id",
    "finish_reasons": "gen_ai.response.finish_reasons",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "cache_read_tokens": "gen_ai.usage.cache_read.input_tokens",
    "cache_write_tokens": "gen_ai.usage.cache_creation.input_tokens",  # "cache_write" in later drafts
    "reasoning_tokens": "gen_ai.usage.reasoning.output_tokens",
    "stream": "gen_ai.request.stream",
    "time_to_first_chunk": "gen_ai.response.time_to_first_chunk",
    "input_messages": "gen_ai.input.messages",
    "output_messages": "gen_ai.output.messages",
    "token_type": "gen_ai.token.type",
    "tool_name": "gen_ai.tool.name",
    "server_address": "server.address",
    "server_port": "server.port",
    "client_address": "client.address",
    "client_port": "client.port",
    "error_type": "error.type",
    "http_status": "http.response.status_code",
    "http_method": "http.request.method",
    "url_path": "url.path",
    "user_agent": "user_agent.original",
    "network_protocol_version": "network.protocol.version",
    # MCP spans
    "mcp_method": "mcp.method.name",
    "mcp_session": "mcp.session.id",
    "jsonrpc_id": "jsonrpc.request.id",
    "rpc_status": "rpc.response.status_code",
    # the calling process, its container (OTel resource names, on the span: the host is the resource)
    "pid": "process.pid",
    "ppid": "process.parent_pid",
    "exe": "process.executable.path",
    "comm": "process.executable.name",
    "cmdline": "process.command_args",
    "uid": "user.id",
    "container_id": "container.id",
    "container_runtime": "container.runtime.name",
    "pod_uid": "k8s.pod.uid",
    # busted only
    "api": "busted.api",
    "agent": "busted.agent.name",
    "agent_pid": "busted.agent.pid",
    "agent_evidence": "busted.agent.evidence",
    "evidence": "busted.evidence",
    "confidence": "busted.confidence",
    "hostname": "busted.hostname",
    "cost": "busted.cost.usd",
    "price_source": "busted.cost.price_source",
    "flow_id": "busted.flow.id",
    "complete": "busted.complete",
    "tool_calls": "busted.tool_calls",
    "direction_sent": "busted.mcp.sent",
    # log records
    "policy_rule": "busted.policy.rules.rule",
    "policy_action": "busted.policy.rules.action",
    "policy_enforced": "busted.policy.rules.enforced",
    "policy_point": "busted.policy.rules.point",
    "lost_where": "busted.lost.where",
    "lost_count": "busted.lost.count",
}
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
#: name -> (instrument, unit, explicit bucket boundaries or None, description)
METRICS: dict[str, tuple[str, str, tuple[float, ...] | None, str]] = {
    "gen_ai.client.token.usage": ("histogram", "{token}", _TOKEN_BUCKETS, "Number of input and output tokens used"),
    "gen_ai.client.operation.duration": ("histogram", "s", _SECONDS_BUCKETS, "GenAI operation duration"),
    "gen_ai.client.operation.time_to_first_chunk": ("histogram", "s", _SECONDS_BUCKETS,
                                                    "Time to receive the first chunk of a streamed response"),
    "busted.gen_ai.client.cost": ("counter", "USD", None, "Cost of LLM calls at busted's prices"),
}
#: busted's catalog ids -> the convention's well-known gen_ai.provider.name values; others as our id
PROVIDER_NAMES: dict[str, str] = {
    "openai": "openai", "anthropic": "anthropic", "google-gemini": "gcp.gemini", "google-vertex": "gcp.vertex_ai",
    "azure-openai": "azure.ai.openai", "aws-bedrock": "aws.bedrock", "mistral": "mistral_ai", "groq": "groq",
    "deepseek": "deepseek", "xai": "x_ai", "cohere": "cohere", "perplexity": "perplexity",
}
PROTOCOLS = ("http/protobuf", "grpc")
_DEFAULT_ENDPOINT = {"http/protobuf": "http://localhost:4318", "grpc": "http://localhost:4317"}
_SIGNAL_PATHS = {"traces": "/v1/traces", "metrics": "/v1/metrics", "logs": "/v1/logs"}

N = NAMES  # short local alias for the hot path below
# A metric series is these attributes of a call, in this order (None: absent), then the token type.
_METRIC_KEYS = (N["operation"], N["provider"], N["request_model"], N["response_model"], N["server_address"],
                N["server_port"], N["error_type"], N["token_type"])
_K_IN, _K_OUT, _K_CACHE_R, _K_CACHE_W, _K_REASONING = (N[k] for k in (
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens"))
_K_TTFC, _K_TOOL_CALLS, _K_COST, _K_PRICE, _K_ADDR, _K_PORT = (N[k] for k in (
    "time_to_first_chunk", "tool_calls", "cost", "price_source", "server_address", "server_port"))
# The per-call int/float attributes' KeyValue.key fields, encoded once.
_W_IN, _W_OUT, _W_CACHE_R, _W_CACHE_W, _W_REASONING, _W_TTFC, _W_TOOL_CALLS, _W_COST, _W_PORT, _W_CPORT, _W_FLOW = (
    wire.key_field(N[k]) for k in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                                   "reasoning_tokens", "time_to_first_chunk", "tool_calls", "cost", "server_port",
                                   "client_port", "flow_id"))
_W_RESPONSE_ID, _W_IN_MSG, _W_OUT_MSG = (wire.key_field(N[k]) for k in ("response_id", "input_messages",
                                                                          "output_messages"))
_MAX_SERIES = 2000  # per metric, as the SDK's default cardinality limit; beyond: one overflow series
_OVERFLOW: tuple[Any, ...] = ("otel.metric.overflow",)


_M_TOKENS, _M_DUR, _M_TTFC, _M_COST = METRICS  # the table's names, in its order


def _put(refs: list[Any], i: int, v: Any) -> Any:
    refs[i] = v
    return v


def _hadd(h: list[Any], bounds: tuple[float, ...], v: float) -> None:
    """One measurement into a histogram series [count, sum, min, max, buckets]."""
    h[0] += 1
    h[1] += v
    if v < h[2]:
        h[2] = v
    if v > h[3]:
        h[3] = v
    h[4][bisect.bisect_left(bounds, v)] += 1


def _metric_attrs(m: tuple[Any, ...]) -> dict[str, Any]:
    if m == _OVERFLOW:
        return {"otel.metric.overflow": True}
    return {k: v for k, v in zip(_METRIC_KEYS, m, strict=False) if v is not None}
_CLEAN_CACHE: dict[Any, Any] = {}  # wire string / argv -> redacted; bounded (values repeat: models, exes)


def _clean(s: str) -> str:
    r = _CLEAN_CACHE.get(s)
    if r is None:
        r = redact_text(s)
        if len(_CLEAN_CACHE) < 8192:
            _CLEAN_CACHE[s] = r
    return r


def _clean_argv(argv: tuple[str, ...]) -> list[str]:
    r = _CLEAN_CACHE.get(argv)
    if r is None:
        r = [_clean(a) for a in redact_argv(list(argv))]
        if len(_CLEAN_CACHE) < 8192:
            _CLEAN_CACHE[argv] = r
    return list(r)


def provider_name(provider: str | None) -> str | None:
    """The ``gen_ai.provider.name`` of a busted catalog id (the well-known value, else the id)."""
    return None if provider is None else PROVIDER_NAMES.get(provider, provider)


def _import_sdk() -> dict[str, Any]:
    try:
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.metrics import export as metrics_data
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanKind
    except ImportError as exc:
        raise MissingDependency("opentelemetry-sdk", "otlp", "OTLP export (--otlp)") from exc
    return dict(LoggerProvider=LoggerProvider, BatchLogRecordProcessor=BatchLogRecordProcessor,
                metrics_data=metrics_data, OTELResourceDetector=OTELResourceDetector, Resource=Resource,
                InstrumentationScope=InstrumentationScope, BatchSpanProcessor=BatchSpanProcessor, SpanKind=SpanKind)


def _exporters(protocol: str) -> tuple[type, type, type]:
    spans: type
    metrics: type
    logs: type
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc import _log_exporter as grpc_logs
            from opentelemetry.exporter.otlp.proto.grpc import metric_exporter as grpc_metrics
            from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_spans

            spans, metrics = grpc_spans.OTLPSpanExporter, grpc_metrics.OTLPMetricExporter
            logs = grpc_logs.OTLPLogExporter
        else:
            from opentelemetry.exporter.otlp.proto.http import _log_exporter as http_logs
            from opentelemetry.exporter.otlp.proto.http import metric_exporter as http_metrics
            from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_spans

            spans, metrics = http_spans.OTLPSpanExporter, http_metrics.OTLPMetricExporter
            logs = http_logs.OTLPLogExporter
    except ImportError as exc:
        pkg = "opentelemetry-exporter-otlp-proto-" + ("grpc" if protocol == "grpc" else "http")
        raise MissingDependency(pkg, "otlp", f"OTLP export over {protocol}") from exc
    return _fast_spans(spans, protocol), metrics, logs


def _fast_spans(base: type, protocol: str) -> type:
    """The official span exporter, sending the spans' bytes as busted.sinks._otlpwire wrote them
    (``WireSpan``s); its sending, retries, backoff, headers and compression unchanged."""
    if protocol == "grpc":
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        class GrpcSpans(base):  # type: ignore[misc]  # base: the SDK's exporter class, imported at run time
            # The gRPC stub takes a message: the bytes parsed into one, in C (the protobuf runtime).
            def _translate_data(self, data: Sequence[Any]) -> Any:
                return ExportTraceServiceRequest.FromString(wire.encode_request(data))

        return GrpcSpans
    from opentelemetry.sdk.trace.export import SpanExportResult

    class HttpSpans(base):  # type: ignore[misc]  # base: the SDK's exporter class, imported at run time
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            if not hasattr(getattr(self, "_client", None), "export"):  # the hook this class posts bytes with
                raise MissingDependency("opentelemetry-exporter-otlp-proto-http>=1.45", "otlp",
                                        "OTLP export over http/protobuf (this version has no bytes client)")

        def export(self, spans: Sequence[Any]) -> Any:
            if getattr(self, "_shutdown", False):
                return SpanExportResult.FAILURE
            result = self._client.export(wire.encode_request(spans))
            return SpanExportResult.SUCCESS if getattr(result, "success", False) else SpanExportResult.FAILURE

    return HttpSpans


class _Wrapped:
    """An SDK exporter wrapped to count how its exports went (``_Counted``, ``_MetricCounted``)."""

    def __init__(self, inner: Any, owner: OtlpSink, signal: str) -> None:
        self.inner, self.owner, self.signal = inner, owner, signal
        self.handed = self.ok = self.failed = 0

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))

    def shutdown(self) -> None:
        self.inner.shutdown()


class _Counted(_Wrapped):
    """Wraps a span or log exporter: counts what the batch processor hands it and how the exports
    went. ``handed`` is counted before the export is tried, so ``accepted - handed`` bounds the queue."""

    def export(self, batch: Sequence[Any]) -> Any:
        n = len(batch)
        self.handed += n
        try:
            result = self.inner.export(batch)
        except Exception as exc:  # noqa: BLE001 - an exporter's bug is a failed export, counted
            self.failed += n
            self.owner._failed(self.signal, n, repr(exc))
            raise
        if getattr(result, "name", "") == "SUCCESS":
            self.ok += n
            self.owner._succeeded()
        else:
            self.failed += n
            self.owner._failed(self.signal, n, None)
        return result


class _MetricCounted(_Wrapped):
    """The metric exporter: one export is a reading of every series (cumulative), not items."""

    def __init__(self, inner: Any, owner: OtlpSink) -> None:
        super().__init__(inner, owner, "metrics")

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kw: Any) -> Any:
        result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kw)
        if getattr(result, "name", "") == "SUCCESS":
            self.ok += 1
            self.owner._succeeded()
        else:  # cumulative sums: the next export carries what this one would have
            self.failed += 1
            self.owner._failed("metrics", 0, None)
        return result


class _LastError(logging.Handler):
    """Keeps the SDK exporters' last error message (redacted) for our own rate-limited line. Being a
    handler in the hierarchy, it also keeps Python's last-resort handler from printing every retry
    to stderr; records still propagate to the application's own logging."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.last = redact_text(record.getMessage())[:300]
        except Exception:  # noqa: BLE001 - a log line must never break an export
            pass


_SDK_LOGGERS = ("opentelemetry.exporter", "opentelemetry.sdk")
_last_error = _LastError()


def _quietly(job: Callable[[], Any]) -> None:
    try:
        job()
    except Exception:  # noqa: BLE001 - closing never raises for the collector's sake
        pass


def _signal_on(given: bool | None, env: str) -> bool:
    if given is not None:
        return given
    return os.environ.get(env, "").strip().lower() != "none"


def _host_id() -> str | None:
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(p) as f:
                v = f.read().strip()
        except OSError:
            continue
        if v:
            return v
    return None


def _base_endpoint(endpoint: str | None, protocol: str) -> str:
    ep = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or _DEFAULT_ENDPOINT[protocol]
    if "://" not in ep:
        ep = "http://" + ep
    parts = urlsplit(ep)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"OTLP endpoint {redact_text(ep)!r}: expected http(s)://HOST:PORT, "
                         "e.g. http://127.0.0.1:4318")
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise UsageError(f"OTLP endpoint {redact_text(ep)!r}: bad port; expected http(s)://HOST:PORT") from exc
    return ep.rstrip("/")


def _shown(url: str) -> str:
    """An endpoint as it may be printed: no userinfo, no query (where credentials would hide)."""
    p = urlsplit(url)
    host = p.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{p.scheme}://{host}" + (f":{p.port}" if p.port else "") + p.path


_EXPORTED = frozenset((LlmCall, McpMessage, PolicyDecision, EventsLost))  # the kinds write() turns into telemetry


class OtlpSink:
    """Export events over OTLP. ``endpoint``: the collector's base URL (``http://HOST:4318`` for
    http/protobuf, ``http://HOST:4317`` for grpc; default ``OTEL_EXPORTER_OTLP_ENDPOINT``, then
    localhost); ``protocol``: ``"http/protobuf"`` (default, or ``OTEL_EXPORTER_OTLP_PROTOCOL``) or
    ``"grpc"``; ``headers``: sent with every request (default ``OTEL_EXPORTER_OTLP_HEADERS``);
    ``timeout``: seconds per export (default ``OTEL_EXPORTER_OTLP_TIMEOUT``, 10).
    ``service_name`` is the default ``service.name`` (``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` win). ``metrics``/``logs``: send those signals too (default: yes,
    unless ``OTEL_METRICS_EXPORTER``/``OTEL_LOGS_EXPORTER`` is ``none``: a traces-only backend such
    as Phoenix answers 404 to them). ``on_error(msg)`` hears of export trouble, at most once per
    ``warn_interval`` seconds. Raises ``MissingDependency`` without ``busted[otlp]``."""

    wants_encoded = False  # the CLI need not JSON-encode events for this output

    def __init__(self, endpoint: str | None = None, protocol: str | None = None,
                 headers: Mapping[str, str] | None = None, *, timeout: float | None = None,
                 service_name: str = "busted", max_queue_size: int = 2048, max_export_batch_size: int = 512,
                 schedule_delay: float = 1.0, metric_interval: float = 10.0, shutdown_timeout: float = 5.0,
                 warn_interval: float = 30.0, mcp_pending: int = 1024, metrics: bool | None = None,
                 logs: bool | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        protocol = (protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
        if protocol not in PROTOCOLS:
            raise UsageError(f"OTLP protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if max_queue_size < 1 or not 1 <= max_export_batch_size <= max_queue_size:
            raise UsageError("OtlpSink needs max_queue_size >= max_export_batch_size >= 1")
        sdk = _import_sdk()
        span_exp, metric_exp, log_exp = _exporters(protocol)
        self.protocol = protocol
        self.endpoint = _base_endpoint(endpoint, protocol)
        self.max_queue_size = max_queue_size
        self.shutdown_timeout = shutdown_timeout
        self.warn_interval = warn_interval
        self.on_error = on_error
        self._sdk = sdk
        self._kind = {True: sdk["SpanKind"].SERVER.value, False: sdk["SpanKind"].CLIENT.value}
        self._lock = threading.Lock()
        self._accepted = {"traces": 0, "logs": 0}
        self._dropped = {"traces": 0, "logs": 0}
        self._lost_told = 0  # losses already sent as an EventsLost record
        self._failing: str | None = None  # the signal whose last export failed, None when healthy
        self._tell_pending = False  # an export succeeded after losses: send them as an EventsLost record
        self._last_warn = 0.0
        self._closed = False
        self._report: dict[str, Any] | None = None
        self._mcp: OrderedDict[tuple[int, str], McpMessage] = OrderedDict()
        self._mcp_pending = mcp_pending
        self._procs: dict[tuple[Any, ...], bytes] = {}  # a process's identity -> its attributes' bytes
        self._peers: dict[bool, dict[tuple[Any, ...], Any]] = {True: {}, False: {}}  # -> _peer()
        self._shapes: dict[tuple[Any, ...], Any] = {}  # a call's shared fields -> _call_shape()
        for name in _SDK_LOGGERS:
            lg = logging.getLogger(name)
            if _last_error not in lg.handlers:
                lg.addHandler(_last_error)

        kw: dict[str, Any] = {}
        if headers is not None:
            kw["headers"] = dict(headers)
        if timeout is not None:
            kw["timeout"] = timeout

        def ep(signal: str) -> str:
            return self.endpoint + _SIGNAL_PATHS[signal] if protocol == "http/protobuf" else self.endpoint

        resource = self._resource(sdk, service_name)
        self._spans = _Counted(span_exp(endpoint=ep("traces"), **kw), self, "traces")
        self._logs = _Counted(log_exp(endpoint=ep("logs"), **kw), self, "logs")
        self._metrics = _MetricCounted(metric_exp(endpoint=ep("metrics"), **kw), self)
        bq = dict(max_queue_size=max_queue_size, max_export_batch_size=max_export_batch_size,
                  schedule_delay_millis=schedule_delay * 1000)
        self._span_proc = sdk["BatchSpanProcessor"](self._spans, **bq)
        self._log_proc = sdk["BatchLogRecordProcessor"](self._logs, **bq)
        self._logger_provider = sdk["LoggerProvider"](resource=resource)
        self._logger_provider.add_log_record_processor(self._log_proc)
        from busted import __version__ as version

        self._logger = self._logger_provider.get_logger("busted", version, schema_url=SCHEMA_URL)
        # Spans are records of exchanges already over (seen by the kernel), not operations in
        # progress: each is written finished, as its protobuf bytes (a WireSpan), and handed to the
        # batch processor (the Tracer's live-span path validates and locks per attribute: ~60 us a
        # span here; a ReadableSpan and the official encoder ~100 us). Every call is exported:
        # sampling an audit trail would lose calls silently.
        self._resource_obj = resource
        self._scope = sdk["InstrumentationScope"]("busted", version, SCHEMA_URL)
        self._head = wire.Head(resource, self._scope)
        # Metrics: aggregated here (a dict and a bisect per measurement, not the SDK instruments'
        # ~8 us each) into the SDK's own data model, exported by the official exporter from a
        # thread of ours every metric_interval seconds, cumulative, and once more at close.
        self._metric_interval = metric_interval
        self._hist: dict[tuple[str, tuple[Any, ...]], list[Any]] = {}  # [count, sum, min, max, buckets]
        self._sums: dict[tuple[str, tuple[Any, ...]], float] = {}
        self._series_by_m: dict[tuple[Any, ...], list[Any]] = {}  # -> _series_of()
        self._series: dict[str, int] = dict.fromkeys(METRICS, 0)
        self._metrics_start = time.time_ns()
        self._metric_stop = threading.Event()
        self._metric_thread = threading.Thread(target=self._metric_loop, name="busted-otlp-metrics", daemon=True)
        self.metrics = _signal_on(metrics, "OTEL_METRICS_EXPORTER")
        self.logs = _signal_on(logs, "OTEL_LOGS_EXPORTER")
        if self.metrics:
            self._metric_thread.start()

    @staticmethod
    def _resource(sdk: dict[str, Any], service_name: str) -> Any:
        from busted import __version__ as version

        uname = platform.uname()
        attrs: dict[str, Any] = {"service.name": service_name, "service.version": version,
                                 "host.name": socket.gethostname(), "os.type": uname.system.lower(),
                                 "os.version": uname.release, "host.arch": uname.machine,
                                 "telemetry.distro.name": "busted"}
        hid = _host_id()
        if hid:
            attrs["host.id"] = hid
        # Ours first, then the environment's (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) over them.
        return sdk["Resource"].create(attrs).merge(sdk["OTELResourceDetector"]().detect())

    # -- writing ------------------------------------------------------------------------------

    def write(self, event: Event) -> None:
        """Turn one event into telemetry for the exporters' threads. Never blocks on the network;
        never raises for the collector's sake (a full queue drops and counts)."""
        if self._closed:
            return
        t = type(event)
        if t is LlmCall:
            self._call(event)  # type: ignore[arg-type]
        elif t is McpMessage:
            self._mcp_message(event)  # type: ignore[arg-type]
        elif t is PolicyDecision:
            self._policy(event)  # type: ignore[arg-type]
        elif t is EventsLost:
            self._lost(event)  # type: ignore[arg-type]
        if self._tell_pending:
            self._tell_pending = False
            self._tell_losses()

    def write_encoded(self, items: Iterable[Any], *, flush: bool = False) -> None:
        """The CLI's batch call: events, or ``busted.sinks.Encoded`` (their ``event`` is used); the
        kinds this output does not export are passed over here (most of a monitor's events)."""
        for item in items:
            ev = getattr(item, "event", item)
            if type(ev) in _EXPORTED:
                self.write(ev)

    def _admit(self, signal: str) -> bool:
        """Room in the signal's queue? (What was accepted and not yet handed to the exporter is in
        it.) Else the item is dropped here, counted: the SDK's own drop would be silent."""
        with self._lock:
            ok = self._admit_locked(signal)
        if not ok:
            self._warn(f"its {signal} queue ({self.max_queue_size}) is full: the collector is slow or down")
        return ok

    def _admit_locked(self, signal: str) -> bool:
        """``_admit`` for a caller holding the lock (and telling ``_warn`` on False)."""
        counted = self._spans if signal == "traces" else self._logs
        if self._accepted[signal] - counted.handed >= self.max_queue_size:
            self._dropped[signal] += 1
            return False
        self._accepted[signal] += 1
        return True

    def _identity(self, ev: LlmCall | McpMessage, out: list[bytes]) -> tuple[bool, Any, Any]:
        """The peer and flow attributes' bytes onto ``out``, then the process's (shared, cached);
        whether this host accepted the flow (SERVER), and the server's address and port."""
        server = ev.direction == Direction.ACCEPT
        # The peer repeats for every call to it (a client's host and port): encoded once, bounded.
        pkey = (ev.saddr, ev.sport, ev.daddr, ev.dport, ev.hostname) if server else (ev.hostname, ev.daddr, ev.dport)
        peer = self._peers[server].get(pkey)
        if peer is None:
            peer = self._peers[server][pkey] = self._peer(ev, server)
            if len(self._peers[server]) > 4096:
                self._peers[server].clear()
        addr, port, pb = peer
        out.append(pb)
        if ev.flow_id is not None:
            out.append(wire.int_attr(_W_FLOW, ev.flow_id))
        # The process, agent and container attributes repeat for every call a process makes:
        # built (and redacted) and encoded once per distinct identity, bounded.
        key = (ev.pid, ev.comm, ev.uid, ev.ppid, ev.exe, ev.cmdline, ev.hostname, ev.evidence, ev.confidence,
               ev.agent, ev.agent_pid, ev.agent_evidence, ev.container_id, ev.container_runtime, ev.pod_uid)
        proc = self._procs.get(key)
        if proc is None:
            proc = self._procs[key] = wire.attrs(self._process_attrs(ev))
            if len(self._procs) > 4096:
                self._procs.clear()
        out.append(proc)
        return server, addr, port

    @staticmethod
    def _peer(ev: LlmCall | McpMessage, server: bool) -> tuple[str | None, int | None, bytes]:
        """The server's address and port (this host's when it accepted the flow), and the peer's
        attributes encoded."""
        if server:
            addr, port = ev.saddr, ev.sport
        else:
            addr, port = (_clean(ev.hostname) if ev.hostname else ev.daddr), ev.dport
        out = []
        if addr:
            out.append(wire.str_attr(_K_ADDR, addr))
        if port is not None:
            out.append(wire.int_attr(_W_PORT, port))
        if server:
            if ev.daddr:
                out.append(wire.str_attr(N["client_address"], ev.daddr))
            if ev.dport is not None:
                out.append(wire.int_attr(_W_CPORT, ev.dport))
        return addr, port, b"".join(out)

    @staticmethod
    def _process_attrs(ev: LlmCall | McpMessage) -> dict[str, Any]:
        a: dict[str, Any] = {N["pid"]: ev.pid, N["comm"]: _clean(ev.comm), N["uid"]: str(ev.uid)}
        if ev.ppid is not None:
            a[N["ppid"]] = ev.ppid
        if ev.exe:
            a[N["exe"]] = _clean(ev.exe)
        if ev.cmdline:
            a[N["cmdline"]] = _clean_argv(ev.cmdline)
        if ev.hostname:
            a[N["hostname"]] = _clean(ev.hostname)
        if ev.evidence:
            a[N["evidence"]] = ev.evidence.name.lower()
            a[N["confidence"]] = ev.confidence
        if ev.agent:
            a[N["agent"]] = _clean(ev.agent)
            if ev.agent_pid is not None:
                a[N["agent_pid"]] = ev.agent_pid
            if ev.agent_evidence:
                a[N["agent_evidence"]] = _clean(ev.agent_evidence)
        if ev.container_id:
            a[N["container_id"]] = _clean(ev.container_id)
            if ev.container_runtime:
                a[N["container_runtime"]] = _clean(ev.container_runtime)
        if ev.pod_uid:
            a[N["pod_uid"]] = _clean(ev.pod_uid)
        return a

    def _call_shape(self, ev: LlmCall) -> tuple[bytes, dict[bool, bytes], bytes, str | None, tuple[Any, ...]]:
        """What a call shares with the other calls of its client (API, models, path, status ...):
        the attributes (redacted, encoded), the span's name and kind (client, server), its status,
        the error type, the metric attributes."""
        op = ev.operation or "chat"
        model = ev.request_model or ev.response_model
        a: dict[str, Any] = {N["operation"]: op}
        prov = provider_name(ev.provider)
        if prov:
            a[N["provider"]] = _clean(prov)
        if ev.request_model:
            a[N["request_model"]] = _clean(ev.request_model)
        if ev.response_model:
            a[N["response_model"]] = _clean(ev.response_model)
        if ev.finish_reason:
            a[N["finish_reasons"]] = [_clean(ev.finish_reason)]
        if ev.stream is not None:
            a[N["stream"]] = ev.stream
        error = ev.error_type or (str(ev.status) if ev.status and ev.status >= 400 else None) or \
            (None if ev.complete else "incomplete")
        if error:
            error = a[N["error_type"]] = _clean(error)
        if ev.status is not None:
            a[N["http_status"]] = ev.status
        if ev.method:
            a[N["http_method"]] = _clean(ev.method)
        if ev.path:
            a[N["url_path"]] = _clean(ev.path)
        if ev.http_version:
            a[N["network_protocol_version"]] = ev.http_version
        if ev.user_agent:
            a[N["user_agent"]] = _clean(ev.user_agent)
        a[N["api"]] = _clean(ev.api)
        a[N["complete"]] = ev.complete
        if ev.price_source and ev.cost_usd is not None:  # a price source without a cost says nothing
            a[N["price_source"]] = _clean(ev.price_source)
        name = f"{op} {_clean(model)}" if model else op
        heads = {server: wire.name_kind(name, kind) for server, kind in self._kind.items()}
        return (wire.attrs(a), heads, wire.status_flags(error is not None), error,
                (op, a.get(N["provider"]), a.get(N["request_model"]), a.get(N["response_model"])))

    def _call(self, ev: LlmCall) -> None:
        key = (ev.operation, ev.provider, ev.request_model, ev.response_model, ev.finish_reason, ev.stream,
               ev.error_type, ev.status, ev.complete, ev.method, ev.path, ev.http_version, ev.user_agent, ev.api,
               ev.price_source if ev.cost_usd is not None else None)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = self._call_shape(ev)
            if len(self._shapes) > 4096:
                self._shapes.clear()
        shared, heads, tail, error, mpart = shape
        # The span's attributes as protobuf bytes, in order: the shape's (cached), this call's own,
        # the peer's and the flow's, the process's (cached). No key is in two of these.
        parts = [shared]
        put = parts.append
        int_attr = wire.int_attr
        if ev.input_tokens is not None:
            put(int_attr(_W_IN, ev.input_tokens))
        if ev.output_tokens is not None:
            put(int_attr(_W_OUT, ev.output_tokens))
        if ev.cache_read_tokens is not None:
            put(int_attr(_W_CACHE_R, ev.cache_read_tokens))
        if ev.cache_write_tokens is not None:
            put(int_attr(_W_CACHE_W, ev.cache_write_tokens))
        if ev.reasoning_tokens is not None:
            put(int_attr(_W_REASONING, ev.reasoning_tokens))
        ttfc = None
        if ev.stream and ev.time_to_first_token_ns is not None:
            ttfc = ev.time_to_first_token_ns / 1e9
            put(wire.float_attr(_W_TTFC, ttfc))
        if ev.tool_calls is not None:
            put(int_attr(_W_TOOL_CALLS, ev.tool_calls))
        if ev.cost_usd is not None:
            put(wire.float_attr(_W_COST, ev.cost_usd))
        if ev.prompt is not None:  # only when content capture is on (the event carries it)
            put(wire.once_attr(_W_IN_MSG, json.dumps([{"role": "user", "parts": [
                {"type": "text", "content": redact_text(ev.prompt)}]}])))
        if ev.completion is not None:
            out: dict[str, Any] = {"role": "assistant", "parts": [{"type": "text",
                                                                   "content": redact_text(ev.completion)}]}
            if ev.finish_reason:
                out["finish_reason"] = redact_text(ev.finish_reason)
            put(wire.once_attr(_W_OUT_MSG, json.dumps([out])))
        if ev.response_id:
            put(wire.once_attr(_W_RESPONSE_ID, redact_id(ev.response_id)))
        server, addr, port = self._identity(ev, parts)
        end = int(ev.wall_time * 1e9)
        start = end - (ev.duration_ns or 0)
        # Metrics: every call counts, queue or no queue (an aggregate costs no queue slot).
        m = (*mpart, addr, port, error)
        with self._lock:
            refs = self._series_of(m)
            if ev.duration_ns is not None:
                _hadd(refs[0] or _put(refs, 0, self._hist_of(_M_DUR, m)), _SECONDS_BUCKETS, ev.duration_ns / 1e9)
            if ttfc is not None:
                _hadd(refs[1] or _put(refs, 1, self._hist_of(_M_TTFC, m)), _SECONDS_BUCKETS, ttfc)
            if ev.input_tokens is not None:
                _hadd(refs[2] or _put(refs, 2, self._hist_of(_M_TOKENS, (*m, "input"))), _TOKEN_BUCKETS,
                      ev.input_tokens)
            if ev.output_tokens is not None:
                _hadd(refs[3] or _put(refs, 3, self._hist_of(_M_TOKENS, (*m, "output"))), _TOKEN_BUCKETS,
                      ev.output_tokens)
            if ev.cost_usd is not None:
                key = refs[4] or _put(refs, 4, self._sum_of(_M_COST, m))
                self._sums[key] += ev.cost_usd
            admitted = self._admit_locked("traces")
        if not admitted:
            self._warn(f"its traces queue ({self.max_queue_size}) is full: the collector is slow or down")
            return
        self._span_proc.on_end(wire.WireSpan(wire.span(heads[server], start, end, parts, tail), self._head))

    def _mcp_message(self, ev: McpMessage) -> None:
        is_request = ev.jsonrpc_method is not None and not ev.is_notification and ev.jsonrpc_id is not None
        key = (ev.flow_id, ev.jsonrpc_id or "")
        if is_request:
            if len(self._mcp) >= self._mcp_pending:  # its answer is overdue: the request alone
                self._mcp_span(self._mcp.popitem(last=False)[1], None)
            self._mcp[key] = ev
            return
        req = self._mcp.pop(key, None) if ev.jsonrpc_method is None and ev.jsonrpc_id is not None else None
        self._mcp_span(req or ev, ev if req is not None else None)

    def _mcp_span(self, req: McpMessage, resp: McpMessage | None) -> None:
        if not self._admit("traces"):
            return
        a: dict[str, Any] = {}
        method = req.jsonrpc_method
        if method:
            a[N["mcp_method"]] = _clean(method)
        session = req.session_id or (resp.session_id if resp is not None else None)
        if session:
            a[N["mcp_session"]] = _clean(session)
        if req.jsonrpc_id is not None:
            a[N["jsonrpc_id"]] = _clean(req.jsonrpc_id)
        if req.tool:
            a[N["tool_name"]] = _clean(req.tool)
        a[N["direction_sent"]] = req.direction_sent
        code = resp.error_code if resp is not None else req.error_code
        if code is not None:
            a[N["rpc_status"]] = str(code)
            a[N["error_type"]] = str(code)
        parts = [wire.attrs(a)]
        server, _, _ = self._identity(req, parts)
        name = f"{_clean(method)} {_clean(req.tool)}" if method and req.tool else (_clean(method) if method else
                                                                                     "mcp response")
        start = int(req.wall_time * 1e9)
        end = int(resp.wall_time * 1e9) if resp is not None else start
        head = wire.name_kind(name, self._kind[server])
        self._span_proc.on_end(wire.WireSpan(wire.span(head, start, max(start, end), parts,
                                                       wire.status_flags(code is not None)), self._head))

    # -- metrics ------------------------------------------------------------------------------

    def _series_of(self, m: tuple[Any, ...]) -> list[Any]:
        """The series a call with metric attributes ``m`` goes to, found once per distinct ``m``
        (bounded): [duration, time to first chunk, input tokens, output tokens] histograms and the
        cost counter's key, each None until first used. Caller holds the lock."""
        refs = self._series_by_m.get(m)
        if refs is None:
            if len(self._series_by_m) >= 4096:
                self._series_by_m.clear()
            refs = self._series_by_m[m] = [None, None, None, None, None]
        return refs

    def _hist_of(self, name: str, m: tuple[Any, ...]) -> list[Any]:
        """A histogram series, made on first use ([count, sum, min, max, buckets]); past the
        cardinality limit, the overflow series. Caller holds the lock."""
        h = self._hist.get((name, m))
        if h is None:
            if self._series[name] >= _MAX_SERIES:
                m = _OVERFLOW
                h = self._hist.get((name, m))
            if h is None:
                self._series[name] += 1
                h = self._hist[(name, m)] = [0, 0.0, math.inf, -math.inf, [0] * (len(METRICS[name][2] or ()) + 1)]
        return h

    def _sum_of(self, name: str, m: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        """A counter series' key in ``_sums``, made on first use; past the limit, the overflow
        series'. Caller holds the lock."""
        key = (name, m)
        if key not in self._sums and self._series[name] >= _MAX_SERIES:
            key = (name, _OVERFLOW)
        if key not in self._sums:
            self._series[name] += 1
            self._sums[key] = 0.0
        return key

    def _metrics_data(self) -> Any:
        """The cumulative readings so far, in the SDK's data model (what its exporters encode)."""
        md = self._sdk["metrics_data"]
        now = time.time_ns()
        with self._lock:
            hist = [(k, (h[0], h[1], h[2], h[3], list(h[4]))) for k, h in self._hist.items()]
            sums = list(self._sums.items())
        points: dict[str, list[Any]] = {name: [] for name in METRICS}
        for (name, m), (count, total, lo, hi, buckets) in hist:
            points[name].append(md.HistogramDataPoint(
                attributes=_metric_attrs(m), start_time_unix_nano=self._metrics_start, time_unix_nano=now,
                count=count, sum=total, bucket_counts=buckets, explicit_bounds=list(METRICS[name][2] or ()),
                min=lo, max=hi))
        for (name, m), total in sums:
            points[name].append(md.NumberDataPoint(attributes=_metric_attrs(m),
                                                   start_time_unix_nano=self._metrics_start, time_unix_nano=now,
                                                   value=total))
        cumulative = md.AggregationTemporality.CUMULATIVE
        metrics = []
        for name, (what, unit, _, desc) in METRICS.items():
            if not points[name]:
                continue
            data = md.Histogram(data_points=points[name], aggregation_temporality=cumulative) if what == "histogram" \
                else md.Sum(data_points=points[name], aggregation_temporality=cumulative, is_monotonic=True)
            metrics.append(md.Metric(name=name, description=desc, unit=unit, data=data))
        if not metrics:
            return None
        return md.MetricsData(resource_metrics=[md.ResourceMetrics(
            resource=self._resource_obj, scope_metrics=[md.ScopeMetrics(scope=self._scope, metrics=metrics,
                                                                         schema_url=SCHEMA_URL)],
            schema_url=SCHEMA_URL)])

    def _export_metrics(self) -> None:
        data = self._metrics_data()
        if data is not None:
            try:
                self._metrics.export(data, timeout_millis=self.shutdown_timeout * 1000)
            except Exception as exc:  # noqa: BLE001 - counted in _MetricCounted; the loop goes on
                self._failed("metrics", 0, repr(exc))

    def _metric_loop(self) -> None:
        while not self._metric_stop.wait(self._metric_interval):
            self._export_metrics()
        self._export_metrics()  # the last reading, at close
        _quietly(self._metrics.shutdown)

    def _emit_log(self, ev: Event, body: str, severity: str, attrs: dict[str, Any], name: str) -> None:
        if not self.logs:
            return
        if not self._admit("logs"):
            return
        from opentelemetry._logs import SeverityNumber

        self._logger.emit(timestamp=int(ev.wall_time * 1e9), observed_timestamp=time.time_ns(),
                          severity_number=getattr(SeverityNumber, severity), severity_text=severity,
                          body=redact_text(body), attributes=attrs, event_name=name)

    def _policy(self, ev: PolicyDecision) -> None:
        a: dict[str, Any] = {N["policy_rule"]: _clean(ev.rule), N["policy_action"]: ev.action,
                             N["policy_enforced"]: ev.enforced, N["policy_point"]: ev.point}
        for k, v in (("flow_id", ev.flow_id), ("pid", ev.pid), ("exe", ev.exe), ("comm", ev.comm),
                     ("hostname", ev.hostname)):
            if v is not None:
                a[N[k]] = _clean(v) if isinstance(v, str) else v
        if ev.uid is not None:
            a[N["uid"]] = str(ev.uid)
        if ev.provider:
            a[N["provider"]] = _clean(provider_name(ev.provider) or "")
        if ev.daddr:
            a[N["server_address"]] = ev.daddr
            if ev.dport is not None:
                a[N["server_port"]] = ev.dport
        if ev.matched:
            a["busted.policy.rules.matched"] = [_clean(f"{k}={v}") for k, v in ev.matched]
        sev = "WARN" if ev.action == "deny" else "INFO"
        body = f"policy {ev.action}{' (enforced)' if ev.enforced else ''} by rule {ev.rule} at {ev.point}"
        self._emit_log(ev, body, sev, a, "busted.policy_decision")

    def _lost(self, ev: EventsLost) -> None:
        a = {N["lost_where"]: ev.where.name.lower(), N["lost_count"]: ev.count}
        self._emit_log(ev, f"{ev.count} events lost at {ev.where.name.lower()}: {ev.detail}", "WARN", a,
                       "busted.events_lost")

    # -- losses -------------------------------------------------------------------------------

    def _lost_total(self) -> int:
        return self._dropped["traces"] + self._dropped["logs"] + self._spans.failed + self._logs.failed

    def _tell_losses(self) -> None:
        """The collector answers again: send what was lost meanwhile as an EventsLost record."""
        total = self._lost_total()
        n, self._lost_told = total - self._lost_told, total
        if n > 0:
            self._lost(EventsLost(ts_ns=time.monotonic_ns(), wall_time=time.time(), where=LossPlace.SINK, count=n,
                                  detail=f"busted.sinks.OtlpSink: {n} spans/log records not exported to "
                                         f"{_shown(self.endpoint)} (collector slow, down or refusing)"))

    def _succeeded(self) -> None:
        if self._lost_told < self._lost_total():
            self._tell_pending = True
        if self._failing is not None:
            self._failing = None
            self._tell(f"otlp {_shown(self.endpoint)}: exports succeed again; {self._lost_total()} spans/log "
                       "records lost so far")

    def _failed(self, signal: str, n: int, why: str | None) -> None:
        self._failing = signal
        self._warn(f"exporting {signal} failed ({why or _last_error.last or 'no reason given'})")

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_warn < self.warn_interval:
            return
        self._last_warn = now
        self._tell(f"otlp {_shown(self.endpoint)}: {what}; {self._lost_total()} spans/log records lost so far "
                   "(the monitor and the other outputs are not held up)")

    def _tell(self, msg: str) -> None:
        if self._report is not None:  # closed: the report told the end; a retry still running stays quiet
            return
        if self.on_error is not None:
            try:
                self.on_error(msg)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the output
                pass

    # -- end ----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Nothing to do here: the batch processors' threads send on their own schedule (a flush
        here would export in the caller's thread and could block it on a slow collector)."""

    def close(self) -> None:
        """Send what is queued (and open MCP requests, and the metrics' last reading), for at most
        ``shutdown_timeout`` seconds; what did not make it is counted (``report()``). Idempotent."""
        if self._closed:
            return
        for req in list(self._mcp.values()):
            self._mcp_span(req, None)
        self._mcp.clear()
        self._closed = True
        # Each shuts down in a thread of its own, in parallel, waited for until one deadline: an
        # exporter stuck in a retry does not hold us past it (its thread is a daemon; what it held
        # is counted as not sent). The span and log processors' shutdown() take no timeout.
        self._metric_stop.set()
        def stop_metrics() -> None:
            if self.metrics:
                self._metric_thread.join()

        jobs = (stop_metrics, self._span_proc.shutdown, self._log_proc.shutdown)
        threads = [threading.Thread(target=_quietly, args=(job,), name="busted-otlp-close", daemon=True)
                   for job in jobs]
        for th in threads:
            th.start()
        deadline = time.monotonic() + self.shutdown_timeout
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        self._report = self._make_report()

    def _make_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for signal, c in (("traces", self._spans), ("logs", self._logs)):
            unsent = max(0, self._accepted[signal] - c.ok - c.failed) if self._closed else 0
            out[signal] = {"exported": c.ok, "dropped": self._dropped[signal], "failed": c.failed, "unsent": unsent,
                           "lost": self._dropped[signal] + c.failed + unsent}
        t, lg = out["traces"], out["logs"]
        lost = t["lost"] + lg["lost"]
        dropped, failed, unsent = (t[k] + lg[k] for k in ("dropped", "failed", "unsent"))
        parts = [f"{k} {v}" for k, v in (("dropped, queue full", dropped), ("export failed", failed),
                                          ("not sent at close", unsent)) if v]
        text = (f"otlp {_shown(self.endpoint)} ({self.protocol}): {t['exported']} spans and {lg['exported']} log "
                f"records exported, {lost} lost" + (f" ({', '.join(parts)})" if parts else "")
                + (f"; {self._metrics.failed} metric exports failed" if self._metrics.failed else ""))
        return {"spans": t["exported"], "logs": lg["exported"], "exported": t["exported"] + lg["exported"],
                "lost": lost, "dropped": dropped, "failed": failed, "unsent": unsent, "traces": t, "log_records": lg,
                "metric_exports": self._metrics.ok, "metric_failures": self._metrics.failed, "text": text}

    def report(self) -> dict[str, Any]:
        """The truth so far: spans/log records ``exported``, ``lost`` (dropped + failed + not sent
        at close), metric exports, and a one-line ``text``."""
        return self._report if self._report is not None else self._make_report()

    def __enter__(self) -> OtlpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
