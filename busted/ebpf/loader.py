"""Build, compile and attach the BPF program for a probe plan; read its ring buffer and loss map.

The program is the concatenation of ``common.h``, one bytes-tier file and one lifecycle-tier file
(see ``common.h`` for why in that order). BCC is imported lazily so the rest of busted (parsers,
sinks, replays) works without it.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Callable
from importlib import resources

from busted.ebpf.layout import FL, FLOW, LOSS_MAP, LOSS_MISS, LOSS_RING, QUIET_KEY, c_definitions
from busted.ebpf.plan import ProbePlan
from busted.ebpf.records import decode_flow_value
from busted.errors import (
    BccNotInstalled,
    KernelHeadersMissing,
    PermissionDenied,
    ProbeLoadError,
    ProbeUnavailable,
    UsageError,
)

__all__ = ["MAX_FLOWS", "RINGBUF_BYTES", "FlowProgram", "build_source"]

# Defaults shared by Monitor, FlowProgram and `busted doctor --ebpf` (which must print what loads).
RINGBUF_BYTES = 4 << 20
MAX_FLOWS = 65536
CHUNK_BYTES = 16384  # plaintext bytes per ring record (the TLS record size)

_BYTES_FILES = {"tracepoint": "bytes_tp.c", "syscall": "bytes_syscall.c", "kprobe": "bytes_kprobe.c"}
_LIFECYCLE_FILES = {"tracepoint": "lifecycle_tp.c", "kprobe": "lifecycle_kprobe.c"}

# (tracepoint "cat:name", function) per tier; kprobes as (kind, kernel function, function).
_TP_ATTACH = {
    ("lifecycle", "tracepoint"): [("sock:inet_sock_set_state", "bst_set_state")],
    ("bytes", "tracepoint"): [
        ("sock:sock_send_length", "bst_send_len"),
        ("sock:sock_recv_length", "bst_recv_len"),
    ],
    ("bytes", "syscall"): [
        ("syscalls:sys_enter_connect", "bst_conn_enter"),
        ("syscalls:sys_exit_connect", "bst_conn_exit"),
        ("syscalls:sys_enter_accept", "bst_acc_enter"),
        ("syscalls:sys_exit_accept", "bst_acc_exit"),
        ("syscalls:sys_enter_accept4", "bst_acc4_enter"),
        ("syscalls:sys_exit_accept4", "bst_acc4_exit"),
        ("syscalls:sys_enter_close", "bst_close_enter"),
    ]
    + [
        (f"syscalls:sys_{d}_{n}", f"bst_{n}_in" if d == "enter" else "bst_io_out")
        for n in ("write", "writev", "sendto", "sendmsg", "read", "readv", "recvfrom", "recvmsg")
        for d in ("enter", "exit")
    ],
    ("lifecycle", "kprobe"): [
        ("syscalls:sys_enter_connect", "bst_kp_conn_in"),
        ("syscalls:sys_enter_accept4", "bst_kp_acc_in"),
    ],
}
_CAPTURE_ATTACH = [
    ("syscalls:sys_enter_connect", "bst_cap_conn_in"),
    ("syscalls:sys_exit_connect", "bst_cap_conn_out"),
    ("syscalls:sys_enter_close", "bst_cap_close"),
] + [
    (f"syscalls:sys_enter_{n}", f"bst_cap_{n}_in")
    for n in ("write", "writev", "sendto", "sendmsg", "read", "readv", "recvfrom", "recvmsg")
] + [(f"syscalls:sys_exit_{n}", "bst_cap_out") for n in ("read", "readv", "recvfrom", "recvmsg")]
_LINEAGE_ATTACH = [
    ("syscalls:sys_enter_execve", "bst_lin_execve_in"),
    ("syscalls:sys_exit_execve", "bst_lin_execve_out"),
    ("sched:sched_process_exec", "bst_lin_exec"),
    ("sched:sched_process_exit", "bst_lin_exit"),
]
# execveat is optional (old kernels): attached when present.
_LINEAGE_OPTIONAL = [
    ("syscalls:sys_enter_execveat", "bst_lin_execveat_in"),
    ("syscalls:sys_exit_execveat", "bst_lin_execve_out"),
]
_KP_ATTACH = {
    ("lifecycle", "kprobe"): [
        ("kprobe", "tcp_connect", "bst_kp_connect"),
        ("kretprobe", "inet_csk_accept", "bst_kp_accept_ret"),
        ("kprobe", "tcp_close", "bst_kp_close"),
    ],
    ("bytes", "kprobe"): [
        ("kprobe", "tcp_sendmsg", "bst_kp_send_in"),
        ("kretprobe", "tcp_sendmsg", "bst_kp_send_out"),
        ("kprobe", "tcp_recvmsg", "bst_kp_recv_in"),
        ("kretprobe", "tcp_recvmsg", "bst_kp_recv_out"),
    ],
}


_FLOW_HEAD = struct.Struct("<QQQQ")  # struct flow starts with open_ns, cgroup, sent, recv
assert FLOW.offsets()["recv"] == 24

# bpf(BPF_OBJ_GET_INFO_BY_FD) reads struct bpf_prog_info (uapi): recursion_misses sits at byte 208.
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
_BPF_OBJ_GET_INFO_BY_FD = 15
_PROG_INFO_SIZE = 232
_RECURSION_MISSES_AT = 208


def prog_recursion_misses(fd: int) -> int:
    """recursion_misses of the BPF program behind ``fd`` (kernel >= 5.12), 0 if unreadable."""
    if _BPF_SYSCALL is None:
        return 0
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = struct.pack("<IIQ", fd, _PROG_INFO_SIZE, ctypes.addressof(info))
    abuf = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_BPF_SYSCALL, _BPF_OBJ_GET_INFO_BY_FD, abuf, len(attr)) != 0:
        return 0
    # The kernel writes back how much it filled: older kernels stop before the field.
    filled = struct.unpack_from("<I", abuf.raw, 4)[0]
    if filled < _RECURSION_MISSES_AT + 8:
        return 0
    return struct.unpack_from("<Q", info.raw, _RECURSION_MISSES_AT)[0]


# TLS libraries' plaintext functions: (symbol, entry program, return program).
_TLS_HOOKS = {
    "openssl": [
        ("SSL_write", "bst_ssl_write_in", "bst_ssl_write_out"),
        ("SSL_write_ex", "bst_ssl_write_ex_in", "bst_ssl_write_ex_out"),
        ("SSL_read", "bst_ssl_read_in", "bst_ssl_read_out"),
        ("SSL_read_ex", "bst_ssl_read_ex_in", "bst_ssl_read_ex_out"),
    ],
    "gnutls": [
        ("gnutls_record_send", "bst_gnutls_send_in", "bst_gnutls_send_out"),
        ("gnutls_record_recv", "bst_gnutls_recv_in", "bst_gnutls_recv_out"),
    ],
}


def _has_symbol(path: str, sym: str) -> bool:
    from busted.ebpf.tlslibs import exported_symbols

    return sym in exported_symbols(path)


def _read(name: str) -> str:
    return resources.files("busted.ebpf").joinpath(name).read_text()


def build_source(plan: ProbePlan, *, ringbuf_bytes: int = RINGBUF_BYTES, max_flows: int = MAX_FLOWS,
                 chunk_bytes: int = CHUNK_BYTES, busy_host: bool = False) -> str:
    """The complete BPF C text for ``plan`` (what ``busted doctor --ebpf`` prints). ``busy_host``
    compiles in the quiet-peer aggregation (docs/kernel.md, "Busy-host mode")."""
    pages = max(1, ringbuf_bytes // 4096)
    if pages & (pages - 1):  # BPF ring buffers are a power-of-two number of pages
        pages = 1 << pages.bit_length()
    if chunk_bytes & (chunk_bytes - 1) or not 256 <= chunk_bytes <= 65536:
        raise UsageError("chunk_bytes must be a power of two between 256 and 65536")
    defines = [f"#define RINGBUF_PAGES {pages}", f"#define MAX_FLOWS {max_flows}",
               f"#define PT_CHUNK_BYTES {chunk_bytes}"]
    if plan.flow_end == "close-state" or plan.lifecycle != "tracepoint":
        defines.append("#define END_AT_CLOSE 1")
    if plan.lineage == "sched-fork":
        defines.append("#define LIN_FORK_SCHED 1")
    if busy_host:
        defines.append("#define BUSY_HOST 1")
    parts = [
        "\n".join(defines),
        c_definitions(),
        _read("common.h"),
        _read("plaintext.c") if plan.plaintext == "uprobe" else "",
        _read("capture.c") if plan.capture == "syscall" else "",
        _read("lineage.c") if plan.lineage != "off" else "",
        _read(_BYTES_FILES[plan.bytes]),
        _read(_LIFECYCLE_FILES[plan.lifecycle]),
    ]
    return "\n".join(parts)


def headers_available(release: str | None = None, modules: str = "/lib/modules",
                      kheaders: str = "/sys/kernel/kheaders.tar.xz") -> bool:
    """Whether BCC will find kernel headers: /lib/modules/<release>/build, $BCC_KERNEL_SOURCE, or
    the kernel's built-in kheaders (CONFIG_IKHEADERS)."""
    release = release or os.uname().release
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return True
    if os.path.exists(f"{modules}/{release}/build/include") or os.path.exists(f"{modules}/{release}/source/include"):
        return True
    return os.path.exists(kheaders)


