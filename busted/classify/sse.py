"""Sans-I/O line framing for streamed HTTP bodies: Server-Sent Events and NDJSON.

``SseParser.feed(bytes)`` returns the events completed by those bytes, whatever the split:
lines end in CRLF, LF or CR (a CR at the end of one chunk and an LF at the start of the next are
one line end); a UTF-8 BOM at the very start is dropped; ``data:`` lines of one event are joined
with "\\n"; ``:`` lines are comments; ``event:``/``id:`` are kept, ``retry:`` ignored (WHATWG
HTML, "Server-sent events", interpreting an event stream).

Bounded: an event (all its lines) larger than ``max_event`` bytes is skipped up to its blank
line and counted in ``overlong``; the parser never holds more than ~``max_event`` bytes.
Nothing here raises on input.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_EVENT", "LineSplitter", "SseEvent", "SseParser"]

DEFAULT_MAX_EVENT = 1 << 20


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str  # "message" when the stream gave no event: field
    data: str  # data: lines joined with "\n"
    id: str | None  # the stream's last event id so far (it persists across events), None if none


class LineSplitter:
    """Splits bytes into lines (CRLF, LF or CR), any split; lines longer than ``max_line`` are dropped.

    ``feed`` returns complete lines without their end; ``None`` in the list marks a dropped
    (overlong) line so callers can count it or reset state.
    """

    __slots__ = ("_buf", "_max", "_pending_cr", "_skipping", "overlong")

    def __init__(self, max_line: int = DEFAULT_MAX_EVENT) -> None:
        self._buf = bytearray()
        self._max = max_line
        self._pending_cr = False  # last byte seen was CR: a following LF belongs to it
        self._skipping = False  # inside an overlong line: drop up to its end
        self.overlong = 0

    def feed(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        i, n = 0, len(data)
        if self._pending_cr and n and data[0] == 0x0A:
            i = 1
        if n:
            self._pending_cr = False
        while i < n:
            lf = data.find(b"\n", i)
            cr = data.find(b"\r", i)
            if lf < 0 and cr < 0:
                self._take(data[i:])
                break
            if cr < 0 or (0 <= lf < cr):
                end, nxt = lf, lf + 1
            else:
                end = cr
                if cr + 1 < n:
                    nxt = cr + 2 if data[cr + 1] == 0x0A else cr + 1
                else:
                    nxt = n
                    self._pending_cr = True
            self._take(data[i:end])
            out.append(self._finish())
            i = nxt
        return out

    def _take(self, piece: bytes) -> None:
        if self._skipping:
            return
        if len(self._buf) + len(piece) > self._max:
            self._skipping = True
            self._buf.clear()
            return
        self._buf += piece

    def _finish(self) -> bytes | None:
        if self._skipping:
            self._skipping = False
            self.overlong += 1
            return None
        line = bytes(self._buf)
        self._buf.clear()
        return line

    @property
    def buffered(self) -> int:
        """Bytes held for an unterminated line."""
        return len(self._buf)

    def pending(self) -> bytes:
        """The bytes of an unterminated last line (a stream may end without a newline)."""
        return b"" if self._skipping else bytes(self._buf)


class SseParser:
    """Incremental ``text/event-stream`` parser; see the module docstring."""

    __slots__ = ("_lines", "_max", "_started", "_held", "_data", "_size", "_event", "_id", "_skip",
                 "overlong", "comments", "events")

    def __init__(self, max_event: int = DEFAULT_MAX_EVENT) -> None:
        self._lines = LineSplitter(max_event)
        self._max = max_event
        self._started = False  # BOM check done
        self._held = b""
        self._data: list[str] = []
        self._size = 0
        self._event = ""
        self._id: str | None = None
        self._skip = False  # current event went over max_event: drop it at its blank line
        self.overlong = 0
        self.comments = 0
        self.events = 0

    def feed(self, data: bytes) -> list[SseEvent]:
        if not self._started:
            data = self._held + data
            if len(data) < 3 and b"\xef\xbb\xbf".startswith(data):
                self._held = data  # may be a BOM split across feeds: wait (3 bytes at most)
                return []
            self._held = b""
            self._started = True
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
        out: list[SseEvent] = []
        for line in self._lines.feed(data):
            if line is None:
                self._skip = True
                continue
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    @property
    def buffered(self) -> int:
        """Bytes held for the event being read (its lines so far and an unterminated line)."""
        return self._lines.buffered + self._size

    def _line(self, line: bytes) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if self._skip:
            return None
        if line[0] == 0x3A:  # ":" comment (keep-alives)
            self.comments += 1
            return None
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        self._size += len(line)
        if self._size > self._max:
            self._skip = True
            return None
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                self._id = value.decode("utf-8", "replace")
        return None

    def _dispatch(self) -> SseEvent | None:
        skipped = self._skip
        data, event, eid = self._data, self._event, self._id
        self._data, self._event, self._size, self._skip = [], "", 0, False
        if skipped:
            self.overlong += 1
            return None
        if not data:
            return None
        self.events += 1
        return SseEvent(event or "message", "\n".join(data), eid)

    def close(self) -> list[SseEvent]:
        """End of body: an event not followed by a blank line is discarded (spec), so nothing is returned."""
        return []
