"""Capability probe: what this kernel offers, read from the filesystem (no BPF loaded).

The probe plan (``busted.ebpf.plan``) is chosen from this; ``busted doctor`` prints it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Capabilities", "TRACEPOINTS", "probe", "tracefs_root", "mount_tracefs"]

# Every tracepoint any tier may use, grouped by what needs it.
TRACEPOINTS: dict[str, tuple[str, ...]] = {
    "lifecycle": ("sock/inet_sock_set_state", "tcp/tcp_destroy_sock"),
    "bytes": ("sock/sock_send_length", "sock/sock_recv_length"),
    "syscall": tuple(
        f"syscalls/sys_{d}_{n}"
        for n in (
            "connect", "accept", "accept4", "close", "write", "writev", "sendto", "sendmsg",
            "read", "readv", "recvfrom", "recvmsg",
        )
        for d in ("enter", "exit")
    ),
    # process lineage (lineage.c): task_newtask, or sched_process_fork where it is missing
    "lineage": ("sched/sched_process_exec", "sched/sched_process_exit", "sched/sched_process_fork",
                "task/task_newtask", "syscalls/sys_enter_execve", "syscalls/sys_exit_execve",
                "syscalls/sys_enter_execveat", "syscalls/sys_exit_execveat"),
}

_TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_root() -> str | None:
    """The mounted tracefs directory, or None."""
    for p in _TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(p, "events")):
            return p
    return None


def mount_tracefs() -> str | None:
    """Mount tracefs (or debugfs, which exposes it) and return its root; None if that failed."""
    import subprocess

    for argv in (
        ["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"],
        ["mount", "-t", "debugfs", "none", "/sys/kernel/debug"],
    ):
        subprocess.run(argv, capture_output=True, check=False)
        root = tracefs_root()
        if root:
            return root
    return None


def _kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _headers(release: str) -> tuple[str | None, str | None, bool]:
    """(path, version, linked_from_other_version) of the headers BCC will use."""
    build = Path(f"/lib/modules/{release}/build")
    if not build.exists():
        return None, None, False
    real = build.resolve()
    version = None
    uts = real / "include/generated/utsrelease.h"
    try:
        m = re.search(r'"([^"]+)"', uts.read_text())
        version = m.group(1) if m else None
    except OSError:
        m = re.search(r"linux-headers-(.+)$", real.name)
        version = m.group(1) if m else None
    return str(real), version, bool(version and version != release)


def _cgroup2() -> str | None:
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return None


def _bcc_version() -> str | None:
    """BCC's version, found without importing it: importing BCC maps LLVM (~75 MB resident),
    and only the compiler child process needs it."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        try:
            with open(os.path.join(d, "version.py")) as f:
                m = re.search(r"""__version__\s*=\s*['"]([^'"]+)""", f.read())
        except OSError:
            continue
        if m:
            return m.group(1)
    return "unknown"


def _has_cap_bpf() -> bool:
    """Effective capabilities allow loading tracing BPF: CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN
    (kernels before 5.8). Checked from CapEff, not the uid: root without capabilities cannot."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return bool(eff & (1 << 21)) or (bool(eff & (1 << 39)) and bool(eff & (1 << 38)))
    except OSError:
        pass
    return os.geteuid() == 0


@dataclass(frozen=True)
class Capabilities:
    kernel_release: str
    kernel_version: tuple[int, int]
    btf: bool
    tracefs: str | None
    tracepoints: dict[str, bool] = field(default_factory=dict)
    kprobes: bool = False
    uprobes: bool = False
    ringbuf: bool = False
    cgroup2: str | None = None
    headers: str | None = None
    headers_version: str | None = None
    headers_mismatch: bool = False
    bcc_version: str | None = None
    privileged: bool = False

    def has(self, tp: str) -> bool:
        return self.tracepoints.get(tp, False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def probe() -> Capabilities:
    release = platform.release()
    root = tracefs_root()
    tps: dict[str, bool] = {}
    for group in TRACEPOINTS.values():
        for tp in group:
            tps[tp] = bool(root and os.path.isdir(os.path.join(root, "events", tp)))
    pmu = Path("/sys/bus/event_source/devices")
    kprobes = (pmu / "kprobe").exists() or bool(root and os.path.exists(os.path.join(root, "kprobe_events")))
    uprobes = (pmu / "uprobe").exists() or bool(root and os.path.exists(os.path.join(root, "uprobe_events")))
    headers, hver, mismatch = _headers(release)
    return Capabilities(
        kernel_release=release,
        kernel_version=_kernel_version(release),
        btf=os.path.exists("/sys/kernel/btf/vmlinux"),
        tracefs=root,
        tracepoints=tps,
        kprobes=kprobes,
        uprobes=uprobes,
        ringbuf=_kernel_version(release) >= (5, 8),
        cgroup2=_cgroup2(),
        headers=headers,
        headers_version=hver,
        headers_mismatch=mismatch,
        bcc_version=_bcc_version(),
        privileged=_has_cap_bpf(),
    )
