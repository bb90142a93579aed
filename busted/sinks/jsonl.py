"""NDJSON output: one event per line (``to_dict()``, secrets masked), rotated by size."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import IO

from busted.events import Event
from busted.sinks._codec import redact

__all__ = ["JsonlSink"]


class JsonlSink:
    """Append events to ``path`` ("-" = stdout). When the file passes ``max_bytes`` it is rotated:
    path -> path.1 -> ... -> path.<backups>, the oldest dropped."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 100 << 20, backups: int = 5) -> None:
        self.path = str(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        self._size = 0
        self.written = 0
        self.rotations = 0
        self._open()

    def _open(self) -> None:
        if self.path == "-":
            self._fh = sys.stdout
            return
        self._fh = open(self.path, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
        self._size = self._fh.tell()

    def _rotate(self) -> None:
        assert self._fh is not None
        self._fh.close()
        for i in range(self.backups, 0, -1):
            src = Path(self.path if i == 1 else f"{self.path}.{i - 1}")
            if src.exists():
                if i == self.backups and Path(f"{self.path}.{i}").exists():
                    os.unlink(f"{self.path}.{i}")
                os.replace(src, f"{self.path}.{i}")
        if self.backups == 0:
            os.unlink(self.path)
        self.rotations += 1
        self._open()

    def write(self, event: Event) -> None:
        line = json.dumps(redact(event.to_dict()), separators=(",", ":")) + "\n"
        with self._lock:
            if self._fh is None:
                raise ValueError(f"{self.path}: sink is closed")
            if self.path != "-" and self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._fh.write(line)
            self._size += len(line.encode())
            self.written += 1

    def flush(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None and self._fh is not sys.stdout:
                self._fh.close()
            elif self._fh is sys.stdout:
                sys.stdout.flush()
            self._fh = None

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
