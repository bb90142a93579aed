"""``busted lab``: a network lab with demo LLM traffic, monitored (no internet needed)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from typing import Any, TextIO

from busted._text import printable as _p
from busted.cli.outputs import _monitor_kwargs, _Sinks, _Summary
from busted.cli.render import HEADER, _announce, _col, _install_sigterm, _json, _wants, render
from busted.events import DnsAnswer, Event, LlmCall, TlsClientHello
from busted.sinks import redact

# -- lab ---------------------------------------------------------------------------------------


def _ms(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.1f}"


def _dash(v: int | None) -> str:
    return "-" if v is None else str(v)


class LabCalls:
    """The LLM calls (and MCP messages) of a lab run, as a table: one row per call a client made,
    then a total per provider; then the flows an agent was behind, with their process chain.
    ``names`` maps a pid to its demo client's name: a call's row shows the name of its process or
    of the nearest ancestor that is a demo client (else the comm). Calls seen on accepted
    connections are the lab's fake providers' own view (their TLS library is probed too): counted
    apart, not listed. Every field is from the wire or the kernel: escaped (printable) and cut to
    its column."""

    HEAD = (f"{'CLIENT':<20} {'PID':>7} {'PROVIDER':<13} {'API':<23} {'MODEL (request -> response)':<40} "
            f"{'STREAM':<6} {'IN':>5} {'OUT':>5} {'CACHE R/W':>9} {'TTFT ms':>8} {'DUR ms':>8} {'STATUS':>6} "
            f"{'COST USD':>10}")

    def __init__(self) -> None:
        self.calls: list[LlmCall] = []
        self.server_side = 0
        self.mcp: list[Any] = []
        self.agent_flows: dict[int, Any] = {}  # flow_id -> its latest flow event, for flows with an agent

    def add(self, ev: Event) -> None:
        from busted.events import Direction, FlowEvent, McpMessage

        if isinstance(ev, FlowEvent):
            if ev.agent and ev.direction == Direction.CONNECT and len(self.agent_flows) < 1000:
                self.agent_flows[ev.flow_id] = ev
        elif isinstance(ev, LlmCall):
            if ev.direction == Direction.ACCEPT:
                self.server_side += 1
            else:
                self.calls.append(ev)
        elif isinstance(ev, McpMessage):
            self.mcp.append(ev)

    @staticmethod
    def _model(c: LlmCall) -> str:
        req, resp = c.request_model or "-", c.response_model
        return req if resp is None or resp == req else f"{req} -> {resp}"

    @staticmethod
    def client(ev: Any, names: dict[int, str]) -> str:
        """The demo client behind an event: its process's name in ``names``, else its nearest
        ancestor's (an agent's tool runs curl: the row is the agent client's), else the comm."""
        for pid in (ev.pid, *(a.pid for a in ev.ancestry or ())):
            if pid in names:
                return names[pid]
        return ev.comm

    @staticmethod
    def chain(ev: Any) -> str:
        """``curl[12] <- bash[11] <- claude[10] <- ...``: the ancestry, nearest first (escaped)."""
        return _p(" <- ".join(f"{a.comm}[{a.pid}]" for a in ev.ancestry or ()) or "?")

    def agents_text(self, names: dict[int, str]) -> str:
        """One line per flow an agent was behind: the agent, its evidence and the process chain."""
        if not self.agent_flows:
            return "Agents: none seen behind the lab's flows"
        lines = [f"Agents behind flows: {len(self.agent_flows)}"]
        for ev in sorted(self.agent_flows.values(), key=lambda e: e.ts_ns):
            lines.append(_p(f"{_col(self.client(ev, names), 20)} {ev.comm} -> {ev.hostname or ev.daddr}:{ev.dport}"
                            f"  agent {ev.agent} (pid {ev.agent_pid}, {ev.agent_evidence})  chain ")
                         + self.chain(ev))
        return "\n".join(lines)

    def row(self, c: LlmCall, names: dict[int, str]) -> str:
        cache = "-" if c.cache_read_tokens is None and c.cache_write_tokens is None else \
            f"{_dash(c.cache_read_tokens)}/{_dash(c.cache_write_tokens)}"
        stream = "-" if c.stream is None else "yes" if c.stream else "no"
        status = _dash(c.status) + ("" if c.complete else "*")
        if c.error_type:
            status += f" {c.error_type}"
        cost = "-" if c.cost_usd is None else f"{c.cost_usd:.6f}"
        return _p(f"{_col(self.client(c, names), 20)} {c.pid:>7} {_col(c.provider or '-', 13)} "
                  f"{_col(c.api, 23)} {_col(self._model(c), 40)} {stream:<6} {_dash(c.input_tokens):>5} "
                  f"{_dash(c.output_tokens):>5} {cache:>9} {_ms(c.time_to_first_token_ns):>8} "
                  f"{_ms(c.duration_ns):>8} {status:>6} {cost:>10}")

    @classmethod
    def live(cls, ev: Event) -> str | None:
        """One short line for the lab's live table view, or None for other events (the full JSON
        of a call is what --json gives)."""
        from busted.events import Direction, McpMessage

        t = time.strftime("%H:%M:%S", time.localtime(ev.wall_time))
        if isinstance(ev, LlmCall):
            d = "in" if ev.direction == Direction.ACCEPT else "out"
            return _p(f"{t:<8} {'llm-call':<10} {ev.pid:>7} {_col(ev.comm, 15)} {d:<3} {ev.provider or '-'} "
                      f"{ev.api} {cls._model(ev)} tokens {_dash(ev.input_tokens)}/{_dash(ev.output_tokens)} "
                      f"ttft {_ms(ev.time_to_first_token_ns)} ms status {_dash(ev.status)}")
        if isinstance(ev, McpMessage):
            d = "out" if ev.direction_sent else "in"
            return _p(f"{t:<8} {'mcp':<10} {ev.pid:>7} {_col(ev.comm, 15)} {d:<3} {ev.jsonrpc_method or '-'} "
                      f"{ev.tool or ''}")
        return None

    def totals(self) -> list[dict[str, Any]]:
        """Per provider (None: a call recognised by shape on a flow no catalog entry names):
        calls, tokens in/out (unknown counts as absent, not 0), cost of the priced calls."""
        by: dict[str | None, dict[str, Any]] = {}
        for c in self.calls:
            t = by.setdefault(c.provider, {"provider": c.provider, "calls": 0, "input_tokens": 0,
                                           "output_tokens": 0, "cost_usd": 0.0, "unpriced": 0})
            t["calls"] += 1
            t["input_tokens"] += c.input_tokens or 0
            t["output_tokens"] += c.output_tokens or 0
            if c.cost_usd is None:
                t["unpriced"] += 1
            else:
                t["cost_usd"] += c.cost_usd
        return sorted(by.values(), key=lambda t: (-t["calls"], t["provider"] or ""))

    def text(self, names: dict[int, str]) -> str:
        return self.calls_text(names) + "\n" + self.agents_text(names)

    def calls_text(self, names: dict[int, str]) -> str:
        if not self.calls and not self.mcp:
            return "LLM calls: none seen" + (f" ({self.server_side} on the lab servers' side)"
                                             if self.server_side else "")
        lines = [f"LLM calls: {len(self.calls)}", self.HEAD]
        lines += [self.row(c, names) for c in sorted(self.calls, key=lambda c: c.ts_ns)]
        if any(not c.complete for c in self.calls):
            lines.append("  (* the response's end was not seen: the connection ended first)")
        for t in self.totals():
            if t["unpriced"] == t["calls"]:
                cost = "cost unknown (no price for the model)"
            else:
                cost = f"${t['cost_usd']:.6f}" + (f" (+{t['unpriced']} unpriced)" if t["unpriced"] else "")
            lines.append(_p(f"total {t['provider'] or '(unnamed host)'}: {t['calls']} calls, "
                            f"{t['input_tokens']} tokens in, {t['output_tokens']} out, {cost}"))
        if self.server_side:
            lines.append(f"(and {self.server_side} calls seen from the lab's fake providers' side of the same "
                         "connections, not listed)")
        if self.mcp:
            lines.append(f"MCP messages: {len(self.mcp)}")
            lines.append(f"{'CLIENT':<20} {'PID':>7} {'DIR':<4} {'METHOD':<24} {'TOOL':<20} {'ID':<8} SESSION")
            for m in self.mcp:
                lines.append(_p(f"{_col(self.client(m, names), 20)} {m.pid:>7} "
                                f"{'out' if m.direction_sent else 'in':<4} {_col(m.jsonrpc_method or '-', 24)} "
                                f"{_col(m.tool or '-', 20)} {_col(m.jsonrpc_id or '-', 8)} "
                                f"{_p(m.session_id or '-')[:36]}"))
        return "\n".join(lines)


