"""``PageProcess``: the live page served by a child process, so the monitor holds no web server.

``busted monitor --ui`` (and ``busted lab --ui``) use it in place of an in-process ``WebUI``:

- The monitor binds the address itself (a taken port fails before any probe loads; a port below
  1024 works), makes the access token, and starts ``python -I busted.web.child`` (``_safe``'s
  isolated child) with the listening socket and one end of a ``SOCK_SEQPACKET`` socketpair. The
  token travels over that socketpair, never in argv or the environment (both readable in /proc).
- The child imports Starlette and uvicorn, loads what it serves, then gives up root (to ``nobody``,
  no supplementary groups, no new privileges) before it accepts a connection: the process that
  parses HTTP from the network holds no privilege and no BPF object.
- The monitor feeds it what the page shows: the calls, MCP messages, policy decisions, losses and
  budget events as the redacted dicts every output writes, and flow closes and classifications as
  small tuples of the fields the flows view groups by. Everything else costs a set lookup. What
  is kept waits in a bounded list and goes out with one non-blocking ``send`` at most every
  ``FLUSH_S`` (and when the monitor's loop is idle, ``tick()``): if the child falls behind and the
  socket buffer is full, the items are dropped for the page and counted (``dropped``), never
  waited for, so a slow page cannot slow the monitor or grow its memory.
- The monitor's stats reach the child at most once a second, with a batch.
- The child unpickles what the monitor sends; the monitor never unpickles what the child says
  (its one message, "ready", is JSON). If the monitor dies, the child reads end-of-file and exits.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from busted.errors import MissingDependency
from busted.events import Event
from busted.web.server import DEFAULT_ADDR, listen, page_url
from busted.web.state import _KEPT_KINDS, _as_dict, flow_record

__all__ = ["MAX_MESSAGE", "PageProcess"]

MAX_MESSAGE = 1 << 20  # bytes per message on the socketpair; a batch is split to fit
_ITEMS_PER_MESSAGE = 512
_MAX_PENDING = 50_000  # items waiting for the next send
FLUSH_S = 0.1  # at most ten sends a second: one per drain (up to 200 a second) cost the monitor more
_SNDBUF = 4 << 20  # room for a few seconds of a busy host's flow closes if the child is slow
_STATS_EVERY_S = 1.0


def _stats_dict(s: Any, dropped: int) -> dict[str, Any]:
    """The monitor's stats as plain values (what the health view shows)."""
    return {"events": getattr(s, "events", None), "queue_depth": getattr(s, "queue_depth", None),
            "open_flows": getattr(s, "open_flows", None),
            "lost": {str(getattr(k, "name", k)).lower(): v for k, v in dict(getattr(s, "lost", {})).items()},
            "plan": {str(k): str(v) for k, v in dict(getattr(s, "plan", {})).items()},
            "page_dropped": dropped}


