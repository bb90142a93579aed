"""Gaps of known length in the plaintext (the kernel copies a bounded head and tail of each write):
the HTTP parsers skip them inside bodies and resynchronise; what they cannot bridge is a counted
loss of that exchange or connection, never the silent end of parsing. Fed byte at a time and at
random splits (hypothesis)."""

from __future__ import annotations

import json

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st

from busted.classify.http import HttpConnection
from busted.classify.http2 import PREFACE
from busted.classify.httpevents import (
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
from busted.classify.llm import CallTracker, LlmCallInfo, scan_request

C, S = Side.CLIENT, Side.SERVER


def prompt_body(size: int, model: str = "gpt-4o-mini", model_first: bool = False) -> bytes:
    msgs = [{"role": "user", "content": "x" * size}]
    d = {"model": model, "messages": msgs, "stream": False} if model_first else \
        {"messages": msgs, "model": model, "stream": False}
    return json.dumps(d).encode()


def answer(model: str = "gpt-4o-mini", pt: int = 11, ct: int = 7, pad: int = 0) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "model": model, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "y" * pad}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}).encode()


def h1_request(body: bytes, chunked: bool = False) -> tuple[bytes, int]:
    """The request's bytes and where its body starts."""
    if chunked:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n", len(head) + len(b"%x\r\n" % len(body))
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    return head + body, len(head)


def h1_response(body: bytes) -> tuple[bytes, int]:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head + body, len(head)


def feed_split(conn: HttpConnection, side: Side, data: bytes, cuts: list[int], ts: int, start: bool = True):
    out = []
    prev = 0
    for c in sorted({min(max(c, 0), len(data)) for c in cuts} | {len(data)}):
        if c > prev:
            out.extend(conn.feed(side, data[prev:c], ts, start=start and prev == 0))
            prev = c
    return out


def filled(events, data_kind, gap_kind, stream=None) -> bytes:
    """A body as the events give it, each gap filled with zeros."""
    out = bytearray()
    for e in events:
        if stream is not None and e.stream != stream:
            continue
        if isinstance(e, data_kind):
            out += e.data
        elif isinstance(e, gap_kind):
            out += bytes(e.size)
    return bytes(out)


def shape(events):
    """The events without data and gaps: what must not change when a body has a gap."""
    return [(type(e).__name__, e.stream, getattr(e, "status", None), getattr(e, "complete", None))
            for e in events if not isinstance(e, RequestData | ResponseData | RequestGap | ResponseGap)]


# --- HTTP/1.1 ----------------------------------------------------------------------------------------


def _h1_exchange(conn, req: bytes, resp: bytes, gap=None, cuts=()):
    """Feed one exchange; ``gap = (side, start, end)`` leaves bytes [start, end) of that side out."""
    out = []
    for side, data in ((C, req), (S, resp)):
        if gap is not None and gap[0] is side:
            _, a, b = gap
            out += feed_split(conn, side, data[:a], list(cuts), 1)
            out += conn.feed_gap(side, b - a, 1)
            out += conn.feed(side, data[b:], 1)
        else:
            out += feed_split(conn, side, data, list(cuts), 1)
    return out


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_h1_gap_inside_a_body_is_bridged_at_any_split(data):
    body = prompt_body(5000)
    resp_body = answer(pad=3000)
    chunked = data.draw(st.booleans())
    req, rb = h1_request(body, chunked)
    resp, sb = h1_response(resp_body)
    side = data.draw(st.sampled_from([C, S]))
    wire, start, blen = (req, rb, len(body)) if side is C else (resp, sb, len(resp_body))
    a = data.draw(st.integers(start, start + blen - 1))
    b = data.draw(st.integers(a + 1, start + blen))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=6))
    conn = HttpConnection()
    ref = _h1_exchange(HttpConnection(), req, resp)
    got = _h1_exchange(conn, req, resp, (side, a, b), cuts)
    # a second exchange on the same connection is read whole after the gap
    req2, _ = h1_request(prompt_body(10, "small"))
    resp2, _ = h1_response(answer("small"))
    got2 = _h1_exchange(conn, req2, resp2)
    assert shape(got) == shape(ref)
    assert conn.errors == 0 and conn.losses == []
    zeroed = bytearray(wire)
    zeroed[a:b] = bytes(b - a)
    if side is C:
        assert filled(got, RequestData, RequestGap) == bytes(zeroed[start : start + blen])
    else:
        assert filled(got, ResponseData, ResponseGap) == bytes(zeroed[start : start + blen])
    assert [type(e) for e in got2 if not isinstance(e, RequestData | ResponseData)] == \
        [RequestHead, RequestEnd, ResponseHead, ResponseEnd]
    assert b"".join(e.data for e in got2 if isinstance(e, ResponseData)) == answer("small")


