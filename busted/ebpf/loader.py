"""Build, compile and attach the BPF program for a probe plan; read its ring buffer and loss map.

The program is the concatenation of ``common.h``, one bytes-tier file and one lifecycle-tier file
(see ``common.h`` for why in that order). BCC is imported lazily so the rest of busted (parsers,
sinks, replays) works without it.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from importlib import resources

from busted.ebpf.plan import ProbePlan
from busted.errors import (
    BccNotInstalled,
    KernelHeadersMissing,
    PermissionDenied,
    ProbeLoadError,
    ProbeUnavailable,
)

__all__ = ["MAX_FLOWS", "RINGBUF_BYTES", "FlowProgram", "build_source"]

# Defaults shared by Monitor, FlowProgram and `busted doctor --ebpf` (which must print what loads).
RINGBUF_BYTES = 4 << 20
MAX_FLOWS = 65536

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


def _read(name: str) -> str:
    return resources.files("busted.ebpf").joinpath(name).read_text()


def build_source(plan: ProbePlan, *, ringbuf_bytes: int = RINGBUF_BYTES, max_flows: int = MAX_FLOWS) -> str:
    """The complete BPF C text for ``plan`` (what ``busted doctor --ebpf`` prints)."""
    pages = max(1, ringbuf_bytes // 4096)
    if pages & (pages - 1):  # BPF ring buffers are a power-of-two number of pages
        pages = 1 << pages.bit_length()
    defines = [f"#define RINGBUF_PAGES {pages}", f"#define MAX_FLOWS {max_flows}"]
    if plan.flow_end == "close-state" or plan.lifecycle != "tracepoint":
        defines.append("#define END_AT_CLOSE 1")
    parts = [
        "\n".join(defines),
        _read("common.h"),
        _read("capture.c") if plan.capture == "syscall" else "",
        _read(_BYTES_FILES[plan.bytes]),
        _read(_LIFECYCLE_FILES[plan.lifecycle]),
    ]
    return "\n".join(parts)


def headers_available(release: str | None = None, modules: str = "/lib/modules") -> bool:
    """Whether BCC will find kernel headers: /lib/modules/<release>/build, $BCC_KERNEL_SOURCE, or
    the kernel's built-in kheaders (CONFIG_IKHEADERS)."""
    release = release or os.uname().release
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return True
    if os.path.exists(f"{modules}/{release}/build/include") or os.path.exists(f"{modules}/{release}/source/include"):
        return True
    return os.path.exists("/sys/kernel/kheaders.tar.xz")


def _import_bcc():
    try:
        import bcc
    except ImportError as exc:
        raise BccNotInstalled(str(exc)) from exc
    return bcc


class FlowProgram:
    """The loaded flow program. ``close()`` detaches everything (also done by process exit)."""

    def __init__(self, plan: ProbePlan, *, ringbuf_bytes: int = RINGBUF_BYTES, max_flows: int = MAX_FLOWS) -> None:
        self.plan = plan
        self.source = build_source(plan, ringbuf_bytes=ringbuf_bytes, max_flows=max_flows)
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
        for place in (1, 2):
            vals = table[ctypes.c_int(place)]
            out[place] = int(sum(vals))
        return out

    def close(self) -> None:
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            self.bpf = None
            try:
                bpf.cleanup()
            except Exception:
                pass
