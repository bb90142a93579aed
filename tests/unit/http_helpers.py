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
