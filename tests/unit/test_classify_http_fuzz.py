"""Malformed, truncated and hostile input never escapes the HTTP observer as an exception."""

from __future__ import annotations

import random

from http_helpers import load_fixtures, mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busted.classify.http import HttpConnection
from busted.classify.http2 import PREFACE
from busted.classify.httpevents import HttpEvent, HttpProtocolError, Side

FIXTURES = load_fixtures()
ALL = [fx["chunks"] for fx in FIXTURES.values()]

chunks_st = st.lists(st.tuples(st.sampled_from([Side.CLIENT, Side.SERVER]), st.binary(max_size=300)), max_size=12)
prefixes = st.sampled_from([b"", PREFACE, b"GET / HTTP/1.1\r\n", b"POST /v1 HTTP/1.1\r\nHost: x\r\n",
                            b"HTTP/1.1 200 OK\r\n", b"\x00\x00\x06\x04\x00\x00\x00\x00\x00"])


def feed_all(chunks, alpn=None, **kw):
    c = HttpConnection(alpn, **kw)
    events = []
    for i, (side, data) in enumerate(chunks):
        got = c.feed(side, data, i)
        if c.stopped and got and isinstance(got[-1], HttpProtocolError):
            assert c.feed(side, data, i) == []  # once given up, silence
        events += got
    events += c.close(len(chunks))
    assert all(isinstance(e, HttpEvent) for e in events)
    assert not [e for e in events if isinstance(e, HttpProtocolError) and e.detail.startswith("internal error")]
    assert c.errors == sum(isinstance(e, HttpProtocolError) for e in events)
    return events


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=prefixes, chunks=chunks_st, alpn=st.sampled_from([None, "h2", "http/1.1"]))
def test_random_bytes_never_raise(prefix, chunks, alpn):
    feed_all([(Side.CLIENT, prefix), *chunks], alpn)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), idx=st.integers(0, len(ALL) - 1), alpn=st.sampled_from([None, "h2"]))
def test_mutated_recordings_never_raise(seed, idx, alpn):
    rng = random.Random(seed)
    feed_all(mutate(rng, ALL[idx], ALL), alpn, max_buffer=4096, max_decoded=2048)


def test_escape_becomes_an_event(monkeypatch):
    # Whatever a library raises (here: a bug injected into the HTTP/2 parser) is turned into one
    # event, counted, and the connection is dropped.
    from busted.classify import http2

    def boom(*a, **k):
        raise KeyError("injected")

    monkeypatch.setattr(http2.Http2Parser, "_frame", boom)
    c = HttpConnection()
    ev = c.feed(Side.CLIENT, PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", 1)
    assert ev == [HttpProtocolError(0, 1, "internal error: KeyError: 'injected'")]
    assert c.errors == 1 and c.stopped
