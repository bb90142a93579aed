"""Flows open before the Monitor started: a sock_diag dump joined to owning pids.

Only the host (root) network namespace is dumped: sock_diag answers for the namespace of the
netlink socket. Owners come from /proc/<pid>/fd links ("socket:[inode]").
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterable
from typing import NamedTuple

from busted.errors import EnvironmentProblem

__all__ = ["ExistingFlow", "dump_established", "absent_tuples", "inode_owners"]

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


def dump_established() -> list[ExistingFlow]:
    """Every ESTABLISHED TCP socket of this network namespace (IPv4 and IPv6)."""
    listen_ports = {m[3] for m in _diag(1 << _TCP_LISTEN)}
    out = []
    for fam, _state, s, sport, d, dport, uid, inode in _diag(1 << _TCP_ESTABLISHED):
        out.append(ExistingFlow(fam, s, sport, d, dport, inode, uid, sport in listen_ports))
    return out


def absent_tuples(tuples: Iterable[tuple[str, int, str, int]]) -> set[tuple[str, int, str, int]]:
    """The (saddr, sport, daddr, dport) of ``tuples`` that no TCP socket of this network namespace
    holds any more, in any state: what the stale-flow sweep may close.

    One dump of the states a flow can be open in (not TIME_WAIT: a host with connection churn
    holds tens of thousands of those, ~30,000 at 500 connections/s), then one exact lookup per
    tuple it did not list (a socket in TIME_WAIT after ``shutdown()`` may still be open in its
    process, so it is asked for by its 4-tuple, not dumped)."""
    want = set(tuples)
    if not want:
        return set()
    live = {(s, sport, d, dport) for _f, _st, s, sport, d, dport, _u, _i in _diag(_LIVE_STATES)}
    rest = want - live
    if not rest:
        return set()
    with _Diag() as nl:
        return {t for t in rest if not nl.exists(t)}


# sock_diag, read with a plain netlink socket and the uapi layouts (linux/inet_diag.h). pyroute2
# parsed every answer into attribute objects: 5.7 s of CPU and a 70 MB peak for a dump of 24,700
# sockets, which the 30-s stale-flow sweep paid on any host with connection churn (a monitor's
# RSS jumped by ~45 MB and its ring overflowed while it ran). This reads the fixed header only.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_STATES = {"established": 1, "syn_sent": 2, "syn_recv": 3, "fin_wait1": 4, "fin_wait2": 5,
               "close_wait": 8, "last_ack": 9, "closing": 11}
_LIVE_STATES = sum(1 << v for v in _TCP_STATES.values())
_ALL_STATES = 0xFFFFFFFF
_NLH = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid: sport, dport
# (big-endian), src, dst, if, cookie (INET_DIAG_NOCOOKIE = all ones: any)
_REQ = struct.Struct("=BBBBI2s2s16s16sIII")
_NOCOOKIE = 0xFFFFFFFF
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport, src, dst, if, cookie),
# expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16s12xIIIII")
_MAX_SOCKETS = 2_000_000  # a bound on one dump, far above any host's socket count
_DUMP_SECONDS = 30.0

Row = tuple[int, int, str, int, str, int, int, int]  # family 4/6, state, saddr, sport, daddr, dport, uid, inode


def _addr(family: int, raw: bytes) -> tuple[int, str]:
    if family == socket.AF_INET:
        return 4, socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == b"\0" * 10 + b"\xff\xff":  # v4-mapped: IPv4, as kernel records say it
        return 4, socket.inet_ntop(socket.AF_INET, raw[12:16])
    return 6, socket.inet_ntop(socket.AF_INET6, raw)


def _packed(addr: str) -> tuple[int, bytes]:
    try:
        return socket.AF_INET, socket.inet_pton(socket.AF_INET, addr) + bytes(12)
    except OSError:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, addr)


class _Diag:
    """One NETLINK_SOCK_DIAG socket: dumps by state, and lookups by 4-tuple."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
        self.sock.settimeout(5.0)
        self.seq = 0
        self.deadline = time.monotonic() + _DUMP_SECONDS

    def __enter__(self) -> _Diag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def ask(self, family: int, states: int, tup: tuple[bytes, bytes, bytes, bytes] | None = None) -> list[Row]:
        """A dump of ``family``'s TCP sockets in ``states``, or (``tup`` = sport, dport, src, dst
        packed) the one socket with that 4-tuple; [] when there is none."""
        self.seq += 1
        sp, dp, src, dst = tup or (b"\0\0", b"\0\0", bytes(16), bytes(16))
        body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states, sp, dp, src, dst, 0, _NOCOOKIE, _NOCOOKIE)
        flags = _NLM_F_REQUEST | (0 if tup else _NLM_F_DUMP)
        self.sock.send(_NLH.pack(_NLH.size + len(body), _SOCK_DIAG_BY_FAMILY, flags, self.seq, 0) + body)
        out: list[Row] = []
        while True:
            if time.monotonic() > self.deadline or len(out) > _MAX_SOCKETS:
                raise EnvironmentProblem(f"the sock_diag dump of TCP sockets did not finish in {_DUMP_SECONDS:.0f} s")
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError as exc:
                raise EnvironmentProblem("sock_diag did not answer in 5 s") from exc
            off = 0
            while off + _NLH.size <= len(data):
                ln, kind, _flags, rseq, _pid = _NLH.unpack_from(data, off)
                if ln < _NLH.size:
                    break
                if rseq == self.seq:
                    if kind == _NLMSG_DONE:
                        return out
                    if kind == _NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, off + _NLH.size)[0]
                        if tup is not None and err in (0, errno.ENOENT):
                            return out
                        raise EnvironmentProblem(f"sock_diag refused the dump: {os.strerror(err)}")
                    if kind == _SOCK_DIAG_BY_FAMILY and ln >= _NLH.size + _MSG.size:
                        f, st, _t, _r, sp_, dp_, src_, dst_, _e, _rq, _wq, uid, ino = _MSG.unpack_from(
                            data, off + _NLH.size)
                        v, a = _addr(f, src_)
                        _, b = _addr(f, dst_)
                        out.append((v, st, a, int.from_bytes(sp_, "big"), b, int.from_bytes(dp_, "big"), uid, ino))
                        if tup is not None:
                            return out
                off += (ln + 3) & ~3

    def exists(self, t: tuple[str, int, str, int]) -> bool:
        """A socket of this namespace (any state, TIME_WAIT included) has this 4-tuple."""
        saddr, sport, daddr, dport = t
        fam, src = _packed(saddr)
        fam2, dst = _packed(daddr)
        if fam != fam2:
            return False
        packed = (sport.to_bytes(2, "big"), dport.to_bytes(2, "big"), src, dst)
        if self.ask(fam, _ALL_STATES, packed):
            return True
        if fam == socket.AF_INET:  # held by a dual-stack IPv6 socket as v4-mapped addresses
            mapped = (packed[0], packed[1], bytes(10) + b"\xff\xff" + src[:4], bytes(10) + b"\xff\xff" + dst[:4])
            return bool(self.ask(socket.AF_INET6, _ALL_STATES, mapped))
        return False


def _diag(states: int) -> list[Row]:
    """TCP sockets of this namespace in ``states`` (a bit per TCP state), IPv4 then IPv6."""
    with _Diag() as nl:
        return nl.ask(socket.AF_INET, states) + nl.ask(socket.AF_INET6, states)


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
