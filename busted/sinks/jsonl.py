"""NDJSON output: one event per line (``to_dict()``, secrets masked), rotated by size.

Each line is one JSON object (``busted.sinks.dumps``: compact, printable ASCII), ``kind`` first;
``busted.sinks.event_from_dict(json.loads(line))`` gives the event back. ``write_encoded`` takes
events the caller already encoded (``busted.sinks.encode``), so a line is not encoded twice.
Lines collect in a buffer written out when it holds 64 KiB, on ``flush()`` /
``close()``, and by a timer every ``flush_interval`` seconds (so ``tail -f`` sees events within that
time even when traffic stops, and a SIGKILL loses at most that much).

The file only ever holds whole lines: a write cut short (disk full) is truncated back to its last
complete line. When the disk refuses (ENOSPC, EIO, ...) the sink says so at once (``on_error``),
keeps running, keeps at most ``max_backlog`` bytes of lines in memory (newer lines beyond that
are dropped and counted), retries on each timer tick (space may come back), and ``close()`` never
raises for it: ``report()`` says how many lines were written and how many lost.

Rotation closes the file and opens a new one at ``path`` with ``busted._safe.open_private``. If that
open is refused (someone planted a link or a directory there, the directory became unsafe, ...), the
sink says so (``on_error``), keeps lines in the same bounded backlog, and tries to open the path
again on the next write and timer tick; lines never go anywhere else (stdout is only for ``path="-"``).
When it opens again after lines were dropped, an ``EventsLost(where=SINK)`` line records how many.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from busted._safe import open_private
from busted.errors import StoreError, UsageError
from busted.events import Event, EventsLost, LossPlace
from busted.sinks._codec import Encoded, encode

__all__ = ["JsonlSink"]

_CHUNK = 1 << 16  # buffer size that triggers a write


class JsonlSink:
    """Append events to ``path`` ("-" = stdout). When the file would pass ``max_bytes`` it is rotated:
    path -> path.1 -> ... -> path.<backups>, the oldest dropped (``backups=0``: start over).
    Thread-safe. ``written`` (lines in the file), ``dropped`` (lines lost to a refusing disk),
    ``rotations`` count what it did; ``last_error`` is the write error while the disk refuses."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 100 << 20, backups: int = 5,
                 flush_interval: float = 1.0, max_backlog: int = 8 << 20,
                 on_error: Callable[[str], None] | None = None) -> None:
        if backups < 0 or max_bytes <= 0:
            raise UsageError("JsonlSink needs max_bytes > 0 and backups >= 0")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.flush_interval = flush_interval
        self.max_backlog = max_backlog
        self.on_error = on_error
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._is_open = False
        self._size = 0  # bytes in the current file
        self._buf = bytearray()  # whole lines not yet written
        self._buf_lines = 0
        self.written = 0
        self.dropped = 0
        self.rotations = 0
        self.last_error: str | None = None
        self._unwritten_at_close = 0
        self._rotate_failing = False
        self._rotate_base = 0  # after a failed rotation: the size it failed at (rotation waits max_bytes more)
        self._reopen_dropped = -1  # while the reopen after a rotation fails: self.dropped when it began
        self._stop = threading.Event()
        self._open()
        self._is_open = True
        self._timer = threading.Thread(target=self._tick, name="busted-jsonl-flush", daemon=True)
        self._timer.start()

    def _open(self) -> None:
        if self.path == "-":
            return
        try:  # busted/_safe.py: never through a link, created 0600, an existing file must be ours
            self._fd, _ = open_private(self.path, os.O_WRONLY | os.O_APPEND, "--jsonl")
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the JSONL output ({exc.strerror}); check the "
                             "directory exists and is writable, or choose another --jsonl path") from exc
        self._size = os.fstat(self._fd).st_size
        self._rotate_base = 0

    def _rotate(self) -> str | None:
        """Rotate; a message to tell if the renames failed (then the same file is appended to, past
        the limit, and rotation is tried again after another ``max_bytes``). Raises if the path
        cannot be opened afterwards (``_fd`` is None then)."""
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        failed: OSError | None = None
        try:
            if self.backups == 0:
                os.unlink(self.path)
            else:
                for i in range(self.backups - 1, -1, -1):  # path.(N-1) -> path.N, ..., path -> path.1
                    src = self.path if i == 0 else f"{self.path}.{i}"
                    if os.path.exists(src):
                        os.replace(src, f"{self.path}.{i + 1}")
        except OSError as exc:
            failed = exc
        else:
            self.rotations += 1
        self._open()
        self._rotate_base = self._size if failed else 0
        told, self._rotate_failing = self._rotate_failing, failed is not None
        if failed is None or told:  # told once per failing spell
            return None
        return (f"{self.path}: cannot rotate the JSONL output ({failed.strerror or failed}); it grows past its "
                f"size limit and rotation is tried again after another {self.max_bytes} bytes")

    def _tell(self, msg: str) -> None:
        if self.on_error is not None:
            try:
                self.on_error(msg)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the output
                pass

    # -- writing -----------------------------------------------------------------------------

    def write(self, event: Event) -> None:
        line = (encode(event).line + "\n").encode()
        with self._lock:
            tells = self._add(line)
        for msg in tells:
            self._tell(msg)

    def write_encoded(self, items: Iterable[Encoded | Event], *, flush: bool = False) -> None:
        """Append events already encoded (``busted.sinks.encode``): their ``line`` is what
        ``write`` would have written (a plain event among them is encoded here). One lock for them
        all; ``flush=True`` writes them out now (the CLI does, once per batch from the Monitor)."""
        tells: list[str] = []
        lines: list[str] = []
        failed: Exception | None = None
        for item in items:  # a plain event that does not encode: the lines before it are written
            try:
                lines.append((item if isinstance(item, Encoded) else encode(item)).line)
            except Exception as exc:  # noqa: BLE001 - raised below, once those lines are in
                failed = exc
                break
        with self._lock:
            chunk = ("\n".join(lines) + "\n").encode() if lines else b""
            if chunk and self._takes_whole(len(chunk)):
                # what _add would do line by line when no line rotates, writes out or is dropped
                self._buf += chunk
                self._buf_lines += len(lines)
                if len(self._buf) >= _CHUNK or self.flush_interval <= 0:
                    tells.append(self._write_out() or "")
            else:
                for line in lines:
                    tells += self._add((line + "\n").encode())
            if flush and self._is_open:
                tells.append(self._write_out() or "")
        for msg in tells:
            if msg:
                self._tell(msg)
        if failed is not None:
            raise failed

    def _takes_whole(self, n: int) -> bool:
        """Whether ``n`` bytes of lines fit in the buffer as they are: the sink open, the file too
        (or stdout), no rotation due (the file stays within ``max_bytes``) and within the backlog.
        Then every line of them would only be appended by ``_add``. Caller holds the lock."""
        if not self._is_open:
            return False  # _add raises for it
        if self.path != "-" and (self._fd is None or self._size - self._rotate_base + len(self._buf) + n
                                 > self.max_bytes):
            return False
        return len(self._buf) + n <= self.max_backlog

    def _add(self, line: bytes) -> list[str]:
        """Buffer one line (rotating, writing out, or dropping as needed). Caller holds the lock.
        Returns the messages to tell."""
        tells: list[str | None] = []
        if not self._is_open:
            raise StoreError(f"{self.path}: JSONL sink is closed")
        if self._fd is None and self.path != "-":
            tells.append(self._reopen())  # the reopen after a rotation failed: retried on every write
        size = self._size - self._rotate_base
        if self.path != "-" and size + len(self._buf) + len(line) > self.max_bytes and (size or self._buf):
            tells.append(self._write_out())
            size = self._size - self._rotate_base
            if not self._buf and self.last_error is None and self._fd is not None and size and \
                    size + len(line) > self.max_bytes:
                try:
                    tells.append(self._rotate())
                except (OSError, StoreError) as exc:  # _fd is None now: the next write opens again
                    tells.append(self._reopen_failed(exc))
        if len(self._buf) + len(line) > self.max_backlog and self.last_error is None:
            tells.append(self._write_out())  # a backlog smaller than a chunk: write out first
        if len(self._buf) + len(line) > self.max_backlog:
            self.dropped += 1  # the disk refuses and the backlog is full: newest dropped, counted
        else:
            self._buf += line
            self._buf_lines += 1
            if len(self._buf) >= _CHUNK or self.flush_interval <= 0:
                tells.append(self._write_out())
        return [t for t in tells if t]

    def _failed(self, exc: OSError | StoreError, doing: str) -> str | None:
        """Record a refused write; the message to tell if this starts a failure. Caller holds the lock."""
        first = self.last_error is None
        self.last_error = f"{getattr(exc, 'strerror', None) or exc} while {doing}"
        if not first:
            return None
        mib = self.max_backlog / (1 << 20)
        backlog = f"{mib:g} MiB" if mib >= 1 else f"{self.max_backlog} bytes"
        if isinstance(exc, StoreError) or "reopening" in doing:
            why = (f"cannot reopen the JSONL output after rotating it ({self.last_error}); remove what is at "
                   "that path or fix its directory.")
        else:
            why = f"cannot write the JSONL output ({self.last_error}; is the disk full?)."
        return (f"{self.path}: {why} Up to {backlog} of lines wait in memory and writing is retried every "
                f"{self.flush_interval:g} s; beyond that new lines are dropped and counted.")

    def _write_out(self) -> str | None:
        """Write the buffer out as whole lines. Caller holds the lock. Returns a message to tell
        (a failure starting, or ending), or None."""
        if not self._buf:
            return None
        if self._fd is None and self.path != "-":  # the reopen after a rotation failed: try again
            tell = self._reopen()
            if self._fd is None:
                return tell
        if self._fd is None:  # stdout
            try:
                sys.stdout.write(self._buf.decode())
                sys.stdout.flush()
            except OSError as exc:
                return self._failed(exc, "writing stdout")
            self.written += self._buf_lines
            self._buf.clear()
            self._buf_lines = 0
            return self._recovered()
        done = 0
        try:
            while done < len(self._buf):
                done += os.write(self._fd, memoryview(self._buf)[done:])
        except OSError as exc:
            self._keep_whole_lines(done)
            return self._failed(exc, "writing")
        self._size += done
        self.written += self._buf_lines
        self._buf.clear()
        self._buf_lines = 0
        return self._recovered()

    def _reopen_failed(self, exc: OSError | StoreError) -> str | None:
        """Rotation closed the file and could not open a new one: nothing is written until a later
        ``_reopen`` succeeds (lines wait in the bounded backlog). Caller holds the lock."""
        self._fd = None
        self._size = self._rotate_base = 0
        if self._reopen_dropped < 0:
            self._reopen_dropped = self.dropped
        return self._failed(exc, "reopening it after rotation")

    def _reopen(self) -> str | None:
        """Try to open the path again after a failed reopen. Caller holds the lock."""
        try:
            self._open()
        except (OSError, StoreError) as exc:
            return self._reopen_failed(exc)
        self._note_reopen_losses()
        return None

    def _note_reopen_losses(self) -> None:
        """Reopened after a failed one: lines dropped meanwhile go into the file as an EventsLost
        record ahead of the kept ones (loss is data). Caller holds the lock."""
        lost = self.dropped - self._reopen_dropped if self._reopen_dropped >= 0 else 0
        self._reopen_dropped = -1
        if lost > 0:
            rec = EventsLost(ts_ns=time.monotonic_ns(), wall_time=time.time(), where=LossPlace.SINK, count=lost,
                             detail=f"busted.sinks.JsonlSink: {lost} lines dropped while {self.path} could not "
                                    "be reopened after rotation")
            self._buf[0:0] = (encode(rec).line + "\n").encode()
            self._buf_lines += 1

    def _keep_whole_lines(self, done: int) -> None:
        """A write stopped after ``done`` bytes: cut the file back to the last whole line and keep
        the rest (from that line on) in the buffer. Caller holds the lock."""
        if done == 0:
            return
        assert self._fd is not None
        keep = self._buf.rfind(b"\n", 0, done) + 1  # bytes of whole lines that made it
        n = self._buf.count(b"\n", 0, keep)
        self.written += n
        self._buf_lines -= n
        if keep < done:
            try:
                os.ftruncate(self._fd, self._size + keep)
            except OSError:  # cannot even cut it back: the torn line stays; do not append its rest
                end = self._buf.find(b"\n", done) + 1
                self._size += done
                self.dropped += 1
                self._buf_lines -= 1
                del self._buf[:end]
                return
        self._size += keep
        del self._buf[:keep]

    def _recovered(self) -> str | None:
        if self.last_error is None:
            return None
        self.last_error = None
        return f"{self.path}: the JSONL output writes again; {self.dropped} lines dropped so far"

    def _tick(self) -> None:
        while not self._stop.wait(self.flush_interval if self.flush_interval > 0 else 1.0):
            with self._lock:
                tell = self._write_out() if self._is_open else None
            if tell:
                self._tell(tell)

    def flush(self) -> None:
        """Write out what is buffered now. Does not raise for a refusing disk (see ``report()``)."""
        with self._lock:
            tell = self._write_out() if self._is_open else None
        if tell:
            self._tell(tell)

    def close(self) -> None:
        """Write out, stop the timer and close (stdout is flushed, not closed). Idempotent. Never
        raises for a refusing disk: what could not be written is counted (see ``report()``)."""
        with self._lock:
            if not self._is_open:
                return
            self._is_open = False
            tell = self._write_out()
            self._unwritten_at_close = self._buf_lines
            self._buf.clear()
            self._buf_lines = 0
            fd, self._fd = self._fd, None
        self._stop.set()
        if threading.current_thread() is not self._timer:
            self._timer.join(timeout=5)
        if fd is not None:
            os.close(fd)
        if tell:
            self._tell(tell)

    def report(self) -> dict[str, Any]:
        """The truth so far: lines ``written``, ``lost`` (dropped + not written at close), a ``text``."""
        with self._lock:
            written, dropped, unwritten = self.written, self.dropped, self._unwritten_at_close
        lost = dropped + unwritten
        parts = [f"{k} {v}" for k, v in (("dropped", dropped), ("not written at close", unwritten)) if v]
        text = f"jsonl {self.path}: {written} events written, {lost} lost" + (f" ({', '.join(parts)})"
                                                                                if parts else "")
        return {"written": written, "lost": lost, "dropped": dropped, "unwritten": unwritten, "text": text}

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
