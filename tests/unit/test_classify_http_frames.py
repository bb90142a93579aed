"""HTTP/2 and body-decoding cases real clients rarely produce, built frame by frame with hyperframe
and hpack: PADDED+PRIORITY HEADERS, hand-split CONTINUATION, SETTINGS_HEADER_TABLE_SIZE per
direction, interim responses, request trailers, late joins, limits (frame size, buffer, zip bomb)."""

from __future__ import annotations

import gzip
import zlib

import hpack
from http_helpers import body
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from busted.classify import httpbody
from busted.classify.http import HttpConnection
from busted.classify.http2 import PREFACE
from busted.classify.httpevents import (
    HttpProtocolError,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
    Side,
)

C, S = Side.CLIENT, Side.SERVER
REQ = [(":method", "POST"), (":scheme", "https"), (":authority", "api.anthropic.com"), (":path", "/v1/messages"),
       ("content-type", "application/json"), ("x-api-key", "sk-test")]


def ser(*frames) -> bytes:
    return b"".join(f.serialize() for f in frames)


def kinds(events):
    return [type(e).__name__ for e in events]


def start(enc_c: hpack.Encoder, settings: dict | None = None) -> tuple[HttpConnection, list]:
    c = HttpConnection()
    ev = c.feed(C, PREFACE + ser(SettingsFrame(0, settings=settings or {})), 1)
    ev += c.feed(S, ser(SettingsFrame(0), SettingsFrame(0, flags=["ACK"])), 2)
    return c, ev


def test_padded_priority_headers_and_padded_data():
    ec, es = hpack.Encoder(), hpack.Encoder()
    c, ev = start(ec)
    assert ev == []
    ev = c.feed(C, ser(HeadersFrame(1, data=ec.encode(REQ), flags=["END_HEADERS", "PADDED", "PRIORITY"], pad_length=9,
                                    depends_on=0, stream_weight=200),
                       DataFrame(1, data=b'{"model":"claude"}', flags=["PADDED", "END_STREAM"], pad_length=30)), 3)
    assert kinds(ev) == ["RequestHead", "RequestData", "RequestEnd"]
    assert ev[0] == RequestHead(1, 3, "POST", "/v1/messages", "api.anthropic.com",
                                (("content-type", "application/json"), ("x-api-key", "sk-test")), "2")
    assert ev[1].data == b'{"model":"claude"}' and ev[2] == RequestEnd(1, 3, 18)
    ev = c.feed(S, ser(HeadersFrame(1, data=es.encode([(":status", "200")]), flags=["END_HEADERS"]),
                       DataFrame(1, data=b"ok", flags=["END_STREAM", "PADDED"], pad_length=0)), 4)
    assert ev == [ResponseHead(1, 4, 200, (), "2"), ResponseData(1, 4, b"ok"), ResponseEnd(1, 4, 2, True)]


def test_continuation_split_by_hand_and_interrupted_block():
    ec = hpack.Encoder()
    c, _ = start(ec)
    block = ec.encode(REQ + [("x-long", "v" * 5000)])
    parts = [block[:10], block[10:3000], block[3000:]]
    ev = c.feed(C, ser(HeadersFrame(1, data=parts[0], flags=["END_STREAM"]), ContinuationFrame(1, data=parts[1]),
                       ContinuationFrame(1, data=parts[2], flags=["END_HEADERS"])), 3)
    assert kinds(ev) == ["RequestHead", "RequestEnd"] and ("x-long", "v" * 5000) in ev[0].headers
    c2, _ = start(hpack.Encoder())
    ev = c2.feed(C, ser(HeadersFrame(1, data=block[:10]), PingFrame(0, opaque_data=b"12345678")), 3)
    assert len(ev) == 1 and "interrupted" in ev[0].detail and c2.stopped


