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
import platform
import struct
import threading
import time
import weakref
from importlib import resources

from cachetools import LRUCache

from busted.ebpf import bpfsys, bytecode
from busted.ebpf.bpfsys import prog_recursion_misses
from busted.ebpf.plan import ProbePlan, lineage_syscall_argv
from busted.errors import (
    BccNotInstalled,
    EnvironmentProblem,
    KernelHeadersMissing,
    PermissionDenied,
    ProbeLoadError,
    ProbeUnavailable,
    UsageError,
)
from busted.events import LossPlace
from busted.wire.layout import FL, FLOW, LOSS_MAP, LOSS_MISS, LOSS_RING, QUIET_KEY, c_definitions
from busted.wire.records import decode_flow_value

__all__ = ["MAX_FLOWS", "MAX_TLS_LIBRARIES", "RINGBUF_BYTES", "FlowProgram", "build_source",
           "check_architecture"]

# Defaults shared by Monitor, FlowProgram and `busted doctor --ebpf` (which must print what loads).
# 16 MiB: a 10-s storm of ~3,400 short-lived processes/s (fork + exit + their flows, ~130,000
# records) fits while the reader, sharing 2 CPUs with the spawners, catches up; 4 MiB lost half of
# them (docs/benchmarks.md, "Lineage at the VM's highest process rate"). The cost: 16 MiB of kernel
# memory, and up to twice that in RSS once the reader has touched every page (the data pages are
# mapped twice, so a record can wrap around the end).
RINGBUF_BYTES = 16 << 20
MAX_FLOWS = 65536
CHUNK_BYTES = 16384  # plaintext bytes per ring record (the TLS record size)
# The largest chunk: pieces are staged in a per-CPU array (pt_scratch), whose values the kernel caps
# at 32 KiB (PCPU_MIN_UNIT_SIZE); 32768 + the record header is over it.
MAX_CHUNK_BYTES = 16384
# Distinct TLS library files (inodes) probed at most; each costs up to 8 links (or perf fds), uprobes on the
# file and, at close, a detach that waits for an RCU grace period. BUSTED_MAX_TLS_LIBRARIES changes it.
MAX_TLS_LIBRARIES = 32
_TLS_FAILED_MAX = 256  # reasons kept for files that could not be probed

# The ring reader (bpfsys.RingReader) reads the kernel's producer position, then the records it
# covers, and stores the consumer position with plain loads and stores: correct under x86-64's
# total store order only (Python cannot issue the acquire/release barriers weaker CPUs need).
_ORDERED_MACHINES = ("x86_64", "amd64")


def check_architecture(machine: str | None = None) -> None:
    """Refuse a machine whose memory ordering the ring reader does not handle (see above)."""
    machine = machine or platform.machine()
    if machine.lower() not in _ORDERED_MACHINES:
        raise EnvironmentProblem(
            f"busted runs on x86-64 only; this machine is {machine!r}. Its BPF ring buffer reader relies "
            "on x86-64's store ordering, and reading it here could return half-written records. Run "
            "busted on an x86-64 host (the events can be sent elsewhere: --jsonl, --store).")

_BYTES_FILES = {"tracepoint": "bytes_tp.c", "syscall": "bytes_syscall.c", "kprobe": "bytes_kprobe.c"}
_LIFECYCLE_FILES = {"tracepoint": "lifecycle_tp.c", "kprobe": "lifecycle_kprobe.c"}
_CAPTURE_FILES = {"cgroup": "capture_cgroup.c", "syscall": "capture.c"}

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
] + [(f"syscalls:sys_exit_{n}", "bst_cap_out")  # answers and plain-HTTP bytes: copied at exit
      for n in ("read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg")]
