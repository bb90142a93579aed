"""The page's own process (started by ``busted.web.process.PageProcess``; not a command to run).

``python -I busted.web.child LISTEN_FD FEED_FD``: serves the page on the listening socket the
monitor bound, from a ``WebState`` fed over the ``SOCK_SEQPACKET`` socket ``FEED_FD``. The first
message is JSON (the access token); then pickled ``("batch", items)`` and ``("stats", dict)``
messages from the monitor. End-of-file (the monitor closed it, or died) ends this process.

Before it serves, the process gives up root: everything it needs is imported and the page's
files are read by then (``WebUI.start(before_serve=...)``).
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import pwd
import select
import signal
import socket
import sys
import time
import types
from typing import Any

from busted.web.process import MAX_MESSAGE
from busted.web.server import WebUI
from busted.web.state import WebState

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
UNPRIVILEGED_USER = "nobody"
COALESCE_S = 0.2  # the page is at most this much behind the monitor


def _warn(message: str) -> None:
    print(f"busted: web UI: {message}", file=sys.stderr, flush=True)


class CannotDrop(Exception):
    """Root could not be given up: the page is not served (failing closed, said on stderr)."""


def drop_privileges(user: str = UNPRIVILEGED_USER) -> None:
    """Root -> ``user`` (its group, no supplementary groups), no new privileges, not dumpable (no
    other process of that user may trace this one or read its memory, where the token is).
    Not root: nothing to give up. No such user: stays, and says so. Root that may not change its
    user (a container without CAP_SETUID/CAP_SETGID): ``CannotDrop``, and the page is not served."""
    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            _warn(f"no user {user!r} on this host: the page's process keeps root")
        else:
            try:
                os.setgroups([])
                os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
                os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
            except OSError as exc:
                raise CannotDrop(f"cannot give up root ({exc.strerror or exc}); the page is not served. "
                                 "Run busted with CAP_SETUID and CAP_SETGID, or without --ui") from exc
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


class _Stats:
    """The monitor's latest stats, as the health view reads them."""

    latest: Any = None

    def get(self) -> Any:
        return self.latest


def _feed(state: WebState, payload: list[Any]) -> None:
    """A batch in the monitor's order: flow tuples grouped in runs, the other items as dicts."""
    run: list[Any] = []
    items: list[Any] = []
    for it in payload:
        if isinstance(it, tuple):
            if items:
                state.write_batch(items)
                items = []
            run.append(it)
        else:
            if run:
                state.write_flows(run)
                run = []
            items.append(it)
    if run:
        state.write_flows(run)
    if items:
        state.write_batch(items)


def _read(feed: socket.socket, buf: bytearray, state: WebState, stats: _Stats) -> bool:
    """Every message waiting on ``feed`` (at most 10,000), into ``state``; False at end-of-file."""
    view = memoryview(buf)
    for _ in range(10_000):
        try:
            n = feed.recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        if n == 0:
            return False
        tag, payload = pickle.loads(view[:n])  # noqa: S301 - from the monitor, which started us
        if tag == "batch":
            _feed(state, payload)
        elif tag == "stats":
            stats.latest = types.SimpleNamespace(**payload)
    return True


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the monitor; its end ends us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    lsock = socket.socket(fileno=int(argv[0]))
    feed = socket.socket(fileno=int(argv[1]))
    feed.settimeout(60)
    try:
        hello = json.loads(feed.recv(65536) or b"{}")
    except (OSError, ValueError):
        return 1
    feed.settimeout(None)
    token = hello.get("token")
    if not isinstance(token, str) or not token:
        return 1
    state, stats = WebState(), _Stats()
    ui = WebUI(state=state, token=token, sock=lsock, warn=_warn)
    try:
        try:
            ui.start(stats=stats.get, before_serve=drop_privileges)
        except CannotDrop as exc:
            _warn(str(exc))
            return 1
        if not ui.serving:
            return 1
        feed.sendall(json.dumps({"ready": True}).encode())
        buf = bytearray(MAX_MESSAGE)  # one buffer for every message: no allocation per receive
        while True:
            select.select([feed], [], [])  # sleep until the monitor sends
            if not _read(feed, buf, state, stats):
                return 0  # the monitor closed the page (or ended)
            # At most COALESCE_S between reads: the monitor sends a message per batch (up to 200
            # a second); reading them in a few bunches a second costs a fraction of waking for each.
            time.sleep(COALESCE_S)
    except OSError:
        return 0  # the socket went away with the monitor
    finally:
        ui.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
