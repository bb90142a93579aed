"""The web page's server: a Starlette app over a ``WebState``; every route behind a token.

Routes (all answer 401 without the token):

    /                  the page (``/?token=T`` sets an HttpOnly cookie and redirects to ``/``)
    /static/...        the page's script, style and the vendored uPlot (no CDN: works offline)
    /api/calls | mcp | decisions | losses | flows    JSON lists, newest first, with the CLI's filters
    /api/spend         cost and tokens over time per provider/model/agent/container/comm
    /api/health        losses and load
    /api/budgets       spend against limits per budget x scope (a policy's [[budgets]])
    /api/stream        server-sent events: every shown event as it happens (bounded per tab)

The page builds every cell with ``textContent`` and the server sends a strict Content-Security-Policy
(no inline script, nothing from another origin): a process name, SNI or model holding HTML is shown
as text. Data are the same redacted dicts every other output writes.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import threading
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from busted.web.state import Filters, WebState

__all__ = ["COOKIE", "SECURITY_HEADERS", "Tab", "make_app"]

COOKIE = "busted_ui"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC = {  # file -> media type; nothing else is served
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
UNAUTHORIZED = ("busted UI: this needs the access token. Open the URL busted printed on its standard "
                "error when it started (it ends in ?token=...).\n")


def _static(name: str) -> bytes:
    return resources.files("busted.web").joinpath("static", name).read_bytes()


class Tab:
    """One open event stream: a bounded queue filled from the Monitor's thread. When the tab reads
    too slowly, new events are dropped for it (counted and told to it), never queued without bound
    and never waited for."""

    def __init__(self, loop: asyncio.AbstractEventLoop, filters: Filters, maxlen: int = 1000) -> None:
        self.loop = loop
        self.filters = filters
        self.pending: collections.deque[str] = collections.deque()
        self.maxlen = maxlen
        self.dropped = 0
        self._lock = threading.Lock()
        self._scheduled = False
        self.wake = asyncio.Event()

    def offer(self, batch: list[dict[str, Any]]) -> None:
        """Called in the writer's thread; one loop wake-up per batch at most."""
        lines = []
        for d in batch:
            if self.filters.match(d):
                lines.append(json.dumps(d, separators=(",", ":"), default=str))
        if not lines:
            return
        with self._lock:
            room = self.maxlen - len(self.pending)
            if room < len(lines):
                self.dropped += len(lines) - max(room, 0)
                lines = lines[:max(room, 0)]
            self.pending.extend(lines)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the server's loop is closed: nothing reads this tab any more
            pass

    def _wake(self) -> None:
        with self._lock:
            self._scheduled = False
        self.wake.set()

    def take(self) -> tuple[list[str], int]:
        with self._lock:
            lines = list(self.pending)
            self.pending.clear()
            dropped, self.dropped = self.dropped, 0
        return lines, dropped


def make_app(state: WebState, token: str, *, loopback: bool = True, stopping: threading.Event | None = None,
             heartbeat_s: float = 1.0, tab_queue: int = 1000) -> Starlette:
    """The app for ``state``; ``token`` is the access token; ``loopback``: accept only loopback
    Host headers (a page on another site cannot reach us by DNS rebinding)."""
    stopping = stopping or threading.Event()
    page = _static("index.html")
    files = {name: _static(name) for name in STATIC}  # read once: the page's process may give up root after
    counters = {"tabs_dropped": 0}

    def authorized(request: Request) -> bool:
        given = request.cookies.get(COOKIE) or request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())

    def secure(resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    def guard(request: Request) -> Response | None:
        if loopback:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if name not in LOOPBACK_HOSTS:
                return secure(PlainTextResponse("busted UI: unexpected Host header\n", status_code=403))
        if not authorized(request):
            return secure(PlainTextResponse(UNAUTHORIZED, status_code=401))
        return None

    async def index(request: Request) -> Response:
        if (bad := guard(request)) is not None:
            return bad
        if "token" in request.query_params:  # keep the token out of the address bar and history
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return secure(resp)
        return secure(Response(page, media_type="text/html; charset=utf-8"))

    async def static(request: Request) -> Response:
        if (bad := guard(request)) is not None:
            return bad
        name = request.path_params["name"]
        if name not in STATIC:
            return secure(PlainTextResponse("not found\n", status_code=404))
        return secure(Response(files[name], media_type=STATIC[name]))

    def limit_of(request: Request) -> int:
        try:
            return max(1, min(int(request.query_params.get("limit", "500")), 5000))
        except ValueError:
            return 500

    async def listing(request: Request) -> Response:
        if (bad := guard(request)) is not None:
            return bad
        view = request.path_params["view"]
        f = Filters(request.query_params)
        if view == "flows":
            data = state.flows(f, limit_of(request))
        elif view in ("calls", "mcp", "decisions", "losses"):
            data = state.items(view, f, limit_of(request))
        else:
            return secure(PlainTextResponse("not found\n", status_code=404))
        return secure(JSONResponse(data))

    async def spend(request: Request) -> Response:
        if (bad := guard(request)) is not None:
            return bad
        q = request.query_params
        try:
            window = float(q.get("window", "3600"))
            buckets = int(q.get("buckets", "60"))
        except ValueError:
            return secure(PlainTextResponse("window and buckets are numbers\n", status_code=400))
        return secure(JSONResponse(state.spend(q.get("by", "provider"), window, buckets, Filters(q))))

    async def health(request: Request) -> Response:
        if (bad := guard(request)) is not None:
            return bad
        h = state.health()
        h["tabs_dropped"] = counters["tabs_dropped"]
        return secure(JSONResponse(h))

    async def budgets(request: Request) -> Response:
        if (bad := guard(request)) is not None:
            return bad
        return secure(JSONResponse(state.budgets()))

    async def stream(request: Request) -> Response:
        if (bad := guard(request)) is not None:
            return bad
        tab = Tab(asyncio.get_running_loop(), Filters(request.query_params), tab_queue)
        unsubscribe = state.subscribe(tab.offer)

        async def events() -> Any:
            try:
                yield "retry: 2000\n\n"
                while not stopping.is_set():
                    try:
                        await asyncio.wait_for(tab.wake.wait(), heartbeat_s)
                    except TimeoutError:
                        yield ": keep-alive\n\n"  # also how a closed tab is noticed
                        continue
                    tab.wake.clear()
                    lines, dropped = tab.take()
                    if dropped:
                        counters["tabs_dropped"] += dropped
                        yield f"event: dropped\ndata: {dropped}\n\n"
                    for line in lines:
                        yield f"data: {line}\n\n"
            finally:
                unsubscribe()

        return secure(StreamingResponse(events(), media_type="text/event-stream",
                                        headers={"X-Accel-Buffering": "no"}))

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/api/stream", stream),
        Route("/api/spend", spend),
        Route("/api/health", health),
        Route("/api/budgets", budgets),
        Route("/api/{view}", listing),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        if (bad := guard(request)) is not None:
            return bad
        return secure(PlainTextResponse("not found\n", status_code=404))

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
