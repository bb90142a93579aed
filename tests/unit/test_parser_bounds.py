"""Memory of the plaintext parsers is bounded per connection whatever a peer sends (issue 17,
item 9: h2c connections x 256 streams of gzip answers that never end took the monitor to 1.7 GB):
streams followed per connection, bytes held for all exchanges, and what is dropped is counted."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import hpack
import pytest

from busted.classify.http import HttpConnection
from busted.classify.http2 import MAX_STREAMS, PREFACE
from busted.classify.httpevents import Side
from busted.classify.llm import MAX_HELD, CallTracker


def frame(typ: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([typ, flags]) + sid.to_bytes(4, "big") + payload


def bomb(n_streams: int, per_stream: int, ctype: str) -> tuple[bytes, list[bytes]]:
    """A client opening ``n_streams`` LLM calls, and the server's answers: gzip bodies that expand
    to ``per_stream`` bytes each and never end (no END_STREAM, an unfinished JSON value / SSE event)."""
    ce, se = hpack.Encoder(), hpack.Encoder()
    body = json.dumps({"model": "m", "messages": []}).encode()
    client = PREFACE + frame(4, 0, 0, b"")
    server = [frame(4, 0, 0, b"")]
    start = b'{"model":"m","x":"' if ctype == "application/json" else b'data: {"x":"'
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = z.compress(start + b"a" * per_stream) + z.flush(zlib.Z_SYNC_FLUSH)
    assert gzip.decompress(blob + z.flush())  # valid gzip
    for i in range(n_streams):
        sid = 1 + 2 * i
        client += frame(1, 4, sid, ce.encode([(":method", "POST"), (":path", "/v1/chat/completions"),
                                              (":scheme", "http"), (":authority", "x")]))
        client += frame(0, 1, sid, body)
        head = frame(1, 4, sid, se.encode([(":status", "200"), ("content-type", ctype),
                                           ("content-encoding", "gzip")]))
        server.append(head + b"".join(frame(0, 0, sid, blob[k : k + 16384]) for k in range(0, len(blob), 16384)))
    return client, server


@pytest.mark.parametrize("ctype", ["application/json", "text/event-stream"])
def test_streams_of_never_ending_gzip_answers_stay_within_the_bound(ctype):
    client, server = bomb(300, 512 * 1024, ctype)
    conn = HttpConnection("h2")
    tracker = CallTracker()
    tracemalloc.start()
    try:
        for ev in conn.feed(Side.CLIENT, client, 1):
            tracker.feed(ev)
        for piece in server:
            for ev in conn.feed(Side.SERVER, piece, 2):
                tracker.feed(ev)
            assert tracker.held <= MAX_HELD
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 300 x 512 KiB decoded were offered; what is kept stays near the bound (plus the streams'
    # decompressors), and the exchanges cut short are counted with a reason
    assert peak < MAX_HELD + 24 * 1024 * 1024, peak
    assert tracker.stats["over_budget"] > 0 and tracker.losses
    assert "bytes held" in tracker.losses[0]


def test_streams_over_the_limit_are_counted_not_followed():
    client, server = bomb(MAX_STREAMS + 20, 10, "application/json")
    conn = HttpConnection("h2")
    conn.feed(Side.CLIENT, client, 1)
    assert not conn.stopped  # the connection is still read
    assert len([x for x in conn.losses if "not followed" in x]) == 20
