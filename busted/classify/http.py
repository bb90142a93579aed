"""One passive HTTP observer per TCP connection: bytes per direction in, ``httpevents`` out.

``HttpConnection.feed(side, data, ts_ns)`` is sans-I/O and never raises: whatever goes wrong
(malformed or hostile bytes, a connection joined mid-stream, a library error) becomes one
``HttpProtocolError`` event, is counted in ``errors``, and the connection is no longer parsed;
later bytes are dropped at the cost of one attribute check.

The protocol is the ALPN hint if given, else found from the first bytes seen:

* the HTTP/2 client preface, or (joined late) a plausible HTTP/2 frame header -> HTTP/2;
* a request line from the client, or a status line from the server (joined late) -> HTTP/1.x;
* anything else -> one ``HttpProtocolError("not HTTP")`` and silence.

``feed_gap(side, size, ts_ns)`` says that ``size`` bytes of ``side`` were on the wire but not
captured (the kernel copies a bounded head and tail of each write): the parsers skip them inside
a body and resynchronise; a gap they cannot bridge loses the exchange or the connection, with its
reason in ``losses`` (never silently). ``feed(..., start=True)`` marks bytes that begin a write
(where HTTP/2 may resume after a gap across frames).

Memory is bounded per connection: ``max_buffer`` bytes of unparsed input (frames, heads), and
``max_decoded`` decoded body bytes per message (decompression is streamed and capped).
"""

from __future__ import annotations

import re

import h11
import hpack
import hyperframe.exceptions

from .http1 import Http1Parser
from .http2 import PREFACE, Http2Parser, looks_like_frame
from .httpbody import HAVE_BROTLI
from .httpevents import HttpEvent, HttpProtocolError, Side

__all__ = ["HAVE_BROTLI", "MAX_BUFFER", "MAX_DECODED", "HttpConnection"]

MAX_BUFFER = 1 << 20  # unparsed bytes held per connection
MAX_DECODED = 16 << 20  # decoded body bytes per message

_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} [^ \r\n\x00]")
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{0,32}\Z")
_STATUS_PREFIX = b"HTTP/1."
_DETECT_MAX = 40  # bytes enough to decide
# What malformed input makes the parsers raise. Anything else is a bug in this package, still
# contained, but reported as "internal error" so that it stands out (the fuzzer fails on it).
_PARSE_ERRORS = (h11.RemoteProtocolError, hpack.HPACKError, hyperframe.exceptions.HyperframeError, ValueError)


