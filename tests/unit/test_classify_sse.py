"""SSE and line framing: every split, every line ending, BOM, comments, bounds; event-stream framing."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from busted.classify.eventstream import EventStreamDecoder, encode_message
from busted.classify.sse import LineSplitter, SseEvent, SseParser

DOC = (b"\xef\xbb\xbf: comment\r\n"
       b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n"
       b"data: line one\ndata:line two\nid: 42\n\n"
       b"retry: 100\nunknown: x\ndata\n\n"
       b"data: cr only\r\rdata: [DONE]\n\n"
       b"event: lonely\n\n"
       b"data: no blank line at the end")
EXPECT = [SseEvent("message_start", "{\"a\":1}", None), SseEvent("message", "line one\nline two", "42"),
          SseEvent("message", "", "42"), SseEvent("message", "cr only", "42"), SseEvent("message", "[DONE]", "42")]


def parse(chunks, **kw):
    p = SseParser(**kw)
    out = []
    for c in chunks:
        out += p.feed(c)
    return out, p


def test_whole_document():
    out, p = parse([DOC])
    assert out == EXPECT
    assert p.comments == 1 and p.events == 5 and p.overlong == 0


def test_every_split_point_and_every_byte():
    assert parse([bytes([b]) for b in DOC])[0] == EXPECT
    for i in range(len(DOC) + 1):
        for k in (i, min(len(DOC), i + 1), min(len(DOC), i + 7)):
            assert parse([DOC[:i], DOC[i:k], DOC[k:]])[0] == EXPECT, (i, k)


def test_bom_only_at_start_and_split():
    assert parse([b"\xef", b"\xbb", b"\xbf", b"data: x\n\n"])[0] == [SseEvent("message", "x", None)]
    assert parse([b"\xef\xbb", b"\xbfdata: x\n\n"])[0] == [SseEvent("message", "x", None)]
    # a second BOM is data of a field name, not stripped: the line is an unknown field
    assert parse([b"data: a\n\n\xef\xbb\xbfdata: b\n\n"])[0] == [SseEvent("message", "a", None)]


def test_crlf_split_between_cr_and_lf_is_one_line_end():
    out, _ = parse([b"data: a\r", b"\n", b"\r", b"\ndata: b\r\n\r\n"])
    assert out == [SseEvent("message", "a", None), SseEvent("message", "b", None)]


def test_overlong_event_is_skipped_and_counted():
    big = b"data: " + b"x" * 5000 + b"\n\n"
    out, p = parse([b"data: small\n\n", big[:3000], big[3000:], b"data: after\n\n"], max_event=1024)
    assert out == [SseEvent("message", "small", None), SseEvent("message", "after", None)]
    assert p.overlong == 1
    # many lines each under the cap but together over it
    many = b"".join(b"data: " + b"y" * 100 + b"\n" for _ in range(50)) + b"\n"
    out, p = parse([many, b"data: ok\n\n"], max_event=1024)
    assert out == [SseEvent("message", "ok", None)] and p.overlong == 1


def test_line_splitter_pending_and_overlong():
    s = LineSplitter(max_line=10)
    assert s.feed(b"ab\ncd") == [b"ab"] and s.pending() == b"cd"
    assert s.feed(b"0123456789abc\nok\n") == [None, b"ok"] and s.overlong == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_random_bytes_never_raise_and_split_invariant(data, cuts):
    ref, _ = parse([data])
    cuts = sorted(c for c in cuts if c <= len(data))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert parse(parts)[0] == ref


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["data", "event", "id", ":", "retry", "x"]),
                          st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                                  max_size=30)), max_size=20),
       st.sampled_from([b"\n", b"\r\n", b"\r"]), st.randoms())
def test_generated_streams_all_line_endings(fields, eol, rnd):
    doc = b"".join((f"{k}: {v}" if k != ":" else f": {v}").encode() + eol + (eol if rnd.random() < 0.3 else b"")
                   for k, v in fields)
    ref, _ = parse([doc])
    assert parse([bytes([b]) for b in doc])[0] == ref
    assert ref == reference_parse(doc.decode().split(eol.decode())[:-1])


def reference_parse(lines: list[str]) -> list[SseEvent]:
    """The spec's algorithm, written plainly, for lines already split."""
    evs: list[SseEvent] = []
    data: list[str] = []
    event, eid = "", None
    for line in lines:
        if line == "":
            if data:
                evs.append(SseEvent(event or "message", "\n".join(data), eid))
            data, event = [], ""
        elif not line.startswith(":"):
            name, _, val = line.partition(":")
            val = val[1:] if val.startswith(" ") else val
            if name == "data":
                data.append(val)
            elif name == "event":
                event = val
            elif name == "id" and "\0" not in val:
                eid = val
    return evs


# --- AWS event-stream ---------------------------------------------------------------------------

FRAMES = [encode_message({":event-type": f"e{i}", ":message-type": "event"}, b'{"i": %d}' % i) for i in range(5)]


def test_event_stream_any_split():
    whole = b"".join(FRAMES)
    ref = EventStreamDecoder().feed(whole)
    assert [m.header(":event-type") for m in ref] == [f"e{i}" for i in range(5)]
    for i in range(len(whole) + 1):
        d = EventStreamDecoder()
        assert d.feed(whole[:i]) + d.feed(whole[i:]) == ref
    d = EventStreamDecoder()
    assert [m for b in whole for m in d.feed(bytes([b]))] == ref


def test_event_stream_bad_crc_and_lengths_stop_decoding():
    bad = bytearray(FRAMES[0])
    bad[9] ^= 1  # prelude crc
    d = EventStreamDecoder()
    assert d.feed(bytes(bad) + FRAMES[1]) == [] and d.broken == "prelude crc mismatch"
    assert d.feed(FRAMES[2]) == []
    huge = EventStreamDecoder(max_message=len(FRAMES[0]) - 1)
    assert huge.feed(FRAMES[0]) == [] and huge.broken.startswith("bad lengths")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 5))
def test_event_stream_mutations_never_raise(noise, which):
    rnd = random.Random(len(noise))
    data = bytearray(b"".join(FRAMES))
    for b in noise[:20]:
        data[rnd.randrange(len(data))] = b
    d = EventStreamDecoder()
    got = d.feed(bytes(data[:which * 30]))
    got += d.feed(bytes(data[which * 30:]) + noise)
    # What comes out is the frames the mutations left intact, up to the first damaged one (random
    # bytes do not make a valid CRC), in order, each counted once; a damaged frame stops decoding
    # and says why.
    ref = EventStreamDecoder().feed(b"".join(FRAMES))
    offsets = [sum(map(len, FRAMES[:i])) for i in range(len(FRAMES))]
    intact = next((i for i, f in enumerate(FRAMES) if bytes(data[offsets[i]:offsets[i] + len(f)]) != f), len(FRAMES))
    assert got == ref[:intact] and d.messages == intact
    assert d.broken is not None or intact == len(FRAMES)  # (trailing noise may break it after the last)
