"""The ``busted`` command. ``main(argv)`` takes its arguments so tests can call it directly.

    busted doctor            what this kernel offers and which probe tiers busted would use
    busted monitor           live flows (table on a terminal, --json for NDJSON)
    busted top               refreshing per-process x provider table
    busted lab               a network lab with demo LLM traffic, monitored (no internet needed)
    busted query             read a store written with --store
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from busted.errors import BustedError
from busted.events import (
    DnsAnswer,
    Event,
    EventsLost,
    FlowClassified,
    FlowClosed,
    FlowEvent,
    FlowOpened,
    TlsClientHello,
)

__all__ = ["main"]


# -- doctor ------------------------------------------------------------------------------------


def _doctor(args: argparse.Namespace, out: TextIO) -> int:
    from busted.ebpf.loader import build_source
    from busted.ebpf.plan import BYTES_TIERS, LIFECYCLE_TIERS, _bytes_ok, _lifecycle_ok, choose_plan
    from busted.ebpf.probe import probe

    caps = probe()
    plan = None
    plan_err = None
    try:
        plan = choose_plan(caps, _parse_probes(args.probes))
    except BustedError as exc:
        plan_err = str(exc)
    if args.ebpf:
        if plan is None:
            print(plan_err, file=sys.stderr)
            return 1
        out.write(build_source(plan))
        return 0
    if args.json:
        d = caps.to_dict()
        d["plan"] = plan.describe() if plan else None
        d["plan_error"] = plan_err
        json.dump(d, out, indent=2)
        out.write("\n")
        return 0 if plan else 1

    def yn(b: bool) -> str:
        return "yes" if b else "NO"

    w = out.write
    w(f"kernel          {caps.kernel_release}\n")
    w(f"privileges      {'root/CAP_BPF' if caps.privileged else 'NOT privileged: run as root'}\n")
    w(f"bcc             {caps.bcc_version or 'NOT importable (apt-get install python3-bpfcc)'}\n")
    if caps.headers:
        note = ""
        if caps.headers_mismatch:
            note = (f"  (linked from another kernel: {caps.headers_version}; safe because busted's BPF "
                    "reads no kernel-internal struct)")
        w(f"headers         {caps.headers}{note}\n")
    else:
        w(f"headers         NOT found for {caps.kernel_release}: install linux-headers-{caps.kernel_release}"
          " or run ./bootstrap.sh\n")
    w(f"BTF             {yn(caps.btf)}\n")
    w(f"tracefs         {caps.tracefs or 'NOT mounted (mount -t tracefs nodev /sys/kernel/tracing)'}\n")
    w(f"kprobes         {'available' if caps.kprobes else 'unavailable (no kprobe PMU / CONFIG_KPROBES off)'}\n")
    w(f"uprobes         {'available' if caps.uprobes else 'unavailable'}\n")
    w(f"ring buffer     {yn(caps.ringbuf)}\n")
    w(f"cgroup v2       {caps.cgroup2 or 'not mounted'}\n")
    w("tracepoints\n")
    for tp, ok in sorted(caps.tracepoints.items()):
        if not tp.startswith("syscalls/") or not ok:
            w(f"  {tp:<36}{'present' if ok else 'MISSING'}\n")
    nsys = sum(1 for tp, ok in caps.tracepoints.items() if tp.startswith("syscalls/") and ok)
    w(f"  syscalls/* (connect, accept, read, write, ...) {nsys} of "
      f"{sum(1 for tp in caps.tracepoints if tp.startswith('syscalls/'))} present\n")
    w("tiers\n")
    for name, tiers, check in (("lifecycle", LIFECYCLE_TIERS, _lifecycle_ok), ("bytes", BYTES_TIERS, _bytes_ok)):
        for t in tiers:
            why = check(caps, t)
            w(f"  {name:<10}{t:<12}{'available' if why is None else 'unavailable: ' + why}\n")
    if plan:
        w("chosen plan\n")
        for k, v in plan.describe().items():
            w(f"  {k:<10}{v}\n")
        return 0
    w(f"chosen plan     NONE: {plan_err}\n")
    return 1


def _parse_probes(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if not v:
            raise SystemExit(f"--probes wants key=value pairs, e.g. bytes=syscall (got {part!r})")
        out[k.strip()] = v.strip()
    return out


# -- rendering ---------------------------------------------------------------------------------


def _ep(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


HEADER = f"{'TIME':<8} {'EVENT':<10} {'PID':>7} {'COMM':<15} {'DIR':<3} {'LOCAL':<22} {'REMOTE':<22} " \
         f"{'PROVIDER/HOST':<34} {'TX':>7} {'RX':>7}"


def render(ev: Event) -> str:
    """One human line per event (the table view of ``busted monitor``)."""
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
        return (f"{t:<8} {kind:<10} {ev.pid:>7} {ev.comm[:15]:<15} {d:<3} {_ep(ev.saddr, ev.sport):<22} "
                f"{_ep(ev.daddr, ev.dport):<22} {who[:34]:<34} {tx:>7} {rx:>7}")
    if isinstance(ev, DnsAnswer):
        ans = ",".join(ev.addresses) or ev.rcode
        chain = " -> ".join(ev.cname_chain[1:])
        return (f"{t:<8} {'dns':<10} {ev.pid or 0:>7} {(ev.comm or '')[:15]:<15} {'':<3} "
                f"{ev.qname} {ev.qtype} {ans}{' via ' + chain if chain else ''}")
    if isinstance(ev, TlsClientHello):
        return (f"{t:<8} {'tls-hello':<10} {ev.pid:>7} {ev.comm[:15]:<15} {'out':<3} "
                f"sni={ev.sni or '-'} alpn={','.join(ev.alpn) or '-'} ja4={ev.ja4}")
    if isinstance(ev, EventsLost):
        return f"{t:<8} {'LOST':<10} {ev.count} at {ev.where.name.lower()} {ev.detail}"
    return f"{t:<8} {ev.kind:<10} {json.dumps(ev.to_dict(), default=str)}"


class _Summary:
    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.providers: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()

    def add(self, ev: Event) -> None:
        self.kinds[ev.kind] += 1
        if isinstance(ev, FlowOpened) and ev.provider:
            self.providers[ev.provider] += 1
        if isinstance(ev, EventsLost):
            self.lost[ev.where.name.lower()] += ev.count

    def text(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.kinds.items())] or ["no events"]
        s = "seen: " + ", ".join(parts)
        if self.providers:
            s += "\nLLM flows by provider: " + ", ".join(f"{k}={v}" for k, v in self.providers.most_common())
        s += "\nlost: " + (", ".join(f"{k}={v}" for k, v in self.lost.items()) if self.lost else "none")
        return s


# -- monitor -----------------------------------------------------------------------------------


def _monitor_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"probes": _parse_probes(getattr(args, "probes", None))}
    if getattr(args, "pid", None):
        kw["pid"] = args.pid
    if getattr(args, "uid", None) is not None:
        kw["uid"] = args.uid
    if getattr(args, "comm", None):
        kw["comm"] = args.comm
    if getattr(args, "port", None):
        kw["port"] = args.port
    if getattr(args, "ipv4", False):
        kw["family"] = 4
    if getattr(args, "ipv6", False):
        kw["family"] = 6
    from busted.policy_cli import policy_kwargs

    kw.update(policy_kwargs(args))
    return kw


class _Sinks:
    """--store / --metrics / --jsonl outputs, fed every event the CLI sees."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.sinks: list[Any] = []
        self.exporter = None
        if getattr(args, "store", None):
            from busted.sinks import Store

            self.sinks.append(Store(args.store))
        if getattr(args, "jsonl", None):
            from busted.sinks import JsonlSink

            self.sinks.append(JsonlSink(args.jsonl))
        if getattr(args, "metrics", None):
            from busted.sinks import PrometheusExporter

            self.exporter = PrometheusExporter(args.metrics)
            self.exporter.start()
            self.sinks.append(self.exporter)

    def write(self, ev: Event, queue_depth: int = 0) -> None:
        for s in self.sinks:
            s.write(ev)
        if self.exporter is not None:
            self.exporter.set_queue_depth(queue_depth)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def _wants(ev: Event, provider: Sequence[str] | None) -> bool:
    if not provider:
        return True
    if isinstance(ev, FlowEvent):
        return (ev.provider or "none") in provider
    return not isinstance(ev, DnsAnswer | TlsClientHello)


