"""Real OTLP endpoints for tests, on loopback: OTLP/HTTP (http.server) and OTLP/gRPC (grpcio with
opentelemetry-proto's service stubs). They keep every request's raw bytes and decode them with
opentelemetry-proto's messages. ``mode``: "ok", "503" (HTTP) / "exhausted" (gRPC
RESOURCE_EXHAUSTED), "sleep" (answer after ``delay`` seconds), or "block" (answer once ``gate``
is set, at most after 30 s)."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb

_MESSAGES = {"traces": (trace_pb.ExportTraceServiceRequest, trace_pb.ExportTraceServiceResponse),
             "metrics": (metrics_pb.ExportMetricsServiceRequest, metrics_pb.ExportMetricsServiceResponse),
             "logs": (logs_pb.ExportLogsServiceRequest, logs_pb.ExportLogsServiceResponse)}


def value(v: Any) -> Any:
    """An AnyValue as a Python value."""
    which = v.WhichOneof("value")
    if which == "array_value":
        return [value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    return None if which is None else getattr(v, which)


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


class _Base:
    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        self.mode, self.delay = mode, delay
        self.lock = threading.Lock()
        self.raw: list[tuple[str, dict[str, str], bytes]] = []  # (signal, headers, body)
        self.requests: dict[str, list[Any]] = {"traces": [], "metrics": [], "logs": []}
        self.refused = 0
        self.gate = threading.Event()

    def _hold(self) -> None:
        if self.mode == "sleep":
            time.sleep(self.delay)
        elif self.mode == "block":
            self.gate.wait(30)

    def _take(self, signal: str, headers: dict[str, str], body: bytes) -> None:
        req = _MESSAGES[signal][0]()
        req.ParseFromString(body)
        with self.lock:
            self.raw.append((signal, headers, body))
            self.requests[signal].append(req)

    def all_bytes(self) -> bytes:
        with self.lock:
            return b"".join(b for _, _, b in self.raw)

    def spans(self) -> list[dict[str, Any]]:
        out = []
        with self.lock:
            reqs = list(self.requests["traces"])
        for req in reqs:
            for rs in req.resource_spans:
                res = attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        out.append({"name": sp.name, "kind": sp.kind, "attrs": attrs(sp.attributes),
                                    "start": sp.start_time_unix_nano, "end": sp.end_time_unix_nano,
                                    "status": sp.status.code, "resource": res, "scope": ss.scope.name,
                                    "schema_url": ss.schema_url})
        return out

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """metric name -> its points in the last request that had it (cumulative temporality)."""
        out: dict[str, list[dict[str, Any]]] = {}
        with self.lock:
            reqs = list(self.requests["metrics"])
        for req in reqs:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        which = m.WhichOneof("data")
                        pts = []
                        for p in getattr(m, which).data_points:
                            d = {"attrs": attrs(p.attributes), "unit": m.unit}
                            if which == "histogram":
                                d.update(count=p.count, sum=p.sum, bounds=list(p.explicit_bounds))
                            else:
                                d.update(value=p.as_double if p.WhichOneof("value") == "as_double" else p.as_int)
                            pts.append(d)
                        out[m.name] = pts
        return out

    def logs(self) -> list[dict[str, Any]]:
        out = []
        with self.lock:
            reqs = list(self.requests["logs"])
        for req in reqs:
            for rl in req.resource_logs:
                for sl in rl.scope_logs:
                    for r in sl.log_records:
                        out.append({"body": value(r.body), "attrs": attrs(r.attributes),
                                    "severity": r.severity_text, "event_name": r.event_name,
                                    "time": r.time_unix_nano})
        return out

    def wait(self, pred: Any, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.05)
        return bool(pred())


class HttpReceiver(_Base):
    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        super().__init__(mode, delay)
        recv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                signal = {"/v1/traces": "traces", "/v1/metrics": "metrics", "/v1/logs": "logs"}.get(self.path)
                if signal is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                recv._hold()
                if recv.mode == "503":
                    with recv.lock:
                        recv.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                recv._take(signal, {k.lower(): v for k, v in self.headers.items()}, body)
                resp = _MESSAGES[signal][1]().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(resp)))
                self.end_headers()
                self.wfile.write(resp)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HttpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GrpcReceiver(_Base):
    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        import grpc
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc

        super().__init__(mode, delay)
        recv = self

        def handle(signal: str, request: Any, context: Any) -> Any:
            recv._hold()
            if recv.mode == "exhausted":
                with recv.lock:
                    recv.refused += 1
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "test receiver: exhausted")
            recv._take(signal, {k: v for k, v in context.invocation_metadata()}, request.SerializeToString())
            return _MESSAGES[signal][1]()

        class Traces(trace_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the stub's name
                return handle("traces", request, context)

        class Metrics(metrics_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                return handle("metrics", request, context)

        class Logs(logs_grpc.LogsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                return handle("logs", request, context)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        logs_grpc.add_LogsServiceServicer_to_server(Logs(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server.start()

    def close(self) -> None:
        self.gate.set()
        self.server.stop(grace=None)

    def __enter__(self) -> GrpcReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