def test_header_table_size_setting_applies_to_the_other_direction():
    # The client allows a 64 KiB table: the server's encoder may grow to it, and its size update is
    # then valid for the decoder of the *server's* headers.
    for allowed, ok in [(65536, True), (None, False)]:
        ec, es = hpack.Encoder(), hpack.Encoder()
        c, _ = start(ec, {SettingsFrame.HEADER_TABLE_SIZE: allowed} if allowed else {})
        c.feed(C, ser(HeadersFrame(1, data=ec.encode(REQ), flags=["END_HEADERS", "END_STREAM"])), 3)
        es.header_table_size = 65536  # emits a dynamic table size update in the next block
        ev = c.feed(S, ser(HeadersFrame(1, data=es.encode([(":status", "200"), ("x-a", "b" * 6000)]),
                                        flags=["END_HEADERS", "END_STREAM"])), 4)
        if ok:
            assert kinds(ev) == ["ResponseHead", "ResponseEnd"] and ("x-a", "b" * 6000) in ev[0].headers
        else:
            assert kinds(ev) == ["HttpProtocolError"] and "table size" in ev[0].detail


def test_dynamic_table_is_per_direction_and_survives_many_streams():
    ec, es = hpack.Encoder(), hpack.Encoder()
    c, _ = start(ec)
    for sid in (1, 3, 5, 7):
        ev = c.feed(C, ser(HeadersFrame(sid, data=ec.encode(REQ), flags=["END_HEADERS", "END_STREAM"])), sid)
        ev += c.feed(S, ser(HeadersFrame(sid, data=es.encode([(":status", "201"), ("x-request-id", "r1")]),
                                         flags=["END_HEADERS", "END_STREAM"])), sid)
        assert [e.stream for e in ev] == [sid] * 4
        assert ev[0].headers == (("content-type", "application/json"), ("x-api-key", "sk-test"))
        assert ev[2].status == 201 and ev[2].headers == (("x-request-id", "r1"),)


def test_interim_response_request_trailers_goaway_and_rst():
    ec, es = hpack.Encoder(), hpack.Encoder()
    c, _ = start(ec)
    ev = c.feed(C, ser(HeadersFrame(1, data=ec.encode(REQ), flags=["END_HEADERS"]),
                       DataFrame(1, data=b"abc"), WindowUpdateFrame(0, window_increment=1000),
                       HeadersFrame(1, data=ec.encode([("x-trailer", "t")]), flags=["END_HEADERS", "END_STREAM"]),
                       HeadersFrame(3, data=ec.encode(REQ), flags=["END_HEADERS", "END_STREAM"])), 3)
    assert kinds(ev) == ["RequestHead", "RequestData", "RequestEnd", "RequestHead", "RequestEnd"]
    assert ev[2] == RequestEnd(1, 3, 3)
    ev = c.feed(S, ser(HeadersFrame(1, data=es.encode([(":status", "103"), ("link", "</a>")]), flags=["END_HEADERS"]),
                       HeadersFrame(1, data=es.encode([(":status", "200")]), flags=["END_HEADERS"]),
                       GoAwayFrame(0, last_stream_id=3),
                       DataFrame(1, data=b"xy", flags=["END_STREAM"]),
                       HeadersFrame(3, data=es.encode([(":status", "200")]), flags=["END_HEADERS"]),
                       DataFrame(3, data=b"z"), RstStreamFrame(3, error_code=8)), 4)
    assert ev == [ResponseHead(1, 4, 200, (), "2"), ResponseData(1, 4, b"xy"), ResponseEnd(1, 4, 2, True),
                  ResponseHead(3, 4, 200, (), "2"), ResponseData(3, 4, b"z"), ResponseEnd(3, 4, 1, False)]
    assert c.close(5) == [] and c.errors == 0


def test_late_join_static_headers_decode_and_hint():
    # Joined after the preface: frames from the first byte; literal headers need no table state.
    ec, es = hpack.Encoder(), hpack.Encoder()
    ec.header_table_size = 0
    es.header_table_size = 0
    req = ec.encode(REQ)
    for alpn in (None, "h2"):
        c = HttpConnection(alpn)
        ev = c.feed(C, ser(HeadersFrame(9, data=req, flags=["END_HEADERS", "END_STREAM"])), 1)
        ev += c.feed(S, ser(HeadersFrame(9, data=es.encode([(":status", "200")]), flags=["END_HEADERS"]),
                            DataFrame(9, data=b"hi", flags=["END_STREAM"])), 2)
        assert kinds(ev) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"], alpn
        assert ev[0].path == "/v1/messages" and c.protocol == "h2"
    # hinted h2 but joined in the middle of a frame: given up at once, not after buffering 1 MiB
    c = HttpConnection("h2")
    ev = c.feed(S, b"\xff" * 9 + b"payload", 1)
    assert len(ev) == 1 and "not an HTTP/2 frame" in ev[0].detail and c.stopped
    # joined mid-response: DATA for a stream whose head was not seen is skipped, not an error
    c = HttpConnection("h2")
    assert c.feed(S, ser(DataFrame(11, data=b"lost", flags=["END_STREAM"])), 1) == [] and c.errors == 0