class PageProcess:
    """The live page as a sink whose server runs in a child process (see the module's docstring).

    Same use as ``WebUI``: built (binds, starts the child) before the probes load, ``start(stats)``
    once the Monitor runs (waits until the page is served), ``write_batch(events)`` per batch,
    ``close()``."""

    def __init__(self, addr: str = DEFAULT_ADDR, *, warn: Callable[[str], None] | None = None,
                 startup_timeout: float = 20.0) -> None:
        if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
            raise MissingDependency("starlette/uvicorn", "ui", "--ui")
        self._warn = warn or (lambda m: print(f"busted: {m}", file=sys.stderr, flush=True))
        self.token = secrets.token_urlsafe(24)
        self.sent = 0  # events handed to the page
        self.dropped = 0  # events the page did not get: its socket was full, or it had stopped
        self._stats: Callable[[], Any] | None = None
        self._stats_at = 0.0
        self._sent_at = 0.0
        self._pending: list[Any] = []
        self._dead = False
        self._timeout = startup_timeout
        lsock = listen(addr, self._warn)
        self.host, self.port = lsock.getsockname()[:2]
        self._feed, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                self._feed.setsockopt(socket.SOL_SOCKET, 32, _SNDBUF)  # SO_SNDBUFFORCE (root): past wmem_max
            except OSError:
                self._feed.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            from busted._safe import CHILD_CWD, child_env, python_argv

            # Started now, so its interpreter and imports overlap the probes' loading.
            self.proc = subprocess.Popen(
                python_argv("busted.web.child", str(lsock.fileno()), str(theirs.fileno())),
                pass_fds=(lsock.fileno(), theirs.fileno()), cwd=CHILD_CWD, env=child_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            self._feed.close()
            raise
        finally:
            lsock.close()  # the child serves it; the monitor keeps no copy
            theirs.close()
        self.pid = self.proc.pid
        hello = {"token": self.token}
        self._feed.sendall(json.dumps(hello).encode())
        self._feed.setblocking(False)

    @property
    def url(self) -> str:
        return page_url(self.host, self.port, self.token)

    def start(self, stats: Callable[[], Any] | None = None) -> PageProcess:
        """Wait until the child serves the page (it says "ready"); say so if it does not."""
        self._stats = stats
        end = time.monotonic() + self._timeout
        msg = b""
        while not self._dead and time.monotonic() < end:
            r, _, _ = select.select([self._feed], [], [], max(0.0, min(0.5, end - time.monotonic())))
            if not r:
                if self.proc.poll() is not None:
                    break
                continue
            try:
                msg = self._feed.recv(4096)
            except BlockingIOError:
                continue
            except OSError:  # reset: the child died unread
                msg = b""
            break
        try:
            ready = bool(json.loads(msg or b"{}").get("ready"))
        except (ValueError, AttributeError):
            ready = False
        if not ready:
            timed_out = time.monotonic() >= end and self.proc.poll() is None and msg == b""
            if self.proc.poll() is None:
                self.proc.kill()  # a page that never got going serves nothing: no stray process
            why = (f"did not start within {self._timeout:.0f} s" if timed_out else
                   "did not start: its process ended before serving (its reason, if it gave one, is above)")
            self._stop_feeding(f"the web UI {why}; the monitor goes on without it")
        else:
            self._send_stats()
        return self

    # -- the sink (the Monitor's writer thread) ----------------------------------------------------

    def write(self, ev: Event) -> None:
        self.write_batch((ev,))

    def write_batch(self, events: Iterable[Event]) -> None:
        """Keep what the page shows; send it if the last send was ``FLUSH_S`` ago or more."""
        if self._dead:
            return
        kept = _KEPT_KINDS
        out: list[Any] = []
        for ev in events:
            kind = ev.kind
            if kind not in kept:  # flow opens, DNS, TLS hellos...: the common case
                continue
            if kind == "flow_closed" or kind == "flow_classified":
                out.append(flow_record(ev))  # a tuple: the child groups it
            else:
                out.append(_as_dict(ev))  # calls, MCP, decisions, losses, budgets: rare, redacted
        if out:
            pending = self._pending
            room = _MAX_PENDING - len(pending)
            if room < len(out):  # the page has not been flushed to for long: bounded, counted
                self.dropped += len(out) - max(room, 0)
                out = out[:max(room, 0)]
            pending.extend(out)
        if time.monotonic() - self._sent_at >= FLUSH_S:
            self.tick()

    def tick(self) -> None:
        """Send what is pending (and the stats, at most once a second). ``write_batch`` calls it
        at most every ``FLUSH_S``; the monitor's loops call it when idle, so the last events of a
        burst reach the page within about half a second."""
        if self._dead:
            return
        now = time.monotonic()
        self._sent_at = now
        if self._stats is not None and now - self._stats_at >= _STATS_EVERY_S:
            self._send_stats()
        out, self._pending = self._pending, []
        for i in range(0, len(out), _ITEMS_PER_MESSAGE):
            self._send_items(out[i:i + _ITEMS_PER_MESSAGE])

    def _send_items(self, items: list[Any]) -> None:
        data = pickle.dumps(("batch", items), protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE:
            if len(items) == 1:
                self.dropped += 1  # one item larger than a message (bounded fields make this rare)
                return
            half = len(items) // 2
            self._send_items(items[:half])
            self._send_items(items[half:])
            return
        if self._send(data):
            self.sent += len(items)
        else:
            self.dropped += len(items)

    def _send_stats(self) -> None:
        self._stats_at = time.monotonic()
        try:
            s = self._stats() if self._stats is not None else None
        except Exception:  # noqa: BLE001 - a closing Monitor: the page keeps the last figures
            return
        if s is not None:
            self._send(pickle.dumps(("stats", _stats_dict(s, self.dropped)), protocol=pickle.HIGHEST_PROTOCOL))

    def _send(self, data: bytes) -> bool:
        if self._dead:
            return False
        try:
            self._feed.send(data)
            return True
        except BlockingIOError:
            return False  # the page is behind: this batch is dropped for it, and counted
        except OSError as exc:  # EPIPE, ECONNRESET: the child has gone
            self._stop_feeding(f"the web UI stopped ({exc.strerror or exc}); the monitor goes on without it")
            return False

    def _stop_feeding(self, why: str) -> None:
        if not self._dead:
            self._dead = True
            self._warn(why)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the page: end-of-file on its socket ends the child; killed if it lingers."""
        self.tick()
        self._dead = True
        self._feed.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.dropped:
            self._warn(f"web UI: {self.dropped} events were not shown on the page (it fell behind)")

    def __enter__(self) -> PageProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
