"""Prometheus exporter (prometheus_client): per provider/process counters, loss and queue gauges.

Why prometheus_client: it is the reference client, well kept, and gives the standard text
exposition format and HTTP server for free. Its own ``CollectorRegistry`` is used (not the
process-global one), so embedding busted does not mix metrics. Bound to 127.0.0.1 by default:
labels carry process names, which a wider bind would expose.
"""

from __future__ import annotations

import threading
from typing import Any

from busted.events import DnsAnswer, Event, EventsLost, FlowClosed, FlowOpened

__all__ = ["PrometheusExporter"]


class PrometheusExporter:
    """``observe(event)`` (alias ``write``) updates the metrics; ``start()`` serves them on ``addr``."""

    def __init__(self, addr: str = "127.0.0.1:9464", registry: Any = None, *, max_label_sets: int = 1000) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge
        except ImportError as exc:  # pragma: no cover - depends on the install
            from busted.errors import EnvironmentProblem

            raise EnvironmentProblem("the Prometheus exporter needs prometheus_client: "
                                     "pip install 'busted[metrics]'") from exc
        host, _, port = addr.rpartition(":")
        self.host = (host or "127.0.0.1").strip("[]")
        self.port = int(port)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.flows = Counter("busted_flows", "TCP flows opened", ["provider", "comm", "direction"], registry=r)
        self.bytes_sent = Counter("busted_bytes_sent", "Bytes sent on closed flows", ["provider", "comm"],
                                  registry=r)
        self.bytes_received = Counter("busted_bytes_received", "Bytes received on closed flows",
                                      ["provider", "comm"], registry=r)
        self.dns = Counter("busted_dns_answers", "DNS answers seen", ["provider"], registry=r)
        self.calls = Counter("busted_llm_calls", "LLM API calls", ["provider", "model", "comm"], registry=r)
        self.tokens = Counter("busted_llm_tokens", "LLM tokens", ["provider", "model", "comm", "kind"], registry=r)
        self.lost = Counter("busted_events_lost", "Events lost, by place", ["where"], registry=r)
        self.queue_depth = Gauge("busted_queue_depth", "Events waiting in the Monitor's queue", registry=r)
        self.open_flows = Gauge("busted_flows_open", "Flows currently open", registry=r)
        self.max_label_sets = max_label_sets
        self._comms: set[str] = set()
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: Any = None

    def _comm(self, comm: str | None) -> str:
        c = comm or "?"
        with self._lock:
            if c in self._comms:
                return c
            if len(self._comms) >= self.max_label_sets:
                return "other"  # bounded cardinality
            self._comms.add(c)
            return c

    def observe(self, ev: Event) -> None:
        if isinstance(ev, FlowOpened):
            self.flows.labels(ev.provider or "none", self._comm(ev.comm), ev.direction.name.lower()).inc()
            self.open_flows.inc()
        elif isinstance(ev, FlowClosed):
            comm = self._comm(ev.comm)
            self.bytes_sent.labels(ev.provider or "none", comm).inc(ev.bytes_sent)
            self.bytes_received.labels(ev.provider or "none", comm).inc(ev.bytes_received)
            self.open_flows.dec()
        elif isinstance(ev, DnsAnswer):
            self.dns.labels(getattr(ev, "provider", None) or "none").inc()
        elif isinstance(ev, EventsLost):
            self.lost.labels(ev.where.name.lower()).inc(ev.count)
        elif hasattr(ev, "model") and hasattr(ev, "provider"):  # LLM call events, duck-typed
            prov, model, comm = ev.provider or "none", getattr(ev, "model", None) or "unknown", self._comm(
                getattr(ev, "comm", None))
            self.calls.labels(prov, model, comm).inc()
            for kind in ("input", "output"):
                n = getattr(ev, f"{kind}_tokens", None)
                if n:
                    self.tokens.labels(prov, model, comm, kind).inc(n)

    write = observe

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def start(self) -> PrometheusExporter:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_port
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
