"""``WebUI``: the page served from a thread of this process, fed like a sink.

``busted ui --store`` serves it this way, and so does the page's child process that ``busted monitor
--ui`` starts (``busted.web.process``): the monitor itself holds no web server.

    ui = WebUI("127.0.0.1:8765")      # binds now: a taken port fails before any probe loads
    ui.start(stats=mon.stats)         # uvicorn in a daemon thread
    print(ui.url)                     # http://127.0.0.1:8765/?token=...
    for ev in mon.events(): ui.write(ev)
    ui.close()

uvicorn serves it (a small, maintained ASGI server; Starlette is the app): both are already
dependencies of the ``mcp`` package busted's lab uses, so ``busted[ui]`` adds nothing new to most
installs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from busted.errors import EnvironmentProblem, MissingDependency, UsageError
from busted.events import Event
from busted.web.state import WebState

__all__ = ["DEFAULT_ADDR", "WebUI", "listen", "page_url", "parse_addr"]

DEFAULT_ADDR = "127.0.0.1:8765"
# What uvicorn and Starlette (through anyio) import only when serving starts or the first request
# comes: loaded before the page's process gives up root, which may leave it unable to read them.
_LAZY_MODULES = ("uvicorn.loops.auto", "uvicorn.loops.asyncio", "anyio.lowlevel", "anyio._backends._asyncio",
                 "anyio.streams.memory", "anyio.streams.stapled", "anyio.streams.tls")


def parse_addr(addr: str, flag: str = "--ui") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); a bare port means loopback."""
    text = addr.strip()
    if text.isdigit():
        return "127.0.0.1", int(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"{flag} {addr!r}: expected HOST:PORT, e.g. {DEFAULT_ADDR}")
    host = host.strip("[]")
    p = int(port)
    if not 0 <= p <= 65535:
        raise UsageError(f"{flag} {addr!r}: port out of range")
    return host, p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stderr_warn(message: str) -> None:
    print(f"busted: {message}", file=sys.stderr, flush=True)


def listen(addr: str, warn: Callable[[str], None] = _stderr_warn) -> socket.socket:
    """A socket listening on ``addr`` (``HOST:PORT``): bound now, so a taken port fails before any
    probe loads; a non-loopback address is warned about."""
    host, port = parse_addr(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise EnvironmentProblem(f"--ui {addr}: cannot listen there ({exc.strerror or exc}); "
                                 "pick another HOST:PORT (port 0 picks a free one)") from exc
    sock.set_inheritable(False)
    if not _is_loopback(host):
        warn(f"--ui {addr}: listening on a non-loopback address; anyone who can reach it and has the "
             "token sees every call (prefer 127.0.0.1 and an SSH tunnel)")
    return sock


def page_url(host: str, port: int, token: str) -> str:
    """The address to open: ``http://HOST:PORT/?token=...`` (the token is the key)."""
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = socket.gethostname()
    return f"http://{shown}:{port}/?token={token}"


def _idle_server_class() -> type:
    """uvicorn's ``Server`` whose main loop sleeps until ``request_exit()``.

    uvicorn's own main loop wakes every 0.1 s to look at ``should_exit`` (and, once a second, to
    refresh the Date header, which is off here): ten wake-ups a second of a thread that competes for
    the GIL with the monitor's reader and main thread, even when no tab is open. This one runs one
    tick (it sets the default headers) and then waits on an event that only ``request_exit()`` sets;
    with no connection the server's thread sleeps in epoll."""
    import uvicorn

    class _IdleServer(uvicorn.Server):
        _wake: asyncio.Event | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        async def main_loop(self) -> None:
            self._wake = asyncio.Event()  # set before _loop: request_exit() reads _loop first
            self._loop = asyncio.get_running_loop()
            if await self.on_tick(0):  # default headers; an exit asked before the loop ran
                return
            while not self.should_exit:  # request_exit() sets should_exit, then wakes us
                await self._wake.wait()

        def request_exit(self) -> None:
            """Stop serving (from any thread)."""
            self.should_exit = True
            loop, wake = self._loop, self._wake
            if loop is not None and wake is not None:
                with contextlib.suppress(RuntimeError):  # the loop is already closed: it has stopped
                    loop.call_soon_threadsafe(wake.set)

    return _IdleServer


class WebUI:
    """The live page as a sink: ``write``/``write_batch`` keep events in bounded windows (one
    ``append`` each when no tab is open), ``close()`` stops the server."""

    def __init__(self, addr: str = DEFAULT_ADDR, *, state: WebState | None = None, token: str | None = None,
                 warn: Callable[[str], None] | None = None, sock: socket.socket | None = None) -> None:
        """``sock``: a socket already listening (the page's child process gets the monitor's)."""
        try:
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            raise MissingDependency("starlette/uvicorn", "ui", "--ui") from exc
        self.token = token or secrets.token_urlsafe(24)
        self.state = state or WebState()
        self._warn = warn or _stderr_warn
        if sock is None:
            sock = listen(addr, self._warn)
        self._sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.loopback = _is_loopback(self.host)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None

    @property
    def url(self) -> str:
        return page_url(self.host, self.port, self.token)

    def start(self, stats: Callable[[], Any] | None = None, startup_timeout: float = 10.0,
              before_serve: Callable[[], None] | None = None) -> WebUI:
        """Serve in a daemon thread; returns once the page is served. ``before_serve()`` runs after
        everything the server needs is imported and loaded, before its thread starts (the page's
        child process gives up root there)."""
        import uvicorn

        from busted.web.app import make_app

        self.state.set_stats(stats)
        app = make_app(self.state, self.token, loopback=self.loopback, stopping=self._stop)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, ws="none", proxy_headers=False,
                                server_header=False, date_header=False)
        config.load()  # the protocol classes uvicorn imports lazily: loaded now, not after before_serve()
        for name in _LAZY_MODULES:  # imported on the first request otherwise: after before_serve()
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        self._server = _idle_server_class()(config)
        if before_serve is not None:
            before_serve()
        self._thread = threading.Thread(target=self._serve, name="busted-ui", daemon=True)
        self._thread.start()
        # The URL is printed once the page is served: the server's start-up (its imports, its
        # event loop) is done before the monitor says it is ready, not on the monitor's time after.
        end = time.monotonic() + startup_timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        if not self._server.started:
            self._warn(f"the web UI did not start within {startup_timeout:.0f} s; the monitor goes on without it")
        return self

    @property
    def serving(self) -> bool:
        """True once uvicorn serves the page."""
        return bool(self._server is not None and self._server.started)

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except Exception as exc:  # noqa: BLE001 - the page dies, the monitor goes on: say so
            self._warn(f"the web UI stopped: {exc}")

    def write(self, ev: Event) -> None:
        self.state.write(ev)

    def write_batch(self, events: Iterable[Event]) -> None:
        self.state.write_batch(events)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.request_exit()
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> WebUI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
