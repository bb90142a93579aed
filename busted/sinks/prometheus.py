"""Prometheus exporter (prometheus_client): per provider/process counters, loss and queue gauges.

Why prometheus_client: it is the reference client, well kept, and gives the standard text
exposition format and HTTP server for free. Its own ``CollectorRegistry`` is used (not the
process-global one), so embedding busted does not mix metrics with the host application's.

Bound to 127.0.0.1 by default: labels carry process names (``comm``), which binding 0.0.0.0 would
expose to anyone who can reach the port.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from busted.errors import EnvironmentProblem
from busted.events import DnsAnswer, Event, EventsLost, FlowClassified, FlowClosed, FlowEvent, FlowOpened

__all__ = ["PrometheusExporter"]

NONE = "none"  # provider label of flows not tied to an LLM provider
OTHER = "other"  # comm/model label values beyond the cardinality cap


def _parse_addr(addr: str) -> tuple[str, int]:
    """"127.0.0.1:9464", "[::1]:9464", ":9464", "9464" -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep and addr.isdigit():
        host, port = "", addr
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise EnvironmentProblem(f"metrics address {addr!r}: expected HOST:PORT, "
                                 "e.g. 127.0.0.1:9464") from None
    return host, p


class PrometheusExporter:
    """``observe(event)`` (alias ``write``) updates the metrics; ``start()`` serves them on ``addr``.

    Metrics (see docs/outputs.md): busted_flows_total{provider,comm,direction},
    busted_bytes_{sent,received}_total{provider,comm}, busted_dns_answers_total{provider},
    busted_llm_calls_total{provider,model,comm}, busted_llm_tokens_total{provider,model,comm,kind},
    busted_events_lost_total{where}, gauges busted_queue_depth and busted_flows_open.

    A flow is counted once, as soon as its provider is known (at open, or at its FlowClassified),
    else at close as provider="none". Each metric keeps at most ``max_label_sets`` label sets;
    beyond that new ``comm`` (and ``model``) values are folded into "other".
    """

    def __init__(self, addr: str = "127.0.0.1:9464", registry: Any = None, *, max_label_sets: int = 1000,
                 catalog: Any = None, max_open_flows: int = 1_000_000) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EnvironmentProblem("the Prometheus exporter needs prometheus_client: "
                                     "pip install 'busted[metrics]'") from exc
        self.addr = addr
        self.host, self.port = _parse_addr(addr)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.flows = Counter("busted_flows", "TCP flows, counted once when their provider is known "
                             "(or at close)", ["provider", "comm", "direction"], registry=r)
        self.bytes_sent = Counter("busted_bytes_sent", "Bytes sent on closed flows", ["provider", "comm"],
                                  registry=r)
        self.bytes_received = Counter("busted_bytes_received", "Bytes received on closed flows",
                                      ["provider", "comm"], registry=r)
        self.dns = Counter("busted_dns_answers", "DNS answers seen, by the provider the name belongs to",
                           ["provider"], registry=r)
        self.calls = Counter("busted_llm_calls", "LLM API calls", ["provider", "model", "comm"], registry=r)
        self.tokens = Counter("busted_llm_tokens", "LLM tokens", ["provider", "model", "comm", "kind"],
                              registry=r)
        self.lost = Counter("busted_events_lost", "Events lost, by place", ["where"], registry=r)
        self.queue_depth = Gauge("busted_queue_depth", "Events waiting in the Monitor's queue", registry=r)
        self.open_flows = Gauge("busted_flows_open", "Flows currently open (seen opening, not yet closed)",
                                registry=r)
        self.max_label_sets = max_label_sets
        self.max_open_flows = max_open_flows
        self._catalog = catalog
        self._seen: dict[int, set[tuple[str, ...]]] = collections.defaultdict(set)
        self._open: dict[int, bool] = {}  # flow_id -> already counted in busted_flows_total
        self._dns_cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: Any = None

    # -- labels ------------------------------------------------------------------------------

    def _labels(self, metric: Any, *values: str, fold: tuple[int, ...] = ()) -> Any:
        """``metric.labels(*values)``, with new label sets beyond the cap folded (positions in
        ``fold`` become "other"). Caller holds the lock."""
        seen = self._seen[id(metric)]
        if values not in seen:
            if len(seen) >= self.max_label_sets:
                values = tuple(OTHER if i in fold else v for i, v in enumerate(values))
            seen.add(values)  # folded sets are few: bounded by the unfolded labels' values
        return metric.labels(*values)

    def _count_flow(self, ev: FlowEvent) -> None:
        direction = ev.direction.name.lower()
        self._labels(self.flows, ev.provider or NONE, ev.comm or "?", direction, fold=(1,)).inc()

    def _dns_provider(self, ev: DnsAnswer) -> str:
        prov = getattr(ev, "provider", None)
        if prov:
            return str(prov)
        if self._catalog is None:
            try:
                from busted.classify.providers import Catalog

                self._catalog = Catalog.builtin()
            except Exception:  # noqa: BLE001 - the label is best effort
                self._catalog = False
        if not self._catalog:
            return NONE
        hit = self._dns_cache.get(ev.qname)
        if hit is None:
            hit = NONE
            for name in (ev.qname, *ev.cname_chain, *(r.value for r in ev.answers if r.rtype == "CNAME")):
                m = self._catalog.match_host(name)
                if m is not None:
                    hit = m.id
                    break
            if len(self._dns_cache) >= 10_000:
                self._dns_cache.clear()
            self._dns_cache[ev.qname] = hit
        return hit

    # -- events ------------------------------------------------------------------------------

    def observe(self, ev: Event) -> None:
        with self._lock:
            self._observe(ev)

    write = observe

    def _observe(self, ev: Event) -> None:
        if isinstance(ev, FlowOpened):
            if ev.flow_id in self._open:
                return
            if len(self._open) >= self.max_open_flows:  # closes lost: forget the oldest
                self._open.pop(next(iter(self._open)))
            self._open[ev.flow_id] = bool(ev.provider)
            if ev.provider:
                self._count_flow(ev)
        elif isinstance(ev, FlowClassified):
            if ev.provider and self._open.get(ev.flow_id) is False:
                self._open[ev.flow_id] = True
                self._count_flow(ev)
        elif isinstance(ev, FlowClosed):
            if not self._open.pop(ev.flow_id, False):
                self._count_flow(ev)
            prov, comm = ev.provider or NONE, ev.comm or "?"
            self._labels(self.bytes_sent, prov, comm, fold=(1,)).inc(max(0, ev.bytes_sent))
            self._labels(self.bytes_received, prov, comm, fold=(1,)).inc(max(0, ev.bytes_received))
        elif isinstance(ev, DnsAnswer):
            self._labels(self.dns, self._dns_provider(ev)).inc()
        elif isinstance(ev, EventsLost):
            self._labels(self.lost, ev.where.name.lower()).inc(max(0, ev.count))
        elif not isinstance(ev, FlowEvent) and hasattr(ev, "provider") and hasattr(ev, "model"):
            # LLM-call events, duck-typed until they exist: provider, model, comm, *_tokens
            prov = str(getattr(ev, "provider", None) or NONE)
            model = str(getattr(ev, "model", None) or "unknown")
            comm = str(getattr(ev, "comm", None) or "?")
            self._labels(self.calls, prov, model, comm, fold=(1, 2)).inc()
            for kind in ("input", "output"):
                n = getattr(ev, f"{kind}_tokens", None)
                if isinstance(n, int) and n > 0:
                    self._labels(self.tokens, prov, model, comm, kind, fold=(1, 2)).inc(n)
        self.open_flows.set(len(self._open))

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def flush(self) -> None:
        """Nothing is buffered; present for the Sink protocol."""

    # -- serving -----------------------------------------------------------------------------

    def start(self) -> PrometheusExporter:
        """Serve /metrics on ``addr`` (port 0 picks a free port; ``self.port`` tells which)."""
        if self._server is not None:
            return self
        from prometheus_client import start_http_server

        try:
            started = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot serve metrics on {self.host}:{self.port} "
                                     f"({exc.strerror or exc}); choose another --metrics address or stop "
                                     "what holds the port") from exc
        if isinstance(started, tuple):  # prometheus_client >= 0.20 returns (server, thread)
            self._server, self._thread = started
            self.port = self._server.server_port
        return self

    def close(self) -> None:
        """Stop serving. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)

    def __enter__(self) -> PrometheusExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
