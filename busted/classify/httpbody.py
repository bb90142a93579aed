"""Bounded, streaming removal of HTTP content-encoding (gzip, deflate, br), shared by HTTP/1.1 and 2.

Bodies arrive in pieces and leave in pieces: nothing is accumulated, and every decompressor is
driven with an output limit, so one small hostile chunk cannot expand into gigabytes in a single
call (zip bombs). Past ``max_decoded`` bytes per message the decoder stops and reports why.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

try:  # optional: brotli >= 1.2 has the output limit a bounded decoder needs
    import brotli as _brotli

    _brotli.Decompressor().process(b"", output_buffer_limit=1)
    HAVE_BROTLI = True
except Exception:  # not installed, or too old to bound its output
    _brotli = None
    HAVE_BROTLI = False

__all__ = ["HAVE_BROTLI", "BodyDecoder", "BodyLimitError", "content_codings"]

_PIECE = 64 * 1024  # output produced per decompressor call


class BodyLimitError(Exception):
    """The body could not be decoded (corrupt, or over the decoded-size cap)."""


def content_codings(headers: Sequence[tuple[str, str]]) -> list[str]:
    """The content-codings applied to a body, in the order they were applied."""
    out: list[str] = []
    for name, value in headers:
        if name == "content-encoding":
            out.extend(c.strip().lower() for c in value.split(",") if c.strip())
    return out


class _Stage:
    """One decompressor; ``feed`` yields bounded pieces."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._z: zlib._Decompress | None = None
        self._br = None
        self._first = True
        if coding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._z = zlib.decompressobj(zlib.MAX_WBITS)  # zlib-wrapped; raw deflate tried on failure
        else:  # br
            self._br = _brotli.Decompressor()

    def feed(self, data: bytes):
        if self._br is not None:
            out = self._br.process(data, output_buffer_limit=_PIECE)
            while True:
                if out:
                    yield out
                if self._br.can_accept_more_data():
                    return
                out = self._br.process(b"", output_buffer_limit=_PIECE)
        z = self._z
        assert z is not None
        if z.eof:  # bytes after the end of the compressed stream: ignored, as browsers do
            return
        try:
            out = z.decompress(data, _PIECE)
        except zlib.error:
            if not (self.coding == "deflate" and self._first):
                raise
            # Some servers send raw deflate (no zlib header) for "deflate".
            self._z = z = zlib.decompressobj(-zlib.MAX_WBITS)
            out = z.decompress(data, _PIECE)
        self._first = False
        while True:
            if out:
                yield out
            tail = z.unconsumed_tail
            if not tail or z.eof:
                return
            out = z.decompress(tail, _PIECE)


class BodyDecoder:
    """Removes the content-codings of one message, streaming; raises BodyLimitError on trouble.

    Unknown codings (zstd, compress, br without the brotli package) leave the body as received
    (``passthrough`` is True); the message's content-encoding header tells the reader.
    """

    __slots__ = ("_stages", "_max", "decoded", "passthrough")

    def __init__(self, codings: Sequence[str], max_decoded: int) -> None:
        self._max = max_decoded
        self.decoded = 0
        codings = [c for c in codings if c != "identity"]
        supported = {"gzip", "x-gzip", "deflate"} | ({"br"} if HAVE_BROTLI else set())
        bad = [c for c in codings if c not in supported]
        self.passthrough = bool(bad)
        # all or nothing: a chain with one unknown coding cannot be partly undone
        self._stages = [] if bad else [_Stage(c) for c in reversed(codings)]  # last applied first

    @property
    def identity(self) -> bool:
        """No content-coding is removed: the body is read as it came (a gap does not break it)."""
        return not self._stages

    def feed(self, data: bytes) -> list[bytes]:
        pieces = [data]
        try:
            for stage in self._stages:
                nxt: list[bytes] = []
                for p in pieces:
                    for out in stage.feed(p):
                        nxt.append(out)
                        self._check(sum(map(len, nxt)))
                pieces = nxt
        except BodyLimitError:
            raise
        except Exception as exc:  # zlib.error, brotli.error
            raise BodyLimitError(f"content-encoding {self._stages[0].coding}: {exc}") from exc
        n = sum(map(len, pieces))
        self._check(n)
        self.decoded += n
        return [p for p in pieces if p]

    def _check(self, n: int) -> None:
        if self.decoded + n > self._max:
            raise BodyLimitError(f"decoded body over {self._max} bytes")
