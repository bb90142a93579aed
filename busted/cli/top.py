"""``busted top``: a refreshing per-process x provider table."""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from typing import Any, TextIO

from busted._text import printable as _p
from busted.cli.outputs import _start
from busted.cli.render import _announce, _col, _fmt_bytes, _install_sigterm, _json, _wants
from busted.errors import UsageError
from busted.events import Event, FlowClosed, LlmCall

# -- top ---------------------------------------------------------------------------------------


TOP_BY = ("comm", "agent", "container")
_TOP_WIDTH = {"comm": 15, "agent": 20, "container": 12}  # comm: the kernel's 15; agent: catalog ids


class TopTable:
    """Per (group, provider) aggregates: processes, connections, bytes, calls, tokens, errors.

    ``by`` picks the group: ``comm`` (the command name, not the pid, so short-lived clients such as
    curl and scripts add up; PIDS says how many processes), ``agent`` (the agent behind the flow,
    docs/agents.md) or ``container`` (its container id, 12 characters). Unknown is "-". A flow
    counts under its latest classification.
    """

    def __init__(self, max_flows: int = 65536, by: str = "comm") -> None:
        from busted.sinks.flowview import FlowView

        if by not in TOP_BY:
            raise UsageError(f"top --by {by!r}: expected one of {', '.join(TOP_BY)}")
        self.by = by
        self.rows: dict[tuple[str, str], Counter[str]] = {}
        self.pids: dict[tuple[str, str], set[int]] = {}
        self._view = FlowView(max_flows=max_flows)  # the flows' latest state, shared with the sinks

    def _group(self, ev: Any) -> str:
        if self.by == "agent":
            return getattr(ev, "agent", None) or "-"
        if self.by == "container":
            cid = getattr(ev, "container_id", None)
            return cid[:12] if cid else "-"
        return getattr(ev, "comm", "") or "?"

    def _key(self, ev: Any) -> tuple[str, str]:
        return self._group(ev), (getattr(ev, "provider", None) or "-")

    def _row(self, key: tuple[str, str], pid: int) -> Counter[str]:
        self.pids.setdefault(key, set()).add(pid)
        return self.rows.setdefault(key, Counter())

    def add(self, ev: Event) -> None:
        if isinstance(ev, LlmCall):
            row = self._row(self._key(ev), ev.pid)
            row["calls"] += 1
            row["tokens"] += (ev.input_tokens or 0) + (ev.output_tokens or 0)
            if ev.error_type is not None or (ev.status or 0) >= 400:
                row["errors"] += 1
            return
        change = self._view.update(ev)
        if change is None:
            return
        key = self._key(change.after.flow)
        if change.before is None:  # first seen: count the connection where it belongs now
            self._row(key, change.after.flow.pid)["conns"] += 1
        else:
            old = self._key(change.before.flow)
            if old != key:  # reclassified: the connection moves to its new row
                self.rows[old]["conns"] -= 1
                self._row(key, change.after.flow.pid)["conns"] += 1
        if isinstance(ev, FlowClosed):
            row = self._row(key, ev.pid)
            row["tx"] += ev.bytes_sent
            row["rx"] += ev.bytes_received

    def top(self, limit: int = 30) -> list[dict[str, Any]]:
        """The rows, busiest first (bytes + connections), as dicts (exact names, for --json); the
        group's key is ``by``'s name (``comm``, ``agent`` or ``container``)."""
        rows = sorted(self.rows.items(), key=lambda kv: -(kv[1]["tx"] + kv[1]["rx"] + kv[1]["conns"]))
        return [{self.by: group, "provider": prov, "pids": len(self.pids[(group, prov)]), "conns": r["conns"],
                 "tx": r["tx"], "rx": r["rx"], "calls": r["calls"], "tokens": r["tokens"],
                 "errors": r["errors"]} for (group, prov), r in rows[:limit]]

    def text(self, limit: int = 30) -> str:
        width = _TOP_WIDTH[self.by]
        head = (f"{self.by.upper():<{width}} {'PROVIDER':<22} {'PIDS':>5} {'CONNS':>6} {'TX':>8} {'RX':>8} "
                f"{'CALLS':>6} {'TOKENS':>7} {'ERR':>4}")
        lines = [head]
        for r in self.top(limit):
            lines.append(_p(f"{_col(r[self.by], width)} {_col(r['provider'], 22)} {r['pids']:>5} {r['conns']:>6} "
                            f"{_fmt_bytes(r['tx']):>8} {_fmt_bytes(r['rx']):>8} {r['calls']:>6} "
                            f"{r['tokens']:>7} {r['errors']:>4}"))
        return "\n".join(lines)


def _top(args: argparse.Namespace, out: TextIO) -> int:
    stop = threading.Event()
    _install_sigterm(stop)
    table = TopTable(by=args.by)
    as_json = args.json
    tty = out.isatty() and not as_json
    mon, sinks = _start(args)
    with mon:
        _announce(mon)
        end = None if args.duration is None else time.monotonic() + args.duration
        try:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                tick = time.monotonic() + args.interval
                for ev in mon.events(timeout=max(0.05, tick - time.monotonic()), stop_event=stop):
                    sinks.write(ev, mon.stats().queue_depth)
                    if _wants(ev, args.provider):
                        table.add(ev)
                    if time.monotonic() >= tick:
                        break
                sinks.tick()  # once per redraw: the page gets what it was held back
                st = mon.stats()
                lost = sum(st.lost.values())
                budgets = mon.budgets()  # spend against limits (a policy's [[budgets]])
                if as_json:
                    out.write(_json({"time": time.time(), "events": st.events, "lost": lost,
                                     "rows": table.top(), **({"budgets": budgets} if budgets else {})}) + "\n")
                else:
                    if tty:
                        out.write("\x1b[H\x1b[2J")  # ours: home + clear, before the redraw
                    out.write(f"busted top — {time.strftime('%H:%M:%S')}  events {st.events}  "
                              f"lost {lost}\n{table.text()}\n")
                    if budgets:
                        from busted.policy.budgets import budget_table

                        out.write(f"\n{budget_table(budgets)}\n")
                    if not tty:
                        out.write("\n")
                out.flush()
        except KeyboardInterrupt:
            pass
        finally:
            sinks.close()
    return 0
