"""``complete`` says whether the response's end was seen, by whatever ends it on the wire: HTTP/2
END_STREAM *or* its content-length reached, an HTTP/1.x close-delimited body at the connection's
end. Fed whole and byte at a time."""

from __future__ import annotations

import gzip
import json

import hpack
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from busted.classify.http import HttpConnection
from busted.classify.http2 import PREFACE
from busted.classify.httpevents import ResponseData, ResponseEnd, ResponseHead, Side
from busted.events import Direction, Evidence, FlowOpened, LlmCall
from busted.pipeline.llmreader import CallReader

C, S = Side.CLIENT, Side.SERVER
BODY = json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}).encode()
REQ_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
FLOW = FlowOpened(ts_ns=1, wall_time=1.0, flow_id=7, direction=Direction.CONNECT, pid=10, tid=10, uid=0,
                  comm="curl", family=4, saddr="10.0.0.1", sport=40000, daddr="10.0.0.2", dport=443,
                  hostname=None, provider=None, evidence=Evidence.UNKNOWN, confidence=0.0)


def ser(*frames) -> bytes:
    return b"".join(f.serialize() for f in frames)


def h2_exchange(body: bytes, *, length: int | None, end_in_own_frame: bool = True,
                extra_headers: tuple = ()) -> list[tuple[Side, bytes]]:
    """One POST and its answer as the lab sends it: DATA with the body, then END_STREAM alone."""
    ec, es = hpack.Encoder(), hpack.Encoder()
    req = [(":method", "POST"), (":scheme", "https"), (":authority", "api.openai.com"),
           (":path", "/v1/chat/completions"), ("content-type", "application/json")]
    head = [(":status", "200"), ("content-type", "application/json"), *extra_headers]
    if length is not None:
        head.append(("content-length", str(length)))
    last = [DataFrame(1, data=body)] + ([DataFrame(1, data=b"", flags=["END_STREAM"])] if end_in_own_frame else [])
    if not end_in_own_frame:
        last = [DataFrame(1, data=body, flags=["END_STREAM"])]
    return [
        (C, PREFACE + ser(SettingsFrame(0))),
        (S, ser(SettingsFrame(0), SettingsFrame(0, flags=["ACK"]))),
        (C, ser(HeadersFrame(1, data=ec.encode(req), flags=["END_HEADERS"]),
                DataFrame(1, data=REQ_BODY, flags=["END_STREAM"]))),
        (S, ser(HeadersFrame(1, data=es.encode(head), flags=["END_HEADERS"]), last[0])),
        *[(S, ser(f)) for f in last[1:]],
    ]


def feed_http(chunks, *, bytewise: bool, upto: int | None = None, close: bool = True):
    c = HttpConnection()
    out = []
    for i, (side, data) in enumerate(chunks[:upto]):
        for part in ([data[k:k + 1] for k in range(len(data))] if bytewise else [data]):
            out.extend(c.feed(side, part, i))
    if close:
        out.extend(c.close(99))
    return out


def ends(events) -> list[tuple[int, bool]]:
    return [(e.ts_ns, e.complete) for e in events if isinstance(e, ResponseEnd)]


def test_h2_response_ends_at_its_content_length_before_end_stream():
    chunks = h2_exchange(BODY, length=len(BODY))
    for bytewise in (False, True):
        # The client stopped reading once it had content-length bytes: the END_STREAM frame is never seen.
        ev = feed_http(chunks, bytewise=bytewise, upto=4)
        assert ends(ev) == [(3, True)]
        assert b"".join(e.data for e in ev if isinstance(e, ResponseData)) == BODY
        # And when the END_STREAM frame does come, it ends nothing twice.
        ev = feed_http(chunks, bytewise=bytewise)
        assert ends(ev) == [(3, True)] and sum(isinstance(e, ResponseHead) for e in ev) == 1


