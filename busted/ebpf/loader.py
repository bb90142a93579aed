"""Build, compile and attach the BPF program for a probe plan; read its ring buffer and loss map.

The program is the concatenation of ``common.h``, one bytes-tier file and one lifecycle-tier file
(see ``common.h`` for why in that order). BCC compiles it in a child process and the bytecode is
cached (``bytecode.py``); this process loads and attaches it with plain bpf(2) and perf-event
calls (``bpfsys.py``), so it never maps BCC or LLVM.
"""

from __future__ import annotations

import atexit
import errno
import os
import struct
import time
import weakref
from importlib import resources

from busted.ebpf import bpfsys, bytecode
from busted.ebpf.bpfsys import prog_recursion_misses
from busted.ebpf.layout import FL, FLOW, LOSS_MAP, LOSS_MISS, LOSS_RING, QUIET_KEY, c_definitions
from busted.ebpf.plan import ProbePlan, lineage_syscall_argv
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
    ("sched:sched_process_exec", "bst_lin_exec"),
    ("sched:sched_process_exit", "bst_lin_exit"),
]
# The "syscall" lineage tier only (argv copied at execve): syscall tracepoints tax every syscall.
_LINEAGE_EXECVE = [
    ("syscalls:sys_enter_execve", "bst_lin_execve_in"),
    ("syscalls:sys_exit_execve", "bst_lin_execve_out"),
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

_PROG_KPROBE, _PROG_TRACEPOINT = 2, 5  # enum bpf_prog_type (uapi)


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
    if lineage_syscall_argv(plan.lineage):
        defines.append("#define LIN_ARGV_SYSCALL 1")
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


class FlowProgram:
    """The loaded flow program. ``close()`` detaches everything (also done by process exit).

    The bytecode comes from ``bytecode.get_compiled`` (the cache, or BCC in a child process);
    this process creates the maps, loads the programs and attaches them with perf-event fds, and
    reads the ring buffer through shared memory. No BCC here."""

    def __init__(self, plan: ProbePlan, *, ringbuf_bytes: int = RINGBUF_BYTES, max_flows: int = MAX_FLOWS,
                 chunk_bytes: int = CHUNK_BYTES, busy_host: bool = False) -> None:
        self.plan = plan
        self.busy_host = busy_host
        self.source = build_source(plan, ringbuf_bytes=ringbuf_bytes, max_flows=max_flows,
                                   chunk_bytes=chunk_bytes, busy_host=busy_host)
        self.tls_files: dict[str, str] = {}  # path -> "openssl" | "gnutls": attached
        self.tls_failed: dict[str, str] = {}  # path -> why not
        self.attached: list[str] = []
        self._links: list[int] = []  # perf-event fds: closing them detaches
        self._loaded: bytecode.Loaded | None = None
        self._ring: bpfsys.RingReader | None = None
        from busted.ebpf.probe import _has_cap_bpf

        if not _has_cap_bpf():
            raise PermissionDenied(f"euid {os.geteuid()}, no CAP_BPF+CAP_PERFMON")
        t0 = time.monotonic()
        self.compiled = self._compiled()
        self.compile_s = time.monotonic() - t0
        self.bytecode_from = self.compiled.source  # "cache" or "compile"
        try:
            self._loaded = bytecode.create_maps(self.compiled)
            self._attach()
            ring = self._loaded.maps["events"]
            self._ring = bpfsys.RingReader(ring.fd, ring.max_entries)
            _LIVE.add(self)
        except BaseException:
            self.close()
            raise

    def _compiled(self) -> bytecode.Compiled:
        try:
            return bytecode.get_compiled(self.source)
        except bytecode.CompileFailed as exc:
            msg = str(exc)
            if exc.kind == "bcc":
                raise BccNotInstalled(msg) from exc
            if exc.kind == "headers" or not headers_available():
                raise KernelHeadersMissing(os.uname().release, msg) from exc
            if exc.kind == "permission":
                raise PermissionDenied(msg) from exc
            raise ProbeLoadError(f"BPF program failed to compile: {msg}") from exc

    @property
    def maps(self) -> dict[str, bpfsys.Map]:
        return self._loaded.maps if self._loaded is not None else {}

    @property
    def prog_fds(self) -> list[int]:
        return list(self._loaded.progs.values()) if self._loaded is not None else []

    def _prog(self, fn: str, prog_type: int) -> int:
        assert self._loaded is not None
        try:
            return bytecode.load_function(self.compiled, self._loaded, fn, prog_type)
        except bpfsys.BpfError as exc:
            if exc.errno == errno.EPERM:
                raise PermissionDenied(f"loading {fn}: {exc}") from exc
            tail = "\n".join(exc.log.strip().splitlines()[-12:])
            raise ProbeLoadError(f"the kernel refused BPF program {fn}: {exc}\n{tail}") from exc
        except KeyError as exc:
            raise ProbeLoadError(f"BPF function {fn} is not in the compiled program") from exc

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
            syscall_argv = lineage_syscall_argv(self.plan.lineage)
            for tp, fn in [(fork_tp, "bst_lin_fork"), *_LINEAGE_ATTACH, *(_LINEAGE_EXECVE if syscall_argv else [])]:
                self._attach_tp(tp, fn)
            for tp, fn in _LINEAGE_OPTIONAL if syscall_argv else []:
                try:
                    self._attach_tp(tp, fn)
                except ProbeLoadError:
                    pass  # no execveat on this kernel: execve covers almost every program
        if self.plan.lifecycle == "tracepoint" and self.plan.flow_end == "destroy":
            self._attach_tp("tcp:tcp_destroy_sock", "bst_destroy")
        for key in keys:
            for kind, kfn, fn in _KP_ATTACH.get(key, []):
                prog = self._prog(fn, _PROG_KPROBE)
                try:
                    self._links.append(bpfsys.perf_attach_probe("kprobe", kfn, 0, prog, ret=kind == "kretprobe"))
                except bpfsys.BpfError as exc:
                    raise ProbeUnavailable(f"cannot attach {kind} {kfn}: {exc}") from exc
                self.attached.append(f"{kind}:{kfn}")

    def _attach_tp(self, tp: str, fn: str) -> None:
        prog = self._prog(fn, _PROG_TRACEPOINT)
        cat, _, name = tp.partition(":")
        try:
            self._links.append(bpfsys.perf_attach_tracepoint(cat, name, prog))
        except bpfsys.BpfError as exc:
            raise ProbeLoadError(f"cannot attach tracepoint {tp}: {exc}") from exc
        self.attached.append(f"tracepoint:{tp}")

    def attach_tls_library(self, path: str, kind: str) -> bool:
        """Attach the plaintext uprobes to one library file (or executable that exports the
        symbols); every process that maps it, now or later, is covered. False (with the reason
        in ``tls_failed``) if it cannot be done; idempotent per path."""
        if self.plan.plaintext != "uprobe" or path in self.tls_files or path in self.tls_failed:
            return path in self.tls_files
        from busted.ebpf.tlslibs import symbol_offsets

        offsets = symbol_offsets(path)
        done: list[str] = []
        links: list[int] = []
        try:
            for sym, fn_in, fn_out in _TLS_HOOKS[kind]:
                if sym not in offsets:
                    continue
                for fn, ret in ((fn_in, False), (fn_out, True)):
                    links.append(bpfsys.perf_attach_probe("uprobe", path, offsets[sym],
                                                          self._prog(fn, _PROG_KPROBE), ret=ret))
                done.append(sym)
        except (bpfsys.BpfError, ProbeLoadError, PermissionDenied) as exc:
            for fd in links:
                _close(fd)
            self.tls_failed[path] = f"{type(exc).__name__}: {exc}"
            return False
        if not done:
            self.tls_failed[path] = "no TLS symbols exported"
            return False
        self._links.extend(links)
        self.tls_files[path] = kind
        self.attached.append(f"uprobe:{path}:{'+'.join(done)}")
        return True

    def skip_plaintext(self, sk: int, open_ns: int) -> None:
        """Stop copying the plaintext of the flow on socket ``sk`` opened at ``open_ns`` (judged:
        not an LLM API or MCP). A later flow on a reused socket address is not affected."""
        if self.plan.plaintext == "uprobe":
            try:
                self.maps["pt_skip"].update(_U64.pack(sk), _U64.pack(open_ns))
            except bpfsys.BpfError:  # map full: the verdict is an optimisation, user space still drops
                pass

    def unbind_ssl(self, pid: int, ssl: int) -> None:
        """Forget a TLS session's socket (the connection ended; the SSL* may be reused)."""
        if self.plan.plaintext == "uprobe":
            m = self.maps["pt_bind"]
            # struct pt_key { u64 ssl; u32 tgid; } padded to the map's key size
            m.delete(struct.pack("<QI", ssl, pid).ljust(m.key_size, b"\0"))

    def unskip_plaintext(self, sk: int) -> None:
        if self.plan.plaintext == "uprobe":
            self.maps["pt_skip"].delete(_U64.pack(sk))

    # -- busy-host mode: the only map access it needs, in plain types (busted/busy.py decodes) ----

    def set_quiet_peer(self, family: int, addr: bytes, port: int, expiry_ns: int, direction: int = 1) -> None:
        """Aggregate new flows to this peer until ``expiry_ns`` (CLOCK_MONOTONIC). ``addr`` is 4
        (AF_INET) or 16 bytes; ``direction`` 1 connect (``port`` the peer's), 2 accept (ours)."""
        if not self.busy_host:
            return
        key = QUIET_KEY.pack(family=family, port=port, direction=direction, addr=addr)
        try:
            self.maps["quiet_peers"].update(key, _U64.pack(expiry_ns))
        except bpfsys.BpfError:  # map full: the peer's flows stay full events (nothing is hidden)
            pass

    def clear_quiet_peer(self, family: int, addr: bytes, port: int, direction: int = 1) -> None:
        if not self.busy_host:
            return
        self.maps["quiet_peers"].delete(QUIET_KEY.pack(family=family, port=port, direction=direction, addr=addr))

    def drain_summaries(self) -> list[tuple[bytes, bytes]]:
        """Take (read and delete) every summary: (key, value) as raw bytes of the SUM_KEY and
        SUM_VAL layouts. Each entry is taken atomically (BPF_MAP_LOOKUP_AND_DELETE_ELEM, kernel >=
        5.14) where the kernel offers it, else read then deleted."""
        if not self.busy_host:
            return []
        m = self.maps["summaries"]
        out = []
        for k in list(m.keys()):
            v = m.take(k)
            if v is not None:
                out.append((k, v))
        return out

    def wait(self, timeout_ms: int) -> bool:
        """Block until the ring has records or ``timeout_ms`` passed."""
        return self._ring.wait(timeout_ms) if self._ring is not None else False

    def read(self, limit: int) -> list[bytes]:
        """Up to ``limit`` ring records (raw bytes), oldest first."""
        return self._ring.read(limit) if self._ring is not None else []

    def losses(self) -> dict[int, int]:
        """Cumulative kernel-side losses by place (LossPlace values), summed over CPUs."""
        out: dict[int, int] = {}
        table = self.maps["losses"]
        for place in (LOSS_RING, LOSS_MAP):
            out[place] = sum(_U64.unpack_from(v)[0] for v in table.lookup_percpu(_U32.pack(place)))
        out[LOSS_MISS] = self.recursion_misses()
        return out

    def recursion_misses(self) -> int:
        """How often the kernel skipped one of our programs (bpf_prog_info.recursion_misses, summed):
        an event that happened with nothing recorded, e.g. a flow end. 0 where unreadable."""
        # A copy: the TLS scanner thread may load uprobe programs meanwhile.
        return sum(prog_recursion_misses(fd) for fd in self.prog_fds)

    def flow_entries(self, older_than_ns: int | None = None) -> dict[int, tuple[tuple[str, int, str, int], int, int]]:
        """Flows the kernel tracks with a known 4-tuple (opened while we watched):
        sk -> ((saddr, sport, daddr, dport), sent, recv); only those opened before
        ``older_than_ns`` (CLOCK_MONOTONIC) when given. Decoded with the declared layout."""
        out = {}
        for k, raw in self.maps["flows"].items():
            flags, _fam, saddr, sport, daddr, dport = decode_flow_value(raw)
            if not flags & FL.HAVE_TUPLE or flags & FL.MIDSTREAM:
                continue
            open_ns, _cg, sent, recv = _FLOW_HEAD.unpack_from(raw)
            if older_than_ns is not None and open_ns > older_than_ns:
                continue
            out[_U64.unpack(k)[0]] = ((saddr, sport, daddr, dport), sent, recv)
        return out

    def forget_flow(self, sk: int) -> bool:
        """Delete a flow from the kernel map; False if it was already gone (its end is on the way)."""
        return self.maps["flows"].delete(_U64.pack(sk))

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        links, self._links = self._links, []
        _close_many(links)  # detach first, then programs and maps
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _close_many(fds: list[int]) -> None:
    """Close perf-event fds from several threads: each detach waits for an RCU grace period
    (~50-100 ms here, seconds under load), and concurrent waiters share grace periods."""
    if len(fds) < 4:
        for fd in fds:
            _close(fd)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, len(fds)), thread_name_prefix="busted-detach") as ex:
        list(ex.map(_close, fds))


_LIVE: weakref.WeakSet[FlowProgram] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    # A process leaving without close() (an exception, Ctrl-C) would have the kernel detach one
    # hook after another at exit; closing them together here is many times faster.
    for prog in list(_LIVE):
        prog.close()
