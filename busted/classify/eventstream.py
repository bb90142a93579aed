"""Sans-I/O decoder for the AWS event-stream framing (``application/vnd.amazon.eventstream``).

Bedrock's ``converse-stream`` and ``invoke-with-response-stream`` answer HTTP 200 with a body of
binary messages::

    total_length u32 | headers_length u32 | prelude_crc u32 (CRC32 of the 8 bytes before)
    headers (name_len u8, name, type u8, value) ... | payload | message_crc u32 (CRC32 of all before)

Header ``:message-type`` is ``event`` or ``exception`` (an error inside a 200, e.g. a
``throttlingException``), ``:event-type`` / ``:exception-type`` name it. A frame whose CRCs do
not match, or whose lengths are impossible, stops the decoder (``broken`` set, counted): after a
bad length nothing later can be trusted to be a frame boundary. Never raises on input.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = ["EventStreamDecoder", "EventStreamMessage", "MAX_MESSAGE", "encode_message"]

MAX_MESSAGE = 1 << 20  # AWS allows 16 MiB; Bedrock chunks are small. Larger ones are refused.
_PRELUDE = 12
_MIN = 16

# type id -> fixed value size (None: 2-byte length prefix follows)
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


@dataclass(frozen=True, slots=True)
class EventStreamMessage:
    headers: tuple[tuple[str, str | int | bool | bytes], ...]
    payload: bytes

    def header(self, name: str) -> str | int | bool | bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class EventStreamDecoder:
    __slots__ = ("_buf", "_max", "broken", "messages")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message
        self.broken: str | None = None  # why decoding stopped
        self.messages = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a message not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[EventStreamMessage]:
        if self.broken is not None:
            return []
        self._buf += data
        out: list[EventStreamMessage] = []
        while len(self._buf) >= _PRELUDE:
            total, hlen, pcrc = struct.unpack_from(">III", self._buf, 0)
            if zlib.crc32(self._buf[:8]) != pcrc:
                return self._stop(out, "prelude crc mismatch")
            if total < _MIN or total > self._max or hlen > total - _MIN:
                return self._stop(out, f"bad lengths total={total} headers={hlen}")
            if len(self._buf) < total:
                break
            frame = bytes(self._buf[:total])
            del self._buf[:total]
            (mcrc,) = struct.unpack_from(">I", frame, total - 4)
            if zlib.crc32(frame[:-4]) != mcrc:
                return self._stop(out, "message crc mismatch")
            headers = _headers(frame, _PRELUDE, _PRELUDE + hlen)
            if headers is None:
                return self._stop(out, "malformed headers")
            self.messages += 1
            out.append(EventStreamMessage(headers, frame[_PRELUDE + hlen : total - 4]))
        return out

    def _stop(self, out: list[EventStreamMessage], why: str) -> list[EventStreamMessage]:
        self.broken = why
        self._buf.clear()
        return out


def _headers(b: bytes, i: int, end: int) -> tuple[tuple[str, str | int | bool | bytes], ...] | None:
    out: list[tuple[str, str | int | bool | bytes]] = []
    while i < end:
        nlen = b[i]
        i += 1
        if i + nlen + 1 > end:
            return None
        name = b[i : i + nlen].decode("utf-8", "replace")
        i += nlen
        t = b[i]
        i += 1
        value: str | int | bool | bytes
        if t in (6, 7):
            if i + 2 > end:
                return None
            vlen = (b[i] << 8) | b[i + 1]
            i += 2
            if i + vlen > end:
                return None
            raw = b[i : i + vlen]
            value = raw.decode("utf-8", "replace") if t == 7 else raw
            i += vlen
        elif t in _FIXED:
            size = _FIXED[t]
            if i + size > end:
                return None
            if t <= 1:
                value = t == 0
            elif t == 9:
                value = b[i : i + 16]
            else:
                value = int.from_bytes(b[i : i + size], "big", signed=True)
            i += size
        else:
            return None
        out.append((name, value))
    return tuple(out)


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """Build one frame with string headers (tests, fuzzing and replays)."""
    hb = bytearray()
    for k, v in headers.items():
        kb, vb = k.encode(), v.encode()
        hb += bytes([len(kb)]) + kb + b"\x07" + struct.pack(">H", len(vb)) + vb
    total = _PRELUDE + len(hb) + len(payload) + 4
    prelude = struct.pack(">II", total, len(hb))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + bytes(hb) + payload
    return head + struct.pack(">I", zlib.crc32(head))
