"""Shared by the HTTP parser tests and bench/fuzz_http.py: fixtures, feeding, normalising."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from busted.classify.http import HttpConnection
from busted.classify.httpevents import HttpEvent, RequestData, ResponseData, Side

FIX = Path(__file__).with_name("fixtures") / "http"
Chunk = tuple[Side, bytes]


def load_fixtures() -> dict[str, dict]:
    """name -> {"alpn", "chunks": [(Side, bytes), ...]}"""
    out = {}
    for p in sorted(FIX.glob("*.json")):
        doc = json.loads(p.read_text())
        doc["chunks"] = [(Side.CLIENT if s == "c" else Side.SERVER, bytes.fromhex(h)) for s, h in doc["chunks"]]
        out[doc["name"]] = doc
    return out


def run(chunks: list[Chunk], pieces=None, alpn: str | None = None, close: bool = True,
        conn: HttpConnection | None = None) -> list[HttpEvent]:
    """Feed recorded chunks (chunk i gets ts i); ``pieces(i, data)`` may split a chunk further."""
    c = conn or HttpConnection(alpn)
    out: list[HttpEvent] = []
    for i, (side, data) in enumerate(chunks):
        for part in (pieces(i, data) if pieces else [data]):
            out.extend(c.feed(side, part, i))
    if close:
        out.extend(c.close(len(chunks)))
    return out


def merged(events: list[HttpEvent]) -> list[HttpEvent]:
    """Adjacent data events of one stream joined, their timestamps dropped: how a body is split
    depends on how the bytes were split, what it says does not."""
    out: list[HttpEvent] = []
    for ev in events:
        if isinstance(ev, RequestData | ResponseData):
            ev = replace(ev, ts_ns=0)
            last = out[-1] if out else None
            if type(last) is type(ev) and last.stream == ev.stream:
                out[-1] = replace(last, data=last.data + ev.data)
                continue
        out.append(ev)
    return out


def body(events: list[HttpEvent], kind: type, stream: int | None = None) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, kind) and (stream is None or e.stream == stream))


def mutate(rng, chunks: list[Chunk], others: list[list[Chunk]]) -> list[Chunk]:
    """A damaged copy of a recorded exchange: the kinds of damage a late join, a lost capture
    record or a hostile peer produce (flipped, inserted, dropped, reordered, spliced bytes)."""
    out = [(s, bytearray(d)) for s, d in chunks]
    for _ in range(rng.randint(1, 4)):
        if not out:
            out.append((Side(rng.randint(0, 1)), bytearray()))
        i = rng.randrange(len(out))
        side, d = out[i]
        op = rng.randrange(10)
        if op == 0 and d:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                d[rng.randrange(len(d))] = rng.randrange(256)
        elif op == 1:  # insert random bytes
            at = rng.randint(0, len(d))
            d[at:at] = rng.randbytes(rng.randint(1, 32))
        elif op == 2 and d:  # drop a range
            a = rng.randrange(len(d))
            del d[a : a + rng.randint(1, 64)]
        elif op == 3:  # drop leading chunks: a late join
            del out[: rng.randint(1, len(out))]
        elif op == 4:  # duplicate a chunk
            out.insert(i, (side, bytearray(d)))
        elif op == 5:  # wrong direction
            out[i] = (Side(1 - side), d)
        elif op == 6 and others:  # splice in a chunk from another exchange
            o = rng.choice(others)
            if o:
                out.insert(i, (lambda c: (c[0], bytearray(c[1])))(rng.choice(o)))
        elif op == 7 and len(d) >= 3:  # blow up a length-ish field
            a = rng.randrange(len(d) - 2)
            d[a : a + 3] = rng.choice([b"\xff\xff\xff", b"\x00\x00\x00", b"\x7f\xff\xff", rng.randbytes(3)])
        elif op == 8:  # truncate
            del out[i + 1 :]
            del d[rng.randint(0, len(d)) :]
        else:  # shuffle two chunks
            j = rng.randrange(len(out))
            out[i], out[j] = out[j], out[i]
    return [(s, bytes(d)) for s, d in out]