def test_h2_content_length_counts_the_encoded_bytes_and_bad_lengths_are_ignored():
    gz = gzip.compress(BODY, mtime=0)
    ev = feed_http(h2_exchange(gz, length=len(gz), extra_headers=(("content-encoding", "gzip"),)),
                   bytewise=False, upto=4)
    assert ends(ev) == [(3, True)] and b"".join(e.data for e in ev if isinstance(e, ResponseData)) == BODY
    # Short of the length, or no usable length: the end was not seen.
    assert ends(feed_http(h2_exchange(BODY, length=len(BODY) + 1), bytewise=False, upto=4)) == [(99, False)]
    assert ends(feed_http(h2_exchange(BODY, length=None), bytewise=False, upto=4)) == [(99, False)]
    bad = h2_exchange(BODY, length=None, extra_headers=(("content-length", "1e3"),))
    assert ends(feed_http(bad, bytewise=False, upto=4)) == [(99, False)]
    # END_STREAM with the last DATA still ends it once.
    assert ends(feed_http(h2_exchange(BODY, length=len(BODY), end_in_own_frame=False), bytewise=True)) == [(3, True)]


def test_h2_trailers_after_content_length_open_no_new_stream():
    chunks = h2_exchange(BODY, length=len(BODY))[:4]
    es = hpack.Encoder()
    es.encode([(":status", "200"), ("content-type", "application/json"), ("content-length", str(len(BODY)))])
    chunks.append((S, ser(HeadersFrame(1, data=es.encode([("grpc-status", "0")]),
                                       flags=["END_HEADERS", "END_STREAM"]))))
    ev = feed_http(chunks, bytewise=False)
    assert [type(e).__name__ for e in ev if not type(e).__name__.startswith("Request")] == [
        "ResponseHead", "ResponseData", "ResponseEnd"]


def reader_calls(chunks, *, bytewise: bool, upto: int | None = None) -> list[LlmCall]:
    r = CallReader(FLOW, lambda ns: ns / 1e9, prices=_NoPrices())
    out = []
    for i, (side, data) in enumerate(chunks[:upto]):
        for part in ([data[k:k + 1] for k in range(len(data))] if bytewise else [data]):
            out.extend(r.feed(side is C, part, 1000 + i))
    out.extend(r.close(5000))
    return [e for e in out if isinstance(e, LlmCall)]


class _NoPrices:
    def cost(self, **_kw):
        return None


def test_reader_h2_call_complete_when_the_client_stopped_at_content_length():
    for bytewise in (False, True):
        calls = reader_calls(h2_exchange(BODY, length=len(BODY)), bytewise=bytewise, upto=4)
        assert len(calls) == 1
        c = calls[0]
        assert (c.complete, c.status, c.input_tokens, c.output_tokens, c.api) == (True, 200, 11, 2, "openai.chat")


H1_REQ = (b"POST /v1/chat/completions HTTP/1.0\r\nHost: gw.internal:8000\r\nContent-Type: application/json\r\n"
          b"Content-Length: " + str(len(REQ_BODY)).encode() + b"\r\n\r\n" + REQ_BODY)


def test_reader_http10_close_delimited_answer_is_complete_at_close():
    resp = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY
    for bytewise in (False, True):
        calls = reader_calls([(C, H1_REQ), (S, resp)], bytewise=bytewise)
        assert [(c.complete, c.output_tokens, c.response_bytes) for c in calls] == [(True, 2, len(BODY))]


def test_reader_stream_cut_by_the_client_stays_incomplete():
    sse = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    ev = json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                     "choices": [{"index": 0, "delta": {"content": "hi"}}]})
    piece = f"data: {ev}\n\n".encode()
    sse += hex(len(piece))[2:].encode() + b"\r\n" + piece + b"\r\n"
    req = H1_REQ.replace(b"HTTP/1.0", b"HTTP/1.1")
    for bytewise in (False, True):
        calls = reader_calls([(C, req), (S, sse)], bytewise=bytewise)
        assert [(c.complete, c.stream) for c in calls] == [(False, True)]
        # and an HTTP/1.1 body with a Content-Length cut short is not complete either
        short = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n" + BODY
        assert [c.complete for c in reader_calls([(C, req), (S, short)], bytewise=bytewise)] == [False]
