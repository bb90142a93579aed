"""Process details from /proc, cached (cachetools) so a busy process is read once.

BPF already captured pid, tid, uid, comm and cgroup id in the process's own context; /proc adds
exe, cmdline, ppid, the network namespace and the start time. A process that exited before we looked keeps what
BPF captured and gets ``None`` for the rest.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple, Protocol

from cachetools import TTLCache

from busted.redact import redact_argv

__all__ = ["ProcInfo", "ProcCache", "ProcReader", "read_exec_argv", "ticks_to_wall"]


class ProcInfo(NamedTuple):
    ppid: int | None
    exe: str | None
    cmdline: tuple[str, ...] | None
    netns: int | None
    start_ticks: int | None
    comm: str | None = None
    # Lineage fields for FlowEvent (ancestry, agent, container...: busted.host.lineage), when known.
    lineage: dict[str, Any] | None = None
    # start_ticks as UNIX seconds (``FlowEvent.proc_start_time``)
    start_time: float | None = None


class ProcReader(Protocol):
    """The process-facts seam: pid -> what is known of it (``ProcCache.get`` reads /proc,
    ``busted.host.lineage.LineageProc.get`` the kernel's fork/exec records first). Never raises: a
    pid nothing is known of gets a ``ProcInfo`` of Nones. A test passes a dict's lookup."""

    def __call__(self, pid: int, /) -> ProcInfo: ...


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


def read_exec_argv(pid: int, comm: str, root: str = "/proc", limit: int = 8192) -> tuple[str, ...] | None:
    """The argv of the program ``pid`` exec'd, read now, raw (the caller redacts): None if the
    process is gone or a zombie, or its comm is no longer ``comm`` (it exec'd another program, or
    the pid was reused, since the exec being decoded; or renamed itself with PR_SET_NAME: then the
    flow's lookup reads /proc again, unchecked, while the process lives). Lineage's exec records
    call this when the kernel did not copy argv (busted/host/lineage.py). A process may rewrite its argv
    area (setproctitle): this reads what it shows now, as ``ps`` does."""
    base = f"{root}/{pid}"
    try:
        with open(f"{base}/stat", "rb") as f:
            stat = f.read(512)
        close = stat.rfind(b")")
        now = stat[stat.find(b"(") + 1 : close].decode("utf-8", "replace")
        if now != comm or stat[close + 2 : close + 3] in (b"Z", b"X"):
            return None
        with open(f"{base}/cmdline", "rb") as f:
            raw = f.read(limit)
    except OSError:
        return None
    if not raw:
        return None  # a zombie, or a kernel thread
    if raw.endswith(b"\0"):
        raw = raw[:-1]  # the last argument's terminator (only one: an empty argument is an argument)
    return tuple(a.decode("utf-8", "replace") for a in raw.split(b"\0"))


class _Entry(NamedTuple):
    ino: int  # of /proc/<pid>: a new process at the pid is a new directory (new inode, new mtime)
    mtime_ns: int
    exe: str | None  # readlink /proc/<pid>/exe when read: an exec changes it, the start time does not
    info: ProcInfo
    gen: object = None  # the kernel's generation of the process (lineage) this entry was checked for


class ProcCache:
    """pid -> ProcInfo, bounded, checked on every lookup against the process now at the pid.

    A pid names different processes over time (reuse), and one process names different programs
    (exec). An entry is one process generation: (pid, start time: ``stat`` field 22) and the exe it
    ran when read. Each lookup checks it with two cheap calls instead of re-reading ``stat`` (~6 µs
    for both against ~8 µs for ``stat`` alone, which would still miss an exec):
    ``stat(/proc/<pid>)`` (a reused pid is a new directory: a new inode and mtime) and
    ``readlink(/proc/<pid>/exe)`` (an exec of another program). A change re-reads /proc (the new
    generation's start time with it). An exec of the same executable file keeps the entry until
    ``ttl``: the kernel's exec records (``busted.host.lineage``) name that case when lineage runs. A
    process that has exited (or is a zombie) keeps the entry of its generation: its flows are often
    decoded after it is gone.

    ``get(pid, gen)``: ``gen`` is the kernel's name for the process's generation (the lineage
    table's fork and exec times): an entry already checked for that ``gen`` is returned without the
    two calls, so a process the kernel's exec records name costs a dict lookup.
    """

    def __init__(self, maxsize: int = 4096, ttl: float = 30.0, root: str = "/proc") -> None:
        self._cache: TTLCache[int, _Entry] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._root = root
        self.reads = 0
        # A few busy pids account for most flows: a small dict in front of the TTLCache (whose
        # timer bookkeeping costs more than the lookup), emptied every second and when full.
        self._hot: dict[int, _Entry] = {}
        self._hot_until = 0.0

    def get(self, pid: int, gen: object = None) -> ProcInfo:
        if pid <= 0:
            return _MISSING
        e = self._hot.get(pid)
        if e is not None and time.monotonic() >= self._hot_until:
            self._hot.clear()
            self._hot_until = time.monotonic() + 1.0
            e = None
        if e is None:
            e = self._cache.get(pid)
            if gen is not None and e is not None and e.gen == gen:
                self._remember(pid, e)
                return e.info
        elif gen is not None and e.gen == gen:
            return e.info
        base = f"{self._root}/{pid}"
        try:
            st = os.stat(base)
        except OSError:  # exited (and reaped): the last generation seen at this pid, if any
            if e is not None:
                return e.info
            self.reads += 1  # asked /proc, which knew nothing (counted as before: a read that failed)
            return _MISSING
        try:
            exe: str | None = os.readlink(f"{base}/exe")
        except OSError:
            exe = None  # a kernel thread, a zombie, or gone since the stat
        if e is not None and e.ino == st.st_ino and e.mtime_ns == st.st_mtime_ns and e.exe == exe:
            if gen is not None:
                e = e._replace(gen=gen)
                self._cache[pid] = e
            self._remember(pid, e)
            return e.info
        self.reads += 1
        info = read_proc(pid, self._root)
        if (e is not None and e.ino == st.st_ino and e.mtime_ns == st.st_mtime_ns and exe is None
                and (info.start_ticks is None or info.start_ticks == e.info.start_ticks)):
            # the same process exiting (a zombie has no exe and an empty cmdline): keep what it ran
            e = e._replace(exe=None, gen=gen)
        elif info.exe is None and info.ppid is None:
            return info  # gone since the stat: no guess (another process may have been there)
        elif info.exe is not None and not info.cmdline:
            return info  # caught inside execve (the new exe, its arguments not yet there): not kept
        else:
            e = _Entry(st.st_ino, st.st_mtime_ns, info.exe if info.exe is not None else exe, info, gen)
        self._cache[pid] = e
        self._remember(pid, e)
        return e.info

    def _remember(self, pid: int, e: _Entry) -> None:
        if len(self._hot) >= 256:
            self._hot.clear()
        self._hot[pid] = e
