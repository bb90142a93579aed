"""What every live command shares: one line per event for a terminal, the JSON line, stderr notes, signals."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from busted._text import printable as _p
from busted.events import (
    DnsAnswer,
    Event,
    EventsLost,
    FlowClassified,
    FlowClosed,
    FlowEvent,
    FlowIdentity,
    FlowOpened,
    FlowSummary,
    LlmCall,
    McpMessage,
    TlsClientHello,
)
from busted.sinks import encode as _encode_event

# -- rendering ---------------------------------------------------------------------------------
# Every string from the kernel or the wire (comm, SNI, DNS names, hostnames) is attacker-chosen:
# table output passes it through printable() so it cannot drive the terminal. --json output is
# busted.sinks.dumps (json.dumps with ensure_ascii=True, or orjson where it writes the same): exact,
# and only printable ASCII.


def _ep(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _col(s: str | None, width: int) -> str:
    """An attacker-controlled field, escaped, then cut and padded to its column."""
    return f"{_p(s or '')[:width]:<{width}}"


HEADER = f"{'TIME':<8} {'EVENT':<10} {'PID':>7} {'COMM':<15} {'DIR':<3} {'LOCAL':<22} {'REMOTE':<22} " \
         f"{'PROVIDER/HOST':<34} {'TX':>7} {'RX':>7}"


def _n(v: int | None) -> str:
    return "?" if v is None else str(v)


def _cost(usd: float | None) -> str:
    if usd is None:
        return "?"
    return f"${usd:.6f}" if usd < 0.01 else f"${usd:.4f}" if usd < 1 else f"${usd:.2f}"


def _render_call(t: str, ev: LlmCall) -> str:
    """provider/host, endpoint, model, tokens in/out, TTFT, status, cost: the fields people ask for."""
    who = " ".join(x for x in (ev.provider or "-", ev.hostname) if x)
    model = ev.response_model or ev.request_model or "?"
    ttft = "?" if ev.time_to_first_token_ns is None else f"{ev.time_to_first_token_ns / 1e6:.0f}ms"
    status = _n(ev.status) + ("" if ev.complete else " incomplete")
    if ev.error_type:
        status += f" {_p(ev.error_type)}"
    return (f"{t:<8} {'call':<10} {ev.pid:>7} {_col(ev.comm, 15)} {'out':<3} {_p(who)} "
            f"{_p(ev.method)} {_p(ev.path[:80])}{' stream' if ev.stream else ''} model={_p(model)} "
            f"tokens={_n(ev.input_tokens)}/{_n(ev.output_tokens)} ttft={ttft} status={status} "
            f"cost={_cost(ev.cost_usd)}")


def _render_mcp(t: str, ev: McpMessage) -> str:
    what = f"method={_p(ev.jsonrpc_method)}" if ev.jsonrpc_method else "response"
    extra = "".join(f" {k}={_p(str(v))}" for k, v in (("tool", ev.tool), ("id", ev.jsonrpc_id),
                                                       ("error", ev.error_code)) if v is not None)
    who = " ".join(x for x in (ev.hostname, _ep(ev.daddr, ev.dport)) if x)
    return (f"{t:<8} {'mcp':<10} {ev.pid:>7} {_col(ev.comm, 15)} {'out' if ev.direction_sent else 'in':<3} "
            f"{_p(who)} {what}{extra}")


def render(ev: Event) -> str:
    """One human line per event (the table view of ``busted monitor``); never a control character.
    Flow rows fill the HEADER's columns; other kinds (dns, tls-hello, call, mcp) say what they
    carry after the DIR column, as ``name=value``."""
    t = time.strftime("%H:%M:%S", time.localtime(ev.wall_time))
    if isinstance(ev, FlowEvent):
        kind = {FlowOpened: "open", FlowClosed: "close", FlowClassified: "classified"}.get(type(ev), ev.kind)
        who = ev.provider or "-"
        if ev.hostname:
            who = f"{who} {ev.hostname} ({ev.evidence.name.lower()})"
        tx = rx = ""
        if isinstance(ev, FlowClosed):
            tx, rx = _fmt_bytes(ev.bytes_sent), _fmt_bytes(ev.bytes_received)
        d = "out" if ev.direction == 1 else "in" if ev.direction == 2 else "?"
        line = (f"{t:<8} {kind:<10} {ev.pid:>7} {_col(ev.comm, 15)} {d:<3} {_ep(ev.saddr, ev.sport):<22} "
                f"{_ep(ev.daddr, ev.dport):<22} {_col(who, 34)} {tx:>7} {rx:>7}")
    elif isinstance(ev, FlowSummary):  # busy-host mode: flows to a quiet peer, summed
        out = ev.direction == 1
        local, peer = ("", _ep(ev.peer, ev.port)) if out else (_ep("*", ev.port), ev.peer)
        line = (f"{t:<8} {'summary':<10} {ev.pid:>7} {_col(ev.comm, 15)} {'out' if out else 'in':<3} "
                f"{local:<22} {_p(peer):<22} {_col(f'- {ev.count} flows', 34)} "
                f"{_fmt_bytes(ev.bytes_sent):>7} {_fmt_bytes(ev.bytes_received):>7}")
    elif isinstance(ev, DnsAnswer):
        ans = ",".join(ev.addresses) or ev.rcode
        chain = " -> ".join(ev.cname_chain[1:])
        line = (f"{t:<8} {'dns':<10} {ev.pid or 0:>7} {_col(ev.comm, 15)} {'':<3} "
                f"{_p(ev.qname)} {ev.qtype} {_p(ans)}{' via ' + _p(chain) if chain else ''}")
    elif isinstance(ev, TlsClientHello):
        line = (f"{t:<8} {'tls-hello':<10} {ev.pid:>7} {_col(ev.comm, 15)} {'out':<3} "
                f"sni={_p(ev.sni or '-')} alpn={_p(','.join(ev.alpn)) or '-'} ja4={_p(ev.ja4)}")
    elif isinstance(ev, LlmCall):
        line = _render_call(t, ev)
    elif isinstance(ev, McpMessage):
        line = _render_mcp(t, ev)
    elif isinstance(ev, EventsLost):
        line = f"{t:<8} {'LOST':<10} {ev.count} at {ev.where.name.lower()} {ev.detail}"
    else:
        line = f"{t:<8} {ev.kind:<10} {json.dumps(ev.to_dict(), default=str)}"
    return _p(line)  # the last guard: fields not escaped above (kinds, details) cannot slip through


def _json(d: dict[str, Any]) -> str:
    # ensure_ascii (the default) escapes every control and non-ASCII character as \uXXXX: the line
    # is exact JSON and safe on a terminal.
    return json.dumps(d, default=str, ensure_ascii=True)


def _warn(msg: str) -> None:
    """Sink trouble (disk full, ...) goes to stderr at once, from whichever thread meets it."""
    print(f"busted: {_p(msg)}", file=sys.stderr, flush=True)


def ready_line(mon: Any, what: str = "monitoring") -> str:
    """What the CLI prints to stderr once the probes are attached and it is reading (tests and
    scripts wait for it instead of guessing how long the BPF compile takes)."""
    st = mon.stats()
    plan = " ".join(f"{k}={v}" for k, v in st.plan.items())
    return f"busted: {what} (probes attached in {st.startup_s:.2f} s; plan {plan})"


def _announce(mon: Any, what: str = "monitoring") -> None:
    print(ready_line(mon, what), file=sys.stderr, flush=True)


def _wants(ev: Event, provider: Sequence[str] | None) -> bool:
    if not provider:
        return True
    if isinstance(ev, FlowIdentity):  # flow events, LLM calls, MCP messages
        return (ev.provider or "none") in provider
    if isinstance(ev, FlowSummary):  # flows judged non-LLM
        return "none" in provider
    return not isinstance(ev, DnsAnswer | TlsClientHello)


def _install_sigterm(stop: threading.Event, *, sigint: bool = False) -> None:
    """SIGTERM (and, with ``sigint``, the first Ctrl-C) end the loop at a batch boundary, so the
    batch in hand reaches every output; a second Ctrl-C interrupts as usual."""
    def handler(signum: int, frame: object) -> None:
        stop.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        if sigint and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, handler)


def _stdout_line(ev: Event, d: dict[str, Any] | None, enc: Any) -> str:
    """The --json line: the event as the file outputs write it (``sinks.encode``: ``to_dict()``
    with credential-named keys and free-text fields masked), compact, printable ASCII only.
    ``enc`` is the file outputs' encoding of the event when they made one (reused: one encoding
    per event for every output); else it is encoded here from ``d`` (its ``to_dict()``, if known)."""
    return (enc if enc is not None else _encode_event(ev, d)).line
