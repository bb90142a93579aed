"""The ``busted`` command. ``main(argv)`` takes its arguments so tests can call it directly.

    busted doctor            what this kernel offers and which probe tiers busted would use
    busted monitor           live flows (table on a terminal, --json for NDJSON)
    busted top               refreshing per-process x provider table
    busted lab               a network lab with demo LLM traffic, monitored (no internet needed)
    busted query             read a store written with --store
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from busted import sinks
from busted._text import printable as _p
from busted.errors import BustedError, EnvironmentProblem, MissingDependency, StoreError, UsageError
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
from busted.sinks import redact

__all__ = ["HEADER", "TopTable", "main", "ready_line", "render"]


# -- doctor ------------------------------------------------------------------------------------

# What a tier costs or lacks that its availability does not say (docs/kernel.md, tiers).
_TIER_NOTES = {
    ("bytes", "syscall"): " (syscall tracepoints: every syscall of every process pays the slow path)",
    ("lineage", "tracepoint"): " (argv from /proc when the exec is decoded)",
    ("lineage", "sched-fork"): " (argv from /proc when the exec is decoded)",
    ("lineage", "syscall"): " (opt-in: argv copied at execve; syscall tracepoints tax every syscall)",
}

_UNPRIVILEGED = ("not running as root, and without CAP_BPF+CAP_PERFMON: this user cannot load BPF or see "
                 "tracefs. Run `sudo busted doctor`.")


_WITHOUT_PLAINTEXT = "flows + SNI classification only (no LlmCall or McpMessage events)"
_TLS_FILES_SHOWN = 8


def _llm_calls_report(caps: Any, plan: Any) -> dict[str, Any]:
    """Whether LLM calls can be read here (the plan's ``plaintext`` tier, uprobes) and, if so,
    which TLS library files would be probed (``tlslibs.scan()``; the list is cut at a few)."""
    from busted.ebpf import tlslibs
    from busted.ebpf.plan import _plaintext_why_not

    # Without a plan (no privileges, a forced tier refused) only the kernel's side can be judged.
    why = _plaintext_why_not(caps, plan.capture, plan.bytes) if plan else \
        _plaintext_why_not(caps, "syscall", "tracepoint")
    tier = plan.plaintext if plan else None
    if plan and tier == "off" and why is None:
        why = "turned off (--probes plaintext=off)"
    d: dict[str, Any] = {"uprobes": caps.uprobes, "plaintext": tier, "why_not": why, "tls_files": None,
                         "tls_files_total": None, "without": _WITHOUT_PLAINTEXT}
    if caps.uprobes and caps.privileged:  # unprivileged, other processes' maps are unreadable
        try:
            found = tlslibs.scan()
        except OSError as exc:  # /proc vanished under us: say so, do not fail the doctor
            d["why_not_scanned"] = str(exc)
        else:
            d["tls_files"] = [{"path": p, "kind": k} for p, k in sorted(found.items())][:_TLS_FILES_SHOWN]
            d["tls_files_total"] = len(found)
    return d


def _doctor_security(args: argparse.Namespace, out: TextIO) -> int:
    from busted._security import FAIL, render, security_checks

    checks = security_checks(**{k: getattr(args, k) for k in ("policy", "prices", "store", "jsonl", "metrics", "ui")})
    if args.json:
        json.dump({"security": [c.to_dict() for c in checks]}, out, indent=2)
        out.write("\n")
    else:
        for line in render(checks):  # paths are printed, never interpreted
            out.write(_p(line) + "\n")
    return 1 if any(c.status == FAIL for c in checks) else 0


def _doctor(args: argparse.Namespace, out: TextIO) -> int:
    if args.security:
        return _doctor_security(args, out)
    given = [f for f in ("policy", "prices", "store", "jsonl", "metrics", "ui") if getattr(args, f)]
    if given:
        raise UsageError(f"doctor --{given[0]} is checked only with --security; add --security")
    from busted.ebpf.loader import MAX_FLOWS, RINGBUF_BYTES, build_source
    from busted.ebpf.plan import (
        BYTES_TIERS,
        LIFECYCLE_TIERS,
        LINEAGE_TIERS,
        _bytes_ok,
        _lifecycle_ok,
        _lineage_ok,
        choose_plan,
    )
    from busted.ebpf.probe import probe

    force = _parse_probes(args.probes)
    caps = probe()
    # Without privileges tracefs is invisible, so every tracepoint would look MISSING: say why instead.
    hidden = not caps.privileged and caps.tracefs is None
    plan = None
    plan_err = None
    if not caps.privileged:
        plan_err = _UNPRIVILEGED
    else:
        try:
            plan = choose_plan(caps, force)
        except BustedError as exc:
            plan_err = str(exc)
    if args.ebpf:
        if plan is None:
            print(_p(f"busted: {plan_err}"), file=sys.stderr)
            return 1
        # Exactly what Monitor() loads: the same defaults (a test pins Monitor's to these).
        out.write(build_source(plan, ringbuf_bytes=RINGBUF_BYTES, max_flows=MAX_FLOWS))
        return 0
    if args.json:
        d = caps.to_dict()
        if hidden:
            d["tracefs"] = d["tracepoints"] = None  # unknown, not absent
        d["plan"] = plan.describe() if plan else None
        d["plan_error"] = plan_err
        d["llm_calls"] = _llm_calls_report(caps, plan)
        json.dump(d, out, indent=2)
        out.write("\n")
        return 0 if plan else 1

    def yn(b: bool) -> str:
        return "yes" if b else "NO"

    def w(line: str) -> None:  # paths, versions and BCC's words are printed, never interpreted
        out.write(_p(line) + "\n")

    if not caps.privileged:
        w(f"NOT PRIVILEGED  uid {os.geteuid()}: {_UNPRIVILEGED}")
        if hidden:
            w("                tracefs, tracepoints and tiers below are unknown, not missing.")
    w(f"kernel          {caps.kernel_release}")
    w(f"privileges      {'root/CAP_BPF' if caps.privileged else 'NO (see the first line)'}")
    w(f"bcc             {caps.bcc_version or 'NOT importable (apt-get install python3-bpfcc)'}")
    if caps.headers:
        note = ""
        if caps.headers_mismatch:
            note = (f"  (linked from another kernel: {caps.headers_version}; safe because busted's BPF "
                    "reads no kernel-internal struct)")
        w(f"headers         {caps.headers}{note}")
    else:
        w(f"headers         NOT found for {caps.kernel_release}: install linux-headers-{caps.kernel_release}"
          " or run ./bootstrap.sh")
    w(f"BTF             {yn(caps.btf)}")
    from busted.ebpf.bytecode import cache_dir

    cdir = cache_dir()
    if cdir is None:
        w("bytecode cache  off (BUSTED_BPF_CACHE=off): every start compiles (~2 s)")
    else:
        n = len([f for f in os.listdir(cdir) if f.endswith(".json")]) if os.path.isdir(cdir) else 0
        w(f"bytecode cache  {cdir} ({n} compiled; BUSTED_BPF_CACHE moves or disables it)")
    if hidden:
        w("tracefs         unknown (not visible without privileges)")
    else:
        w(f"tracefs         {caps.tracefs or 'NOT mounted (mount -t tracefs nodev /sys/kernel/tracing)'}")
    w(f"kprobes         {'available' if caps.kprobes else 'unavailable (no kprobe PMU / CONFIG_KPROBES off)'}")
    w(f"uprobes         {'available' if caps.uprobes else 'unavailable'}")
    w(f"ring buffer     {yn(caps.ringbuf)}")
    w(f"cgroup v2       {caps.cgroup2 or 'not mounted'}")
    if hidden:
        w("tracepoints     unknown: not visible without privileges")
        w("tiers           unknown: not visible without privileges")
    else:
        w("tracepoints")
        for tp, ok in sorted(caps.tracepoints.items()):
            if not tp.startswith("syscalls/") or not ok:
                w(f"  {tp:<36}{'present' if ok else 'MISSING'}")
        nsys = sum(1 for tp, ok in caps.tracepoints.items() if tp.startswith("syscalls/") and ok)
        w(f"  syscalls/* (connect, accept, read, write, ...) {nsys} of "
          f"{sum(1 for tp in caps.tracepoints if tp.startswith('syscalls/'))} present")
        w("tiers")
        for name, tiers, check in (("lifecycle", LIFECYCLE_TIERS, _lifecycle_ok),
                                   ("bytes", BYTES_TIERS, _bytes_ok), ("lineage", LINEAGE_TIERS, _lineage_ok)):
            for t in tiers:
                why = check(caps, t)
                note = _TIER_NOTES.get((name, t), "")
                w(f"  {name:<10}{t:<12}{'available' if why is None else 'unavailable: ' + why}{note}")
    llm = _llm_calls_report(caps, plan)
    if hidden and not caps.uprobes:
        w("LLM calls       unknown: uprobes are not visible without privileges")
    elif not caps.uprobes:
        w(f"LLM calls       unavailable: this kernel has no uprobes; you see {_WITHOUT_PLAINTEXT}")
    elif plan is None:
        w("LLM calls       unknown until a plan is chosen (uprobes available)")
    elif llm["why_not"]:
        w(f"LLM calls       off: {llm['why_not']}; you see {_WITHOUT_PLAINTEXT}")
    else:
        w("LLM calls       plaintext uprobe: TLS library plaintext and plain HTTP are read")
    if llm["tls_files"] is not None:
        total = llm["tls_files_total"]
        w(f"  TLS files to probe: {total}" + ("" if total else " (none found: TLS flows get SNI only)"))
        for f in llm["tls_files"]:
            w(f"  {f['kind']:<10}{f['path']}")
        if total > len(llm["tls_files"]):
            w(f"  ... and {total - len(llm['tls_files'])} more")
    if plan:
        w("chosen plan")
        for k, v in plan.describe().items():
            w(f"  {k:<10}{v}")
        return 0
    w(f"chosen plan     NONE: {'needs privileges (see the first line)' if not caps.privileged else plan_err}")
    return 1


def _parse_probes(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if not v:
            raise UsageError(f"--probes wants key=value pairs, e.g. bytes=syscall,lifecycle=tracepoint "
                             f"(got {part!r})")
        out[k.strip()] = v.strip()
    return out


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
        return "\n".join(_p(line) for line in s.split("\n"))


# -- outputs and the monitor ---------------------------------------------------------------------


def _monitor_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"probes": _parse_probes(getattr(args, "probes", None))}
    if getattr(args, "pid", None):
        kw["pid"] = args.pid
    if getattr(args, "uid", None):
        kw["uid"] = args.uid
    if getattr(args, "comm", None):
        kw["comm"] = args.comm
    if getattr(args, "port", None):
        kw["port"] = args.port
    if getattr(args, "family", None):
        kw["family"] = args.family
    if getattr(args, "llm_calls", True) is False:
        kw["llm_calls"] = False
    if getattr(args, "capture_content", 0):
        kw["capture_content"] = args.capture_content
    if getattr(args, "prices", None):
        kw["prices"] = args.prices
    if getattr(args, "busy_host", False):
        kw["busy_host"] = True
    from busted.policy_cli import policy_kwargs

    kw.update(policy_kwargs(args))
    return kw


def _check_file_output(flag: str, path: str) -> None:
    """Fail now, creating nothing, if ``path`` cannot be written: not after loading BPF."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        raise StoreError(f"{flag} {path}: is a directory; give a file path")
    if not parent.is_dir():
        raise StoreError(f"{flag} {path}: directory {parent} does not exist; create it or choose another path")
    # The directory must be writable even for an existing file: SQLite adds -wal/-shm files next
    # to the store and JSONL rotation renames files in it.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"{flag} {path}: directory {parent} is not writable by uid {os.geteuid()}; "
                         "choose another path or run with the rights to write there")
    if p.exists() and not os.access(p, os.W_OK):
        raise StoreError(f"{flag} {path}: not writable by uid {os.geteuid()}; choose another path")


