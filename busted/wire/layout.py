"""Wire layouts shared by the BPF programs and the Python decoder, declared once.

Each layout is a list of (name, C type[, count]). From it come the C struct text that the loader
puts in front of the BPF source (``c_definitions()``) and the ``struct.Struct`` the decoder uses,
with the same offsets: padding the C compiler would add is declared explicitly on both sides, so
the two cannot drift. The record type numbers, flow flags and loss places are generated here too.
A kernel test compares these offsets with what BCC compiled (tests/kernel/test_layout.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "CAP_DNS_TCP", "CAP_DNS_UDP", "CAP_HDR", "FL", "FLOW", "LOSS_MAP", "LOSS_MISS", "LOSS_RING",
    "LIN_ARGS", "LIN_FNAME", "LIN_HDR", "LINF", "Layout", "PT_HDR", "PT_PACKET", "QUIET_KEY", "QUIET_MAX",
    "REC_ARRIVAL", "REC_BIND", "RX_REC",
    "REC_CLOSE", "REC_DNS", "REC_EXEC", "REC_EXIT", "REC_FORK", "REC_HDR", "REC_OPEN", "REC_PLAIN",
    "REC_TLS", "SUM_KEY", "SUM_MAX", "SUM_VAL", "c_definitions",
]

_TYPES = {"u8": ("B", 1), "u16": ("H", 2), "u32": ("I", 4), "u64": ("Q", 8), "char": ("s", 1)}


@dataclass(frozen=True)
class Layout:
    """A C struct as data. ``fields`` are (name, type, count); count > 1 makes an array (byte
    arrays decode as ``bytes``). Padding is inserted where C would put it and named ``_padN``."""

    name: str
    fields: tuple[tuple[str, str, int], ...]

    @staticmethod
    def of(name: str, *spec: tuple) -> Layout:
        out: list[tuple[str, str, int]] = []
        off = 0
        pads = 0
        align = 1
        for item in spec:
            fname, ctype = item[0], item[1]
            count = item[2] if len(item) > 2 else 1
            size = _TYPES[ctype][1]
            align = max(align, size)
            if off % size:
                gap = size - off % size
                out.append((f"_pad{pads}", "u8", gap))
                pads += 1
                off += gap
            out.append((fname, ctype, count))
            off += size * count
        if off % align:
            out.append((f"_pad{pads}", "u8", align - off % align))
        return Layout(name, tuple(out))

    @property
    def format(self) -> str:
        parts = []
        for _name, ctype, count in self.fields:
            code = _TYPES[ctype][0]
            if ctype in ("u8", "char") and count > 1:
                parts.append(f"{count}s")
            else:
                parts.append(code * count if count > 1 else code)
        return "".join(parts)

    @property
    def struct(self) -> struct.Struct:
        return struct.Struct("<" + self.format)

    @property
    def size(self) -> int:
        return self.struct.size

    def offsets(self) -> dict[str, int]:
        out = {}
        off = 0
        for name, ctype, count in self.fields:
            out[name] = off
            off += _TYPES[ctype][1] * count
        return out

    def pack(self, **values: int | bytes) -> bytes:
        """Bytes of this struct with the named fields set (others zero): for tests and replays."""
        unknown = set(values) - set(self.names())
        if unknown:
            raise KeyError(f"{self.name} has no field {sorted(unknown)}")
        args = []
        for name, ctype, count in self.fields:
            blob = ctype in ("u8", "char") and count > 1
            args.append(values.get(name, b"" if blob else 0))
        return self.struct.pack(*args)

    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _t, _c in self.fields)

    def c_struct(self) -> str:
        lines = [f"struct {self.name} {{"]
        for name, ctype, count in self.fields:
            lines.append(f"    {ctype} {name}[{count}];" if count > 1 else f"    {ctype} {name};")
        lines.append("};")
        return "\n".join(lines)


# Record types on the ring buffer (the first u32 of every record).
REC_OPEN = 1  # a flow attributed to a process: FlowOpened
REC_CLOSE = 2  # a flow ended: FlowClosed (carries bytes)
REC_DNS = 3  # capture: a DNS answer read by a process
REC_TLS = 4  # capture: a client's first write(s) on a new TCP connection
REC_PLAIN = 10  # plaintext: a chunk a process gave its TLS library or a plain-HTTP socket
REC_BIND = 11  # plaintext: a TLS session (SSL*) was joined to its socket
REC_ARRIVAL = 12  # arrival: when the first byte of a read on a followed socket arrived (arrival.c)
REC_FORK = 5  # lineage: a new process (not a thread): pid, parent pid (lineage.c)
REC_EXEC = 6  # lineage: a process ran a new program: filename and argv follow the header
REC_EXIT = 7  # lineage: a process (its last thread) exited

CAP_DNS_UDP = 1
CAP_DNS_TCP = 2
# pt_hdr.source of plain-HTTP bytes read from packets (capture tier "cgroup"): a received piece's
# time is when it reached the socket, not when the process read it.
PT_PACKET = 4

# Kernel loss counters, indexed by place (the values of busted.events.LossPlace).
LOSS_RING = 1
LOSS_MAP = 2
LOSS_MISS = 6  # not counted by BPF: the kernel's per-program recursion misses, read by the loader


class FL:
    """flow.flags"""

    ATTRIBUTED = 1  # pid/comm/uid were taken in the owning process's context
    OPEN_SENT = 2  # a REC_OPEN was emitted
    HAVE_TUPLE = 4  # addresses/ports are filled
    MIDSTREAM = 8  # first seen after it began (the flow predates the monitor)
    UNTRACKED = 16  # REC_CLOSE for a socket with no flow entry at all
    AGGREGATED = 32  # busy-host mode: its peer was quiet; no open/close records, summed at its end


# The kernel's per-socket state (the `flows` map value) and what every flow record carries.
FLOW = Layout.of(
    "flow",
    ("open_ns", "u64"),
    ("cgroup", "u64"),
    ("sent", "u64"),
    ("recv", "u64"),
    ("fdkey", "u64"),  # (tgid << 32 | fd) when the syscall tier linked an fd, else 0
    ("pid", "u32"),
    ("tid", "u32"),
    ("uid", "u32"),
    ("family", "u16"),
    ("sport", "u16"),
    ("dport", "u16"),
    ("direction", "u8"),
    ("flags", "u8"),
    ("saddr", "u8", 16),
    ("daddr", "u8", 16),
    ("comm", "char", 16),
)

# Busy-host mode (docs/kernel.md): peers user space judged "not an LLM provider, not MCP".
# The address is as the lifecycle tier sees it: IPv4 in the first 4 bytes (family AF_INET), or 16
# bytes (AF_INET6, v4-mapped included). ``port`` is the service port in host order: the peer's for
# a connect, this host's (the listening port) for an accept. Value: expiry, CLOCK_MONOTONIC ns.
QUIET_KEY = Layout.of(
    "quiet_key",
    ("family", "u16"),
    ("port", "u16"),
    ("direction", "u8"),  # DIR_CONNECT / DIR_ACCEPT
    ("_pad", "u8", 3),
    ("addr", "u8", 16),
)
# Flows to quiet peers, summed per process x peer until user space drains (reads and deletes) them.
SUM_KEY = Layout.of(
    "sum_key",
    ("tgid", "u32"),
    ("family", "u16"),
    ("port", "u16"),
    ("direction", "u8"),
    ("_pad", "u8", 7),
    ("addr", "u8", 16),
)
SUM_VAL = Layout.of(
    "sum_val",
    ("count", "u64"),  # flows ended
    ("sent", "u64"),
    ("recv", "u64"),
    ("first_ns", "u64"),  # the earliest open among them
    ("last_ns", "u64"),  # the latest end
    ("uid", "u32"),
    ("_pad", "u8", 4),
    ("cgroup", "u64"),
    ("comm", "char", 16),
)
QUIET_MAX = 4096  # quiet_peers entries (user space keeps its set within this)
SUM_MAX = 16384  # summaries entries between two drains; a full map is a counted KERNEL_MAP loss

# A flow record is this header followed by the flow itself (one copy in emit()).
REC_HDR = Layout.of(
    "rec_hdr",
    ("type", "u32"),
    ("pad", "u32"),
    ("ts_ns", "u64"),
    ("sk", "u64"),
)

# A capture record is this header followed by `len` payload bytes.
CAP_HDR = Layout.of(
    "cap_hdr",
    ("type", "u32"),
    ("len", "u32"),  # payload bytes that follow (at most CAP_MAX)
    ("ts_ns", "u64"),
    ("sk", "u64"),  # the flow's socket (TLS, DNS over TCP); 0 for UDP DNS
    ("pid", "u32"),
    ("tid", "u32"),
    ("uid", "u32"),
    ("fd", "u32"),
    ("wire_len", "u32"),  # what the syscall really moved: > len means the copy was truncated
    ("family", "u16"),  # DNS: peer (resolver) address, when known
    ("port", "u16"),
    ("transport", "u8"),  # CAP_DNS_UDP / CAP_DNS_TCP
    ("addr", "u8", 16),
    ("comm", "char", 16),
)


# A plaintext record is this header followed by `len` bytes; a bind record is the header alone.
PT_HDR = Layout.of(
    "pt_hdr",
    ("type", "u32"),
    ("len", "u32"),  # bytes that follow (at most the chunk size)
    ("ts_ns", "u64"),
    ("sk", "u64"),  # the flow's socket, 0 while the session is not joined yet
    ("ssl", "u64"),  # the library's session pointer (an opaque key); 0 for plain HTTP
    ("pid", "u32"),
    ("tid", "u32"),
    ("wire_len", "u32"),  # bytes the call moved in all; > offset + len means pieces were cut
    ("offset", "u32"),  # where this piece starts within the call's bytes
    ("direction", "u8"),  # 0 the process wrote (sent), 1 it read (received)
    ("source", "u8"),  # 1 OpenSSL, 2 GnuTLS, 3 a plain socket's syscalls, PT_PACKET its packets
    # 1: bytes of the call before this piece were not copied; 2: its bytes after it never come;
    # 4: a new call (a packet, cgroup capture tier) after `offset` bytes of the stream never seen
    ("cut", "u8"),
)


# REC_ARRIVAL (arrival.c): a read of ``sk`` at ``ts_ns`` whose first byte reached the socket at
# ``arrival_ns`` (both bpf_ktime_get_ns).
RX_REC = Layout.of(
    "rx_rec",
    ("type", "u32"),
    ("ts_ns", "u64"),
    ("sk", "u64"),
    ("arrival_ns", "u64"),
)


class LINF:
    """lin_hdr.flags"""

    ARGV_TRUNCATED = 1  # more arguments, or longer ones, than the record holds
    NO_ARGV = 2  # the exec's arguments were not seen (execve entered before the monitor started)
    THREADS_TOO = 4  # fork records may name threads (no task:task_newtask on this kernel)
    ARGV_UNREAD = 8  # an argument's memory was not resident: it is an empty string in argv


# Lineage records (fork/exec/exit): this header; an exec adds ``flen`` bytes of filename (the path
# the kernel executed, from sched_process_exec, NUL-terminated, at most LIN_FNAME) and then ``len``
# bytes of argv (NUL-terminated strings read from user memory at sys_enter_execve, at most
# LIN_ARGS). Only the bytes used travel: a typical exec record is ~120 bytes.
LIN_FNAME = 256
LIN_ARGS = 1024  # a power of two (the BPF code masks offsets with it)
LIN_ARGLEN = 256  # one argument is cut at this many bytes
LIN_MAXARGS = 16
LIN_HDR = Layout.of(
    "lin_hdr",
    ("type", "u32"),
    ("pid", "u32"),  # the process (tgid)
    ("ts_ns", "u64"),
    ("cgroup", "u64"),  # cgroup v2 id of the process at that moment
    ("ppid", "u32"),  # fork: the parent's tgid; else 0
    ("tid", "u32"),  # exec: the thread that called execve (old_pid); fork: the parent thread
    ("uid", "u32"),
    ("len", "u32"),  # exec: bytes of args used
    ("flen", "u32"),  # exec: bytes of filename that follow the header (with its NUL)
    ("flags", "u32"),  # LINF
    ("comm", "char", 16),
)


def c_definitions() -> str:
    """The C text for every layout and constant above (the loader prepends it to the program)."""
    consts = [
        ("REC_OPEN", REC_OPEN), ("REC_CLOSE", REC_CLOSE), ("REC_DNS", REC_DNS), ("REC_TLS", REC_TLS),
        ("REC_PLAIN", REC_PLAIN), ("REC_BIND", REC_BIND), ("REC_ARRIVAL", REC_ARRIVAL),
        ("CAP_DNS_UDP", CAP_DNS_UDP), ("CAP_DNS_TCP", CAP_DNS_TCP),
        ("LOSS_RING", LOSS_RING), ("LOSS_MAP", LOSS_MAP),
        ("REC_FORK", REC_FORK), ("REC_EXEC", REC_EXEC), ("REC_EXIT", REC_EXIT),
        ("LIN_FNAME", LIN_FNAME), ("LIN_ARGS", LIN_ARGS), ("LIN_ARGLEN", LIN_ARGLEN),
        ("LIN_MAXARGS", LIN_MAXARGS), ("QUIET_MAX", QUIET_MAX), ("SUM_MAX", SUM_MAX),
    ] + [(f"FL_{k}", v) for k, v in vars(FL).items() if k.isupper()] + [
        (f"LINF_{k}", v) for k, v in vars(LINF).items() if k.isupper()]
    out = ["/* Generated from busted/wire/layout.py: edit it there. */"]
    out += [f"#define {k} {v}" for k, v in consts]
    for lay in (FLOW, REC_HDR, CAP_HDR, PT_HDR, RX_REC, LIN_HDR, QUIET_KEY, SUM_KEY, SUM_VAL):
        out.append(lay.c_struct())
    out.append("struct rec {\n    struct rec_hdr h;\n    struct flow f;\n};")
    out.append("struct lin_exec {\n    struct lin_hdr h;\n    char data[LIN_FNAME + LIN_ARGS];\n};")
    return "\n".join(out) + "\n"
