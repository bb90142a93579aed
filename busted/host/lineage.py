"""Process lineage: who started whom, from the kernel's fork/exec/exit records. Sans-I/O.

``LineageTable`` is fed the lineage records (``busted/ebpf/lineage.c``) in ring-buffer order, the
same order as the flow records: when a flow's open is decoded, the fork and exec of its process
and of every ancestor started while we watched were fed before it, even if all of them exited
a millisecond later. It is bounded (``max_procs``): exited processes are forgotten first, oldest
exit first; a process still running that must be forgotten is a counted loss.

``LineageProc`` is the seam to the flow table: a ``proc(pid) -> ProcInfo`` function like
``ProcCache.get`` that consults the lineage table first and ``/proc`` second, and adds the
``lineage`` fields of ``FlowEvent`` (ancestry, agent, container) to the ``ProcInfo`` it returns.
Its I/O (``/proc`` reads, cgroup id -> path) comes in as functions, so tests drive it with plain
data.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache

from busted.classify.agents import AgentCatalog
from busted.classify.containers import container_of
from busted.events import Ancestor
from busted.host.procinfo import ProcCache, ProcInfo, ProcReader
from busted.redact import redact_argv
from busted.wire.layout import LINF, REC_EXEC, REC_EXIT, REC_FORK
from busted.wire.records import LinRecord

__all__ = ["NO_LINEAGE", "LineageProc", "LineageTable", "Proc"]

#: The FlowEvent fields this module fills, all unknown.
NO_LINEAGE: dict[str, Any] = {
    "ancestry": None, "agent": None, "agent_pid": None, "agent_evidence": None,
    "container_id": None, "container_runtime": None, "pod_uid": None, "pod_qos": None,
    "proc_start_time": None,
}


class Proc:
    """One process as the kernel reported it. ``ppid`` is the parent at fork (not the reaper it
    is handed to when the parent exits); ``exe``/``argv`` are those of its last exec (inherited
    from the parent until it execs; ``argv`` redacted); times are CLOCK_MONOTONIC ns."""

    __slots__ = ("pid", "ppid", "comm", "exe", "argv", "start_ns", "exec_ns", "exit_ns", "cgroup",
                 "uid", "argv_truncated", "argv_unread")

    def __init__(self, pid: int, ppid: int | None, comm: str, start_ns: int | None, cgroup: int,
                 uid: int) -> None:
        self.pid = pid
        self.ppid = ppid
        self.comm = comm
        self.exe: str | None = None
        self.argv: tuple[str, ...] | None = None
        self.start_ns = start_ns
        self.exec_ns: int | None = None
        self.exit_ns: int | None = None
        self.cgroup = cgroup
        self.uid = uid
        self.argv_truncated = False
        self.argv_unread = False  # an argument BPF could not read (an empty string in argv)

    def __repr__(self) -> str:
        return (f"Proc(pid={self.pid}, ppid={self.ppid}, comm={self.comm!r}, exe={self.exe!r}, "
                f"argv={self.argv!r}, exit_ns={self.exit_ns})")


class LineageTable:
    """pid -> Proc from lineage records. Not thread-safe: the flow table's reader feeds it.

    ``feed(rec)`` returns how many running processes it had to forget since the last report
    (reported at most every ``report_ns`` of record time, so a storm makes a few loss events, not
    one per process); the flow table turns that into an ``EventsLost(USER_TABLE)``.
    """

    def __init__(self, max_procs: int = 32768, report_ns: int = 500_000_000,
                 exec_argv: Callable[[int, str], tuple[str, ...] | None] | None = None) -> None:
        self.max_procs = max(16, max_procs)
        # For exec records without argv (tiers that register no execve syscall hook; an execve in
        # flight when the monitor started): ``exec_argv(pid, comm)`` reads the process's argv now
        # (raw; None if it exited, or its comm says it is no longer that program).
        self._exec_argv = exec_argv
        self.argv_from_proc = 0  # exec records whose argv was read from /proc
        self.argv_lost = 0  # ... and those whose process was gone (or exec'd again) by then
        self._procs: OrderedDict[int, Proc] = OrderedDict()  # oldest insertion first
        self._exited: deque[Proc] = deque()  # in exit order; entries may be stale (re-forked pid)
        self.records = 0
        self.forks = 0
        self.execs = 0
        self.exits = 0
        self.evicted_live = 0  # running processes forgotten for room (a loss)
        self._unreported = 0
        self._report_ns = report_ns
        self._last_report = 0

    def __len__(self) -> int:
        return len(self._procs)

    def get(self, pid: int) -> Proc | None:
        return self._procs.get(pid)

    # -- in ------------------------------------------------------------------------------------

    def feed(self, rec: LinRecord) -> int:
        """Apply one record; returns the count of forgotten running processes to report now."""
        self.records += 1
        p: Proc | None
        if rec.type == REC_FORK:
            self.forks += 1
            parent = self._procs.get(rec.ppid)
            p = Proc(rec.pid, rec.ppid, rec.comm, rec.ts_ns, rec.cgroup, rec.uid)
            if parent is not None:  # until it execs, a child runs its parent's program
                p.exe, p.argv, p.argv_truncated = parent.exe, parent.argv, parent.argv_truncated
                p.argv_unread = parent.argv_unread
            self._put(p)
        elif rec.type == REC_EXEC:
            self.execs += 1
            p = self._procs.get(rec.pid)
            if p is None or p.exit_ns is not None:  # forked before we started watching
                p = Proc(rec.pid, None, rec.comm, None, rec.cgroup, rec.uid)
                self._put(p)
            p.comm = rec.comm
            p.exe = rec.filename
            argv = rec.argv
            if rec.flags & LINF.NO_ARGV and self._exec_argv is not None:
                argv = self._exec_argv(rec.pid, rec.comm)
                if argv is None:
                    self.argv_lost += 1
                else:
                    self.argv_from_proc += 1
            elif rec.flags & LINF.NO_ARGV:
                argv = None  # unknown, not empty: the lookup falls back to /proc
            p.argv = redact_argv(argv) if argv is not None else None
            p.argv_truncated = bool(rec.flags & LINF.ARGV_TRUNCATED)
            p.argv_unread = bool(rec.flags & LINF.ARGV_UNREAD)
            p.exec_ns = rec.ts_ns
            p.cgroup = rec.cgroup
            p.uid = rec.uid
        elif rec.type == REC_EXIT:
            self.exits += 1
            p = self._procs.get(rec.pid)
            if p is not None and p.exit_ns is None:
                p.exit_ns = rec.ts_ns
                self._exited.append(p)
        return self._due(rec.ts_ns)

    def _put(self, p: Proc) -> None:
        procs = self._procs
        old = procs.pop(p.pid, None)
        if old is not None and old.exit_ns is None:
            old.exit_ns = p.start_ns or 0  # pid reused: its exit was lost; the old entry is stale
        while len(procs) >= self.max_procs:
            self._evict()
        procs[p.pid] = p

    def _evict(self) -> None:
        procs = self._procs
        while self._exited:
            old = self._exited.popleft()
            if procs.get(old.pid) is old:
                del procs[old.pid]
                return
        # Nothing exited to forget: the oldest running process goes, and that is a loss.
        procs.popitem(last=False)
        self.evicted_live += 1
        self._unreported += 1

    def _due(self, ts_ns: int) -> int:
        if not self._unreported or ts_ns - self._last_report < self._report_ns:
            return 0
        n, self._unreported = self._unreported, 0
        self._last_report = ts_ns
        return n

    def take_unreported(self) -> int:
        """Forgotten running processes not reported yet (for a final report)."""
        n, self._unreported = self._unreported, 0
        return n


class _Node:
    __slots__ = ("pid", "ppid", "comm", "exe", "argv", "cgroup_path")

    def __init__(self, pid: int, ppid: int | None, comm: str, exe: str | None,
                 argv: tuple[str, ...] | None, cgroup_path: str | None) -> None:
        self.pid, self.ppid, self.comm, self.exe, self.argv = pid, ppid, comm, exe, argv
        self.cgroup_path = cgroup_path


class LineageProc:
    """``proc(pid) -> ProcInfo`` with lineage: the lineage table first, ``/proc`` second.

    ``proc`` is the /proc source (``ProcCache.get``); ``cgroup_path(cgroup_id)`` resolves a cgroup
    v2 id to its path, ``proc_cgroup(pid)`` reads a live process's cgroup v2 path (both may return
    None). ``max_depth`` bounds the ancestry (the process itself counts). ``wall_offset`` turns the
    records' CLOCK_MONOTONIC ns into UNIX seconds (the Monitor's; default: measured now).
    """

    def __init__(self, table: LineageTable, proc: ProcReader, *,
                 agents: AgentCatalog | None = None,
                 cgroup_path: Callable[[int], str | None] = lambda _id: None,
                 proc_cgroup: Callable[[int], str | None] = lambda _pid: None,
                 max_depth: int = 8, wall_offset: float | None = None) -> None:
        self.table = table
        self.wall_offset = time.time() - time.monotonic() if wall_offset is None else wall_offset
        self._proc = proc
        # ProcCache.get takes the kernel's generation of a process it knows: a process whose fork
        # and exec the table recorded is checked against /proc once per generation, not per lookup.
        self._proc_gen = proc if isinstance(getattr(proc, "__self__", None), ProcCache) else None
        self.agents = agents if agents is not None else AgentCatalog.builtin()
        self._cgroup_path = cgroup_path
        self._proc_cgroup = proc_cgroup
        self.max_depth = max(1, max_depth)
        # Results by process: (pid, fork time, exec time) for those in the table (an exec makes a
        # new entry), (pid, start ticks) for those known from /proc only. Ancestors do not change.
        self._memo: LRUCache[tuple, dict[str, Any]] = LRUCache(maxsize=4096)
        self._hot: dict[int, tuple[Proc | None, int | None, ProcInfo, ProcInfo]] = {}

    def _inherit(self, p: Proc) -> None:
        """A process forked from one we never saw exec, that has not exec'd itself, runs its
        parent's program: take the nearest ancestor's exe and argv (the table's, else /proc's
        while that ancestor lives), unless that ancestor exec'd after this fork. Fills ``p``."""
        child, pid = p, p.ppid
        for _ in range(self.max_depth):
            if not pid:
                return
            q = self.table.get(pid)
            if q is not None and q.exe is not None:
                if q.exec_ns is not None and child.start_ns is not None and q.exec_ns > child.start_ns:
                    return  # it exec'd something else after the fork: not our program
                p.exe, p.argv, p.argv_unread = q.exe, q.argv, q.argv_unread
                return
            info = self._proc(pid)
            if info.exe is not None:
                p.exe, p.argv = info.exe, info.cmdline
                return
            if q is None or q.exec_ns is not None:
                return
            child, pid = q, q.ppid

    def _node(self, pid: int) -> _Node | None:
        p = self.table.get(pid)
        if p is not None and p.exe is None and p.exec_ns is None:
            self._inherit(p)
        if p is not None and p.exe is not None and p.ppid is not None and not p.argv_unread:
            return _Node(pid, p.ppid, p.comm, p.exe, p.argv, self._cgroup_of(p))
        info = self._proc(pid)
        if p is None and info.ppid is None and info.exe is None:
            return None
        if p is not None:  # partly known: fill the gaps from /proc (a process older than us)
            cg = self._cgroup_of(p)
            return _Node(pid, p.ppid if p.ppid is not None else info.ppid, p.comm,
                         p.exe or info.exe, self._argv(p, info), cg)
        return _Node(pid, info.ppid, info.comm or "", info.exe, info.cmdline, self._proc_cgroup(pid))

    def _node_proc(self, pid: int) -> _Node | None:
        info = self._proc(pid)
        if info.ppid is None and info.exe is None:
            return None
        return _Node(pid, info.ppid, info.comm or "", info.exe, info.cmdline, self._proc_cgroup(pid))

    @staticmethod
    def _argv(p: Proc, info: ProcInfo) -> tuple[str, ...] | None:
        # The kernel's copy, unless BPF could not read part of it and /proc still has it whole.
        if p.argv is None or (p.argv_unread and info.cmdline):
            return info.cmdline
        return p.argv

    def _cgroup_of(self, p: Proc) -> str | None:
        # The cgroup at its last exec/fork, by id; a cgroup too new for the index: ask /proc.
        return (self._cgroup_path(p.cgroup) if p.cgroup else None) or self._proc_cgroup(p.pid)

    def _current(self, pid: int, info: ProcInfo | None = None) -> Proc | None:
        """The table's entry for the process now at ``pid``: not one whose exit the kernel reported
        while /proc shows a live program there (the pid was reused and its fork record lost)."""
        p = self.table.get(pid)
        if p is not None and p.exit_ns is not None:
            if (info if info is not None else self._proc(pid)).exe is not None:  # a zombie has no exe
                return None
        return p

    def lineage(self, pid: int) -> dict[str, Any]:
        """The FlowEvent lineage fields for ``pid`` (NO_LINEAGE when nothing is known)."""
        p = self._current(pid)
        if p is not None:
            key: tuple = (pid, p.start_ns, p.exec_ns)
        else:  # /proc's generation: its start time and, across an exec, its program
            info = self._proc(pid)
            key = (pid, info.start_ticks, info.exe, info.cmdline)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        first = self._node(pid) if p is not None or self.table.get(pid) is None else self._node_proc(pid)
        if first is None:
            return NO_LINEAGE
        chain = [first]
        cont = container_of(first.cgroup_path)
        seen = {pid}
        node = first
        while len(chain) < self.max_depth and node.ppid and node.pid != 1 and node.ppid not in seen:
            parent = self._node(node.ppid)
            if parent is None:
                break
            # The first process of a container is the last one shown: its parent is outside.
            if cont.container_id is not None and container_of(parent.cgroup_path).container_id != cont.container_id:
                break
            chain.append(parent)
            seen.add(parent.pid)
            node = parent
        out = dict(NO_LINEAGE)
        out["ancestry"] = tuple(Ancestor(n.pid, n.comm, n.exe) for n in chain)
        for n in chain:
            m = self.agents.match(n.exe, n.argv)
            if m is not None:
                out["agent"], out["agent_pid"], out["agent_evidence"] = m.id, n.pid, f"{m.via}:{m.matched}"
                break
        if cont.container_id is not None or cont.pod_uid is not None:
            out["container_id"] = cont.container_id
            out["container_runtime"] = cont.runtime
            out["pod_uid"] = cont.pod_uid
            out["pod_qos"] = cont.qos
        # Its fork as the kernel reported it; a process forked before we watched: /proc's start.
        if p is not None and p.start_ns is not None:
            out["proc_start_time"] = p.start_ns / 1e9 + self.wall_offset
        else:
            out["proc_start_time"] = self._proc(pid).start_time
        self._memo[key] = out
        return out

    def get(self, pid: int) -> ProcInfo:
        """Like ``ProcCache.get``, plus the lineage fields; the kernel's record wins over /proc
        for ppid (the parent at fork), exe (the path executed) and cmdline."""
        if pid <= 0:
            return ProcInfo(None, None, None, None, None)
        p = self.table.get(pid)
        if self._proc_gen is not None and (p is None or p.exit_ns is None):
            # The kernel reports every fork and exec: a pid it has no entry for runs the program
            # it ran when first read (generation 0), until a fork or exec record names it. So /proc
            # is checked once per generation, not per flow of a busy process older than us.
            gen = (p.start_ns, p.exec_ns) if p is not None else (0, 0)
            info = self._proc_gen(pid, gen)  # type: ignore[call-arg]
        else:
            info = self._proc(pid)
        p = self._current(pid, info)
        # Busy processes open many flows: the same inputs (the kernel's entry, unchanged since its
        # last exec, and the same /proc reading) give the same answer.
        exec_ns = p.exec_ns if p is not None else None
        hot = self._hot.get(pid)
        if hot is not None and hot[0] is p and hot[1] == exec_ns and hot[2] is info:
            return hot[3]
        lin = self.lineage(pid)  # (fills a fork-only child's program from its parent: _inherit)
        if p is None:
            out = info._replace(lineage=lin)
        else:
            out = ProcInfo(
                p.ppid if p.ppid is not None else info.ppid,
                p.exe or info.exe,
                self._argv(p, info),
                info.netns,
                info.start_ticks,
                p.comm or info.comm,
                lin,
                lin["proc_start_time"],
            )
        if len(self._hot) >= 4096:
            self._hot.clear()
        self._hot[pid] = (p, exec_ns, info, out)
        return out
