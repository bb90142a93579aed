"""What the sans-I/O HTTP parsers emit, and what the LLM/MCP extractors consume.

The seam between two layers of the plaintext work (issue: LLM calls):

* ``busted.classify.http`` turns the bytes of one connection, fed per direction with their
  timestamps (``feed(Side.CLIENT, data, ts_ns)``), into these events: HTTP/1.1 (h11) and HTTP/2
  (hyperframe + hpack) alike. Bodies arrive *decoded* (chunked framing and gzip/deflate/br
  content-encoding removed) and in the order the bytes were seen.
* ``busted.classify.llm`` consumes them and produces per-call records (model, tokens, ...).

Nothing here does I/O. Header values are kept as received so the extractors can read
``content-type`` or ``user-agent``; the layers above never store credential headers (see
``busted.redact``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "HttpEvent",
    "HttpProtocolError",
    "RequestData",
    "RequestEnd",
    "RequestGap",
    "RequestHead",
    "ResponseData",
    "ResponseEnd",
    "ResponseGap",
    "ResponseHead",
    "Side",
]


class Side(enum.IntEnum):
    """Which end wrote the bytes: the client (requests) or the server (responses)."""

    CLIENT = 0
    SERVER = 1


@dataclass(frozen=True, slots=True)
class HttpEvent:
    """Base: ``stream`` is 0 for HTTP/1.1 (exchanges are sequential), the stream id for HTTP/2."""

    stream: int
    ts_ns: int


@dataclass(frozen=True, slots=True)
class RequestHead(HttpEvent):
    method: str
    path: str  # as sent: path and query
    authority: str | None  # Host header or :authority
    headers: tuple[tuple[str, str], ...]  # lower-case names, in order, pseudo-headers excluded
    http_version: str  # "1.1", "1.0" or "2"


@dataclass(frozen=True, slots=True)
class RequestData(HttpEvent):
    data: bytes  # decoded body bytes


@dataclass(frozen=True, slots=True)
class RequestGap(HttpEvent):
    """Body bytes that were on the wire but not captured (the kernel copies a bounded head and tail
    of each write): the message goes on after them. ``size`` counts wire bytes of the body."""

    size: int


@dataclass(frozen=True, slots=True)
class RequestEnd(HttpEvent):
    body_bytes: int  # decoded body length in total


@dataclass(frozen=True, slots=True)
class ResponseHead(HttpEvent):
    status: int
    headers: tuple[tuple[str, str], ...]
    http_version: str


@dataclass(frozen=True, slots=True)
class ResponseData(HttpEvent):
    data: bytes  # decoded body bytes


@dataclass(frozen=True, slots=True)
class ResponseGap(HttpEvent):
    """Like ``RequestGap``, in a response body."""

    size: int


@dataclass(frozen=True, slots=True)
class ResponseEnd(HttpEvent):
    body_bytes: int  # decoded body length in total
    complete: bool  # False when the connection ended (or was lost) mid-response


@dataclass(frozen=True, slots=True)
class HttpProtocolError(HttpEvent):
    """Bytes the parser could not follow; the stream (or connection) was abandoned, and counted."""

    detail: str