# The "cgroup" capture tier: (function, program type, attach type), linked to the cgroup v2 root.
_PROG_CGROUP_SKB, _PROG_SOCK_ADDR = 8, 18  # enum bpf_prog_type (uapi)
_CAPTURE_CGROUP = [
    ("bst_capc_egress", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS),
    ("bst_capc_ingress", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_INGRESS),
    ("bst_capc_connect4", _PROG_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT),
    ("bst_capc_connect6", _PROG_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT),
    ("bst_capc_sendmsg4", _PROG_SOCK_ADDR, bpfsys.CGROUP_UDP4_SENDMSG),
    ("bst_capc_sendmsg6", _PROG_SOCK_ADDR, bpfsys.CGROUP_UDP6_SENDMSG),
]
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
    if chunk_bytes & (chunk_bytes - 1) or not 256 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise UsageError(f"chunk_bytes must be a power of two between 256 and {MAX_CHUNK_BYTES} (got {chunk_bytes}): "
                         "a piece and its header are staged in a per-CPU buffer, which the kernel caps at 32 KiB")
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
        _read("arrival.c") if plan.plaintext == "uprobe" else "",
        _read("plaintext.c") if plan.plaintext == "uprobe" else "",
        _read(_CAPTURE_FILES[plan.capture]) if plan.capture in _CAPTURE_FILES else "",
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
                 chunk_bytes: int = CHUNK_BYTES, busy_host: bool = False,
                 max_tls_libraries: int | None = None) -> None:
        check_architecture()
        self.plan = plan
        self.busy_host = busy_host
        self.source = build_source(plan, ringbuf_bytes=ringbuf_bytes, max_flows=max_flows,
                                   chunk_bytes=chunk_bytes, busy_host=busy_host)
        self.tls_files: dict[str, str] = {}  # label (path as a process names it) -> "openssl" | "gnutls"
        self.tls_failed: LRUCache[str, str] = LRUCache(maxsize=_TLS_FAILED_MAX)  # path -> why not
        self.tls_refused = 0  # TLS libraries (or processes) not probed: the bound, the scan's own bounds
        self.max_tls_libraries = _max_tls_libraries() if max_tls_libraries is None else max_tls_libraries
        self.attached: list[str] = []
        self._links: list[int] = []  # perf-event fds: closing them detaches
        # TLS attachments, one set per file (st_dev, st_ino) whatever path or namespace reached it.
        # The lock orders them with close(): none starts once close() has begun, and close() takes
        # the sets only after an attachment in progress is complete (so each one is detached).
        self._tls_lock = threading.Lock()
        self._tls_sets: dict[tuple[int, int], list[int]] = {}
        self._tls_refused_keys: LRUCache[tuple[int, int], bool] = LRUCache(maxsize=65536)
        self._closing = False
        self._uprobe_multi: bool | None = None  # None: not tried yet
        self._multi_error = ""
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

    def _prog(self, fn: str, prog_type: int, expected_attach_type: int = 0) -> int:
        assert self._loaded is not None
        try:
            return bytecode.load_function(self.compiled, self._loaded, fn, prog_type,
                                          expected_attach_type=expected_attach_type)
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
        elif self.plan.capture == "cgroup":
            self._attach_cgroup(_CAPTURE_CGROUP)
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
        if self.plan.plaintext == "uprobe" and self.plan.bytes == "tracepoint":
            # When answers' bytes arrived (arrival.c): optional, TTFT falls back to the read time.
            try:
                self._attach_tp("tcp:tcp_probe", "bst_rx_probe")
            except ProbeLoadError:
                pass
        for key in keys:
            for kind, kfn, fn in _KP_ATTACH.get(key, []):
                prog = self._prog(fn, _PROG_KPROBE)
                try:
                    self._links.append(bpfsys.perf_attach_probe("kprobe", kfn, 0, prog, ret=kind == "kretprobe"))
                except bpfsys.BpfError as exc:
                    raise ProbeUnavailable(f"cannot attach {kind} {kfn}: {exc}") from exc
                self.attached.append(f"{kind}:{kfn}")

    def _attach_cgroup(self, progs: list[tuple[str, int, int]]) -> None:
        """Link cgroup programs to the cgroup v2 root: every socket of the host, whatever its
        namespace, belongs to a cgroup under it. All are verified before the first is linked."""
        from busted.ebpf.probe import _cgroup2

        root = _cgroup2()
        if root is None:
            raise ProbeUnavailable("the capture tier 'cgroup' needs cgroup v2 mounted (none in /proc/self/mountinfo); "
                                   "mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) or force "
                                   "--probes capture=syscall")
        loaded = [(fn, self._prog(fn, ptype, atype), atype) for fn, ptype, atype in progs]
        cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for fn, prog, atype in loaded:
                try:
                    self._links.append(bpfsys.cgroup_link(prog, cg, atype))
                except bpfsys.BpfError as exc:
                    raise ProbeLoadError(f"cannot link {fn} to the cgroup v2 root {root}: {exc}") from exc
                self.attached.append(f"cgroup:{fn}")
        finally:
            os.close(cg)

    def _attach_tp(self, tp: str, fn: str) -> None:
        prog = self._prog(fn, _PROG_TRACEPOINT)
        cat, _, name = tp.partition(":")
        try:
            self._links.append(bpfsys.perf_attach_tracepoint(cat, name, prog))
        except bpfsys.BpfError as exc:
            raise ProbeLoadError(f"cannot attach tracepoint {tp}: {exc}") from exc
        self.attached.append(f"tracepoint:{tp}")

    def attach_tls_library(self, path: str, kind: str | None = None) -> bool:
        """Attach the plaintext uprobes to the library file (or executable that exports the
        symbols) at ``path``, a trusted path (the system's libraries); see ``attach_tls_fd``."""
        if self.plan.plaintext != "uprobe":
            return False
        from busted.ebpf.tlslibs import inspect_fd, open_path

        fd = open_path(path)
        if fd is None:
            self._failed(path, "cannot open it as a regular file")
            return False
        try:
            got = inspect_fd(fd)
            if got is None or got.kind is None or (kind is not None and got.kind != kind):
                self._failed(path, "no TLS symbols exported")
                return False
            return self.attach_tls_fd(fd, got.key, got.kind, got.offsets, path)
        finally:
            os.close(fd)

    def _attach_uprobe(self, fn: str, target: str, offset: int, ret: bool) -> int:
        """One uprobe: a BPF uprobe_multi link where the kernel has them (they detach in parallel,
        see bpfsys.uprobe_multi_link), else a perf event. Called with the TLS lock held."""
        assert self._loaded is not None
        if self._uprobe_multi is not False:
            try:
                fd = bpfsys.uprobe_multi_link(self._prog(fn, _PROG_KPROBE, bpfsys.TRACE_UPROBE_MULTI), target,
                                              [offset], ret=ret)
                self._uprobe_multi = True
                return fd
            except (bpfsys.BpfError, ProbeLoadError) as exc:
                if self._uprobe_multi:  # they worked before: this file's problem, not the kernel's
                    raise
                self._uprobe_multi = False  # an older kernel: perf-event uprobes from now on
                self._multi_error = str(exc)
                self._unload_tls_progs()
        return bpfsys.perf_attach_probe("uprobe", target, offset, self._prog(fn, _PROG_KPROBE), ret=ret)

    def _unload_tls_progs(self) -> None:
        """Forget the TLS programs loaded for uprobe_multi links (their attach type differs)."""
        assert self._loaded is not None
        names = {f for hooks in _TLS_HOOKS.values() for _, a, b in hooks for f in (a, b)}
        for name in names & set(self._loaded.progs):
            _close(self._loaded.progs.pop(name))

    @property
    def tls_inodes(self) -> list[tuple[int, int]]:
        """(st_dev, st_ino) of every file the plaintext uprobes are attached to."""
        return list(self._tls_sets)

    def tls_known(self, key: tuple[int, int]) -> bool:
        """Whether the file (st_dev, st_ino) is probed already or was refused: nothing to do."""
        return key in self._tls_sets or key in self._tls_refused_keys

    def count_tls_loss(self, n: int = 1) -> None:
        """Count TLS libraries (or processes) the scanner left unprobed (LossPlace.TLS_LIBRARY)."""
        with self._tls_lock:
            self.tls_refused += n

    def _failed(self, label: str, why: str) -> None:
        self.tls_failed[label] = why

    def attach_tls_fd(self, fd: int, key: tuple[int, int], kind: str, offsets: dict[str, int],
                      label: str) -> bool:
        """Attach the plaintext uprobes to the file open at ``fd`` (``key`` its (st_dev, st_ino),
        ``offsets`` where its TLS functions are); every process that maps it, now or later, in any
        mount namespace, is covered. One attachment set per key; at most ``max_tls_libraries``
        keys: a new one beyond is refused and counted once (``losses()``, TLS_LIBRARY). False if
        not attached (the reason in ``tls_failed``); nothing is attached once close() began."""
        if self.plan.plaintext != "uprobe" or kind not in _TLS_HOOKS:
            return False
        with self._tls_lock:
            if self._closing:
                return False
            if key in self._tls_sets:
                return True
            if key in self._tls_refused_keys:
                return False
            if len(self._tls_sets) >= self.max_tls_libraries:
                self._tls_refused_keys[key] = True
                self.tls_refused += 1
                self._failed(label, f"not probed: {self.max_tls_libraries} TLS libraries are probed already "
                             "(BUSTED_MAX_TLS_LIBRARIES)")
                return False
            done: list[str] = []
            links: list[int] = []
            # The kernel resolves this path to the open file itself: the inode we inspected, not
            # whatever a path names by now.
            target = f"/proc/self/fd/{fd}"
            try:
                for sym, fn_in, fn_out in _TLS_HOOKS[kind]:
                    if sym not in offsets:
                        continue
                    for fn, ret in ((fn_in, False), (fn_out, True)):
                        links.append(self._attach_uprobe(fn, target, offsets[sym], ret))
                    done.append(sym)
            except (bpfsys.BpfError, ProbeLoadError, PermissionDenied) as exc:
                _close_many(links)
                self._tls_refused_keys[key] = True  # tried once; a failure is counted, not retried
                self.tls_refused += 1
                self._failed(label, f"{type(exc).__name__}: {exc}")
                return False
            if not done:
                self._failed(label, "no TLS symbols exported")
                return False
            self._tls_sets[key] = links
            if label in self.tls_files:  # another file at the same path (another container)
                label = f"{label} [{os.major(key[0])}:{os.minor(key[0])}:{key[1]}]"
            self.tls_files[label] = kind
            self.attached.append(f"uprobe:{label}:{'+'.join(done)}")
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

    # -- busy-host mode: the only map access it needs, in plain types (busted/pipeline/busy.py decodes) ----

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
        if self.tls_refused:
            out[LossPlace.TLS_LIBRARY.value] = self.tls_refused
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
        with self._tls_lock:  # waits for an attachment in progress; none starts after this
            self._closing = True
            links, self._links = self._links, []
            for fds in self._tls_sets.values():
                links.extend(fds)
            self._tls_sets.clear()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        _close_many(links)  # detach first, then programs and maps
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _max_tls_libraries() -> int:
    try:
        return max(0, int(os.environ.get("BUSTED_MAX_TLS_LIBRARIES", MAX_TLS_LIBRARIES)))
    except ValueError:
        raise UsageError("BUSTED_MAX_TLS_LIBRARIES must be a whole number (distinct TLS library "
                         f"files probed at most; default {MAX_TLS_LIBRARIES})") from None


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
