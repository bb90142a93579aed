"""Flows open before the Monitor started: a sock_diag dump joined to owning pids.

Only the host (root) network namespace is dumped: sock_diag answers for the namespace of the
netlink socket. Owners come from /proc/<pid>/fd links ("socket:[inode]").
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import NamedTuple

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


def dump_established() -> list[ExistingFlow]:
    """Every ESTABLISHED TCP socket of this network namespace (IPv4 and IPv6)."""
    listen_ports = {m[3] for m in _diag(1 << _TCP_LISTEN)}
    out = []
    for fam, _state, s, sport, d, dport, uid, inode in _diag(1 << _TCP_ESTABLISHED):
        out.append(ExistingFlow(fam, s, sport, d, dport, inode, uid, sport in listen_ports))
    return out


def live_tuples() -> set[tuple[str, int, str, int]]:
    """(saddr, sport, daddr, dport) of every TCP socket of this network namespace whose flow can
    still be open: what the stale-flow sweep compares the kernel map with.

    TIME_WAIT is left out: a socket only enters it after its flow was closed (the kernel reports
    TCP_CLOSE for the full socket first), and a host with connection churn holds tens of thousands
    of them (500 connections/s keep ~30,000); LISTEN, CLOSE and request sockets carry no flow."""
    return {(s, sport, d, dport) for _f, _st, s, sport, d, dport, _u, _i in _diag(_LIVE_STATES)}


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
_NLH = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_REQ = struct.Struct("=BBBBI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, sockid (zero)
_MSG = struct.Struct("=BBBB2s2s16s16s12xIIIII")  # inet_diag_msg: family, state, timer, retrans,
# sockid (sport, dport big-endian, src, dst, if, cookie), expires, rqueue, wqueue, uid, inode
_MAX_SOCKETS = 2_000_000  # a bound on one dump, far above any host's socket count
_DUMP_SECONDS = 30.0


def _addr(family: int, raw: bytes) -> tuple[int, str]:
    if family == socket.AF_INET:
        return 4, socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == b"\0" * 10 + b"\xff\xff":  # v4-mapped: IPv4, as kernel records say it
        return 4, socket.inet_ntop(socket.AF_INET, raw[12:16])
    return 6, socket.inet_ntop(socket.AF_INET6, raw)


def _diag(states: int) -> list[tuple[int, int, str, int, str, int, int, int]]:
    """TCP sockets of this namespace in ``states`` (a bit per TCP state), IPv4 then IPv6:
    (family 4/6, state, saddr, sport, daddr, dport, uid, inode)."""
    out: list[tuple[int, int, str, int, str, int, int, int]] = []
    deadline = time.monotonic() + _DUMP_SECONDS
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5.0)
        for seq, fam in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            body = _REQ.pack(fam, socket.IPPROTO_TCP, 0, 0, states)
            nl.send(_NLH.pack(_NLH.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
                    + body)
            done = False
            while not done:
                if time.monotonic() > deadline or len(out) > _MAX_SOCKETS:
                    raise EnvironmentProblem("the sock_diag dump of TCP sockets did not finish in 30 s")
                try:
                    data = nl.recv(1 << 16)
                except TimeoutError as exc:
                    raise EnvironmentProblem("sock_diag did not answer in 5 s") from exc
                off = 0
                while off + _NLH.size <= len(data):
                    ln, kind, _flags, rseq, _pid = _NLH.unpack_from(data, off)
                    if ln < _NLH.size:
                        break
                    if rseq == seq:
                        if kind == _NLMSG_DONE:
                            done = True
                            break
                        if kind == _NLMSG_ERROR:
                            err = -struct.unpack_from("=i", data, off + _NLH.size)[0]
                            raise EnvironmentProblem(f"sock_diag refused the dump: {os.strerror(err)}")
                        if kind == _SOCK_DIAG_BY_FAMILY and ln >= _NLH.size + _MSG.size:
                            f, st, _t, _r, sp, dp, src, dst, _e, _rq, _wq, uid, ino = _MSG.unpack_from(
                                data, off + _NLH.size)
                            v, s = _addr(f, src)
                            _, d = _addr(f, dst)
                            out.append((v, st, s, int.from_bytes(sp, "big"), d, int.from_bytes(dp, "big"), uid, ino))
                    off += (ln + 3) & ~3
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
