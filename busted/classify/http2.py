"""HTTP/2 seen from the side: hyperframe splits frames, one hpack Decoder per direction.

A passive observer is not an endpoint, so this does not use h2's state machine (it would answer,
enforce flow control, and refuse a connection joined late). Each direction's header blocks go to
its own hpack decoder, because client and server keep separate dynamic tables; SETTINGS_HEADER_TABLE_SIZE
sent by one side bounds the *other* side's table, and the size updates themselves are in the
header blocks, which the decoder applies.

Gaps (``feed_gap``: bytes that were on the wire but not captured): a gap inside one DATA frame's
payload is skipped, that frame's rest streamed, and the frames after it parsed as usual. A gap
across frame headers cannot be framed through: the streams of that side in flight lose their
bodies, and the side resumes at the next write that starts with a plausible frame (``write_start``)
— writers put whole frames in a write. A gap inside a header block loses the connection (the HPACK
table would drift). Each loss is noted in ``losses``.

Memory: at most ``MAX_STREAMS`` streams per connection are followed (more are ignored, counted);
each has at most one streaming decompressor.

Raises (hyperframe, hpack, ValueError) to the facade, which turns them into ``HttpProtocolError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

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
    Side,
)

__all__ = ["PREFACE", "Http2Parser", "looks_like_frame"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_MAX_FRAME = 16384
MAX_STREAMS = 256  # open streams followed per connection (servers commonly allow 100-256)
MAX_HEADER_LIST = 256 * 1024  # decoded header bytes per block (hpack's own bomb guard)
MAX_TABLE = 64 * 1024  # largest HPACK dynamic table we agree to mirror

_CONN_FRAMES = {0x4, 0x6, 0x7}  # SETTINGS, PING, GOAWAY: stream 0 only
_STREAM_FRAMES = {0x0, 0x1, 0x2, 0x3, 0x5, 0x9}  # DATA, HEADERS, PRIORITY, RST, PUSH, CONTINUATION


def looks_like_frame(head: bytes) -> bool:
    """Is this 9-byte prefix a plausible first frame of a connection joined late?"""
    length = int.from_bytes(head[0:3], "big")
    typ, sid = head[3], int.from_bytes(head[5:9], "big")
    if length > DEFAULT_MAX_FRAME or sid & 0x80000000 or typ > 0x9:
        return False
    if typ in _CONN_FRAMES:
        return sid == 0
    if typ in _STREAM_FRAMES:
        return sid != 0
    return True  # WINDOW_UPDATE: either


def _content_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    """The content-length header's value; None when absent, repeated with different values, or
    not a plain decimal number (then only END_STREAM ends the response)."""
    values = {v.strip() for n, v in headers if n == "content-length"}
    if len(values) != 1:
        return None
    v = values.pop()
    return int(v) if v.isdigit() and len(v) <= 18 else None


@dataclass(slots=True)
class _Stream:
    req_head: bool = False
    req_done: bool = False
    req_body: BodyDecoder | None = None
    req_ok: bool = True
    resp_head: bool = False
    resp_body: BodyDecoder | None = None
    resp_ok: bool = True
    resp_length: int | None = None  # the response's content-length, when it gave a valid one
    resp_raw: int = 0  # DATA payload bytes of the response received (before content decoding)
    resp_done: bool = False  # ended by its content-length; END_STREAM (or RST) still to come


@dataclass(slots=True)
class _Direction:
    decoder: hpack.Decoder
    buf: bytearray = field(default_factory=bytearray)
    preface_checked: bool = False
    block_sid: int = 0  # stream of a header block awaiting CONTINUATION, 0 if none
    block: bytearray = field(default_factory=bytearray)
    block_end_stream: bool = False
    block_push: bool = False
    max_frame: int = 0  # set from the other side's SETTINGS_MAX_FRAME_SIZE; 0 = not seen
    first: bool = True  # no frame parsed yet in this direction
    # A DATA frame streamed rather than buffered (a gap fell inside it): its stream, payload and
    # padding bytes still to come, and whether it ends the stream.
    data_sid: int = 0
    data_left: int = 0
    pad_left: int = 0
    data_end: bool = False
    lost: bool = False  # after a gap across frames: bytes dropped until a write starts with a frame


class Http2Parser:
    """Both directions of one HTTP/2 connection."""

    def __init__(self, max_decoded: int, max_buffer: int) -> None:
        self._max_decoded = max_decoded
        self._max_buffer = max_buffer
        self._dirs = (_Direction(hpack.Decoder(MAX_HEADER_LIST)), _Direction(hpack.Decoder(MAX_HEADER_LIST)))
        self._dirs[Side.SERVER].preface_checked = True  # only the client sends the preface
        self._streams: dict[int, _Stream] = {}
        self._refused: set[int] = set()  # streams over MAX_STREAMS, ignored (bounded like _streams)
        self.goaway = False  # seen from either side; streams in flight still finish
        self.losses: list[str] = []

    def feed(self, side: Side, data: bytes, ts: int) -> list[HttpEvent]:
        d = self._dirs[side]
        if d.lost:
            return []
        out: list[HttpEvent] = []
        if d.data_left or d.pad_left:
            data = self._stream_rest(side, d, data, ts, out)
            if not data:
                return out
        d.buf += data
        if sum(len(x.buf) + len(x.block) for x in self._dirs) > self._max_buffer:  # both directions
            raise ValueError(f"buffer limit ({self._max_buffer} bytes)")
        if not d.preface_checked:
            n = min(len(d.buf), len(PREFACE))
            if d.buf[:n] != PREFACE[:n]:
                d.preface_checked = True  # joined late: frames from the first byte
            elif n < len(PREFACE):
                return out
            else:
                del d.buf[: len(PREFACE)]
                d.preface_checked = True
        buf = d.buf
        pos = 0
        try:
            while len(buf) - pos >= 9:
                # Copies, not views of buf: a frame (or an exception's traceback) may keep its view,
                # and a bytearray with live views cannot be trimmed.
                head = bytes(buf[pos : pos + 9])
                if d.first:
                    # An ALPN hint says h2, but a join in the middle of a frame says garbage.
                    if not looks_like_frame(head):
                        raise ValueError("first bytes are not an HTTP/2 frame (joined mid-frame?)")
                    d.first = False
                frame, length = Frame.parse_frame_header(memoryview(head))
                limit = d.max_frame or 0xFFFFFF  # unknown limit (joined late): the buffer cap bounds it
                if length > limit:
                    raise ValueError(f"frame of {length} bytes over SETTINGS_MAX_FRAME_SIZE {limit}")
                if len(buf) - pos - 9 < length:
                    break
                frame.parse_body(memoryview(bytes(buf[pos + 9 : pos + 9 + length])))
                pos += 9 + length
                self._frame(side, d, frame, ts, out)
        finally:
            del buf[:pos]
        return out

    # -- gaps ---------------------------------------------------------------------------------

    def write_start(self, side: Side) -> None:
        """The next bytes of ``side`` begin a write: a side lost to a gap may resume there."""
        d = self._dirs[side]
        if d.lost:
            d.lost = False
            d.first = True  # the first frame is checked for plausibility again
            d.buf.clear()

    def feed_gap(self, side: Side, size: int, ts: int) -> list[HttpEvent]:
        d = self._dirs[side]
        out: list[HttpEvent] = []
        if d.lost or size <= 0:
            return out
        if not (d.data_left or d.pad_left):
            self._start_streaming(side, d, size, ts, out)
        if d.data_left or d.pad_left:
            k = min(size, d.data_left)
            if k:
                d.data_left -= k
                size -= k
                self._gap(side, d.data_sid, k, ts, out)
            p = min(size, d.pad_left)
            d.pad_left -= p
            size -= p
            if not (d.data_left or d.pad_left) and d.data_end:
                d.data_end = False
                self._data(side, d.data_sid, b"", True, ts, out)
        if size:
            self._lose_side(side, d, size, ts, out)
        return out

    def _start_streaming(self, side: Side, d: _Direction, size: int, ts: int, out: list[HttpEvent]) -> None:
        """If the buffer holds the start of a DATA frame that the gap falls inside, stream that frame."""
        buf = d.buf
        if len(buf) < 9 or d.first or d.block_sid or buf[3] != 0x0:
            return
        length = int.from_bytes(buf[0:3], "big")
        flags, sid = buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        have = len(buf) - 9
        if length - have < size or sid == 0:
            return  # the gap runs past this frame
        payload = bytes(buf[9:])
        pad = 0
        if flags & 0x8:  # PADDED: the first payload byte says how much padding ends the frame
            if not payload:
                return
            pad = payload[0]
            payload = payload[1:]
            length -= 1
        body = length - pad
        if body < 0:
            raise ValueError("DATA frame padding longer than its payload")
        seen = payload[:body]
        buf.clear()
        d.data_sid, d.data_end = sid, bool(flags & 0x1)
        d.data_left = body - len(seen)
        d.pad_left = pad - (len(payload) - len(seen))
        if seen:
            self._data(side, sid, seen, False, ts, out)

    def _stream_rest(self, side: Side, d: _Direction, data: bytes, ts: int, out: list[HttpEvent]) -> bytes:
        """The rest of a streamed DATA frame from ``data``; returns the bytes after the frame."""
        k = min(len(data), d.data_left)
        if k:
            d.data_left -= k
            self._data(side, d.data_sid, data[:k], False, ts, out)
        p = min(len(data) - k, d.pad_left)
        d.pad_left -= p
        if not (d.data_left or d.pad_left) and d.data_end:
            d.data_end = False
            self._data(side, d.data_sid, b"", True, ts, out)
        return data[k + p :]

    def _gap(self, side: Side, sid: int, size: int, ts: int, out: list[HttpEvent]) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        if side is Side.CLIENT:
            if st.req_head and not st.req_done:
                out.append(RequestGap(sid, ts, size))
                if st.req_body is not None and not st.req_body.identity:
                    st.req_ok = False
                    self.losses.append(f"a gap in the compressed request body of stream {sid}: not decoded past it")
        elif st.resp_head:
            out.append(ResponseGap(sid, ts, size))
            if st.resp_body is not None and not st.resp_body.identity:
                st.resp_ok = False
                self.losses.append(f"a gap in the compressed response body of stream {sid}: not decoded past it")

    def _lose_side(self, side: Side, d: _Direction, size: int, ts: int, out: list[HttpEvent]) -> None:
        """A gap across frames: that side's streams in flight lose their bodies; resume at a write start."""
        if d.block_sid or d.first:
            raise ValueError(f"a {size}-byte gap in an HTTP/2 header block (HPACK state lost)"
                             if d.block_sid else f"a {size}-byte gap before the first HTTP/2 frame")
        d.lost = True
        d.buf.clear()
        d.data_left = d.pad_left = 0
        d.data_end = False
        n = 0
        for sid, st in sorted(self._streams.items()):
            if side is Side.CLIENT and st.req_head and not st.req_done:
                st.req_done = True  # the request's end may be in the gap: it ends here
                out.append(RequestEnd(sid, ts, st.req_body.decoded if st.req_body else 0))
                n += 1
            elif side is Side.SERVER and st.resp_head:
                self._end_response(sid, st, ts, out, complete=False)
                n += 1
        who = "client" if side is Side.CLIENT else "server"
        self.losses.append(f"a {size}-byte gap across HTTP/2 frames of the {who}: {n} stream bodies cut, "
                           "parsing resumes at its next write")

    def _frame(self, side: Side, d: _Direction, f: Frame, ts: int, out: list[HttpEvent]) -> None:
        if d.block_sid:
            if not isinstance(f, ContinuationFrame) or f.stream_id != d.block_sid:
                raise ValueError("header block interrupted before END_HEADERS")
            d.block += f.data
            if sum(len(x.buf) + len(x.block) for x in self._dirs) > self._max_buffer:
                raise ValueError(f"buffer limit ({self._max_buffer} bytes) in a header block")
            if "END_HEADERS" in f.flags:
                sid, d.block_sid = d.block_sid, 0
                block, d.block = bytes(d.block), bytearray()
                self._headers(side, d, sid, block, d.block_end_stream, d.block_push, ts, out)
            return
        if isinstance(f, HeadersFrame | PushPromiseFrame):
            push = isinstance(f, PushPromiseFrame)
            end_stream = not push and "END_STREAM" in f.flags
            if "END_HEADERS" in f.flags:
                self._headers(side, d, f.stream_id, f.data, end_stream, push, ts, out)
            else:
                d.block_sid, d.block_end_stream, d.block_push = f.stream_id, end_stream, push
                d.block = bytearray(f.data)
        elif isinstance(f, DataFrame):
            self._data(side, f.stream_id, f.data, "END_STREAM" in f.flags, ts, out)
        elif isinstance(f, ContinuationFrame):
            raise ValueError("CONTINUATION without HEADERS")
        elif isinstance(f, RstStreamFrame):
            st = self._streams.pop(f.stream_id, None)
            if st is not None and (st.req_head or st.resp_head) and not st.resp_done:
                out.append(ResponseEnd(f.stream_id, ts, st.resp_body.decoded if st.resp_body else 0, False))
        elif isinstance(f, SettingsFrame):
            if "ACK" in f.flags:
                return
            other = self._dirs[1 - side]
            size = f.settings.get(SettingsFrame.HEADER_TABLE_SIZE)
            if size is not None:
                # Bounds the table of the peer's encoder, i.e. the decoder of the other direction.
                # The encoder's own size updates (in its header blocks) resize the table; this only
                # bounds them. An observer keeps the largest announced (the old size stays valid
                # until the ACK, and refusing a peer's slip would only blind us), capped for memory.
                dec = other.decoder
                dec.max_allowed_table_size = min(max(dec.max_allowed_table_size, size), MAX_TABLE)
            mfs = f.settings.get(SettingsFrame.MAX_FRAME_SIZE)
            if mfs is not None:
                other.max_frame = max(DEFAULT_MAX_FRAME, min(mfs, 0xFFFFFF))
            elif not other.max_frame:
                other.max_frame = DEFAULT_MAX_FRAME
        elif isinstance(f, GoAwayFrame):
            self.goaway = True
        # PING, PRIORITY, WINDOW_UPDATE, extension frames: nothing for an observer

    def _headers(self, side: Side, d: _Direction, sid: int, block: bytes, end_stream: bool, push: bool,
                 ts: int, out: list[HttpEvent]) -> None:
        headers = d.decoder.decode(block, raw=True)  # always decoded: it updates the dynamic table
        if push:
            return  # promised request headers; the pushed response shows up as a response
        hs = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in headers]
        pseudo = {n: v for n, v in hs if n.startswith(":")}
        plain = tuple((n, v) for n, v in hs if not n.startswith(":"))
        st = self._streams.get(sid)
        if side is Side.CLIENT:
            if st is None or not st.req_head:
                if st is None:
                    st = self._open(sid)
                    if st is None:
                        return
                st.req_head = True
                st.req_body = BodyDecoder(content_codings(plain), self._max_decoded)
                authority = pseudo.get(":authority") or next((v for n, v in plain if n == "host"), None)
                out.append(RequestHead(sid, ts, pseudo.get(":method", ""), pseudo.get(":path", ""),
                                       authority, plain, "2"))
            if end_stream and not st.req_done:  # end of the request (trailers, if a body came first)
                st.req_done = True
                out.append(RequestEnd(sid, ts, st.req_body.decoded if st.req_body else 0))
            return
        status = pseudo.get(":status", "")
        if st is None or not st.resp_head:
            if status[:1] == "1" and len(status) == 3:
                return  # interim (100 Continue, 103 Early Hints)
            if st is None:
                st = self._open(sid)
                if st is None:
                    return
            st.resp_head = True
            st.resp_body = BodyDecoder(content_codings(plain), self._max_decoded)
            st.resp_length = _content_length(plain)
            code = int(status) if status.isdigit() and len(status) == 3 else 0
            out.append(ResponseHead(sid, ts, code, plain, "2"))
            if st.resp_length == 0 and not end_stream:
                self._end_by_length(sid, st, ts, out)
        if end_stream:
            self._end_response(sid, st, ts, out)

    def _open(self, sid: int) -> _Stream | None:
        if len(self._streams) >= MAX_STREAMS:
            # Streams already answered in full (by content-length) whose END_STREAM never came go first.
            for done in [k for k, v in self._streams.items() if v.resp_done]:
                del self._streams[done]
        if len(self._streams) >= MAX_STREAMS:
            if sid not in self._refused:
                if len(self._refused) >= MAX_STREAMS:
                    self._refused.clear()
                self._refused.add(sid)
                self.losses.append(f"stream {sid} not followed: over {MAX_STREAMS} open streams on the connection")
            return None
        st = self._streams[sid] = _Stream()
        return st

    def _end_response(self, sid: int, st: _Stream, ts: int, out: list[HttpEvent], complete: bool = True) -> None:
        if not st.resp_done:
            out.append(ResponseEnd(sid, ts, st.resp_body.decoded if st.resp_body else 0, st.resp_ok and complete))
        del self._streams[sid]

    def _end_by_length(self, sid: int, st: _Stream, ts: int, out: list[HttpEvent]) -> None:
        """The response's DATA reached its content-length: it is whole. A client that has its
        Content-Length bytes may stop reading (curl does) before the server's END_STREAM, which
        many servers send in an empty DATA frame of its own; the stream stays known until then so
        that its last frames (or trailers) are not taken for a new stream."""
        out.append(ResponseEnd(sid, ts, st.resp_body.decoded if st.resp_body else 0, st.resp_ok))
        st.resp_done = True

    def _data(self, side: Side, sid: int, data: bytes, end_stream: bool, ts: int, out: list[HttpEvent]) -> None:
        st = self._streams.get(sid)
        if st is None:
            return  # a stream whose head we did not see (joined late): its body cannot be decoded
        if side is Side.CLIENT:
            if not st.req_head or st.req_done:
                return
            if data and st.req_ok and st.req_body is not None:
                try:
                    out.extend(RequestData(sid, ts, p) for p in st.req_body.feed(data))
                except BodyLimitError as exc:
                    st.req_ok = False
                    out.append(HttpProtocolError(sid, ts, f"request body: {exc}"))
            if end_stream:
                st.req_done = True
                out.append(RequestEnd(sid, ts, st.req_body.decoded if st.req_body else 0))
            return
        if not st.resp_head or (st.resp_done and not end_stream):
            return
        if data and not st.resp_done:
            st.resp_raw += len(data)
            if st.resp_ok and st.resp_body is not None:
                try:
                    out.extend(ResponseData(sid, ts, p) for p in st.resp_body.feed(data))
                except BodyLimitError as exc:
                    st.resp_ok = False
                    out.append(HttpProtocolError(sid, ts, f"response body: {exc}"))
        if end_stream:
            self._end_response(sid, st, ts, out)
        elif st.resp_length is not None and st.resp_raw >= st.resp_length and not st.resp_done:
            self._end_by_length(sid, st, ts, out)

    def close(self, ts: int) -> list[HttpEvent]:
        """Responses still in flight are cut short."""
        out: list[HttpEvent] = [
            ResponseEnd(sid, ts, st.resp_body.decoded if st.resp_body else 0, False)
            for sid, st in sorted(self._streams.items())
            if (st.req_head or st.resp_head) and not st.resp_done
        ]
        self._streams.clear()
        return out
