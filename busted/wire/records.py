"""Decoders for the ring buffer records, from the layouts in ``busted.wire.layout``.

``decode_any(raw)`` dispatches on the record type (the first u32): flow records (open/close)
become ``FlowRecord``, capture records (DNS answers, TLS hellos) ``CapRecord``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

from busted.wire.layout import (
    CAP_DNS_TCP,
    CAP_HDR,
    FL,
    FLOW,
    LIN_ARGS,
    LIN_FNAME,
    LIN_HDR,
    PT_HDR,
    REC_ARRIVAL,
    REC_BIND,
    REC_CLOSE,
    REC_DNS,
    REC_EXEC,
    REC_EXIT,
    REC_FORK,
    REC_HDR,
    REC_OPEN,
    REC_PLAIN,
    REC_TLS,
    RX_REC,
)

__all__ = [
    "FL", "REC_CLOSE", "REC_DNS", "REC_OPEN", "REC_SIZE", "REC_TLS",
    "ArrivalRecord", "CapRecord", "FlowRecord", "LinRecord", "PlainRecord", "addr_text", "decode", "decode_any",
    "decode_capture", "decode_flow_value", "decode_lineage", "decode_plain",
]

# A flow record: the header, then the flow. Both sizes are multiples of 8: no gap between them.
_REC = struct.Struct("<" + REC_HDR.format + FLOW.format)
_FLOW = FLOW.struct
_CAP = CAP_HDR.struct
_PT = PT_HDR.struct
_LIN = LIN_HDR.struct
_RX = RX_REC.struct
REC_SIZE = _REC.size
CAP_HDR_SIZE = _CAP.size

_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
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


class CapRecord(NamedTuple):
    type: int
    ts_ns: int
    sk: int  # the flow's socket (TLS, DNS over TCP), 0 when none
    pid: int
    tid: int
    uid: int
    fd: int
    peer: str | None
    peer_port: int
    tcp: bool
    comm: str
    data: bytes
    wire_len: int  # bytes the syscall moved; more than len(data) when the copy was truncated


class PlainRecord(NamedTuple):
    """A plaintext chunk (REC_PLAIN), or a session joined to its socket (REC_BIND, no data)."""

    type: int
    ts_ns: int
    sk: int  # 0 while the session is not joined to its socket
    ssl: int  # the TLS library's session pointer (opaque); 0 for plain HTTP
    pid: int
    tid: int
    wire_len: int  # bytes the call moved in all
    offset: int  # where this piece starts within the call's bytes
    sent: bool  # the process wrote it (else it read it)
    source: int  # 1 OpenSSL, 2 GnuTLS, 3 a plain socket
    cut: int  # 1: bytes before this piece (the call's tail) were skipped; 2: the call's bytes after it never come
    data: bytes


def decode_plain(buf: bytes) -> PlainRecord:
    typ, n, ts, sk, ssl, pid, tid, wire_len, offset, direction, source, cut, _tail = _PT.unpack_from(buf)
    data = bytes(buf[_PT.size : _PT.size + n]) if typ == REC_PLAIN else b""
    return PlainRecord(typ, ts, sk, ssl, pid, tid, wire_len, offset, direction == 0, source, cut, data)


class LinRecord(NamedTuple):
    """A lineage record (busted/ebpf/lineage.c): fork, exec or exit of a process."""

    type: int  # REC_FORK / REC_EXEC / REC_EXIT
    pid: int
    ts_ns: int
    cgroup: int
    ppid: int  # fork: the parent's pid; else 0
    tid: int
    uid: int
    flags: int  # LINF
    comm: str
    filename: str | None = None  # exec: the path the kernel executed (a script, not its interpreter)
    argv: tuple[str, ...] | None = None  # exec: raw (NOT redacted: the lineage table redacts)


@lru_cache(maxsize=4096)  # peers repeat; this runs for both ends of every flow
def addr_text(family: int, raw: bytes) -> tuple[int, str]:
    """(4|6|0, text) for a 16-byte address field in AF_* numbering; v4-mapped IPv6 becomes 4."""
    if family == _AF_INET:
        return 4, socket.inet_ntop(_AF_INET, raw[:4])
    if family == _AF_INET6:
        if raw[:12] == _V4MAPPED:
            return 4, socket.inet_ntop(_AF_INET, raw[12:16])
        return 6, socket.inet_ntop(_AF_INET6, raw)
    return 0, ""


@lru_cache(maxsize=1024)  # the same few names, over and over
def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode(buf: bytes) -> FlowRecord:
    """Decode one flow record. Raises ``struct.error`` on a short buffer (counted by the caller)."""
    (typ, _pad, ts, sk, open_ns, cg, sent, recv, _fdkey, pid, tid, uid, fam, sport, dport, direction,
     flags, saddr, daddr, comm, _tail) = _REC.unpack_from(buf)
    f1, s = addr_text(fam, saddr)
    f2, d = addr_text(fam, daddr)
    return FlowRecord(
        typ, flags, ts, open_ns, sk, cg, sent, recv, pid, tid, uid, f1 if f1 == f2 else max(f1, f2),
        sport, dport, direction, s, d, _comm(comm),
    )


def decode_flow_value(buf: bytes) -> tuple[int, int, str, int, str, int]:
    """(flags, family, saddr, sport, daddr, dport) of a ``flows`` map value (struct flow)."""
    v = _FLOW.unpack_from(buf)
    fam, sport, dport, flags, saddr, daddr = v[8], v[9], v[10], v[12], v[13], v[14]
    f1, s = addr_text(fam, saddr)
    _f2, d = addr_text(fam, daddr)
    return flags, f1, s, sport, d, dport


def decode_capture(buf: bytes) -> CapRecord:
    """Decode one capture record (header + payload). Raises ``struct.error`` when short."""
    (typ, n, ts, sk, pid, tid, uid, fd, wire_len, fam, port, transport, addr, comm,
     _tail) = _CAP.unpack_from(buf)
    data = bytes(buf[_CAP.size : _CAP.size + n])
    peer = None
    if fam in (_AF_INET, _AF_INET6):
        peer = addr_text(fam, addr)[1]
    return CapRecord(typ, ts, sk, pid, tid, uid, fd, peer, port, transport == CAP_DNS_TCP,
                     _comm(comm), data, max(wire_len, len(data)))


class ArrivalRecord(NamedTuple):
    """REC_ARRIVAL: a read of socket ``sk`` at ``ts_ns`` whose first byte arrived at ``arrival_ns``."""

    type: int
    ts_ns: int
    sk: int
    arrival_ns: int


def decode_arrival(buf: bytes) -> ArrivalRecord:
    typ, _pad, ts, sk, arrival = _RX.unpack_from(buf)
    return ArrivalRecord(typ, ts, sk, arrival)


def decode_lineage(buf: bytes) -> LinRecord:
    """Decode a fork/exec/exit record. Raises ``struct.error`` when short."""
    (typ, pid, ts, cg, ppid, tid, uid, n, flen, flags, comm) = _LIN.unpack_from(buf)
    if typ != REC_EXEC:
        return LinRecord(typ, pid, ts, cg, ppid, tid, uid, flags, _comm(comm))
    base = _LIN.size
    flen = min(flen, LIN_FNAME)
    if len(buf) < base + flen:
        raise struct.error("exec record shorter than its filename")
    fname = _comm(bytes(buf[base : base + flen]))
    raw = bytes(buf[base + flen : base + flen + min(n, LIN_ARGS)])
    parts = raw.split(b"\0")
    if raw.endswith(b"\0"):
        parts.pop()  # the last argument's terminator; without it the last argument was cut
    argv = tuple(a.decode("utf-8", "replace") for a in parts) if raw else ()
    return LinRecord(typ, pid, ts, cg, ppid, tid, uid, flags, _comm(comm), fname or None, argv)


Record = FlowRecord | CapRecord | PlainRecord | LinRecord | ArrivalRecord

_DECODERS: dict[int, Callable[[bytes], Record]] = {
    REC_OPEN: decode, REC_CLOSE: decode, REC_DNS: decode_capture, REC_TLS: decode_capture,
    REC_PLAIN: decode_plain, REC_BIND: decode_plain, REC_ARRIVAL: decode_arrival,
    REC_FORK: decode_lineage, REC_EXEC: decode_lineage, REC_EXIT: decode_lineage}


def decode_any(buf: bytes) -> Record:
    """Decode a record of any type. Raises ``ValueError`` for an unknown type, ``struct.error``
    for a short buffer."""
    if len(buf) < 4:
        raise struct.error("record shorter than its type")
    typ = int.from_bytes(buf[:4], "little")
    dec = _DECODERS.get(typ)
    if dec is None:
        raise ValueError(f"unknown record type {typ}")
    return dec(buf)
