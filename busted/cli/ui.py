"""``busted ui --store F``: the web page over a store, read-only; needs no root."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any, TextIO

from busted.cli.render import _install_sigterm, _warn


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
