"""Decoder for the flow program's ring buffer records (``struct rec`` in common.h)."""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

__all__ = [
    "CAP_HDR", "FL", "REC_CLOSE", "REC_DNS", "REC_OPEN", "REC_SIZE", "REC_TLS",
    "CapRecord", "FlowRecord", "decode", "decode_capture",
]

REC_OPEN = 1
REC_CLOSE = 2
REC_DNS = 3  # capture.c: a DNS answer read by a process
REC_TLS = 4  # capture.c: a client's first write(s) on a new TCP connection


class FL:
    ATTRIBUTED = 1
    OPEN_SENT = 2
    HAVE_TUPLE = 4
    MIDSTREAM = 8
    UNTRACKED = 16


# Must match struct rec in common.h, field for field.
_REC = struct.Struct("<IIQQQQQQIIIHHHBB16s16s16s")
REC_SIZE = _REC.size

_AF_INET = socket.AF_INET
_V4MAPPED = b"\x00" * 10 + b"\xff\xff"


class FlowRecord(NamedTuple):
    type: int
    flags: int
    ts_ns: int
    open_ns: int
    sk: int
    cgroup: int
    sent: int
    recv: int
    pid: int
    tid: int
    uid: int
    family: int  # 4 or 6 (v4-mapped IPv6 is reported as 4), 0 if unknown
    sport: int
    dport: int
    direction: int
    saddr: str
    daddr: str
    comm: str


_ADDR_MEMO: dict[tuple[int, bytes], tuple[int, str]] = {}


def _addr(family: int, raw: bytes) -> tuple[int, str]:
    """(4|6|0, text) for a 16-byte address field; memoized (bounded): peers repeat."""
    key = (family, raw)
    hit = _ADDR_MEMO.get(key)
    if hit is None:
        if len(_ADDR_MEMO) >= 4096:
            _ADDR_MEMO.clear()
        hit = _ADDR_MEMO[key] = _addr_text(family, raw)
    return hit


def _addr_text(family: int, raw: bytes) -> tuple[int, str]:
    if family == _AF_INET:
        return 4, socket.inet_ntop(_AF_INET, raw[:4])
    if family == socket.AF_INET6:
        if raw[:12] == _V4MAPPED:
            return 4, socket.inet_ntop(_AF_INET, raw[12:16])
        return 6, socket.inet_ntop(socket.AF_INET6, raw)
    return 0, ""


def decode(buf: bytes) -> FlowRecord:
    """Decode one record. Raises ``struct.error`` on a short buffer (counted by the caller)."""
    (typ, flags, ts, open_ns, sk, cg, sent, recv, pid, tid, uid, fam, sport, dport, direction, _pad,
     saddr, daddr, comm) = _REC.unpack_from(buf)
    f1, s = _addr(fam, saddr)
    f2, d = _addr(fam, daddr)
    return FlowRecord(
        typ, flags, ts, open_ns, sk, cg, sent, recv, pid, tid, uid, f1 if f1 == f2 else max(f1, f2),
        sport, dport, direction, s, d, comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
    )


_DNS_TCP = 2

# struct cap_hdr in capture.c
CAP_HDR = struct.Struct("<IIQQIIIIHHB3x16s16s")


class CapRecord(NamedTuple):
    type: int
    ts_ns: int
    sk: int
    pid: int
    tid: int
    uid: int
    fd: int
    peer: str | None
    peer_port: int
    tcp: bool
    comm: str
    data: bytes


def decode_capture(buf: bytes) -> CapRecord:
    typ, n, ts, sk, pid, tid, uid, fd, fam, port, transport, addr, comm = CAP_HDR.unpack_from(buf)
    data = bytes(buf[CAP_HDR.size : CAP_HDR.size + n])
    peer = None
    if fam == socket.AF_INET:
        peer = socket.inet_ntop(socket.AF_INET, addr[:4])
    elif fam == socket.AF_INET6:
        peer = socket.inet_ntop(socket.AF_INET6, addr)
    return CapRecord(typ, ts, sk, pid, tid, uid, fd, peer, port, transport == _DNS_TCP,
                     comm.split(b"\0", 1)[0].decode("utf-8", "replace"), data)