def _metrics_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep and addr.isdigit():
        host, port = "", addr
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--metrics {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def _check_metrics(addr: str) -> None:
    if importlib.util.find_spec("prometheus_client") is None:
        raise MissingDependency("prometheus_client", "metrics", "--metrics")
    host, port = _metrics_addr(addr)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise UsageError(f"--metrics {addr!r}: cannot resolve {host!r} ({exc})") from exc
    fam, typ, proto, _, sa = infos[0]
    with socket.socket(fam, typ, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server will
        try:
            s.bind(sa)
        except OSError as exc:
            raise EnvironmentProblem(f"--metrics {addr}: cannot listen there ({exc.strerror or exc}); "
                                     "choose another address or stop what holds the port") from exc


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output given, checked before anything is created or loaded (issue: bad paths were
    found ~3 s later, after the BPF load, and a failed --jsonl left an empty store behind)."""
    for flag in ("store", "jsonl"):
        path = getattr(args, flag, None)
        if path:
            _check_file_output(f"--{flag}", path)
    if getattr(args, "metrics", None):
        _check_metrics(args.metrics)


class _Sinks:
    """--store / --metrics / --jsonl outputs, fed every event the CLI sees.

    Opened before the probes are loaded, so a bad output fails at once; on any failure (here or
    in the Monitor's start) ``abort()`` closes them and removes the files they created."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.sinks: list[Any] = []
        self.exporter = None
        self.ui: Any = None
        self._created: list[Path] = []
        _check_outputs(args)
        try:
            if getattr(args, "store", None):
                from busted.sinks import Store

                self._note(args.store, "-wal", "-shm", "-journal", ".lock")
                self.sinks.append(Store(args.store, retention_seconds=getattr(args, "retention_age", None),
                                        max_bytes=getattr(args, "retention_size", None), on_error=_warn))
            if getattr(args, "jsonl", None):
                from busted.sinks import JsonlSink

                self._note(args.jsonl)
                self.sinks.append(JsonlSink(args.jsonl, on_error=_warn))
            if getattr(args, "metrics", None):
                from busted.sinks import PrometheusExporter

                self.exporter = PrometheusExporter(args.metrics)
                self.sinks.append(self.exporter)
                self.exporter.start()
            if getattr(args, "otlp", None) is not None:  # --otlp given, with or without an endpoint
                from busted.sinks.otlp import OtlpSink

                self.sinks.append(OtlpSink(args.otlp or None, args.otlp_protocol, on_error=_warn))
            elif getattr(args, "otlp_protocol", None):
                raise UsageError("--otlp-protocol needs --otlp [ENDPOINT]")
            if getattr(args, "ui", None):
                from busted.web import WebUI  # binds now: a taken port fails before the probes load

                self.ui = WebUI(args.ui, warn=_warn)
                self.sinks.append(self.ui)
        except BaseException:
            self.abort()
            raise

    def started(self, mon: Any) -> None:
        """The Monitor runs: serve the page (--ui) with its stats, and say where."""
        if self.ui is not None:
            self.ui.start(stats=mon.stats)
            print(f"busted: web UI at {self.ui.url}  (the token in it is the key: keep it private)",
                  file=sys.stderr, flush=True)

    def _note(self, path: str, *suffixes: str) -> None:
        for p in (path, *(path + s for s in suffixes)):
            if not os.path.lexists(p):
                self._created.append(Path(p))

    def write(self, ev: Event, queue_depth: int = 0) -> None:
        for s in self.sinks:
            s.write(ev)
        if self.exporter is not None:
            self.exporter.set_queue_depth(queue_depth)

    @property
    def encodes(self) -> bool:
        """True if an output writes JSON lines (store, JSONL): give write_batch() encoded events."""
        return any(s is not self.exporter and s is not self.ui and getattr(s, "wants_encoded", True)
                   for s in self.sinks)

    def write_batch(self, events: Sequence[Event], encoded: Sequence[Any], queue_depth: Callable[[], int]) -> None:
        """One batch to every output: the file outputs get the events encoded once
        (``sinks.encode``; an event that would not encode is passed as is, for the output to count
        it), under one lock each; the JSONL file is written out per batch. ``queue_depth()`` is
        read once per batch, and only for --metrics."""
        for s in self.sinks:
            if s is self.exporter:
                for ev in events:
                    s.write(ev)
                s.set_queue_depth(queue_depth())
            elif s is self.ui:
                s.write_batch(events)
            elif not getattr(s, "wants_encoded", True):  # --otlp: the events themselves
                s.write_encoded(events)
            elif isinstance(s, sinks.JsonlSink):
                s.write_encoded(encoded, flush=True)
            else:
                s.write_encoded(encoded)

    def close(self) -> None:
        """Close every sink; a sink's failure is printed, not raised, so the summary still comes."""
        for s in self.sinks:
            try:
                s.close()
            except BustedError as exc:
                _warn(str(exc))
            else:
                if hasattr(s, "report"):
                    print(f"busted: {_p(s.report()['text'])}", file=sys.stderr)

    def abort(self) -> None:
        """Close what was opened and remove the files this run created: a failed start leaves nothing."""
        for s in self.sinks:
            with contextlib.suppress(Exception):
                s.close()
        self.sinks = []
        for p in self._created:
            with contextlib.suppress(OSError):
                p.unlink()


def _warn(msg: str) -> None:
    """Sink trouble (disk full, ...) goes to stderr at once, from whichever thread meets it."""
    print(f"busted: {_p(msg)}", file=sys.stderr, flush=True)


def _start(args: argparse.Namespace, before_start: Any = None) -> tuple[Any, _Sinks]:
    """Outputs first (a bad one fails in milliseconds and creates nothing), then the probes.
    ``before_start(mon)`` runs between the two (the policy reloader installs its SIGHUP handler
    there, so a HUP during start-up is a reload, not a kill)."""
    import busted

    sinks = _Sinks(args)
    mon = None
    try:
        kw = _monitor_kwargs(args)
        if getattr(kw.get("policy"), "budgets", ()):  # budgets: spend of the current windows from --store
            from busted.budget_enforce import stored_spend
            from busted.sinks import Store

            kw["budget_spend"] = stored_spend([s for s in sinks.sinks if isinstance(s, Store)], kw["policy"])
        mon = busted.Monitor(**kw)
        if before_start is not None:
            before_start(mon)
        mon.start()
        sinks.started(mon)
    except BaseException:
        if mon is not None:
            mon.close()
        sinks.abort()
        raise
    return mon, sinks


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


_BATCH = 4096  # at most this many events per batch the monitor loop takes from the Monitor


def _run_monitor(args: argparse.Namespace, out: TextIO, events: Iterable[Event | Sequence[Event]], mon: Any = None,
                 sinks: _Sinks | None = None) -> _Summary:
    """The monitor's output loop. ``events`` yields events, or lists of events (a batch, as taken
    from the Monitor at once): each batch is encoded once per event for every output, handed to
    the outputs together and printed with one write and one flush."""
    summary = _Summary()
    as_json = args.json or not out.isatty()
    encodes = sinks is not None and sinks.encodes
    depth = (lambda: mon.stats().queue_depth) if mon is not None else (lambda: 0)
    if not as_json:
        out.write(HEADER + "\n")
        out.flush()
    try:
        for item in events:
            batch: Sequence[Event] = (item,) if isinstance(item, Event) else item
            encoded = []
            lines = []
            for ev in batch:
                summary.add(ev)
                d = enc = None
                if encodes:
                    try:
                        d = ev.to_dict()
                        enc = _encode_event(ev, d)
                    except Exception:  # noqa: BLE001 - the store counts an event it cannot encode
                        d = None
                        encoded.append(ev)
                    else:
                        encoded.append(enc)
                if not _wants(ev, args.provider):
                    continue
                lines.append(_stdout_line(ev, d, enc) if as_json else render(ev))
            if sinks is not None:
                sinks.write_batch(batch, encoded, depth)
            if lines:
                lines.append("")
                out.write("\n".join(lines))
                out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        if sinks is not None:
            sinks.close()
    return summary


def _monitor(args: argparse.Namespace, out: TextIO) -> int:
    stop = threading.Event()
    prev_int = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    _install_sigterm(stop, sigint=True)
    try:
        return _monitor_loop(args, out, stop)
    finally:
        if prev_int is not None:
            signal.signal(signal.SIGINT, prev_int)


def _monitor_loop(args: argparse.Namespace, out: TextIO, stop: threading.Event) -> int:
    from busted.policy_cli import Reloader

    mon, sinks = _start(args, before_start=lambda m: Reloader(m, getattr(args, "policy", None)))
    with mon:
        _announce(mon)
        deadline = None if args.duration is None else time.monotonic() + args.duration

        def stream() -> Iterable[list[Event]]:
            # Batches: wait for one event, then take the others the Monitor has queued by then (a
            # drain's worth, every 5-10 ms; they are there, so this does not wait), so the outputs
            # write and flush once per batch.
            while not stop.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                gen = mon.events(timeout=min(0.5, left) if left is not None else 0.5, stop_event=stop)
                for first in gen:
                    yield [first, *itertools.islice(gen, min(mon.stats().queue_depth, _BATCH - 1))]
                    if deadline is not None and time.monotonic() >= deadline:
                        return

        summary = _run_monitor(args, out, stream(), mon, sinks)
        st = mon.stats()
    print(summary.text(), file=sys.stderr)
    print(_p(f"kernel records {st.records}, events {st.events}, plan {st.plan}"), file=sys.stderr)
    return 0


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
        from busted.flowview import FlowView

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
                        from busted.budgets import budget_table

                        out.write(f"\n{budget_table(budgets)}\n")
                    if not tty:
                        out.write("\n")
                out.flush()
        except KeyboardInterrupt:
            pass
        finally:
            sinks.close()
    return 0


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
            mon = stack.enter_context(busted.Monitor(**_monitor_kwargs(args)))
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

    addrs = set()
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


# -- entry -------------------------------------------------------------------------------------


def _age(text: str) -> float | None:
    try:
        return sinks.parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int | None:
    try:
        return sinks.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a byte count >= 0, got {text!r}")
    return n


class _Parser(argparse.ArgumentParser):
    """Every busted parser: no abbreviations, so a prefix (``--ui``) is refused instead of silently
    meaning another option (``--uid``), today or when an option is added. Subcommand parsers are
    made of this class too (``add_subparsers`` uses the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _filter_flags() -> argparse.ArgumentParser:
    """The filter flags, defined once: monitor, top, lab and query take the same ones."""
    fp = _Parser(add_help=False)
    g = fp.add_argument_group("filters (a flow must match every one given; repeatable ones match any value)")
    g.add_argument("-p", "--pid", type=int, action="append", help="only this process id (repeatable)")
    g.add_argument("-u", "--uid", type=int, action="append", help="only this user id (repeatable)")
    g.add_argument("-c", "--comm", action="append", help="only this command name, exact (repeatable)")
    g.add_argument("-P", "--port", type=int, action="append", help="only flows with this port at either end "
                   "(repeatable)")
    fam = g.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", dest="family", action="store_const", const=4, help="only IPv4")
    fam.add_argument("-6", "--ipv6", dest="family", action="store_const", const=6, help="only IPv6")
    g.add_argument("--provider", action="append", help="only flows to this provider id ('none' = non-LLM; "
                   "repeatable)")
    return fp


def _live_flags() -> argparse.ArgumentParser:
    """Flags of the commands that load probes and write outputs (monitor, top, lab)."""
    lp = _Parser(add_help=False)
    lp.add_argument("--probes", help="force tiers, e.g. bytes=syscall,lifecycle=tracepoint")
    lp.add_argument("--json", action="store_true", help="NDJSON (default when stdout is not a terminal)")
    g = lp.add_argument_group("outputs (checked before the probes load; a bad one exits 2 and creates nothing)")
    g.add_argument("--store", help="also write every event to this SQLite file")
    g.add_argument("--retention-age", type=_age, default=sinks.DEFAULT_RETENTION_SECONDS, metavar="AGE",
                   help="--store keeps events this long (e.g. 7d, 12h; 'off': forever; default 7d)")
    g.add_argument("--retention-size", type=_size, default=sinks.DEFAULT_MAX_BYTES, metavar="SIZE",
                   help="--store keeps at most this much data (e.g. 1GiB, 500MiB; 'off'; default 1GiB)")
    g.add_argument("--jsonl", help="also append every event to this JSONL file (rotated)")
    g.add_argument("--metrics", help="serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464)")
    g.add_argument("--ui", nargs="?", const="127.0.0.1:8765", metavar="ADDR",
                   help="serve the web page on ADDR (default 127.0.0.1:8765); the URL to open, with its access "
                   "token, is printed on stderr (docs/outputs.md)")
    g.add_argument("--otlp", nargs="?", const="", metavar="ENDPOINT", help="also export calls as OpenTelemetry "
                   "GenAI spans + metrics to this OTLP collector (e.g. http://127.0.0.1:4318; without ENDPOINT: "
                   "OTEL_EXPORTER_OTLP_ENDPOINT, else localhost; needs busted[otlp]; docs/outputs.md)")
    g.add_argument("--otlp-protocol", choices=("http/protobuf", "grpc"), help="with --otlp: http/protobuf "
                   "(default, or OTEL_EXPORTER_OTLP_PROTOCOL) or grpc")
    from busted.policy_cli import add_policy_options  # --policy/--enforce: busted/policy_cli.py

    add_policy_options(lp)
    c = lp.add_argument_group("LLM calls (read from TLS plaintext and plain HTTP; docs/llm.md)")
    c.add_argument("--no-llm-calls", dest="llm_calls", action="store_false",
                   help="flows, DNS and TLS hellos only: no plaintext probes, no call/MCP events")
    c.add_argument("--capture-content", type=_nonneg, default=0, metavar="N",
                   help="keep the first N bytes of each prompt and completion, secrets masked (default 0: none)")
    c.add_argument("--prices", metavar="FILE", help="price overrides (JSON or TOML: provider -> model -> "
                   "input_per_mtok/output_per_mtok/...), consulted before genai-prices (docs/llm.md)")
    return lp


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="busted", description="Audit this host's traffic to LLM providers (eBPF).")
    sub = p.add_subparsers(dest="cmd", required=True)
    filters, live = _filter_flags(), _live_flags()

    d = sub.add_parser("doctor", help="what this kernel offers and which probe tiers would be used")
    d.add_argument("--json", action="store_true")
    d.add_argument("--ebpf", action="store_true", help="print the BPF program Monitor() would load and exit")
    d.add_argument("--probes", help="force tiers, e.g. bytes=syscall,lifecycle=tracepoint")
    s = d.add_argument_group("--security: the installation as a root monitor trusts it (docs/security.md); "
                             "give the options the monitor will run with to check them too")
    s.add_argument("--security", action="store_true", help="only these checks: OK/WARN/FAIL, each with what "
                   "to do; exit 1 if one FAILs")
    for flag, what in (("--policy", "policy file"), ("--prices", "price file"), ("--store", "store path"),
                       ("--jsonl", "JSONL path"), ("--metrics", "metrics address"), ("--ui", "UI address")):
        s.add_argument(flag, metavar="FILE" if "file" in what else "ADDR" if "addr" in what else "PATH",
                       help=f"with --security: check this {what}")

    m = sub.add_parser("monitor", help="live view of flows", parents=[filters, live])
    m.add_argument("--duration", type=float, help="stop after this many seconds")
    m.add_argument("--busy-host", action="store_true", help="flows to peers judged non-LLM (not a provider, "
                   "not MCP) are summed in the kernel per process x peer for 60 s and reported every 5 s as "
                   "flow_summary events (docs/outputs.md)")

    t = sub.add_parser("top", help="refreshing per-process x provider table", parents=[filters, live])
    t.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    t.add_argument("--duration", type=float, help="stop after this many seconds")
    t.add_argument("--by", choices=TOP_BY, default="comm", help="group rows by command name (default), "
                   "agent (docs/agents.md) or container id")

    lab = sub.add_parser("lab", help="network lab with demo LLM traffic, monitored", parents=[filters, live])
    lab.add_argument("--rounds", type=int, default=1)

    from busted.policy_cli import add_policy_parser  # policy: busted/policy_cli.py

    add_policy_parser(sub)

    q = sub.add_parser("query", help="read a store written with --store", parents=[filters])
    q.add_argument("--store", required=True)
    q.add_argument("--table", choices=("flows", "events", "llm_calls", "mcp_messages", "flow_summaries"),
                   default="flows", help="flows (one row per flow), events (every event; see --kind), llm_calls, "
                   "mcp_messages, flow_summaries (busy-host mode)")
    q.add_argument("--kind", action="append", help="with --table events: only this kind, e.g. llm_call "
                   "(repeatable)")
    q.add_argument("--since", type=float, help="only the last N seconds")
    q.add_argument("--json", action="store_true", help="NDJSON, as monitor --json (the default)")
    q.add_argument("--format", choices=("json", "csv"), default="json", help="json (= --json) or csv")

    u = sub.add_parser("ui", help="serve the web page from a store written with --store (read-only, no root)")
    u.add_argument("--store", required=True)
    u.add_argument("--addr", default="127.0.0.1:8765", help="HOST:PORT to listen on (default 127.0.0.1:8765)")
    u.add_argument("--since", type=float, help="only the last N seconds of the store")
    u.add_argument("--duration", type=float, help="stop after this many seconds")
    return p


def _ui(args: argparse.Namespace, out: TextIO) -> int:
    """``busted ui --store F``: the web page over a store, read-only; needs no root."""
    from busted.sinks import Store
    from busted.web import WebState, WebUI
    from busted.web.state import SHOWN_KINDS

    store = Store.open_readonly(args.store)
    state = WebState()
    try:
        since = None if args.since is None else time.time() - args.since
        n = 0
        batch: list[Any] = []
        for d in store.events(kinds=sorted(SHOWN_KINDS), since=since, raw=True):
            batch.append(d)
            n += 1
            if len(batch) >= 1000:
                state.write_batch(batch)
                batch = []
        state.write_batch(batch)
    finally:
        store.close()
    stop = threading.Event()
    _install_sigterm(stop)
    with WebUI(args.addr, state=state, warn=_warn) as ui:
        ui.start()
        print(f"busted: {n} stored events; web UI at {ui.url}  (Ctrl-C stops)", file=sys.stderr, flush=True)
        end = None if args.duration is None else time.monotonic() + args.duration
        try:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                stop.wait(0.5 if end is None else max(0.0, min(0.5, end - time.monotonic())))
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    from busted.policy_cli import policy_command

    handlers = {"doctor": _doctor, "monitor": _monitor, "top": _top, "lab": _lab, "query": _query,
                "policy": policy_command, "ui": _ui}
    try:
        return handlers[args.cmd](args, out)
    except BustedError as exc:
        # Messages carry paths and BCC's output: escaped per line, newlines kept.
        print("\n".join(_p(line) for line in f"busted: {exc}".split("\n")), file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
