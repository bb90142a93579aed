"""Which TLS libraries to probe for plaintext, as processes come.

``TlsScanner`` attaches the plaintext uprobes to the TLS library files processes map: all of them
at start, then, in its own thread, those of each process that opens its first flow (a new venv's
OpenSSL, a node binary). Files already probed cover new processes from their first call. One
attachment per file (device, inode), a bounded number of them, a bounded scan rate.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from cachetools import LRUCache

__all__ = ["TlsListener", "TlsProgram", "TlsScanner"]

# Told of each TLS file probed: f(fd, (st_dev, st_ino), TLS function -> offset, path); what it
# returns is ignored (busted.policy.model_enforce's attach_fd says whether it attached).
TlsListener = Callable[[int, tuple[int, int], dict[str, int], str], object]


class TlsProgram(Protocol):
    """What the scanner needs of the loaded kernel program (``busted.ebpf.loader.FlowProgram``):
    attach the plaintext uprobes to a file, know which files are done, count what it left."""

    @property
    def tls_files(self) -> Mapping[str, str]: ...  # attached: path as a process names it -> kind

    @property
    def tls_failed(self) -> Mapping[str, str]: ...  # path -> why not attached

    def attach_tls_library(self, path: str, kind: str | None = None) -> bool: ...

    def attach_tls_fd(self, fd: int, key: tuple[int, int], kind: str, offsets: dict[str, int],
                      label: str) -> bool: ...

    def tls_known(self, key: tuple[int, int]) -> bool: ...

    @property
    def tls_inodes(self) -> list[tuple[int, int]]: ...  # (st_dev, st_ino) of every file probed

    def count_tls_loss(self, n: int = 1) -> None: ...


class TlsScanner:
    """Finds TLS library files (busted.ebpf.tlslibs) and attaches the program's uprobes to them.

    Any local user can start processes that map files of their choosing, so the work is bounded:
    at most ``scans_per_s`` processes are scanned per second (the rest wait in a bounded queue;
    beyond it they are counted as lost), at most ``tlslibs.MAX_CANDIDATES_PER_PID`` files per
    process, each file inspected once per identity, and the program probes at most
    ``max_tls_libraries`` distinct files (refusals counted: ``LossPlace.TLS_LIBRARY``)."""

    def __init__(self, program: TlsProgram, *, max_queue: int = 4096, scans_per_s: float = 200.0) -> None:
        self._program = program
        self._seen: LRUCache[int, bool] = LRUCache(maxsize=65536)  # pids already scanned
        self._queue: collections.deque[int] = collections.deque(maxlen=max_queue)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rate = max(1.0, scans_per_s)
        self.dropped = 0  # pids not scanned because the queue was full
        # Called as f(fd, key, offsets, path) for each TLS file probed after start (the policy's
        # model uprobes go on the same files: busted/policy/model_enforce.py).
        self.listeners: list[TlsListener] = []
        self.scanned = 0  # pids scanned

    @property
    def files(self) -> dict[str, str]:
        """Attached files: path (as a process names it) -> "openssl" | "gnutls"."""
        return dict(self._program.tls_files)

    @property
    def failed(self) -> dict[str, str]:
        return dict(self._program.tls_failed)

    def scan_all(self) -> None:
        """At start: the system's libraries, then what every running process maps."""
        from busted.ebpf.tlslibs import load_symbol_cache, save_symbol_cache, system_libraries

        load_symbol_cache()
        for path, kind in system_libraries().items():
            self._program.attach_tls_library(path, kind)
        try:
            pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            self._seen[pid] = True
            self.scan_pid(pid)
        save_symbol_cache()

    def scan_pid(self, pid: int) -> None:
        """Probe the TLS libraries ``pid`` maps (and its executable if it embeds OpenSSL)."""
        from busted.ebpf.tlslibs import inspect_fd, mapped_candidates, open_candidate

        prog = self._program
        self.scanned += 1
        try:
            cands, over = mapped_candidates(pid)
        except Exception:  # the process is gone or unreadable: nothing to attach
            return
        if over:
            prog.count_tls_loss(over)
        for c in cands:
            if c.dev and prog.tls_known((c.dev, c.ino)):
                continue  # probed already (or refused, counted once): not even opened again
            fd = open_candidate(c)  # exactly the file mapped, never a path resolved again
            if fd is None:
                continue
            try:
                got = inspect_fd(fd)
                if got is None or got.kind is None or (c.exe and got.kind != "openssl"):
                    continue  # only OpenSSL embedded in an executable is looked for (node and kin)
                if prog.attach_tls_fd(fd, got.key, got.kind, got.offsets, c.path):
                    for listener in self.listeners:
                        listener(fd, got.key, got.offsets, c.path)
            except Exception:  # recorded in tls_failed by the program; never fatal
                pass
            finally:
                os.close(fd)

    def replay(self, listener: TlsListener) -> None:
        """Give ``listener`` (as ``listeners``) the files probed so far that running processes map:
        those ``scan_all`` found before it was registered. One more walk of /proc, at most
        ``MAX_CANDIDATES_PER_PID`` files a process, only files the program probes."""
        from busted.ebpf.tlslibs import inspect_fd, mapped_candidates, open_candidate

        probed = set(self._program.tls_inodes)
        done: set[tuple[int, int]] = set()
        try:
            pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                cands, _over = mapped_candidates(pid)
            except Exception:  # gone or unreadable
                continue
            for c in cands:
                key = (c.dev, c.ino)
                if key not in probed or key in done:
                    continue
                fd = open_candidate(c)
                if fd is None:
                    continue
                try:
                    got = inspect_fd(fd)
                    if got is not None and got.kind is not None and got.key in probed:
                        done.add(got.key)
                        listener(fd, got.key, got.offsets, c.path)
                except Exception:  # the listener reports its own failures
                    pass
                finally:
                    os.close(fd)

    def saw(self, pid: int) -> None:
        """A flow was opened by ``pid``: scan it once (in the scanner thread)."""
        if pid <= 0 or pid in self._seen:
            return
        self._seen[pid] = True
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # the oldest waiting pid goes unscanned
            self._program.count_tls_loss(1)
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
        tokens, last = self._rate, time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while self._queue and not self._stop.is_set():
                now = time.monotonic()
                tokens = min(self._rate, tokens + (now - last) * self._rate)
                last = now
                if tokens < 1.0:  # over the rate: wait (the queue is bounded), stop stays responsive
                    self._stop.wait((1.0 - tokens) / self._rate)
                    continue
                tokens -= 1.0
                try:
                    pid = self._queue.popleft()
                except IndexError:
                    break
                self.scan_pid(pid)