def _lab(args: argparse.Namespace, out: TextIO) -> int:
    import busted
    from busted.lab import Lab

    summary = _Summary()
    calls = LabCalls()
    stop = threading.Event()
    _install_sigterm(stop)
    results: list[Any] = []
    sinks = _Sinks(args)  # outputs first: a bad path fails before namespaces or BPF exist
    started = False
    try:
        with contextlib.ExitStack() as stack:
            print("busted lab: starting network namespaces, lab DNS and fake LLM providers ...", file=sys.stderr)
            lab = stack.enter_context(Lab())
            mon = stack.enter_context(busted.Monitor(busted.MonitorOptions(**_monitor_kwargs(args))))
            started = True
            sinks.started(mon)
            _run_lab(args, out, lab, mon, sinks, summary, calls, results, stop)
    finally:
        if started:
            sinks.close()
        else:
            sinks.abort()  # the lab or the probes failed: leave no output files behind
    # The calls table: on stdout with the table view; with NDJSON on stdout (--json, or stdout not
    # a terminal) on stderr, so stdout stays one JSON object per line and the main job still shows it.
    as_json = args.json or not out.isatty()
    names = {r.pid: r.name for r in results if r.pid}
    table = calls.text(names)
    if as_json:
        print(table, file=sys.stderr)
    else:
        out.write("\n" + table + "\n")
        out.flush()
    print(summary.text(), file=sys.stderr)
    ok = sum(1 for r in results if r.returncode == 0)
    skipped = [f"{r.name} ({r.skipped})" for r in results if r.skipped]
    if skipped:
        print(_p(f"busted lab: skipped {', '.join(skipped)}"), file=sys.stderr)
    print(f"busted lab: {ok}/{len(results)} demo clients succeeded; lab torn down", file=sys.stderr)
    return 0