class HttpConnection:
    """Observer of one TCP connection's HTTP (plaintext: cleartext, or TLS payload via uprobes).

    ``alpn`` ("h2", "http/1.1", "http/1.0") skips detection. ``protocol`` is "h2" or "http/1"
    once known, None while undecided or if the bytes were not HTTP. ``stopped``: no longer parsed
    (after an error, a tunnel, or ``close``). ``errors``: ``HttpProtocolError`` events emitted.
    """

    def __init__(self, alpn: str | None = None, *, max_buffer: int = MAX_BUFFER,
                 max_decoded: int = MAX_DECODED) -> None:
        self.max_buffer = max_buffer
        self.max_decoded = max_decoded
        self.errors = 0
        self.stopped = False
        self.protocol: str | None = None
        self._h1: Http1Parser | None = None
        self._h2: Http2Parser | None = None
        self.losses: list[str] = []  # exchanges or the connection lost to gaps and bounds, with why
        self._pending: list[tuple[Side, bytes, int]] = []  # chunks held until the protocol is known
        self._pending_len = [0, 0]
        if alpn == "h2":
            self._start("h2")
        elif alpn in ("http/1.1", "http/1.0"):
            self._start("http/1")

    def _start(self, proto: str) -> None:
        self.protocol = proto
        if proto == "h2":
            self._h2 = Http2Parser(self.max_decoded, self.max_buffer)
        else:
            self._h1 = Http1Parser(self.max_decoded, self.max_buffer)

    def feed(self, side: Side, data: bytes, ts_ns: int, *, start: bool = False) -> list[HttpEvent]:
        """Bytes written by ``side``, in the order they were seen; returns the events they complete.
        ``start``: they begin one write of that side (a place HTTP/2 can resume after a gap)."""
        if self.stopped or not data:
            return []
        try:
            if self.protocol is None:
                return self._detect(side, bytes(data), ts_ns)
            if start and self._h2 is not None:
                self._h2.write_start(side)
            return self._feed(side, data, ts_ns)
        except Exception as exc:  # the contract: nothing escapes, the connection is abandoned
            return [self._fail(ts_ns, _describe(exc))]

    def feed_gap(self, side: Side, size: int, ts_ns: int) -> list[HttpEvent]:
        """``size`` bytes written by ``side`` that were not captured; returns the events they make."""
        if self.stopped or size <= 0:
            return []
        try:
            if self.protocol is None:
                raise ValueError(f"a {size}-byte gap before the protocol was known")
            if self._h2 is not None:
                out = self._h2.feed_gap(side, size, ts_ns)
            else:
                h1 = self._h1
                assert h1 is not None
                out = h1.gap_client(size, ts_ns) if side is Side.CLIENT else h1.gap_server(size, ts_ns)
        except Exception as exc:
            detail = _describe(exc)
            self.losses.append(f"connection no longer parsed: {detail}")
            return [self._fail(ts_ns, detail)]
        self._take_losses()
        return out

    def _take_losses(self) -> None:
        p = self._h2 if self._h2 is not None else self._h1
        if p is not None and p.losses:
            self.losses.extend(p.losses)
            p.losses.clear()

    def close(self, ts_ns: int) -> list[HttpEvent]:
        """The connection ended: finish close-delimited bodies, flag responses in flight incomplete."""
        if self.stopped:
            return []
        self.stopped = True
        try:
            if self._h2 is not None:
                return self._h2.close(ts_ns)
            if self._h1 is not None:
                return self._h1.close(ts_ns)
        except Exception as exc:
            self.errors += 1
            return [HttpProtocolError(0, ts_ns, _describe(exc))]
        return []

    def _fail(self, ts: int, detail: str) -> HttpProtocolError:
        self.errors += 1
        self.stopped = True
        self._pending.clear()
        return HttpProtocolError(0, ts, detail)

    def _feed(self, side: Side, data: bytes, ts: int) -> list[HttpEvent]:
        if self._h2 is not None:
            out = self._h2.feed(side, data, ts)
        else:
            h1 = self._h1
            assert h1 is not None
            out = h1.feed_client(data, ts) if side is Side.CLIENT else h1.feed_server(data, ts)
            if h1.stopped:  # a tunnel (Upgrade/CONNECT) or the server closed: nothing more to read
                self.stopped = True
        for ev in out:
            if isinstance(ev, HttpProtocolError):
                self.errors += 1
        self._take_losses()
        return out

    def _detect(self, side: Side, data: bytes, ts: int) -> list[HttpEvent]:
        self._pending.append((side, data, ts))
        self._pending_len[side] += len(data)
        head = b"".join(d for s, d, _ in self._pending if s is side)[:_DETECT_MAX]
        proto = self._guess(side, head)
        if proto is None:
            if self._pending_len[side] > _DETECT_MAX:  # cannot happen with _guess's rules; belt and braces
                return [self._fail(ts, "not HTTP")]
            return []
        if proto == "":
            return [self._fail(ts, "not HTTP")]
        self._start(proto)
        pending, self._pending = self._pending, []
        out: list[HttpEvent] = []
        for s, d, t in pending:
            out.extend(self._feed(s, d, t))
            if self.stopped:
                break
        return out

    @staticmethod
    def _guess(side: Side, head: bytes) -> str | None:
        """"h2", "http/1", "" (not HTTP) or None (need more bytes)."""
        if side is Side.CLIENT:
            n = min(len(head), len(PREFACE))
            if head[:n] == PREFACE[:n]:
                return "h2" if n == len(PREFACE) else None
            if _REQUEST_LINE.match(head):
                return "http/1"
            if _METHOD_PREFIX.match(head):  # "GE", "POST": a method still arriving
                return None
        else:
            n = min(len(head), len(_STATUS_PREFIX))
            if head[:n] == _STATUS_PREFIX[:n]:
                return "http/1" if n == len(_STATUS_PREFIX) else None
        if len(head) < 9:
            return None
        return "h2" if looks_like_frame(head[:9]) else ""


def _describe(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"[:300]
    return text if isinstance(exc, _PARSE_ERRORS) else "internal error: " + text