def _install_sigterm(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _run_monitor(args: argparse.Namespace, out: TextIO, events: Iterable[Event] | None = None,
                 mon: Any = None) -> _Summary:
    summary = _Summary()
    as_json = args.json or not out.isatty()
    if not as_json:
        out.write(HEADER + "\n")
        out.flush()
    sinks = _Sinks(args)
    try:
        for ev in events:
            summary.add(ev)
            sinks.write(ev, mon.stats().queue_depth if mon is not None else 0)
            if not _wants(ev, args.provider):
                continue
            out.write((json.dumps(ev.to_dict()) if as_json else render(ev)) + "\n")
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        sinks.close()
    return summary


def _monitor(args: argparse.Namespace, out: TextIO) -> int:
    import busted

    stop = threading.Event()
    _install_sigterm(stop)
    mon = busted.Monitor(**_monitor_kwargs(args))
    from busted.policy_cli import Reloader

    Reloader(mon, getattr(args, "policy", None))  # SIGHUP, handled from before the start
    with mon:
        deadline = None if args.duration is None else time.monotonic() + args.duration

        def stream() -> Iterable[Event]:
            while not stop.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                yield from mon.events(timeout=min(0.5, left) if left is not None else 0.5, stop_event=stop)

        summary = _run_monitor(args, out, stream(), mon)
        st = mon.stats()
    print(summary.text(), file=sys.stderr)
    print(f"kernel records {st.records}, events {st.events}, plan {st.plan}", file=sys.stderr)
    return 0


# -- top ---------------------------------------------------------------------------------------


class TopTable:
    """Per (command, provider) aggregates: processes, connections, bytes, calls, tokens, errors.

    Grouped by command name rather than pid so short-lived clients (curl, scripts) add up; the
    PIDS column says how many processes. A flow counts under its latest classification.
    """

    def __init__(self, max_flows: int = 65536) -> None:
        self.rows: dict[tuple[str, str], Counter[str]] = {}
        self.pids: dict[tuple[str, str], set[int]] = {}
        self._flow_key: dict[int, tuple[str, str]] = {}
        self._max_flows = max_flows

    def _key(self, ev: Any) -> tuple[str, str]:
        return ((getattr(ev, "comm", "") or "?"), (getattr(ev, "provider", None) or "-"))

    def _row(self, key: tuple[str, str], pid: int) -> Counter[str]:
        self.pids.setdefault(key, set()).add(pid)
        return self.rows.setdefault(key, Counter())

    def add(self, ev: Event) -> None:
        if isinstance(ev, FlowOpened):
            key = self._key(ev)
            self._row(key, ev.pid)["conns"] += 1
            if len(self._flow_key) < self._max_flows:
                self._flow_key[ev.flow_id] = key
        elif isinstance(ev, FlowClassified):
            old, key = self._flow_key.get(ev.flow_id), self._key(ev)
            if old is not None and old != key:
                self.rows[old]["conns"] -= 1
                self._row(key, ev.pid)["conns"] += 1
                self._flow_key[ev.flow_id] = key
        elif isinstance(ev, FlowClosed):
            key = self._flow_key.pop(ev.flow_id, None) or self._key(ev)
            row = self._row(key, ev.pid)
            row["tx"] += ev.bytes_sent
            row["rx"] += ev.bytes_received
        elif hasattr(ev, "model"):  # LLM call events (duck-typed until they exist)
            row = self._row(self._key(ev), getattr(ev, "pid", 0) or 0)
            row["calls"] += 1
            row["tokens"] += (getattr(ev, "input_tokens", 0) or 0) + (getattr(ev, "output_tokens", 0) or 0)
            if (getattr(ev, "status", 200) or 200) >= 400:
                row["errors"] += 1

    def text(self, limit: int = 30) -> str:
        head = (f"{'COMM':<15} {'PROVIDER':<22} {'PIDS':>5} {'CONNS':>6} {'TX':>8} {'RX':>8} {'CALLS':>6} "
                f"{'TOKENS':>7} {'ERR':>4}")
        lines = [head]
        rows = sorted(self.rows.items(), key=lambda kv: -(kv[1]["tx"] + kv[1]["rx"] + kv[1]["conns"]))
        for (comm, prov), r in rows[:limit]:
            lines.append(f"{comm[:15]:<15} {prov[:22]:<22} {len(self.pids[(comm, prov)]):>5} {r['conns']:>6} "
                         f"{_fmt_bytes(r['tx']):>8} {_fmt_bytes(r['rx']):>8} {r['calls']:>6} {r['tokens']:>7} "
                         f"{r['errors']:>4}")
        return "\n".join(lines)


def _top(args: argparse.Namespace, out: TextIO) -> int:
    import busted

    stop = threading.Event()
    _install_sigterm(stop)
    table = TopTable()
    tty = out.isatty()
    sinks = _Sinks(args)
    with busted.Monitor(**_monitor_kwargs(args)) as mon:
        end = None if args.duration is None else time.monotonic() + args.duration
        try:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                tick = time.monotonic() + args.interval
                for ev in mon.events(timeout=max(0.05, tick - time.monotonic()), stop_event=stop):
                    sinks.write(ev)
                    if _wants(ev, args.provider):
                        table.add(ev)
                    if time.monotonic() >= tick:
                        break
                if tty:
                    out.write("\x1b[H\x1b[2J")
                st = mon.stats()
                out.write(f"busted top — {time.strftime('%H:%M:%S')}  events {st.events}  "
                          f"lost {sum(st.lost.values())}\n{table.text()}\n")
                if not tty:
                    out.write("\n")
                out.flush()
        except KeyboardInterrupt:
            pass
        finally:
            sinks.close()
    return 0


# -- lab ---------------------------------------------------------------------------------------


def _lab(args: argparse.Namespace, out: TextIO) -> int:
    import busted
    from busted.lab import Lab, demo_traffic

    summary = _Summary()
    as_json = args.json
    print("busted lab: starting network namespaces, lab DNS and fake LLM providers ...", file=sys.stderr)
    with Lab() as lab, busted.Monitor(**_monitor_kwargs(args)) as mon:
        print(f"busted lab: monitor up in {mon.stats().startup_s:.2f}s, plan {mon.plan.describe()}",
              file=sys.stderr)
        print(f"busted lab: client namespace {lab.client_ns}, lab DNS {lab.dns_addr}; running demo clients",
              file=sys.stderr)
        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.extend(demo_traffic(lab, rounds=args.rounds)),
                                  daemon=True)
        worker.start()
        lab_nets = (lab.client_ns, lab.server_ns)
        sinks = _Sinks(args)
        if not as_json:
            out.write(HEADER + "\n")
        try:
            while worker.is_alive() or True:
                got = False
                for ev in mon.events(timeout=1.0):
                    got = True
                    if isinstance(ev, FlowEvent | DnsAnswer | TlsClientHello) and not _in_lab(ev, lab):
                        continue
                    summary.add(ev)
                    sinks.write(ev)
                    out.write((json.dumps(ev.to_dict()) if as_json else render(ev)) + "\n")
                    out.flush()
                    if not worker.is_alive():
                        break
                if not worker.is_alive() and not got:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            sinks.close()
        _ = lab_nets
    print(summary.text(), file=sys.stderr)
    ok = sum(1 for r in results if r.returncode == 0)
    print(f"busted lab: {ok}/{len(results)} demo clients succeeded; lab torn down", file=sys.stderr)
    return 0


