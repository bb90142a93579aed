"""NDJSON output: one event per line (``to_dict()``, secrets masked), rotated by size.

Each line is one JSON object, ``kind`` first; ``busted.sinks.event_from_dict(json.loads(line))``
gives the event back. Writes go through a 64 KiB buffer, flushed at least every ``flush_interval``
seconds (checked on each write) and on ``flush()``/``close()``, so the event path never waits on the
disk for more than one buffered write.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import IO

from busted.errors import StoreError
from busted.events import Event
from busted.sinks._codec import redact

__all__ = ["JsonlSink"]


class JsonlSink:
    """Append events to ``path`` ("-" = stdout). When the file would pass ``max_bytes`` it is rotated:
    path -> path.1 -> ... -> path.<backups>, the oldest dropped (``backups=0``: start over).
    Thread-safe. ``written``, ``rotations`` count what it did."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 100 << 20, backups: int = 5,
                 flush_interval: float = 1.0) -> None:
        if backups < 0 or max_bytes <= 0:
            raise ValueError("JsonlSink needs max_bytes > 0 and backups >= 0")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        self._size = 0
        self._last_flush = time.monotonic()
        self.written = 0
        self.rotations = 0
        self._open()

    def _open(self) -> None:
        if self.path == "-":
            self._fh = sys.stdout
            return
        try:
            self._fh = open(self.path, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the JSONL output ({exc.strerror}); check the "
                             "directory exists and is writable, or choose another --jsonl path") from exc
        self._size = os.fstat(self._fh.fileno()).st_size

    def _rotate(self) -> None:
        assert self._fh is not None
        self._fh.close()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, -1, -1):  # path.(N-1) -> path.N, ..., path -> path.1
                src = self.path if i == 0 else f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
        self.rotations += 1
        self._open()

    def write(self, event: Event) -> None:
        line = json.dumps(redact(event.to_dict()), separators=(",", ":"), default=str) + "\n"
        n = len(line.encode("utf-8"))
        with self._lock:
            if self._fh is None:
                raise StoreError(f"{self.path}: JSONL sink is closed")
            try:
                if self.path != "-" and self._size and self._size + n > self.max_bytes:
                    self._rotate()
                self._fh.write(line)
                self._size += n
                self.written += 1
                now = time.monotonic()
                if now - self._last_flush >= self.flush_interval:
                    self._fh.flush()
                    self._last_flush = now
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot write the JSONL output ({exc.strerror}); "
                                 "is the disk full?") from exc

    def flush(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close (stdout is flushed, not closed). Idempotent."""
        with self._lock:
            fh, self._fh = self._fh, None
            if fh is None:
                return
            if fh is sys.stdout:
                fh.flush()
            else:
                fh.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
