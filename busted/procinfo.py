"""Process details from /proc, cached (cachetools) so a busy process is read once.

BPF already captured pid, tid, uid, comm and cgroup id in the process's own context; /proc adds
exe, cmdline, ppid, the network namespace and the start time. A process that exited before we looked keeps what
BPF captured and gets ``None`` for the rest.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

from cachetools import TTLCache

from busted.redact import redact_argv

__all__ = ["ProcInfo", "ProcCache", "ticks_to_wall"]


class ProcInfo(NamedTuple):
    ppid: int | None
    exe: str | None
    cmdline: tuple[str, ...] | None
    netns: int | None
    start_ticks: int | None
    comm: str | None = None
    # Lineage fields for FlowEvent (ancestry, agent, container...: busted.lineage), when known.
    lineage: dict | None = None
    # start_ticks as UNIX seconds (``FlowEvent.proc_start_time``)
    start_time: float | None = None


_MISSING = ProcInfo(None, None, None, None, None)
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_boot_wall: float | None = None


def ticks_to_wall(ticks: int) -> float:
    """``/proc/<pid>/stat`` starttime (clock ticks since boot) -> UNIX seconds. The boot's wall
    time is read once (``CLOCK_BOOTTIME``, the clock starttime counts in)."""
    global _boot_wall
    if _boot_wall is None:
        _boot_wall = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return _boot_wall + ticks / _CLK_TCK


def read_proc(pid: int, root: str = "/proc") -> ProcInfo:
    base = f"{root}/{pid}"
    try:
        with open(f"{base}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return _MISSING
    # comm may contain spaces and parentheses: fields start after the last ')'.
    close = stat.rfind(b")")
    comm = stat[stat.find(b"(") + 1 : close].decode("utf-8", "replace")
    rest = stat[close + 2 :].split()
    try:
        ppid = int(rest[1])
        start = int(rest[19])
    except (IndexError, ValueError):
        ppid, start = None, None
    try:
        exe: str | None = os.readlink(f"{base}/exe")
    except OSError:
        exe = None
    try:
        with open(f"{base}/cmdline", "rb") as f:
            raw = f.read(8192)
        # Secrets on command lines (curl -H "Authorization: ...", --api-key ...) are masked here,
        # before anything else sees them.
        cmd: tuple[str, ...] | None = redact_argv(
            [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")]
        ) if raw else ()
    except OSError:
        cmd = None
    try:
        link = os.readlink(f"{base}/ns/net")  # "net:[4026531840]"
        netns: int | None = int(link[link.index("[") + 1 : -1])
    except (OSError, ValueError):
        netns = None
    return ProcInfo(ppid, exe, cmd, netns, start, comm, None, None if start is None else ticks_to_wall(start))


class ProcCache:
    """pid -> ProcInfo, bounded and short-lived (pids are reused; exec changes exe/cmdline)."""

    def __init__(self, maxsize: int = 4096, ttl: float = 30.0, root: str = "/proc") -> None:
        self._cache: TTLCache[int, ProcInfo] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._root = root
        self.reads = 0
        # A few busy pids account for most flows: a small dict in front of the TTLCache (whose
        # timer bookkeeping costs more than the lookup), emptied every second and when full.
        self._hot: dict[int, ProcInfo] = {}
        self._hot_until = 0.0

    def get(self, pid: int) -> ProcInfo:
        if pid <= 0:
            return _MISSING
        info = self._hot.get(pid)
        if info is not None:
            if time.monotonic() < self._hot_until:
                return info
            self._hot.clear()
            self._hot_until = time.monotonic() + 1.0
        info = self._cache.get(pid)
        if info is None:
            self.reads += 1
            info = read_proc(pid, self._root)
            if info.exe is not None or info.ppid is not None:
                self._cache[pid] = info
        if info.exe is not None or info.ppid is not None:
            if len(self._hot) >= 256:
                self._hot.clear()
            self._hot[pid] = info
        return info