def _in_lab(ev: Event, lab: Any) -> bool:
    """Only show what the lab's clients did (the host may have other traffic)."""
    addrs = set()
    for h in lab.hosts.values():
        addrs.update(a for a in h.addresses if a)
    if isinstance(ev, FlowEvent):
        return ev.daddr in addrs or ev.saddr in addrs
    if isinstance(ev, TlsClientHello):
        return ev.daddr in addrs
    if isinstance(ev, DnsAnswer):
        return ev.server in (None, lab.dns_addr) and any(a in addrs for a in ev.addresses) or \
            ev.rcode != "NOERROR"
    return True


# -- query -------------------------------------------------------------------------------------


def _query(args: argparse.Namespace, out: TextIO) -> int:
    from busted.sinks import Store

    since = time.time() - args.since if args.since else None
    filters = {k: v for k, v in (("pid", args.pid), ("comm", args.comm), ("provider", args.provider)) if v}
    with Store.open_readonly(args.store) as store:
        if args.table == "events":
            rows = [ev.to_dict() for ev in store.events(since=since, **filters)]
        else:
            rows = list(store.flows(since=since, **filters))
    if args.format == "json":
        for r in rows:
            out.write(json.dumps(r, default=str) + "\n")
    else:
        import csv

        cols: list[str] = []
        for r in rows:
            cols.extend(k for k in r if k not in cols)
        w = csv.DictWriter(out, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()})
    return 0


