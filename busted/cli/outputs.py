"""The outputs of the live commands (--store, --jsonl, --metrics, --ui, --otlp), checked before
the probes load, and the Monitor's arguments from the flags."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from busted import sinks
from busted._text import printable as _p
from busted.cli.render import _warn
from busted.errors import BustedError, EnvironmentProblem, MissingDependency, StoreError, UsageError
from busted.events import Event, EventsLost, FlowOpened


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
    """The Monitor options the flags ask for (only those given: the defaults live in
    ``busted.options.MonitorOptions``)."""
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
    from busted.cli.policy import policy_kwargs

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
                # binds now (a taken port fails before the probes load) and starts the page's own
                # process: no web server or web modules in the monitor (docs/outputs.md)
                from busted.web.process import PageProcess

                self.ui = PageProcess(args.ui, warn=_warn)
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

    def tick(self) -> None:
        """The monitor's loop is idle: let the page send what it holds (--ui)."""
        if self.ui is not None:
            self.ui.tick()

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
            if s is self.exporter and s is not None:
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
            from busted.policy.budget_enforce import stored_spend
            from busted.sinks import Store

            kw["budget_spend"] = stored_spend([s for s in sinks.sinks if isinstance(s, Store)], kw["policy"])
        mon = busted.Monitor(busted.MonitorOptions(**kw))
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
