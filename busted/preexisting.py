"""Flows open before the Monitor started: a sock_diag dump (pyroute2) joined to owning pids.

Only the host (root) network namespace is dumped: sock_diag answers for the namespace of the
netlink socket. Owners come from /proc/<pid>/fd links ("socket:[inode]").
"""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

from busted.classify.providers import parse_ip
from busted.errors import EnvironmentProblem

__all__ = ["ExistingFlow", "dump_established", "inode_owners", "live_tuples"]

_TCP_ESTABLISHED = 1
_TCP_LISTEN = 10


class ExistingFlow(NamedTuple):
    family: int  # 4 or 6
    saddr: str
    sport: int
    daddr: str
    dport: int
    inode: int
    uid: int
    listening_port: bool  # sport is a port some socket here listens on: the flow was accepted


def _norm(addr: str) -> tuple[int, str]:
    ip = parse_ip(addr)  # v4-mapped IPv6 becomes IPv4, as in kernel records
    if ip is None:
        return 0, addr
    return ip.version, str(ip)


def dump_established() -> list[ExistingFlow]:
    """Every ESTABLISHED TCP socket of this network namespace (IPv4 and IPv6)."""
    return _in_thread(_dump)


def live_tuples() -> set[tuple[str, int, str, int]]:
    """(saddr, sport, daddr, dport) of every TCP socket of this network namespace that still
    exists, in any state: what the stale-flow sweep compares the kernel map with."""
    return _in_thread(_dump_all)


def _in_thread(fn):  # type: ignore[no-untyped-def]
    """pyroute2 drives its sockets with an asyncio loop of its own, which fails inside a thread that
    already runs one (Jupyter, ``async with Monitor()``): the dump runs in a short-lived thread."""
    import threading

    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            box.append(exc)

    t = threading.Thread(target=run, name="busted-sockdiag", daemon=True)
    t.start()
    t.join(30)
    if not box:
        raise EnvironmentProblem("the sock_diag dump of open TCP sockets did not finish in 30 s; flows "
                                 "opened before the monitor will be missing (Monitor(preexisting=False) "
                                 "skips the dump)")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _dump() -> list[ExistingFlow]:
    from pyroute2 import DiagSocket

    out: list[ExistingFlow] = []
    with DiagSocket() as ds:
        ds.bind()
        listen_ports: set[int] = set()
        est = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=fam, states=(1 << _TCP_LISTEN)):
                listen_ports.add(m.get("idiag_sport"))
            est.extend(ds.get_sock_stats(family=fam, states=(1 << _TCP_ESTABLISHED)))
    for m in est:
        fam, s = _norm(m.get("idiag_src"))
        _, d = _norm(m.get("idiag_dst"))
        sport = m.get("idiag_sport")
        out.append(
            ExistingFlow(fam, s, sport, d, m.get("idiag_dport"), m.get("idiag_inode"),
                         m.get("idiag_uid"), sport in listen_ports)
        )
    return out


def _dump_all() -> set[tuple[str, int, str, int]]:
    from pyroute2 import DiagSocket

    out: set[tuple[str, int, str, int]] = set()
    with DiagSocket() as ds:
        ds.bind()
        for fam in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=fam, states=0xFFFF & ~(1 << _TCP_LISTEN)):
                out.add((_norm(m.get("idiag_src"))[1], m.get("idiag_sport"),
                         _norm(m.get("idiag_dst"))[1], m.get("idiag_dport")))
    return out


def inode_owners(inodes: set[int], proc: str = "/proc") -> dict[int, int]:
    """socket inode -> pid of a process holding it (the first found)."""
    found: dict[int, int] = {}
    if not inodes:
        return found
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        fd_dir = f"{proc}/{name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                ino = int(link[8:-1])
                if ino in inodes and ino not in found:
                    found[ino] = int(name)
        if len(found) == len(inodes):
            break
    return found