def _import_bcc():
    try:
        import bcc
    except ImportError as exc:
        raise BccNotInstalled(str(exc)) from exc
    return bcc


class FlowProgram:
    """The loaded flow program. ``close()`` detaches everything (also done by process exit)."""

    def __init__(self, plan: ProbePlan, *, ringbuf_bytes: int = RINGBUF_BYTES, max_flows: int = MAX_FLOWS,
                 chunk_bytes: int = CHUNK_BYTES, busy_host: bool = False) -> None:
        self.plan = plan
        self.busy_host = busy_host
        self.source = build_source(plan, ringbuf_bytes=ringbuf_bytes, max_flows=max_flows,
                                   chunk_bytes=chunk_bytes, busy_host=busy_host)
        self.tls_files: dict[str, str] = {}  # path -> "openssl" | "gnutls": attached
        self.tls_failed: dict[str, str] = {}  # path -> why not
        from busted.ebpf.probe import _has_cap_bpf

        if not _has_cap_bpf():
            raise PermissionDenied(f"euid {os.geteuid()}, no CAP_BPF+CAP_PERFMON")
        bcc = _import_bcc()
        if not headers_available():
            raise KernelHeadersMissing(os.uname().release)
        t0 = time.monotonic()
        try:
            self.bpf = bcc.BPF(text=self.source.encode())
        except Exception as exc:  # BCC raises bare Exception for compile errors
            msg = str(exc)
            if "kernel headers" in msg.lower() or "kheaders" in msg.lower():
                raise KernelHeadersMissing(os.uname().release, msg) from exc
            if "Operation not permitted" in msg or "EPERM" in msg:
                raise PermissionDenied(msg) from exc
            raise ProbeLoadError(f"BPF program failed to compile or load: {msg}") from exc
        self.compile_s = time.monotonic() - t0
        self.attached: list[str] = []
        try:
            self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        keys = [("lifecycle", self.plan.lifecycle), ("bytes", self.plan.bytes)]
        for key in keys:
            for tp, fn in _TP_ATTACH.get(key, []):
                self._attach_tp(tp, fn)
        if self.plan.capture == "syscall":
            for tp, fn in _CAPTURE_ATTACH:
                self._attach_tp(tp, fn)
        if self.plan.lineage != "off":
            fork_tp = "sched:sched_process_fork" if self.plan.lineage == "sched-fork" else "task:task_newtask"
            for tp, fn in [(fork_tp, "bst_lin_fork"), *_LINEAGE_ATTACH]:
                self._attach_tp(tp, fn)
            for tp, fn in _LINEAGE_OPTIONAL:
                try:
                    self._attach_tp(tp, fn)
                except ProbeLoadError:
                    pass  # no execveat on this kernel: execve covers almost every program
        if self.plan.lifecycle == "tracepoint" and self.plan.flow_end == "destroy":
            self._attach_tp("tcp:tcp_destroy_sock", "bst_destroy")
        for key in keys:
            for kind, kfn, fn in _KP_ATTACH.get(key, []):
                try:
                    if kind == "kprobe":
                        self.bpf.attach_kprobe(event=kfn.encode(), fn_name=fn.encode())
                    else:
                        self.bpf.attach_kretprobe(event=kfn.encode(), fn_name=fn.encode())
                except Exception as exc:
                    raise ProbeUnavailable(f"cannot attach {kind} {kfn}: {exc}") from exc
                self.attached.append(f"{kind}:{kfn}")

    def _attach_tp(self, tp: str, fn: str) -> None:
        try:
            self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())
        except Exception as exc:
            raise ProbeLoadError(f"cannot attach tracepoint {tp}: {exc}") from exc
        self.attached.append(f"tracepoint:{tp}")

    def attach_tls_library(self, path: str, kind: str) -> bool:
        """Attach the plaintext uprobes to one library file (or executable that exports the
        symbols); every process that maps it, now or later, is covered. False (with the reason
        in ``tls_failed``) if it cannot be done; idempotent per path."""
        if self.plan.plaintext != "uprobe" or path in self.tls_files or path in self.tls_failed:
            return path in self.tls_files
        hooks = _TLS_HOOKS[kind]
        done = []
        try:
            for sym, fn_in, fn_out in hooks:
                if not _has_symbol(path, sym):
                    continue
                self.bpf.attach_uprobe(name=path.encode(), sym=sym.encode(), fn_name=fn_in.encode())
                self.bpf.attach_uretprobe(name=path.encode(), sym=sym.encode(), fn_name=fn_out.encode())
                done.append(sym)
        except Exception as exc:
            self.tls_failed[path] = f"{type(exc).__name__}: {exc}"
            return False
        if not done:
            self.tls_failed[path] = "no TLS symbols exported"
            return False
        self.tls_files[path] = kind
        self.attached.append(f"uprobe:{path}:{'+'.join(done)}")
        return True

    def skip_plaintext(self, sk: int, open_ns: int) -> None:
        """Stop copying the plaintext of the flow on socket ``sk`` opened at ``open_ns`` (judged:
        not an LLM API or MCP). A later flow on a reused socket address is not affected."""
        if self.plan.plaintext == "uprobe":
            try:
                self.bpf[b"pt_skip"][ctypes.c_ulonglong(sk)] = ctypes.c_ulonglong(open_ns)
            except Exception:  # map full: the verdict is an optimisation, user space still drops
                pass

    def unbind_ssl(self, pid: int, ssl: int) -> None:
        """Forget a TLS session's socket (the connection ended; the SSL* may be reused)."""
        if self.plan.plaintext == "uprobe":
            key = self.bpf[b"pt_bind"].Key(ssl=ssl, tgid=pid)
            try:
                del self.bpf[b"pt_bind"][key]
            except KeyError:
                pass

    def unskip_plaintext(self, sk: int) -> None:
        if self.plan.plaintext == "uprobe":
            try:
                del self.bpf[b"pt_skip"][ctypes.c_ulonglong(sk)]
            except KeyError:
                pass

    # -- busy-host mode: the only map access it needs, in plain types (busted/busy.py decodes) ----

    def set_quiet_peer(self, family: int, addr: bytes, port: int, expiry_ns: int, direction: int = 1) -> None:
        """Aggregate new flows to this peer until ``expiry_ns`` (CLOCK_MONOTONIC). ``addr`` is 4
        (AF_INET) or 16 bytes; ``direction`` 1 connect (``port`` the peer's), 2 accept (ours)."""
        if not self.busy_host:
            return
        t = self.bpf[b"quiet_peers"]
        key = t.Key.from_buffer_copy(QUIET_KEY.pack(family=family, port=port, direction=direction, addr=addr))
        try:
            t[key] = ctypes.c_ulonglong(expiry_ns)
        except Exception:  # map full: the peer's flows stay full events (nothing is hidden)
            pass

    def clear_quiet_peer(self, family: int, addr: bytes, port: int, direction: int = 1) -> None:
        if not self.busy_host:
            return
        t = self.bpf[b"quiet_peers"]
        key = t.Key.from_buffer_copy(QUIET_KEY.pack(family=family, port=port, direction=direction, addr=addr))
        try:
            del t[key]
        except KeyError:
            pass

    def drain_summaries(self) -> list[tuple[bytes, bytes]]:
        """Take (read and delete) every summary: (key, value) as raw bytes of the SUM_KEY and
        SUM_VAL layouts. Each entry is taken atomically (BPF_MAP_LOOKUP_AND_DELETE_ELEM, kernel >=
        5.14) where the kernel offers it, else read then deleted."""
        if not self.busy_host:
            return []
        from bcc.libbcc import lib

        t = self.bpf[b"summaries"]
        out = []
        for k in list(t.keys()):
            leaf = t.Leaf()
            if lib.bpf_lookup_and_delete(t.map_fd, ctypes.byref(k), ctypes.byref(leaf)) != 0:
                try:  # older kernels: no lookup-and-delete for hash maps
                    leaf = t[k]
                    del t[k]
                except KeyError:
                    continue
            out.append((bytes(k), bytes(leaf)))
        return out

    def open_ring(self, callback: Callable[[int, int, int], object]) -> None:
        """Register ``callback(ctx, data_ptr, size)`` for every ring buffer record."""
        self._cb = callback  # keep a reference: BCC holds only a ctypes pointer
        self.bpf[b"events"].open_ring_buffer(callback)

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def consume(self) -> None:
        self.bpf.ring_buffer_consume()

    def losses(self) -> dict[int, int]:
        """Cumulative kernel-side losses by place (LossPlace values), summed over CPUs."""
        out: dict[int, int] = {}
        table = self.bpf[b"losses"]
        for place in (LOSS_RING, LOSS_MAP):
            vals = table[ctypes.c_int(place)]
            out[place] = int(sum(vals))
        out[LOSS_MISS] = self.recursion_misses()
        return out

    def recursion_misses(self) -> int:
        """How often the kernel skipped one of our programs (bpf_prog_info.recursion_misses, summed):
        an event that happened with nothing recorded, e.g. a flow end. 0 where unreadable."""
        total = 0
        for fn in getattr(self.bpf, "funcs", {}).values():
            fd = getattr(fn, "fd", None)
            if fd is not None and fd >= 0:
                total += prog_recursion_misses(fd)
        return total

    def flow_entries(self, older_than_ns: int | None = None) -> dict[int, tuple[tuple[str, int, str, int], int, int]]:
        """Flows the kernel tracks with a known 4-tuple (opened while we watched):
        sk -> ((saddr, sport, daddr, dport), sent, recv); only those opened before
        ``older_than_ns`` (CLOCK_MONOTONIC) when given. Decoded with the declared layout."""
        out = {}
        for k, v in self.bpf[b"flows"].items():
            raw = bytes(v)
            flags, _fam, saddr, sport, daddr, dport = decode_flow_value(raw)
            if not flags & FL.HAVE_TUPLE or flags & FL.MIDSTREAM:
                continue
            open_ns, _cg, sent, recv = _FLOW_HEAD.unpack_from(raw)
            if older_than_ns is not None and open_ns > older_than_ns:
                continue
            out[int(k.value)] = ((saddr, sport, daddr, dport), sent, recv)
        return out

    def forget_flow(self, sk: int) -> bool:
        """Delete a flow from the kernel map; False if it was already gone (its end is on the way)."""
        try:
            del self.bpf[b"flows"][ctypes.c_ulonglong(sk)]
        except KeyError:
            return False
        return True

    def close(self) -> None:
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            self.bpf = None
            try:
                bpf.cleanup()
            except Exception:
                pass
