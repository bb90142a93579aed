"""HTTP observer on recorded exchanges: real clients (curl, node) against real servers, fed whole,
one byte at a time and at random splits; keep-alive, chunked+gzip, br, 100-continue, HEAD,
close-delimited, HTTP/2 multiplexing, CONTINUATION, padding, trailers, RST_STREAM, late joins."""

from __future__ import annotations

import pytest
from http_helpers import body, load_fixtures, merged, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busted.classify import httpbody
from busted.classify.http import HttpConnection
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

FIXTURES = load_fixtures()
# What the generator's servers sent (tests/unit/make_http_fixtures.py BODIES), decoded.
ONE, TWO, THREE = b"first response\n", b"second response, a bit longer\n", b"third\n"
GZ_LINES = b"".join(b"line %d of a chunked gzip body\n" % i for i in range(200))
POST_BODY = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "' + b"hi " * 700 + b'"}]}'


def kinds(events):
    return [type(e).__name__ for e in events]


def test_fixtures_present():
    assert {"h1_keepalive", "h1_chunked_gzip", "h1_post_continue", "h1_close_delimited", "h1_head", "h1_brotli",
            "h2_multiplex", "h2_features", "h2_post", "h2_reset"} <= set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_no_errors_and_byte_at_a_time_equals_whole(name):
    fx = FIXTURES[name]
    whole = run(fx["chunks"])
    assert not [e for e in whole if isinstance(e, HttpProtocolError)]
    assert merged(run(fx["chunks"], pieces=lambda i, d: [d[j : j + 1] for j in range(len(d))])) == merged(whole)
    # with the ALPN hint instead of detection: the same
    assert merged(run(fx["chunks"], alpn=fx["alpn"])) == merged(whole)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(FIXTURES)), data=st.data())
