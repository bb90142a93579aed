"""``busted monitor``: live events, one line each (a table on a terminal, --json otherwise)."""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from busted._text import printable as _p
from busted.cli.outputs import _Sinks, _start, _Summary
from busted.cli.render import HEADER, _announce, _install_sigterm, _stdout_line, _wants, render
from busted.events import Event
from busted.sinks import Encoded
from busted.sinks import encode as _encode_event

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
            if not batch:  # idle: nothing to write; what an output holds back (the page) goes now
                if sinks is not None:
                    sinks.tick()
                continue
            encoded: list[Encoded | Event] = []  # an event that would not encode goes as is (the store counts it)
            lines = []
            for ev in batch:
                summary.add(ev)
                enc = None
                if encodes:
                    try:
                        enc = _encode_event(ev)
                    except Exception:  # noqa: BLE001 - the store counts an event it cannot encode
                        encoded.append(ev)
                    else:
                        encoded.append(enc)
                if not _wants(ev, args.provider):
                    continue
                lines.append(_stdout_line(ev, None, enc) if as_json else render(ev))
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
    from busted.cli.policy import Reloader

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
                yield []  # half a second without an event: an empty batch lets the outputs catch up

        summary = _run_monitor(args, out, stream(), mon, sinks)
        st = mon.stats()
    print(summary.text(), file=sys.stderr)
    print(_p(f"kernel records {st.records}, events {st.events}, plan {st.plan}"), file=sys.stderr)
    return 0
