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
from typing import TYPE_CHECKING, Any, Literal

from cachetools import LRUCache

from busted.errors import EnvironmentProblem, MissingDependency, UsageError
from busted.events import (
    BudgetExceeded,
    BudgetSpend,
    DnsAnswer,
    Event,
    EventsLost,
    FlowClosed,
    FlowEvent,
    FlowSummary,
    LlmCall,
    McpMessage,
    PolicyDecision,
)
from busted.redact import redact_text
from busted.sinks.flowview import FlowView

if TYPE_CHECKING:
    from busted.classify.providers import Catalog

__all__ = ["PrometheusExporter"]

NONE = "none"  # provider label of flows not tied to an LLM provider; agent/container label when unknown
OTHER = "other"  # label values beyond the cardinality caps
CONTAINER_ID_CHARS = 12  # the container label: the id's first 12 characters, as docker/crictl print it


def _label(value: str) -> str:
    """A label value taken from the wire (a model or method name): credentials masked, length bounded."""
    return redact_text(value)[:128]


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
        raise UsageError(f"metrics address {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9464") from None
    return host, p


class PrometheusExporter:
    """``observe(event)`` (alias ``write``) updates the metrics; ``start()`` serves them on ``addr``.

    Metrics (see docs/outputs.md): busted_flows_total{provider,comm,direction,agent,container},
    busted_bytes_{sent,received}_total{provider,comm,agent,container}, busted_dns_answers_total{provider},
    busted_events_lost_total{where}, the LLM/MCP/policy counters, busted_label_values_folded_total{label},
    gauges busted_queue_depth and busted_flows_open.

    A flow is counted once, as soon as its provider is known (at open, or at its FlowClassified),
    else at close as provider="none" (a busy-host ``FlowSummary`` adds its flows and bytes there
    too); flow state comes from one ``FlowView`` (at most
    ``max_open_flows`` open flows). Each metric keeps at most ``max_label_sets`` label sets; beyond
    that new ``comm`` (and ``model``, MCP ``method``) values are folded into "other". The ``agent``
    and ``container`` labels (who is behind a flow, docs/agents.md; never a pid) each take at most
    ``max_label_values`` distinct values; later new values are "other", and every event so folded
    counts in ``busted_label_values_folded_total{label}``.

    DNS answers are labelled with the provider the answer itself carries (if its event has one),
    else by ``catalog`` (pass the one given to ``Monitor(catalog=...)``), else by the hostnames the
    Monitor's own flow classifications tied to a provider, else by the built-in catalog.
    """

    def __init__(self, addr: str = "127.0.0.1:9464", registry: Any = None, *, max_label_sets: int = 1000,
                 catalog: Catalog | None = None, max_open_flows: int = 1_000_000,
                 max_label_values: int = 64) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise MissingDependency("prometheus_client", "metrics", "the Prometheus exporter") from exc
        self.addr = addr
        self.host, self.port = _parse_addr(addr)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        who = ["agent", "container"]  # who is behind the flow: bounded (max_label_values), never a pid
        self.flows = Counter("busted_flows", "TCP flows, counted once when their provider is known "
                             "(or at close)", ["provider", "comm", "direction", *who], registry=r)
        self.bytes_sent = Counter("busted_bytes_sent", "Bytes sent on closed flows", ["provider", "comm", *who],
                                  registry=r)
        self.bytes_received = Counter("busted_bytes_received", "Bytes received on closed flows",
                                      ["provider", "comm", *who], registry=r)
        self.dns = Counter("busted_dns_answers", "DNS answers seen, by the provider the name belongs to",
                           ["provider"], registry=r)
        self.lost = Counter("busted_events_lost", "Events lost, by place", ["where"], registry=r)
        llm = ["provider", "model", "comm", *who]
        self.llm_calls = Counter("busted_llm_calls", "LLM API calls, by HTTP status class (2xx, 4xx, 5xx; "
                                 "'unknown' when no status was seen, 'incomplete' when the flow ended first)",
                                 [*llm, "status_class"], registry=r)
        self.llm_tokens = Counter("busted_llm_tokens", "Tokens the LLM APIs reported, by type (input includes "
                                  "cache reads and writes)", [*llm, "type"], registry=r)
        self.llm_cost = Counter("busted_llm_cost_usd", "Estimated spend in USD (tokens x list price; calls "
                                "to models without a known price add nothing)", llm, registry=r)
        self.mcp = Counter("busted_mcp_messages", "MCP JSON-RPC messages, by method ('response' for "
                           "responses)", ["method", "comm"], registry=r)
        self.policy = Counter("busted_policy_decisions", "Policy decisions, by rule, action, whether the "
                              "kernel enforced it, and where it was decided", ["rule", "action", "enforced", "point"],
                              registry=r)
        self.folded = Counter("busted_label_values_folded", "Events whose agent or container label was "
                              "counted as 'other' (more distinct values than the cap)", ["label"], registry=r)
        # budgets (docs/policy.md "Budgets"): the scope label is capped like agent/container
        self.budget_spent = Gauge("busted_budget_spent", "A budget's spend for one scope in its current window "
                                  "(as last reported; busted_budget_window_end_seconds says when that window ends)",
                                  ["budget", "per", "scope", "unit"], registry=r)
        self.budget_limit = Gauge("busted_budget_limit", "A budget's limit per scope and window", ["budget", "unit"],
                                  registry=r)
        self.budget_window_end = Gauge("busted_budget_window_end_seconds", "UNIX time the reported window of a "
                                       "budget's scope ends", ["budget", "per", "scope"], registry=r)
        self.budget_exceeded = Counter("busted_budget_exceeded", "Budgets exhausted (once per scope and window), "
                                       "by action and whether the kernel refuses the scope",
                                       ["budget", "action", "enforced"], registry=r)
        self.queue_depth = Gauge("busted_queue_depth", "Events waiting in the Monitor's queue", registry=r)
        self.open_flows = Gauge("busted_flows_open", "Flows currently open (seen opening, not yet closed)",
                                registry=r)
        self.max_label_sets = max_label_sets
        self.max_label_values = max(1, max_label_values)
        self._values: dict[str, set[str]] = {"agent": set(), "container": set(), "scope": set(), "budget": set()}
        self.view = FlowView(max_flows=max_open_flows)
        self._catalog = catalog
        self._builtin: Catalog | None | Literal[False] = None  # loaded on first need; False: unavailable
        self._seen: dict[int, set[tuple[str, ...]]] = collections.defaultdict(set)
        self._learned: collections.OrderedDict[str, str] = collections.OrderedDict()  # hostname -> provider
        self._dns_cache: LRUCache[str, str] = LRUCache(maxsize=10_000)
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: Any = None

    # -- labels ------------------------------------------------------------------------------

    def _labels(self, metric: Any, *values: str, fold: tuple[int, ...] = ()) -> Any:
        """``metric.labels(*values)``, with new label sets beyond the cap folded (positions in
        ``fold`` become "other"; "none" stays: one value adds no cardinality). Caller holds the lock."""
        seen = self._seen[id(metric)]
        if values not in seen:
            if len(seen) >= self.max_label_sets:
                values = tuple(OTHER if i in fold and v != NONE else v for i, v in enumerate(values))
            seen.add(values)  # folded sets are few: bounded by the unfolded labels' values
        return metric.labels(*values)

    def _capped(self, label: str, value: str | None) -> str:
        """``value`` if this label has room for it (or already has it), else "other" (counted).
        Caller holds the lock."""
        if not value:
            return NONE
        seen = self._values[label]
        if value in seen:
            return value
        if len(seen) < self.max_label_values:
            seen.add(value)
            return value
        self.folded.labels(label).inc()
        return OTHER

    def _who(self, ev: FlowEvent | LlmCall) -> tuple[str, str]:
        """The (agent, container) label values of a flow or call, capped."""
        agent = ev.agent[:64] if ev.agent else None  # a catalog id (ours or the user's)
        # A hex id (or an lxc/nspawn name) from the cgroup path: cut before anything could read it
        # as a secret-shaped token.
        container = ev.container_id[:CONTAINER_ID_CHARS] if ev.container_id else None
        return self._capped("agent", agent), self._capped("container", container)

    def _count_flow(self, ev: FlowEvent, provider: str | None) -> None:
        direction = ev.direction.name.lower()
        self._labels(self.flows, provider or NONE, ev.comm or "?", direction, *self._who(ev),
                     fold=(1, 3, 4)).inc()

    def _learn(self, ev: FlowEvent) -> None:
        """Remember which provider the Monitor tied a hostname to (its catalog, whatever it is)."""
        if ev.hostname and ev.provider:
            name = ev.hostname.rstrip(".").lower()
            if self._learned.get(name) != ev.provider:
                self._learned[name] = ev.provider
                self._learned.move_to_end(name)
                self._dns_cache.clear()  # a cached "none" may now be wrong
                while len(self._learned) > 10_000:
                    self._learned.popitem(last=False)

    def _match(self, name: str) -> str | None:
        if self._catalog is not None:
            m = self._catalog.match_host(name)
            return m.id if m is not None else None
        learned = self._learned.get(name.rstrip(".").lower())
        if learned:
            return learned
        if self._builtin is None:
            try:
                from busted.classify.providers import Catalog

                self._builtin = Catalog.builtin()
            except Exception:  # noqa: BLE001 - the label is best effort
                self._builtin = False
        if self._builtin:
            m = self._builtin.match_host(name)
            return m.id if m is not None else None
        return None

    def _dns_provider(self, ev: DnsAnswer) -> str:
        prov = getattr(ev, "provider", None)  # set by the Monitor once answers carry their provider
        if prov:
            return str(prov)
        hit = self._dns_cache.get(ev.qname)
        if hit is None:
            hit = NONE
            for name in (ev.qname, *ev.cname_chain, *(r.value for r in ev.answers if r.rtype == "CNAME")):
                found = self._match(name)
                if found:
                    hit = found
                    break
            self._dns_cache[ev.qname] = hit
        return hit

    # -- events ------------------------------------------------------------------------------

    def observe(self, ev: Event) -> None:
        with self._lock:
            self._observe(ev)

    write = observe

    def _observe(self, ev: Event) -> None:
        if isinstance(ev, FlowEvent):
            self._learn(ev)
            change = self.view.update(ev)
            if change is not None:
                after = change.after
                if change.provider_learned or (isinstance(ev, FlowClosed) and not after.provider):
                    self._count_flow(after.flow, after.provider)
                if isinstance(ev, FlowClosed):
                    labels = (after.provider or NONE, after.comm or "?", *self._who(after.flow))
                    self._labels(self.bytes_sent, *labels, fold=(1, 2, 3)).inc(max(0, after.bytes_sent or 0))
                    self._labels(self.bytes_received, *labels, fold=(1, 2, 3)).inc(
                        max(0, after.bytes_received or 0))
        elif isinstance(ev, FlowSummary):  # busy-host mode: flows judged non-LLM, summed
            comm = ev.comm or "?"
            # a summary has no lineage: agent and container are unknown ("none")
            self._labels(self.flows, NONE, comm, ev.direction.name.lower(), NONE, NONE,
                         fold=(1,)).inc(max(0, ev.count))
            self._labels(self.bytes_sent, NONE, comm, NONE, NONE, fold=(1,)).inc(max(0, ev.bytes_sent))
            self._labels(self.bytes_received, NONE, comm, NONE, NONE, fold=(1,)).inc(max(0, ev.bytes_received))
        elif isinstance(ev, DnsAnswer):
            self._labels(self.dns, self._dns_provider(ev)).inc()
        elif isinstance(ev, LlmCall):
            self._count_call(ev)
        elif isinstance(ev, McpMessage):
            method = _label(ev.jsonrpc_method) if ev.jsonrpc_method else "response"
            self._labels(self.mcp, method, ev.comm or "?", fold=(0, 1)).inc()
        elif isinstance(ev, EventsLost):
            self._labels(self.lost, ev.where.name.lower()).inc(max(0, ev.count))
        elif isinstance(ev, BudgetSpend | BudgetExceeded):
            self._budget(ev)
        elif isinstance(ev, PolicyDecision):
            self._labels(self.policy, _label(ev.rule), ev.action, "true" if ev.enforced else "false", ev.point,
                         fold=(0,)).inc(max(1, ev.count))  # an aggregated event stands for ``count``
        self.open_flows.set(len(self.view))

    def _count_call(self, ev: LlmCall) -> None:
        base = (ev.provider or NONE, _label(ev.response_model or ev.request_model or "?"), ev.comm or "?",
                *self._who(ev))
        fold = (1, 2, 3, 4)  # all but provider: provider ids come from the catalog, a closed set
        if not ev.complete:
            status = "incomplete"
        elif ev.status is None:
            status = "unknown"
        else:
            status = f"{ev.status // 100}xx" if 100 <= ev.status < 600 else "other"
        self._labels(self.llm_calls, *base, status, fold=fold).inc()
        for kind, n in (("input", ev.input_tokens), ("output", ev.output_tokens),
                        ("cache_read", ev.cache_read_tokens), ("cache_write", ev.cache_write_tokens),
                        ("reasoning", ev.reasoning_tokens)):
            if n is not None and n >= 0:  # None (not reported) adds no series; a reported 0 does
                self._labels(self.llm_tokens, *base, kind, fold=fold).inc(n)
        if ev.cost_usd is not None and ev.cost_usd >= 0:
            self._labels(self.llm_cost, *base, fold=fold).inc(ev.cost_usd)

    def _budget(self, ev: BudgetSpend | BudgetExceeded) -> None:
        """Budget gauges: label values are capped (budget names and scopes: ``max_label_values``
        each; a scope beyond the cap is not exported, counted in busted_label_values_folded)."""
        budget = self._capped("budget", _label(ev.budget))
        if isinstance(ev, BudgetExceeded):
            self.budget_exceeded.labels(budget, ev.action, "true" if ev.enforced else "false").inc()
            return
        scope = self._capped("scope", _label(ev.scope))
        for unit, limit in (("tokens", ev.limit_tokens), ("usd", ev.limit_usd)):
            if limit is not None:
                self.budget_limit.labels(budget, unit).set(limit)
        if OTHER in (budget, scope):
            return  # a sum of unrelated scopes' spends would mean nothing
        self.budget_spent.labels(budget, ev.per, scope, "tokens").set(ev.tokens)
        self.budget_spent.labels(budget, ev.per, scope, "usd").set(ev.usd)
        self.budget_window_end.labels(budget, ev.per, scope).set(ev.window_end)

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
