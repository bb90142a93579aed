"""``busted query``: read a store written with --store."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, TextIO

from busted._text import printable as _p
from busted.cli.render import _json
from busted.errors import UsageError

# -- query -------------------------------------------------------------------------------------


def _row_filter(args: argparse.Namespace, flow_provider: dict[int, str | None]) -> Callable[[dict], bool]:
    """The monitor's filters over stored rows (dicts). A row without a filtered field (a DNS
    answer has no port) does not match; an event's provider is its flow's when it has none."""
    checks: list[Callable[[dict], bool]] = []
    if args.pid:
        checks.append(lambda r: r.get("pid") in args.pid)
    if args.uid:
        checks.append(lambda r: r.get("uid") in args.uid)
    if args.comm:
        checks.append(lambda r: r.get("comm") in args.comm)
    if args.port:
        checks.append(lambda r: r.get("sport") in args.port or r.get("dport") in args.port
                      or r.get("port") in args.port)  # a flow summary's service port
    if args.family:
        checks.append(lambda r: r.get("family") == args.family)
    if args.provider:
        def prov(r: dict) -> bool:
            p = r.get("provider") or flow_provider.get(r.get("flow_id", -1))
            return (p or "none") in args.provider

        checks.append(prov)
    return lambda r: all(c(r) for c in checks)


def _query(args: argparse.Namespace, out: TextIO) -> int:
    from busted.sinks import Store

    if args.json and args.format == "csv":
        raise UsageError("--json and --format csv contradict each other; give one")
    if args.kind and args.table != "events":
        raise UsageError(f"--kind selects events: give --table events (or drop --kind for --table {args.table})")
    since = time.time() - args.since if args.since else None
    with Store.open_readonly(args.store) as store:
        flows = list(store.flows(since=since))
        if args.table == "events":
            by_flow = {f["flow_id"]: f.get("provider") for f in flows} if args.provider else {}
            keep = _row_filter(args, by_flow)
            rows = [d for d in (ev.to_dict() for ev in store.events(kinds=args.kind, since=since)) if keep(d)]
        elif args.table == "llm_calls":
            keep = _row_filter(args, {})
            rows = [c for c in store.calls(since=since) if keep(c)]
        elif args.table == "mcp_messages":
            keep = _row_filter(args, {})
            rows = [m for m in store.mcp_messages(since=since) if keep(m)]
        elif args.table == "flow_summaries":
            keep = _row_filter(args, {})
            rows = [m for m in store.summaries(since=since) if keep(m)]
        else:
            keep = _row_filter(args, {})
            rows = [f for f in flows if keep(f)]
    if args.format != "csv":
        for r in rows:
            out.write(_json(r) + "\n")
        return 0
    import csv

    tty = out.isatty()
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    w = csv.DictWriter(out, fieldnames=cols)
    w.writeheader()
    for r in rows:
        cells = {k: _csv_cell(json.dumps(v) if isinstance(v, list | dict) else v) for k, v in r.items()}
        if tty:  # CSV is exact in a file or pipe; on a terminal its text cells are escaped
            cells = {k: _p(v) if isinstance(v, str) else v for k, v in cells.items()}
        w.writerow(cells)
    return 0


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(v: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (a comm ``=HYPERLINK(..)``, a host ``@SUM(..)``)
    gets a leading ``'``, as OWASP's CSV-injection advice says; numbers (-3 included) stay numbers."""
    return "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v