def test_h1_gap_fed_byte_at_a_time_around_it():
    body = prompt_body(70_000)
    req, rb = h1_request(body)
    conn = HttpConnection()
    out = []  # as the kernel copies it: a 48 KiB head, a gap, a 16 KiB tail
    for i in range(0, 49_152):
        out += conn.feed(C, req[i : i + 1], 1)
    out += conn.feed_gap(C, len(req) - 16_384 - 49_152, 1)
    tail = req[len(req) - 16_384 :]
    for i in range(len(tail)):
        out += conn.feed(C, tail[i : i + 1], 1)
    assert [type(e) for e in out if isinstance(e, RequestHead | RequestEnd)] == [RequestHead, RequestEnd]
    assert sum(e.size for e in out if isinstance(e, RequestGap)) == len(req) - 16_384 - 49_152
    assert len(filled(out, RequestData, RequestGap)) == len(body)


def test_h1_gap_across_chunk_framing_ends_that_body_and_resumes_at_the_next_request():
    conn = HttpConnection()
    body = b"a" * 1000
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"".join(b"64\r\n" + body[i : i + 100] + b"\r\n" for i in range(0, 1000, 100)) + b"0\r\n\r\n")
    head = req.index(b"\r\n\r\n") + 4
    out = conn.feed(C, req[: head + 50], 1)
    out += conn.feed_gap(C, 500, 1)  # crosses several chunk headers
    out += conn.feed(C, req[head + 550 :], 1)  # the write's tail: dropped (no request line)
    assert [type(e) for e in out if not isinstance(e, RequestData | RequestGap)] == [RequestHead, RequestEnd]
    assert conn.losses and "chunked" in conn.losses[0] and conn.errors == 0
    resp, _ = h1_response(answer())
    out = conn.feed(S, resp, 2)
    assert [type(e) for e in out if not isinstance(e, ResponseData)] == [ResponseHead, ResponseEnd]
    req2, _ = h1_request(prompt_body(10))
    out = conn.feed(C, req2, 3, start=True)
    assert [type(e) for e in out if not isinstance(e, RequestData)] == [RequestHead, RequestEnd]


def test_h1_gap_in_a_head_loses_the_connection_with_its_reason():
    conn = HttpConnection()
    req, rb = h1_request(prompt_body(100))
    out = conn.feed(C, req[:20], 1) + conn.feed_gap(C, 10, 1)
    assert isinstance(out[-1], HttpProtocolError) and conn.stopped
    assert conn.losses and "request head" in conn.losses[0]


def test_h1_gap_past_a_message_end_loses_the_connection():
    conn = HttpConnection()
    req, rb = h1_request(b"{}")
    req2, _ = h1_request(b"{}")
    both = req + req2
    out = conn.feed(C, both[: rb + 1], 1) + conn.feed_gap(C, 30, 1)
    assert conn.stopped and conn.losses and "past the end" in conn.losses[0]
    assert isinstance(out[-1], HttpProtocolError)


