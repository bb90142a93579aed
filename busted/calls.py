"""LLM calls from plaintext: which TLS libraries to probe, and per flow, bytes -> LlmCall/McpMessage.

``TlsScanner`` attaches the plaintext uprobes to the TLS library files processes use: all of them
at start, then, in its own thread, those of each process that opens its first flow (a new venv's
OpenSSL, a node binary). Files already probed cover new processes from their first call.

``reader_factory`` makes the per-flow reader the FlowTable feeds with plaintext.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from cachetools import LRUCache

__all__ = ["TlsScanner", "reader_factory"]


class TlsScanner:
    """Finds TLS library files (busted.ebpf.tlslibs) and attaches the program's uprobes to them."""

    def __init__(self, program: Any, *, max_queue: int = 4096) -> None:
        self._program = program
        self._seen: LRUCache[int, bool] = LRUCache(maxsize=65536)  # pids already scanned
        self._queue: collections.deque[int] = collections.deque(maxlen=max_queue)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0  # pids not scanned because the queue was full

    @property
    def files(self) -> dict[str, str]:
        """Attached files: path -> "openssl" | "gnutls"."""
        return dict(self._program.tls_files)

    @property
    def failed(self) -> dict[str, str]:
        return dict(self._program.tls_failed)

    def scan_all(self) -> None:
        from busted.ebpf.tlslibs import load_symbol_cache, save_symbol_cache, scan

        load_symbol_cache()
        for path, kind in scan().items():
            self._program.attach_tls_library(path, kind)
        save_symbol_cache()

    def saw(self, pid: int) -> None:
        """A flow was opened by ``pid``: scan it once (in the scanner thread)."""
        if pid <= 0 or pid in self._seen:
            return
        self._seen[pid] = True
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(pid)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="busted-tls-scan", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from busted.ebpf.tlslibs import scan_pid

        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while self._queue and not self._stop.is_set():
                pid = self._queue.popleft()
                try:
                    found = scan_pid(pid)
                except Exception:  # the process is gone or unreadable: nothing to attach
                    continue
                for path, kind in found.items():
                    try:
                        self._program.attach_tls_library(path, kind)
                    except Exception:  # recorded in tls_failed by the program; never fatal
                        pass


def reader_factory(*, capture_content: int = 0, prices: Any = None) -> Any:
    """A function (flow, wall) -> reader for the FlowTable (see busted.flows)."""
    from busted.llmreader import CallReader

    def make(flow: Any, wall: Any) -> CallReader:
        return CallReader(flow, wall, capture_content=capture_content, prices=prices)

    return make