def _run_lab(args: argparse.Namespace, out: TextIO, lab: Any, mon: Any, sinks: _Sinks, summary: _Summary,
             calls: LabCalls, results: list[Any], stop: threading.Event) -> None:
    from busted.lab import demo_traffic

    as_json = args.json or not out.isatty()
    _announce(mon)
    print(f"busted lab: client namespace {lab.client_ns}, lab DNS {lab.dns_addr}; running demo clients",
          file=sys.stderr)
    worker = threading.Thread(target=lambda: results.extend(demo_traffic(lab, rounds=args.rounds)),
                              daemon=True)
    worker.start()
    if not as_json:
        out.write(HEADER + "\n")

    def show(ev: Event) -> None:
        if not _in_lab(ev, lab):
            return
        summary.add(ev)
        sinks.write(ev, mon.stats().queue_depth)
        if _wants(ev, args.provider):
            calls.add(ev)
            out.write((_json(redact(ev.to_dict())) if as_json else LabCalls.live(ev) or render(ev)) + "\n")
            out.flush()

    try:
        while worker.is_alive() and not stop.is_set():
            for ev in mon.events(timeout=0.5, stop_event=stop):
                show(ev)
                if not worker.is_alive():
                    break
            sinks.tick()  # idle (or the demo ended): the page gets what it was held back
        # The demo is done: take what is still in flight (closes, late answers), bounded.
        end = time.monotonic() + 3.0
        for ev in mon.events(timeout=1.0, stop_event=stop):
            show(ev)
            if time.monotonic() >= end:
                break
    except KeyboardInterrupt:
        pass


def _in_lab(ev: Event, lab: Any) -> bool:
    """Only show what the lab's clients did (the host may have other traffic)."""
    from busted.events import FlowIdentity

    addrs: set[str] = set()
    for h in lab.hosts.values():
        addrs.update(a for a in h.addresses if a)
    if isinstance(ev, FlowIdentity):  # flow events, LLM calls, MCP messages
        return ev.daddr in addrs or ev.saddr in addrs
    if isinstance(ev, TlsClientHello):
        return ev.daddr in addrs
    if isinstance(ev, DnsAnswer):
        return ev.server in (None, lab.dns_addr) and any(a in addrs for a in ev.addresses) or \
            ev.rcode != "NOERROR"
    return True
