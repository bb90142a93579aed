"""HTTP/1.x seen from the side: h11 parses each direction, the observer keeps them in step.

h11 is an endpoint library, so each direction gets the role that *receives* it: the client's
bytes go to a ``SERVER``-role connection (it parses requests), the server's bytes to a
``CLIENT``-role one (it parses responses). Rather than play the missing half of each endpoint,
every message gets a fresh h11 connection that starts from the previous one's ``trailing_data``.
A response parser is primed by sending it the request line it answers (only the method matters
to framing: a HEAD or CONNECT response has no body); with no request seen (we joined late) it is
primed with GET.

Gaps (``gap_client``/``gap_server``: bytes that were on the wire but not captured) are bridged
inside a body whose framing h11 can count through: a Content-Length body, a chunk's data, a
close-delimited body. h11 is fed that many zero bytes (its public API; the zeros are reported as
``RequestGap``/``ResponseGap``, never as body data). A gap h11 cannot count through (it crosses a
chunk header) ends that message's body where the gap starts and resumes at the next message head
that starts a write; a gap inside a head, or one past a message's end (a pipelined message in it,
whose answer could not be paired any more), loses the connection. Each is counted in ``losses``.

Raises h11/BodyLimitError exceptions to the facade (``busted.classify.http``), which turns them
into ``HttpProtocolError`` events.
"""

from __future__ import annotations

import re
from collections import deque

import h11

from .httpbody import BodyDecoder, BodyLimitError, content_codings
from .httpevents import (
    HttpEvent,
    HttpProtocolError,
    RequestData,
    RequestEnd,
    RequestGap,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseGap,
    ResponseHead,
)

__all__ = ["Http1Parser"]

MAX_HEAD = 64 * 1024  # request/response head size h11 may buffer
MAX_UNANSWERED = 1024  # pipelined requests remembered for their responses' framing
_FILL = 256 * 1024  # zero bytes handed to h11 at a time when bridging a gap
# Where parsing resumes after a gap it could not bridge: a whole request or status line.
_REQUEST_START = re.compile(rb"[A-Z]{3,10} [^ \r\n]{1,8192} HTTP/1\.[01]\r\n")
_STATUS_START = re.compile(rb"HTTP/1\.[01] [0-9]{3}[ \r]")


class _GapLost(Exception):
    """A gap that cannot be bridged: the connection is lost (its reason is the message)."""


