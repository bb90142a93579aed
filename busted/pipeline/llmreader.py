"""Per flow: plaintext bytes (each tagged sent/received) -> HTTP events -> LlmCall / McpMessage.

The FlowTable makes one ``CallReader`` per flow whose plaintext it follows. The HTTP layer
(``busted.classify.http``) and the API-shape layer (``busted.classify.llm``) are sans-I/O and
do the parsing; this module maps their records onto typed events carrying the flow's identity,
prices calls, and judges the flow: ``interesting`` becomes False once the flow is known to carry
neither an LLM API nor MCP (its plaintext then stops in the kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from busted.classify.http import HttpConnection
from busted.classify.httpevents import RequestHead, Side
from busted.classify.llm import CallTracker, LlmCallInfo
from busted.classify.mcp import CLIENT_TO_SERVER, McpMessageInfo
from busted.events import FLOW_IDENTITY, Direction, Event, FlowIdentity, LlmCall, McpMessage
from busted.pipeline.flows import ReaderFactory

__all__ = ["CallReader", "default_prices", "reader_factory"]

_IDENTITY = tuple(k for k in FLOW_IDENTITY if k not in ("ts_ns", "wall_time"))
ARRIVAL_JOIN_NS = 10_000_000  # a socket read's arrival is joined to plaintext read this soon after it
ARRIVAL_MEMO = 256  # chunk times known to be arrivals, per flow
_PRICES: Any = None


def default_prices() -> Any:
    """The process-wide price book (genai-prices when installed), built on first use."""
    global _PRICES
    if _PRICES is None:
        from busted.classify.prices import PriceBook

        _PRICES = PriceBook()
    return _PRICES


class CallReader:
    """One flow's plaintext -> events. ``flow`` is the flow's latest identity; ``wall`` turns
    monotonic nanoseconds into UNIX seconds."""

    def __init__(self, flow: FlowIdentity, wall: Callable[[int], float], *, capture_content: int = 0,
                 prices: Any = None) -> None:
        self.flow = flow
        self._wall = wall
        self._http = HttpConnection()
        self._calls = CallTracker(capture_content=capture_content)
        self._prices = prices
        # Who is the HTTP client on this flow: we connected (our writes are requests), or we
        # accepted (our writes are responses: a local model server, an MCP server).
        self._we_are_client = flow.direction != Direction.ACCEPT
        self._known = 0  # LLM or MCP records produced
        self.interesting: bool | None = None
        # The first request's Host header (or :authority), once, for the flow table to name the
        # flow by (``take_host``); only asked for on flows we opened.
        self._host: str | None = None
        self._host_wanted = self._we_are_client
        # Arrival times from the kernel (busted/ebpf/arrival.c, through the flow table): a read at
        # ``ts`` whose first byte reached the socket earlier. The chunk that read delivered is
        # timed by that arrival, so TTFT is what the host saw, not when the client read.
        self._arrival: tuple[int, int] | None = None  # (read ts, arrival ts) not joined to a chunk yet
        self._arrival_read = -1  # the read (its ts) the last arrival was joined to
        self._arrival_ts = 0
        self._socket_ts: dict[int, None] = {}  # chunk times that are arrivals (newest ARRIVAL_MEMO)

    def arrival(self, read_ns: int, arrival_ns: int) -> None:
        """The kernel saw the first byte of the read made at ``read_ns`` arrive at ``arrival_ns``."""
        self._arrival = (read_ns, arrival_ns)

    def _arrived(self, ts: int) -> int:
        a = self._arrival
        if a is not None and a[0] <= ts:
            self._arrival = None
            # The read's plaintext follows its socket read within the library call (or, for
            # memory-BIO stacks, soon after); an older report belongs to a read that delivered none.
            if ts - a[0] <= ARRIVAL_JOIN_NS and a[1] < ts:
                self._arrival_read, self._arrival_ts = ts, a[1]
        if ts != self._arrival_read:
            return ts
        return self._at_socket(self._arrival_ts)

    def _at_socket(self, t: int) -> int:
        """``t`` is an arrival time: a TTFT measured to it says so (``ttft_source`` "socket")."""
        if len(self._socket_ts) >= ARRIVAL_MEMO:
            del self._socket_ts[next(iter(self._socket_ts))]
        self._socket_ts[t] = None
        return t

    def feed(self, sent: bool, data: bytes, ts_ns: int, *, start: bool = False,
             arrived: bool = False) -> list[Event]:
        """Bytes the process sent (or received); ``start``: they begin one of its writes/reads;
        ``arrived``: ``ts_ns`` is already when they reached the socket (read from packets)."""
        side = Side.CLIENT if sent == self._we_are_client else Side.SERVER
        if not sent:
            ts_ns = self._at_socket(ts_ns) if arrived else self._arrived(ts_ns)
        out: list[Event] = []
        for hev in self._http.feed(side, data, ts_ns, start=start):
            if self._host_wanted and isinstance(hev, RequestHead):
                self._host_wanted = False
                self._host = hev.authority
            out.extend(self._records(self._calls.feed(hev)))
        self._judge()
        return out

    def take_host(self) -> str | None:
        """The first request's Host header, the first time it is asked for after that request's
        head was read; None otherwise."""
        host, self._host = self._host, None
        return host

    def feed_gap(self, sent: bool, size: int, ts_ns: int) -> list[Event]:
        """``size`` bytes moved that were not captured (the kernel's copy limit, or lost records)."""
        side = Side.CLIENT if sent == self._we_are_client else Side.SERVER
        out: list[Event] = []
        for hev in self._http.feed_gap(side, size, ts_ns):
            out.extend(self._records(self._calls.feed(hev)))
        return out

    def take_losses(self) -> list[str]:
        """Why exchanges (or the connection) were lost to gaps or memory bounds since the last call."""
        lost = self._http.losses + self._calls.losses
        self._http.losses.clear()
        self._calls.losses.clear()
        return lost

    def close(self, ts_ns: int) -> list[Event]:
        # The HTTP layer first: a close-delimited body (HTTP/1.0, no Content-Length) ends here,
        # complete; only then does the tracker cut short what is still open.
        out: list[Event] = []
        for hev in self._http.close(ts_ns):
            out.extend(self._records(self._calls.feed(hev)))
        out.extend(self._records(self._calls.close(ts_ns)))
        return out

    def _judge(self) -> None:
        kinds = self._calls.kinds
        if self._known or kinds.get("llm") or kinds.get("mcp"):
            self.interesting = True
        elif self.flow.provider is not None:
            return  # a provider's flow: keep reading, whatever its first exchanges were
        elif self._http.stopped:
            self.interesting = False  # not HTTP at all
        elif kinds.get("other") and not kinds.get("maybe_mcp"):
            # exchanges that are no LLM API call or MCP, to a host no catalog entry names
            self.interesting = False

    def _records(self, recs: list[Any]) -> list[Event]:
        out: list[Event] = []
        for r in recs:
            if isinstance(r, LlmCallInfo):
                out.append(self._llm(r))
            elif isinstance(r, McpMessageInfo):
                out.append(self._mcp(r))
        self._known += len(out)
        return out

    def _identity(self, ts_ns: int) -> dict[str, Any]:
        fd = self.flow.__dict__
        d = {k: fd[k] for k in _IDENTITY}
        d["ts_ns"] = ts_ns
        d["wall_time"] = self._wall(ts_ns)
        return d

    def _llm(self, r: LlmCallInfo) -> LlmCall:
        cost = None
        model = r.response_model or r.request_model
        prices = self._prices if self._prices is not None else default_prices()
        try:
            cost = prices.cost(model=model, input_tokens=r.input_tokens, output_tokens=r.output_tokens,
                               cache_read_tokens=r.cache_read_tokens, cache_write_tokens=r.cache_write_tokens,
                               provider=self.flow.provider, authority=r.authority, api=r.api)
        except Exception:  # a price is an extra: never lose the call over it
            cost = None
        return LlmCall(
            **self._identity(r.ts_ns), api=r.api, operation=r.operation, method=r.method, path=r.path,
            http_version=r.http_version, stream_id=r.stream_id, request_model=r.request_model,
            response_model=r.response_model, stream=r.stream, status=r.status, error_type=r.error_type,
            input_tokens=r.input_tokens, output_tokens=r.output_tokens, cache_read_tokens=r.cache_read_tokens,
            cache_write_tokens=r.cache_write_tokens, reasoning_tokens=r.reasoning_tokens,
            total_tokens=r.total_tokens, finish_reason=r.finish_reason, tool_calls=r.tool_calls,
            request_bytes=r.request_body_bytes, response_bytes=r.response_body_bytes,
            time_to_first_token_ns=r.time_to_first_token_ns, ttft_source=self._ttft_source(r),
            duration_ns=r.duration_ns,
            user_agent=r.user_agent, complete=r.complete,
            cost_usd=cost.usd if cost is not None else None,
            price_source=cost.source if cost is not None else None,
            prompt=r.prompt_text, completion=r.completion_text, response_id=r.response_id,
        )

    def _ttft_source(self, r: LlmCallInfo) -> str | None:
        if r.time_to_first_token_ns is None:
            return None
        return "socket" if r.ts_ns + r.time_to_first_token_ns in self._socket_ts else "read"

    def _mcp(self, r: McpMessageInfo) -> McpMessage:
        sent_by_client = r.direction == CLIENT_TO_SERVER
        return McpMessage(
            **self._identity(r.ts_ns), direction_sent=sent_by_client == self._we_are_client,
            jsonrpc_method=r.method, jsonrpc_id=None if r.id is None else str(r.id), session_id=r.session_id,
            tool=r.tool_name, error_code=r.error_code, is_notification=r.is_notification,
        )


def reader_factory(*, capture_content: int = 0, prices: Any = None) -> ReaderFactory:
    """A function (flow, wall) -> reader for the FlowTable (see busted.pipeline.flows)."""

    def make(flow: FlowIdentity, wall: Callable[[int], float]) -> CallReader:
        return CallReader(flow, wall, capture_content=capture_content, prices=prices)

    return make