def test_random_splits_equal_whole(name, data):
    fx = FIXTURES[name]
    cuts = {}
    for i, (_, d) in enumerate(fx["chunks"]):
        cuts[i] = sorted(set(data.draw(st.lists(st.integers(0, len(d)), max_size=8))))

    def pieces(i, d):
        edges = [0, *cuts[i], len(d)]
        return [d[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]

    assert merged(run(fx["chunks"], pieces=pieces)) == merged(run(fx["chunks"]))


def test_h1_keepalive_three_requests():
    ev = run(FIXTURES["h1_keepalive"]["chunks"])
    assert kinds(ev) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"] * 3
    heads = [e for e in ev if isinstance(e, RequestHead)]
    assert [h.path for h in heads] == ["/one", "/two", "/three"]
    assert all(h.method == "GET" and h.http_version == "1.1" and h.stream == 0 for h in heads)
    assert heads[0].authority and heads[0].authority.startswith("127.0.0.1:")
    assert ("user-agent", "curl/7.88.1") in heads[0].headers
    assert [e.data for e in ev if isinstance(e, ResponseData)] == [ONE, TWO, THREE]
    ends = [e for e in ev if isinstance(e, ResponseEnd)]
    assert [(e.body_bytes, e.complete) for e in ends] == [(len(ONE), True), (len(TWO), True), (len(THREE), True)]
    # events carry the timestamp of the chunk that completed them
    assert [e.ts_ns for e in ev if isinstance(e, ResponseEnd)] == [1, 4, 7]


def test_h1_chunked_gzip_decoded():
    ev = run(FIXTURES["h1_chunked_gzip"]["chunks"])
    head = next(e for e in ev if isinstance(e, ResponseHead))
    assert ("content-encoding", "gzip") in head.headers and ("transfer-encoding", "chunked") in head.headers
    assert body(ev, ResponseData) == GZ_LINES
    assert ev[-1] == ResponseEnd(0, ev[-1].ts_ns, len(GZ_LINES), True)


def test_h1_brotli_decoded_when_available_else_raw(monkeypatch):
    chunks = FIXTURES["h1_brotli"]["chunks"]
    if httpbody.HAVE_BROTLI:
        assert body(run(chunks), ResponseData) == b"brotli body " * 100
    monkeypatch.setattr(httpbody, "HAVE_BROTLI", False)
    ev = run(chunks)
    raw = chunks[-1][1] if chunks[-1][0] is Side.SERVER else None
    assert raw is not None and body(ev, ResponseData) == raw.split(b"\r\n\r\n", 1)[-1]
    assert not [e for e in ev if isinstance(e, HttpProtocolError)]


def test_h1_post_100_continue():
    ev = run(FIXTURES["h1_post_continue"]["chunks"])
    assert kinds(ev) == ["RequestHead", "RequestData", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"]
    assert ev[0].method == "POST" and ("expect", "100-continue") in ev[0].headers
    assert body(ev, RequestData) == POST_BODY and ev[2].body_bytes == len(POST_BODY)
    assert ev[3].status == 200  # the interim 100 is not the response
    assert body(ev, ResponseData) == POST_BODY


def test_h1_head_has_no_body_and_close_delimited_ends_at_close():
    ev = run(FIXTURES["h1_head"]["chunks"])
    assert kinds(ev) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseEnd"]
    assert ("content-length", str(len(ONE))) in ev[2].headers and ev[3].body_bytes == 0
    chunks = FIXTURES["h1_close_delimited"]["chunks"]
    ev = run(chunks, close=False)
    assert kinds(ev)[-1] == "ResponseData"  # no length: not over until the connection is
    ev = run(chunks)
    want = b"close-delimited body: no content-length, ends at FIN\n" * 5
    assert ev[2].http_version == "1.0" and body(ev, ResponseData) == want
    assert ev[-1] == ResponseEnd(0, len(chunks), len(want), True)


def test_h1_close_mid_body_is_incomplete():
    chunks = FIXTURES["h1_keepalive"]["chunks"][:4]  # /two's head, not its body
    ev = run(chunks)
    assert ev[-1] == ResponseEnd(0, 4, 0, False)


def test_close_flags_requests_never_answered():
    ev = run(FIXTURES["h1_keepalive"]["chunks"][:3])  # /two asked, connection gone
    assert kinds(ev)[-3:] == ["RequestHead", "RequestEnd", "ResponseEnd"] and ev[-1] == ResponseEnd(0, 3, 0, False)
    c = HttpConnection()
    c.feed(Side.CLIENT, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n", 1)
    assert c.close(2) == [ResponseEnd(0, 2, 0, False)] * 2
    ev = run(FIXTURES["h2_post"]["chunks"][:3])
    assert ev[-1] == ResponseEnd(1, 3, 0, False) and kinds(ev).count("ResponseEnd") == 1


def test_h1_late_join_response_without_request():
    chunks = FIXTURES["h1_keepalive"]["chunks"][1:]
    ev = run(chunks)
    assert kinds(ev)[:3] == ["ResponseHead", "ResponseData", "ResponseEnd"]
    assert ev[0].status == 200 and ev[0].stream == 0 and ev[1].data == ONE
    assert [e.path for e in ev if isinstance(e, RequestHead)] == ["/two", "/three"]
    assert body(ev, ResponseData) == ONE + TWO + THREE


def test_h1_late_join_mid_body_gives_up_quietly():
    c = HttpConnection()
    ev = c.feed(Side.SERVER, b"\x1f\x8b\x08\x00 compressed middle of something", 5)
    assert ev == [HttpProtocolError(0, 5, "not HTTP")]
    assert c.stopped and c.errors == 1
    assert c.feed(Side.CLIENT, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 6) == [] and c.close(7) == []


def test_streamed_bodies_arrive_as_they_come():
    # An LLM streaming answer (SSE over chunked) must not wait for the end of the response.
    c = HttpConnection()
    c.feed(Side.CLIENT, b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}", 1)
    ev = c.feed(Side.SERVER, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n", 2)
    assert kinds(ev) == ["ResponseHead"]
    lines = [b'data: {"delta": "He"}\n\n', b'data: {"delta": "llo"}\n\n']
    for ts, line in enumerate(lines, start=3):
        ev = c.feed(Side.SERVER, b"%x\r\n%s\r\n" % (len(line), line), ts)
        assert ev == [ResponseData(0, ts, line)]
    assert c.feed(Side.SERVER, b"0\r\n\r\n", 9) == [ResponseEnd(0, 9, sum(map(len, lines)), True)]


def test_h1_pipelined_head_then_get():
    c = HttpConnection()
    ev = c.feed(Side.CLIENT, b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n", 1)
    assert [e.method for e in ev if isinstance(e, RequestHead)] == ["HEAD", "GET"]
    ev = c.feed(Side.SERVER, b"HTTP/1.1 200 OK\r\nContent-Length: 55\r\n\r\n"
                             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2)
    assert kinds(ev) == ["ResponseHead", "ResponseEnd", "ResponseHead", "ResponseData", "ResponseEnd"]
    assert ev[1].body_bytes == 0 and ev[3].data == b"ok"


def test_h1_gzip_request_body_and_deflate_variants():
    import gzip
    import zlib

    payload = b'{"prompt": "x"}' * 50
    for enc, blob in [("gzip", gzip.compress(payload)), ("deflate", zlib.compress(payload)),
                      ("deflate", zlib.compress(payload)[2:-4])]:  # raw deflate, as some servers send
        c = HttpConnection()
        ev = c.feed(Side.CLIENT, b"POST /v1 HTTP/1.1\r\nHost: h\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
                    % (enc.encode(), len(blob)) + blob, 1)
        assert body(ev, RequestData) == payload and ev[-1] == RequestEnd(0, 1, len(payload)), enc


def test_h1_upgrade_and_connect_stop_parsing():
    c = HttpConnection()
    ev = c.feed(Side.CLIENT, b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1)
    assert kinds(ev) == ["RequestHead", "RequestEnd"]
    ev = c.feed(Side.SERVER, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                             b"\x81\x05hello", 2)
    assert kinds(ev) == ["ResponseHead", "ResponseEnd"] and ev[0].status == 101
    assert c.stopped and c.errors == 0
    assert c.feed(Side.CLIENT, b"\x81\x85 masked frame", 3) == []
    c = HttpConnection()
    ev = c.feed(Side.CLIENT, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n\x16\x03\x01", 1)
    assert [(e.method, e.path) for e in ev if isinstance(e, RequestHead)] == [("CONNECT", "api.openai.com:443")]
    ev = c.feed(Side.SERVER, b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03\x00\x10", 2)
    assert kinds(ev) == ["ResponseHead", "ResponseEnd"] and c.stopped and c.errors == 0
    assert ev[1] == ResponseEnd(0, 2, 0, True) and c.close(3) == []


def test_h1_refused_upgrade_keeps_parsing():
    # curl --http2 on http:// asks for h2c; a server without it answers in HTTP/1.1 and the
    # connection goes on. The client's bytes sent meanwhile are held, then parsed.
    c = HttpConnection()
    ev = c.feed(Side.CLIENT, b"POST /a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                             b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: 3\r\n\r\nabc"
                             b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n", 1)
    assert kinds(ev) == ["RequestHead", "RequestData", "RequestEnd"] and ev[1].data == b"abc"
    ev = c.feed(Side.SERVER, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2)
    assert kinds(ev) == ["ResponseHead", "RequestHead", "RequestEnd", "ResponseData", "ResponseEnd"]
    assert ev[1].path == "/b"
    ev = c.feed(Side.SERVER, b"HTTP/1.1 204 No Content\r\n\r\n", 3)
    assert kinds(ev) == ["ResponseHead", "ResponseEnd"] and c.errors == 0 and not c.stopped
    c = HttpConnection()
    c.feed(Side.CLIENT, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n", 1)
    ev = c.feed(Side.SERVER, b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 4\r\n\r\nauth", 2)
    assert kinds(ev) == ["ResponseHead", "ResponseData", "ResponseEnd"] and ev[0].status == 407
    ev = c.feed(Side.CLIENT, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
                             b"Proxy-Authorization: Basic eDp5\r\n\r\n", 3)
    assert kinds(ev) == ["RequestHead", "RequestEnd"] and not c.stopped
    # held bytes are bounded
    c = HttpConnection(max_buffer=1000)
    c.feed(Side.CLIENT, b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1)
    ev = c.feed(Side.CLIENT, b"x" * 2000, 2)
    assert len(ev) == 1 and "buffer limit" in ev[0].detail


def test_h1_oversized_head_is_an_error():
    c = HttpConnection()
    ev = c.feed(Side.CLIENT, b"GET / HTTP/1.1\r\nX-A: " + b"a" * 100_000, 1)
    assert len(ev) == 1 and isinstance(ev[0], HttpProtocolError) and c.stopped


# -- HTTP/2 -----------------------------------------------------------------------------------


def test_h2_two_streams_interleaved():
    ev = run(FIXTURES["h2_multiplex"]["chunks"])
    heads = {e.stream: e for e in ev if isinstance(e, RequestHead)}
    assert {s: h.path for s, h in heads.items()} == {1: "/two/a", 3: "/two/b", 5: "/one"}
    assert all(h.http_version == "2" and h.method == "GET" for h in heads.values())
    assert ("user-agent", "node-h2-test") in heads[1].headers and heads[1].authority.startswith("127.0.0.1:")
    data = [(e.stream, e.data[:1]) for e in ev if isinstance(e, ResponseData)]
    assert data[:6] == [(1, b"A"), (3, b"B")] * 3  # interleaved as the server sent them
    assert body(ev, ResponseData, 1) == b"A" * 3000 and body(ev, ResponseData, 3) == b"B" * 3000
    ends = {e.stream: (e.body_bytes, e.complete) for e in ev if isinstance(e, ResponseEnd)}
    assert ends == {1: (3000, True), 3: (3000, True), 5: (len(ONE), True)}


def test_h2_gzip_padding_continuation_trailers():
    ev = run(FIXTURES["h2_features"]["chunks"])
    paths = {e.stream: e.path for e in ev if isinstance(e, RequestHead)}
    by = {p: s for s, p in paths.items()}
    assert body(ev, ResponseData, by["/gzip"]) == b"gzip over h2 " * 300
    assert body(ev, ResponseData, by["/padded"]) == b"padded data frames\n" * 10
    big = next(e for e in ev if isinstance(e, ResponseHead) and e.stream == by["/big-headers"])
    assert ("x-big", "x" * 20000) in big.headers  # 20 kB: a HEADERS frame and CONTINUATION
    trailers = [e for e in ev if e.stream == by["/trailers"] and not isinstance(e, RequestHead | RequestEnd)]
    assert kinds(trailers) == ["ResponseHead", "ResponseData", "ResponseEnd"]
    assert trailers[-1].complete and trailers[-1].body_bytes == len(b"body then trailers\n")


def test_h2_post_body():
    ev = run(FIXTURES["h2_post"]["chunks"])
    assert ev[0].method == "POST" and ("content-type", "application/json") in ev[0].headers
    assert body(ev, RequestData) == POST_BODY
    assert [(e.stream, e.body_bytes) for e in ev if isinstance(e, RequestEnd)] == [(1, len(POST_BODY))]
    assert body(ev, ResponseData) == POST_BODY


def test_h2_rst_stream_ends_response_incomplete():
    ev = run(FIXTURES["h2_reset"]["chunks"])
    assert ev[-1] == ResponseEnd(1, ev[-1].ts_ns, 600, False)
    assert body(ev, ResponseData) == b"partial " * 75


def test_h2_close_mid_stream_flags_in_flight():
    chunks = FIXTURES["h2_multiplex"]["chunks"]
    cut = next(i for i, (s, d) in enumerate(chunks) if s is Side.SERVER and len(d) > 1000)
    head, data = chunks[cut]
    ev = run([*chunks[:cut], (head, data[:200])])  # response heads and the first bytes of stream 1
    ends = [e for e in ev if isinstance(e, ResponseEnd)]
    assert {(e.stream, e.complete) for e in ends} == {(1, False), (3, False)}


def test_h2_late_join_with_dynamic_table_refs_stops():
    chunks = FIXTURES["h2_multiplex"]["chunks"]
    i = next(i for i, (s, d) in enumerate(chunks) if s is Side.CLIENT and d[3] == 0x1 and i > 1)  # stream 5's HEADERS
    c = HttpConnection()
    ev = run(chunks[i:], conn=c)
    assert len(ev) == 1 and isinstance(ev[0], HttpProtocolError) and "Invalid" in ev[0].detail
    assert c.stopped and c.protocol == "h2"


def test_not_http_is_one_error():
    c = HttpConnection()
    assert c.feed(Side.CLIENT, b"\x16\x03", 1) == []  # too short to tell
    ev = c.feed(Side.CLIENT, b"\x01\x02\x00\x01\xfc\x03\x03 tls hello", 2)
    assert ev == [HttpProtocolError(0, 2, "not HTTP")] and c.protocol is None
    for _ in range(3):
        assert c.feed(Side.SERVER, b"\x16\x03\x03\x00\x7a", 3) == []
    assert c.errors == 1