def _headers(raw) -> tuple[tuple[str, str], ...]:
    # latin-1 is lossless: the bytes can always be recovered
    return tuple((n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in raw)


class Http1Parser:
    """Both directions of one HTTP/1.x connection. ``stopped`` once the bytes stop being HTTP."""

    def __init__(self, max_decoded: int, max_buffer: int = 1 << 20) -> None:
        self._max_decoded = max_decoded
        self._max_buffer = max_buffer
        self._req = self._new_request_parser(b"")
        self._resp: h11.Connection | None = None
        self._methods: deque[tuple[bytes, bool]] = deque()  # (method, upgrade?) of requests not yet answered
        self._req_body: BodyDecoder | None = None
        self._req_n = 0
        self._resp_body: BodyDecoder | None = None
        self._resp_n = 0
        self._resp_ok = True  # False once the body decoder gave up on this response
        self._req_ok = True
        self._in_response = False
        self._unanswered = 0  # requests seen whose response has not ended
        # After an Upgrade/CONNECT request the client's next bytes may be another protocol: they
        # are held until the response says (101 / 2xx to CONNECT: a tunnel; anything else: HTTP).
        self._held: bytearray | None = None
        self._resp_switch: bytes | None = None  # method of the Upgrade/CONNECT request being answered
        self._req_switch = False  # the request being parsed is an Upgrade/CONNECT
        self.stopped = False
        # Gaps: body bytes of the zeros fed to h11 still to report as a gap, and whether a side
        # waits for the next message head after a gap it could not bridge.
        self._req_skip = 0
        self._resp_skip = 0
        self._req_resync = False
        self._resp_resync = False
        self.losses: list[str] = []  # why exchanges (or the connection) were lost to gaps

    @staticmethod
    def _new_request_parser(data: bytes) -> h11.Connection:
        c = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if data:
            c.receive_data(data)
        return c

    def _new_response_parser(self, data: bytes) -> h11.Connection:
        method, upgrade = self._methods.popleft() if self._methods else (b"GET", False)
        self._resp_switch = method if upgrade or method == b"CONNECT" else None
        c = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        target = b"x:1" if method == b"CONNECT" else b"/"
        headers = [(b"host", b"x"), (b"content-length", b"0")]
        if upgrade:  # so that h11 accepts a 101 answer
            headers += [(b"connection", b"upgrade"), (b"upgrade", b"x")]
        c.send(h11.Request(method=method, target=target, headers=headers))
        if method != b"CONNECT":
            c.send(h11.EndOfMessage())
        if data:
            c.receive_data(data)
        return c

    # -- client side -------------------------------------------------------------------------

    def feed_client(self, data: bytes, ts: int) -> list[HttpEvent]:
        if self.stopped:
            return []
        if self._req_resync:
            if not _REQUEST_START.match(data):
                return []  # still inside what the gap cut: wait for a request line
            self._req_resync = False
            self._req = self._new_request_parser(b"")
        if self._held is not None:
            self._held += data
            if len(self._held) > self._max_buffer:
                raise ValueError(f"buffer limit ({self._max_buffer} bytes) waiting for an Upgrade answer")
            return []
        self._req.receive_data(data)
        return self._drain_requests(ts)

    def _drain_requests(self, ts: int) -> list[HttpEvent]:
        out: list[HttpEvent] = []
        while True:
            ev = self._req.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return out
            if isinstance(ev, h11.Request):
                hs = _headers(ev.headers)
                authority = next((v for n, v in hs if n == "host"), None)
                out.append(RequestHead(0, ts, ev.method.decode("latin-1"), ev.target.decode("latin-1"),
                                       authority, hs, ev.http_version.decode("latin-1")))
                if len(self._methods) >= MAX_UNANSWERED:
                    raise ValueError(f"over {MAX_UNANSWERED} requests without a response")
                self._unanswered += 1
                upgrade = any(n == "upgrade" for n, _ in hs)
                self._methods.append((ev.method, upgrade))
                self._req_body = BodyDecoder(content_codings(hs), self._max_decoded)
                self._req_n = 0
                self._req_ok = True
                self._req_switch = ev.method == b"CONNECT" or upgrade
            elif isinstance(ev, h11.Data):
                data = bytes(ev.data)
                if self._req_skip:
                    k = min(self._req_skip, len(data))
                    self._req_skip -= k
                    out.append(RequestGap(0, ts, k))
                    data = data[k:]
                    self._req_body = self._gapped(self._req_body, "request")
                    if not data:
                        continue
                if self._req_ok and self._req_body is not None:
                    try:
                        for piece in self._req_body.feed(data):
                            self._req_n += len(piece)
                            out.append(RequestData(0, ts, piece))
                    except BodyLimitError as exc:
                        self._req_ok = False
                        out.append(HttpProtocolError(0, ts, f"request body: {exc}"))
            elif isinstance(ev, h11.EndOfMessage):
                out.append(RequestEnd(0, ts, self._req_n))
                self._req_body = None
                if self._req_skip:  # the gap goes on past this request: a next one was in it
                    raise _GapLost("a gap in the client's bytes goes past the end of a request")
                rest, closed = self._req.trailing_data
                if self._req_switch:
                    self._req_switch = False
                    self._held = bytearray(rest)
                    self._req = self._new_request_parser(b"")
                    return out
                self._req = self._new_request_parser(rest)
                if closed:
                    self._req.receive_data(b"")
            elif isinstance(ev, h11.ConnectionClosed):
                return out

    def _release(self, ts: int) -> list[HttpEvent]:
        held, self._held = self._held, None
        self._resp_switch = None
        if held is None:  # answered before the request's end: that request is plain HTTP now
            self._req_switch = False
            return []
        if not held:
            return []
        self._req.receive_data(bytes(held))
        return self._drain_requests(ts)

    # -- server side -------------------------------------------------------------------------

    def feed_server(self, data: bytes, ts: int) -> list[HttpEvent]:
        if self.stopped:
            return []
        if self._resp_resync:
            if not _STATUS_START.match(data):
                return []
            self._resp_resync = False
            self._resp = None
        if self._resp is None:
            self._resp = self._new_response_parser(data)
        else:
            self._resp.receive_data(data)
        return self._drain_responses(ts)

    def _drain_responses(self, ts: int) -> list[HttpEvent]:
        out: list[HttpEvent] = []
        while self._resp is not None:
            ev = self._resp.next_event()
            if ev is h11.NEED_DATA:
                return out
            if ev is h11.PAUSED:  # switched protocols (101, or 2xx to CONNECT): a tunnel now
                if self._in_response:  # the CONNECT exchange itself is complete
                    out.append(ResponseEnd(0, ts, 0, True))
                    self._in_response = False
                    self._unanswered = max(0, self._unanswered - 1)
                self.stopped = True
                return out
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101:
                    out.append(ResponseHead(0, ts, 101, _headers(ev.headers), ev.http_version.decode("latin-1")))
                    out.append(ResponseEnd(0, ts, 0, True))
                    self._unanswered = max(0, self._unanswered - 1)
                continue  # 100 Continue and other interim answers are not the response
            if isinstance(ev, h11.Response):
                hs = _headers(ev.headers)
                out.append(ResponseHead(0, ts, ev.status_code, hs, ev.http_version.decode("latin-1")))
                self._in_response = True
                if self._resp_switch is not None and not (self._resp_switch == b"CONNECT" and ev.status_code < 300):
                    out.extend(self._release(ts))  # refused: the client's held bytes are HTTP after all
                self._resp_body = BodyDecoder(content_codings(hs), self._max_decoded)
                self._resp_n = 0
                self._resp_ok = True
            elif isinstance(ev, h11.Data):
                data = bytes(ev.data)
                if self._resp_skip:
                    k = min(self._resp_skip, len(data))
                    self._resp_skip -= k
                    out.append(ResponseGap(0, ts, k))
                    data = data[k:]
                    self._resp_body = self._gapped(self._resp_body, "response")
                    if not data:
                        continue
                if self._resp_ok and self._resp_body is not None:
                    try:
                        for piece in self._resp_body.feed(data):
                            self._resp_n += len(piece)
                            out.append(ResponseData(0, ts, piece))
                    except BodyLimitError as exc:
                        self._resp_ok = False
                        out.append(HttpProtocolError(0, ts, f"response body: {exc}"))
            elif isinstance(ev, h11.EndOfMessage):
                out.append(ResponseEnd(0, ts, self._resp_n, self._resp_ok))
                self._unanswered = max(0, self._unanswered - 1)  # late join: responses without requests
                self._in_response = False
                self._resp_body = None
                if self._resp_skip:
                    raise _GapLost("a gap in the server's bytes goes past the end of a response")
                rest, closed = self._resp.trailing_data
                if closed:
                    self._resp = None
                    self.stopped = True
                    return out
                self._resp = self._new_response_parser(rest) if rest else None
            elif isinstance(ev, h11.ConnectionClosed):
                self._resp = None
                return out
        return out

    # -- gaps ---------------------------------------------------------------------------------

    def gap_client(self, size: int, ts: int) -> list[HttpEvent]:
        """``size`` bytes the client sent that were not captured. Raises ValueError when the
        connection cannot be followed past them."""
        if self.stopped or self._req_resync or size <= 0:
            return []
        if self._held is not None:
            raise ValueError(f"a {size}-byte gap in bytes held for an Upgrade answer")
        out: list[HttpEvent] = []
        if not self._in_body(self._req):
            raise ValueError(f"a {size}-byte gap in a request head")
        try:
            bridged = self._bridge(self._req, size, True, ts, out)
        except _GapLost as exc:
            raise ValueError(str(exc)) from None
        except h11.ProtocolError:
            bridged = False  # zeros where a chunk header was: the gap crossed chunk framing
        if not bridged:
            self.losses.append(f"a {size}-byte gap in a request body crossed its chunked framing; "
                               "the body ends there, parsing resumes at the next request")
            out.append(RequestEnd(0, ts, self._req_n))
            self._req_body = None
            self._req_skip = 0
            self._req_resync = True
        return out

    def gap_server(self, size: int, ts: int) -> list[HttpEvent]:
        """``size`` bytes the server sent that were not captured (see ``gap_client``)."""
        if self.stopped or self._resp_resync or size <= 0:
            return []
        out: list[HttpEvent] = []
        resp = self._resp
        if resp is None or not self._in_body(resp):
            raise ValueError(f"a {size}-byte gap in a response head")
        try:
            bridged = self._bridge(resp, size, False, ts, out)
        except _GapLost as exc:
            raise ValueError(str(exc)) from None
        except h11.ProtocolError:
            bridged = False
        if not bridged:
            self.losses.append(f"a {size}-byte gap in a response body crossed its chunked framing; "
                               "the response ends there (incomplete), parsing resumes at the next one")
            out.append(ResponseEnd(0, ts, self._resp_n, False))
            self._in_response = False
            self._unanswered = max(0, self._unanswered - 1)
            self._resp_body = None
            self._resp_skip = 0
            self._resp_resync = True
        return out

    def _bridge(self, conn: h11.Connection, size: int, client: bool, ts: int, out: list[HttpEvent]) -> bool:
        """Feed ``size`` zeros through h11 as a gap, if the gap starts inside a body; False if not."""
        if self._skip_counted(conn, size, client, ts, out):
            return True
        left = size
        while left:
            piece = min(left, _FILL)
            left -= piece
            conn.receive_data(bytes(piece))
            if client:
                self._req_skip += piece
                out.extend(self._drain_requests(ts))
                pending = self._req_skip
            else:
                self._resp_skip += piece
                out.extend(self._drain_responses(ts))
                pending = self._resp_skip
            if pending:  # h11 waits for more than zeros can give (a chunk header): not bridgeable
                return False
        return True

    def _skip_counted(self, conn: h11.Connection, size: int, client: bool, ts: int, out: list[HttpEvent]) -> bool:
        """The fast path for a gap that stays inside a body h11 counts through: its reader is told
        to expect fewer bytes, instead of being fed as many zeros (a 4 GiB write would cost seconds
        of CPU). h11's readers are not public API: on any other shape this says False and the
        zeros path (public API only) runs."""
        reader = getattr(conn, "_reader", None)
        kind = type(reader).__name__
        if kind == "ContentLengthReader" and isinstance(getattr(reader, "_remaining", None), int):
            if reader._remaining < size:  # type: ignore[union-attr]
                return False
            reader._remaining -= size  # type: ignore[union-attr]
        elif kind == "ChunkedReader" and isinstance(getattr(reader, "_bytes_in_chunk", None), int):
            if reader._bytes_in_chunk <= size or getattr(reader, "_bytes_to_discard", b"x"):  # type: ignore[union-attr]
                return False
            reader._bytes_in_chunk -= size  # type: ignore[union-attr]
        elif kind != "Http10Reader":
            return False
        if client:
            out.append(RequestGap(0, ts, size))
            self._req_body = self._gapped(self._req_body, "request")
            out.extend(self._drain_requests(ts))  # a body that ended with the gap ends here
        else:
            out.append(ResponseGap(0, ts, size))
            self._resp_body = self._gapped(self._resp_body, "response")
            out.extend(self._drain_responses(ts))
        return True

    @staticmethod
    def _in_body(conn: h11.Connection) -> bool:
        """Inside a message body, with no unparsed bytes (a chunk header cut by the gap) pending."""
        return conn.their_state is h11.SEND_BODY and not conn.trailing_data[0]

    def _gapped(self, body: BodyDecoder | None, what: str) -> BodyDecoder | None:
        """A body decoder after a gap: a compressed stream cannot resume mid-way (None: stop)."""
        if body is None or body.identity:
            return body
        self.losses.append(f"a gap in a compressed {what} body: not decoded past it")
        return None

    def close(self, ts: int) -> list[HttpEvent]:
        """End of the connection: a close-delimited body ends here; a response in flight, and each
        request still waiting for one, gets ``ResponseEnd(complete=False)``."""
        out: list[HttpEvent] = []
        if self._resp is not None and self._in_response and not self.stopped:
            try:
                self._resp.receive_data(b"")
                out.extend(self._drain_responses(ts))
            except h11.RemoteProtocolError:
                pass
        if self._in_response:
            out.append(ResponseEnd(0, ts, self._resp_n, False))
            self._in_response = False
            self._unanswered = max(0, self._unanswered - 1)
        out.extend(ResponseEnd(0, ts, 0, False) for _ in range(self._unanswered))
        self._unanswered = 0
        return out