# -- entry -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="busted", description="Audit this host's traffic to LLM providers (eBPF).")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("doctor", help="what this kernel offers and which probe tiers would be used")
    d.add_argument("--json", action="store_true")
    d.add_argument("--ebpf", action="store_true", help="print the generated BPF program and exit")
    d.add_argument("--probes", help="force tiers, e.g. bytes=syscall,lifecycle=tracepoint")

    def filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-p", "--pid", type=int, action="append", help="only this process (repeatable)")
        sp.add_argument("-u", "--uid", type=int, help="only this user id")
        sp.add_argument("-c", "--comm", action="append", help="only this command name (repeatable)")
        sp.add_argument("-P", "--port", type=int, action="append", help="only flows with this port")
        sp.add_argument("-4", "--ipv4", action="store_true", help="only IPv4")
        sp.add_argument("-6", "--ipv6", action="store_true", help="only IPv6")
        sp.add_argument("--provider", action="append", help="only flows to this provider id ('none' = non-LLM)")
        sp.add_argument("--probes", help="force tiers, e.g. bytes=syscall")
        sp.add_argument("--json", action="store_true", help="NDJSON (default when stdout is not a terminal)")
        sp.add_argument("--store", help="also write every event to this SQLite file")
        sp.add_argument("--jsonl", help="also append every event to this JSONL file (rotated)")
        sp.add_argument("--metrics", help="serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464)")
        from busted.policy_cli import add_policy_options  # --policy/--enforce: busted/policy_cli.py

        add_policy_options(sp)

    m = sub.add_parser("monitor", help="live view of flows")
    filters(m)
    m.add_argument("--duration", type=float, help="stop after this many seconds")

    t = sub.add_parser("top", help="refreshing per-process x provider table")
    filters(t)
    t.add_argument("--interval", type=float, default=2.0)
    t.add_argument("--duration", type=float)

    lab = sub.add_parser("lab", help="network lab with demo LLM traffic, monitored")
    filters(lab)
    lab.add_argument("--rounds", type=int, default=1)

    from busted.policy_cli import add_policy_parser  # policy: busted/policy_cli.py

    add_policy_parser(sub)

    q = sub.add_parser("query", help="read a store")
    q.add_argument("--store", required=True)
    q.add_argument("--table", choices=("flows", "events"), default="flows")
    q.add_argument("--since", type=float, help="only the last N seconds")
    q.add_argument("--pid", type=int)
    q.add_argument("--comm")
    q.add_argument("--provider")
    q.add_argument("--format", choices=("json", "csv"), default="json")
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    from busted.policy_cli import policy_command

    handlers = {"doctor": _doctor, "monitor": _monitor, "top": _top, "lab": _lab, "query": _query,
                "policy": policy_command}
    try:
        return handlers[args.cmd](args, out)
    except BustedError as exc:
        print(f"busted: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