def test_h1_close_delimited_response_gap_is_bridged():
    conn = HttpConnection()
    conn.feed(C, b"GET / HTTP/1.0\r\n\r\n", 1)
    out = conn.feed(S, b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":", 2)
    out += conn.feed_gap(S, 100_000, 2) + conn.feed(S, b"1}", 2) + conn.close(3)
    assert sum(e.size for e in out if isinstance(e, ResponseGap)) == 100_000
    assert [e.complete for e in out if isinstance(e, ResponseEnd)] == [True]


def test_h1_gap_in_a_gzip_body_stops_decoding_it_counted():
    import gzip

    conn = HttpConnection()
    conn.feed(C, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1)
    z = gzip.compress(b"x" * 100_000)
    resp = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(z)
    out = conn.feed(S, resp + z[:50], 2) + conn.feed_gap(S, len(z) - 60, 2) + conn.feed(S, z[-10:], 2)
    assert [type(e) for e in out if isinstance(e, ResponseHead | ResponseEnd)] == [ResponseHead, ResponseEnd]
    assert any("compressed" in why for why in conn.losses)


# --- HTTP/2 ------------------------------------------------------------------------------------------


def frame(typ: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([typ, flags]) + sid.to_bytes(4, "big") + payload


def data_frames(sid: int, body: bytes, size: int = 16384, end: bool = True, pad: int = 0) -> bytes:
    out = b""
    if pad:
        size -= 1 + pad  # frames stay within the default SETTINGS_MAX_FRAME_SIZE
    for i in range(0, len(body), size):
        last = i + size >= len(body)
        piece = body[i : i + size]
        flags = (1 if last and end else 0) | (8 if pad else 0)
        out += frame(0, flags, sid, (bytes([pad]) + piece + bytes(pad)) if pad else piece)
    return out


class H2:
    """Writes both sides of an HTTP/2 connection (one encoder per side)."""

    def __init__(self) -> None:
        self.enc = (hpack.Encoder(), hpack.Encoder())

    def request(self, sid: int, body: bytes, pad: int = 0) -> bytes:
        hb = self.enc[0].encode([(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "https"),
                                 (":authority", "api"), ("content-type", "application/json")])
        return frame(1, 4, sid, hb) + data_frames(sid, body, pad=pad)

    def response(self, sid: int, body: bytes) -> bytes:
        hb = self.enc[1].encode([(":status", "200"), ("content-type", "application/json")])
        return frame(1, 4, sid, hb) + data_frames(sid, body)


def h2_conn() -> tuple[HttpConnection, list]:
    conn = HttpConnection("h2")
    out = conn.feed(C, PREFACE + frame(4, 0, 0, b""), 0, start=True)
    out += conn.feed(S, frame(4, 0, 0, b""), 0, start=True)
    return conn, out


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_h2_gap_inside_one_data_frame_is_bridged(data):
    w = H2()
    body = prompt_body(40_000)
    pad = data.draw(st.sampled_from([0, 0, 7]))
    req = w.request(1, body, pad=pad)
    frames = []  # (start, length) of each DATA frame
    i = 0
    while i < len(req):
        n = int.from_bytes(req[i : i + 3], "big")
        if req[i + 3] == 0:
            frames.append((i, n))
        i += 9 + n
    fstart, flen = data.draw(st.sampled_from(frames))
    lo = fstart + 9 + (1 if pad else 0)
    a = data.draw(st.integers(lo, fstart + 9 + flen - 1))
    b = data.draw(st.integers(a + 1, fstart + 9 + flen))
    cuts = data.draw(st.lists(st.integers(0, len(req)), max_size=5))
    conn, _ = h2_conn()
    out = feed_split(conn, C, req[:a], cuts, 1) + conn.feed_gap(C, b - a, 1)
    out += feed_split(conn, C, req[b:], [c - b for c in cuts], 1, start=False)
    resp = w.response(1, answer())
    out += conn.feed(S, resp, 2, start=True)
    assert conn.errors == 0 and conn.losses == []
    assert [type(e) for e in out if not isinstance(e, RequestData | RequestGap | ResponseData)] == \
        [RequestHead, RequestEnd, ResponseHead, ResponseEnd]
    # the body with the gap zeroed, padding bytes taken out (a gap over padding is no body)
    zeroed = bytearray(req)
    zeroed[a:b] = bytes(b - a)
    want = b""
    for fs, fl in frames:
        payload = bytes(zeroed[fs + 9 : fs + 9 + fl])
        want += payload[1 : len(payload) - pad] if pad else payload
    assert filled(out, RequestData, RequestGap) == want


def test_h2_gap_across_frames_resumes_at_the_next_write():
    w = H2()
    conn, _ = h2_conn()
    body = prompt_body(300_000)
    req = w.request(1, body)
    out = conn.feed(C, req[:49_152], 1, start=True)
    out += conn.feed_gap(C, len(req) - 49_152 - 16_384, 1)
    out += conn.feed(C, req[-16_384:], 1)  # the tail: mid-frame, dropped
    assert [type(e) for e in out if isinstance(e, RequestHead | RequestEnd)] == [RequestHead, RequestEnd]
    assert conn.losses and "across HTTP/2 frames" in conn.losses[0] and not conn.stopped
    out = conn.feed(S, w.response(1, answer()), 2, start=True)
    assert [type(e) for e in out if not isinstance(e, ResponseData)] == [ResponseHead, ResponseEnd]
    out = conn.feed(C, w.request(3, prompt_body(10)), 3, start=True)
    out += conn.feed(S, w.response(3, answer("small")), 4, start=True)
    assert [type(e) for e in out if not isinstance(e, RequestData | ResponseData)] == \
        [RequestHead, RequestEnd, ResponseHead, ResponseEnd]
    assert b"".join(e.data for e in out if isinstance(e, ResponseData)) == answer("small")


def test_h2_gap_in_a_header_block_loses_the_connection():
    conn, _ = h2_conn()
    hb = hpack.Encoder().encode([(":method", "POST"), (":path", "/x"), ("a", "b" * 100)])
    out = conn.feed(C, frame(1, 0, 1, hb[:10]), 1, start=True)  # no END_HEADERS: a CONTINUATION follows
    out += conn.feed(C, frame(9, 4, 1, hb[10:])[:15], 1) + conn.feed_gap(C, 20, 1)
    assert conn.stopped and isinstance(out[-1], HttpProtocolError)
    assert conn.losses and "HPACK" in conn.losses[0]


# --- request bodies known in part --------------------------------------------------------------------


def test_scan_request_reads_top_level_keys_only():
    body = json.dumps({"messages": [{"role": "user", "content": '"model": "evil"', "model": "nested"}],
                       "model": "gpt-4o", "stream": True}).encode()
    assert scan_request(body) == {"\0truncated": True, "model": "gpt-4o", "stream": True}
    # cut before the keys: found in the tail (after a gap)
    got = scan_request(body[:30], body[-40:])
    assert got["model"] == "gpt-4o" and got["stream"] is True
    assert scan_request(b'{"model": "a\\"b", "stream": false', b"") == {"\0truncated": True, "model": 'a"b',
                                                                        "stream": False}
    assert scan_request(b"", b"") == {"\0truncated": True}


@given(st.binary(max_size=300), st.binary(max_size=100))
def test_scan_request_never_raises(head, tail):
    out = scan_request(head, tail)
    assert out["\0truncated"] is True


def test_tracker_reports_a_gapped_call_and_the_next_one():
    tracker = CallTracker()
    conn = HttpConnection()
    body = prompt_body(300_000)
    req, rb = h1_request(body)
    recs = []

    def run(evs):
        for e in evs:
            recs.extend(tracker.feed(e))

    run(conn.feed(C, req[:49_152], 1, start=True))
    run(conn.feed_gap(C, len(req) - 49_152 - 16_384, 1))
    run(conn.feed(C, req[-16_384:], 1))
    resp, _ = h1_response(answer(pt=75_000, ct=3, pad=200_000))
    run(conn.feed(S, resp[:49_152], 2, start=True))
    run(conn.feed_gap(S, len(resp) - 49_152 - 16_384, 2))
    run(conn.feed(S, resp[-16_384:], 2))
    req2, _ = h1_request(prompt_body(10, "small"))
    run(conn.feed(C, req2, 3, start=True))
    run(conn.feed(S, h1_response(answer("small", 5, 2))[0], 4, start=True))
    calls = [r for r in recs if isinstance(r, LlmCallInfo)]
    assert [(c.request_model, c.response_model, c.input_tokens, c.output_tokens, c.status, c.complete)
            for c in calls] == [("gpt-4o-mini", "gpt-4o-mini", 75_000, 3, 200, True),
                                ("small", "small", 5, 2, 200, True)]
    assert calls[0].request_body_bytes == len(body)
    assert calls[0].response_body_bytes == len(resp) - resp.index(b"\r\n\r\n") - 4
    assert tracker.stats["request_gaps"] == 1 and tracker.stats["response_gaps"] == 1


def test_tracker_sse_stream_with_a_gap_keeps_counting():
    tracker = CallTracker()
    conn = HttpConnection()
    req, _ = h1_request(json.dumps({"model": "m", "messages": [], "stream": True}).encode())
    recs = []
    for e in conn.feed(C, req, 1, start=True):
        recs.extend(tracker.feed(e))
    events = b"".join(b'data: {"model":"m","choices":[{"delta":{"content":"t"}}]}\n\n' for _ in range(5000))
    last = (b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5000,'
            b'"total_tokens":5003}}\n\ndata: [DONE]\n\n')
    body = events + last
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    for e in conn.feed(S, resp[:30_000], 2, start=True) + conn.feed_gap(S, 200_000, 2) + \
            conn.feed(S, resp[230_000:], 2):
        recs.extend(tracker.feed(e))
    (call,) = [r for r in recs if isinstance(r, LlmCallInfo)]
    assert (call.output_tokens, call.input_tokens, call.stream, call.complete) == (5000, 3, True, True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.one_of(st.binary(max_size=64), st.integers(1, 100_000))), max_size=12),
       st.sampled_from([None, "h2", "http/1.1"]))