def test_frame_over_max_frame_size_and_buffer_limit():
    c, _ = start(hpack.Encoder())
    # 20 kB DATA frame: over the 16384 the client never raised
    ev = c.feed(S, ser(DataFrame(1, data=b"a" * 20000)), 3)
    assert len(ev) == 1 and "MAX_FRAME_SIZE" in ev[0].detail and c.stopped
    # joined late (no SETTINGS seen): the frame size is unknown, the buffer cap bounds it
    c = HttpConnection("h2", max_buffer=100_000)
    hdr = (5_000_000).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    ev = c.feed(S, ser(PingFrame(0, opaque_data=b"12345678")) + hdr + b"x" * 60_000, 1)
    assert ev == []
    ev = c.feed(S, b"x" * 60_000, 2)
    assert len(ev) == 1 and "buffer limit" in ev[0].detail and c.errors == 1


def _response_with(body_bytes: bytes, coding: str, **kw) -> tuple[list, HttpConnection]:
    c = HttpConnection(**kw)
    ev = c.feed(C, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 1)
    ev += c.feed(S, b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
                 % (coding.encode(), len(body_bytes)) + body_bytes, 2)
    return ev, c


def test_zip_bomb_is_capped():
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 kB
    assert len(bomb) < 200_000
    ev, c = _response_with(bomb, "gzip", max_decoded=1 << 20)
    errs = [e for e in ev if isinstance(e, HttpProtocolError)]
    assert len(errs) == 1 and "over 1048576" in errs[0].detail
    assert sum(len(e.data) for e in ev if isinstance(e, ResponseData)) <= 1 << 20
    assert ev[-1] == ResponseEnd(0, 2, ev[-1].body_bytes, False)
    # the connection itself goes on
    ev = c.feed(C, b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n", 3)
    assert kinds(ev) == ["RequestHead", "RequestEnd"]


def test_brotli_bomb_is_capped():
    if not httpbody.HAVE_BROTLI:
        return  # covered by the raw-delivery test in test_classify_http.py
    import brotli

    bomb = brotli.compress(b"\0" * (64 << 20))
    ev, _ = _response_with(bomb, "br", max_decoded=1 << 20)
    errs = [e.detail for e in ev if isinstance(e, HttpProtocolError)]
    assert errs == ["response body: decoded body over 1048576 bytes"]


def test_corrupt_gzip_and_unknown_coding():
    ev, c = _response_with(b"\x1f\x8b\x08\x00garbage-not-deflate", "gzip")
    assert kinds(ev)[-2:] == ["HttpProtocolError", "ResponseEnd"] and not ev[-1].complete
    assert "content-encoding gzip" in ev[-2].detail and not c.stopped
    ev, _ = _response_with(b"\x28\xb5\x2f\xfd zstd frame", "zstd")
    assert body(ev, ResponseData) == b"\x28\xb5\x2f\xfd zstd frame" and ev[-1].complete
    blob = zlib.compress(gzip.compress(b"twice"))  # "gzip, deflate": undone in reverse order
    ev, _ = _response_with(blob, "gzip, deflate")
    assert body(ev, ResponseData) == b"twice"


def test_request_body_decoder_error_does_not_stop_parsing():
    c = HttpConnection()
    ev = c.feed(C, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nnope!", 1)
    assert kinds(ev) == ["RequestHead", "HttpProtocolError", "RequestEnd"]
    assert body(ev, RequestData) == b"" and c.errors == 1 and not c.stopped