def test_random_bytes_and_gaps_never_raise(steps, alpn):
    """Gaps anywhere (heads, frames, between messages), mixed with random bytes: events or counted
    losses, never an exception, never an internal error."""
    req, _ = h1_request(prompt_body(50))
    conn = HttpConnection(alpn)
    tracker = CallTracker()
    evs = conn.feed(C, PREFACE if alpn == "h2" else req, 0, start=True)
    for server, step in steps:
        side = S if server else C
        evs += conn.feed_gap(side, step, 1) if isinstance(step, int) else conn.feed(side, step, 1, start=True)
    evs += conn.close(2)
    for e in evs:
        tracker.feed(e)
    tracker.close(3)
    assert tracker.stats["internal_errors"] == 0
    assert all("internal error" not in getattr(e, "detail", "") for e in evs)


def test_a_huge_gap_inside_a_counted_body_is_skipped_without_feeding_it():
    """A 4 GiB write (the record's largest length) costs one event, not 4 GiB of zeros through h11."""
    conn = HttpConnection()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (5 << 30)
    out = conn.feed(C, head + b'{"model":"m","messages":[', 1) + conn.feed_gap(C, 4 << 30, 1)
    assert [e.size for e in out if isinstance(e, RequestGap)] == [4 << 30]
    out = conn.feed_gap(C, (5 << 30) - (4 << 30) - 25, 1)
    assert [type(e) for e in out] == [RequestGap, RequestEnd]
