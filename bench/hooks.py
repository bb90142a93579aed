"""Kernel cost per hook family: empty BPF programs attached and detached in place under churn.

    sudo flock /tmp/busted-kernel.lock .venv/bin/python bench/hooks.py [--rounds 3] [--pairs 5]
        [--seconds 3] [--procs 4] [--micro-pairs 10] [--families noop,busted-sock-tp,...] [--no-counts]

The churn workload of bench/churn.py (its server and its connection: connect, 8 bytes each way,
close, on 127.0.0.1) runs without a break for the whole run; client processes count connections in
shared memory. This process compiles one BCC object per hook family up front, then, per family,
runs pairs of slices: one with the family's programs attached, one with them detached, order
alternating between pairs (so a linear drift cancels over two pairs). Attaching and detaching are
done here, between slices (no process start-up, no compile inside a slice). A pair's ratio is
the attached slice's connections/s over the detached slice's. The family ``noop`` attaches nothing:
its ratios are the noise floor. Families rotate order between rounds.

Two figures per pair: the connection-rate ratio (attached/detached, < 1 = slower) and the workload's
CPU time per connection ratio (attached/detached from /proc/PID/schedstat of the server and clients,
> 1 = dearer). The second is what the hooks cost the workload's own CPU; other load on the machine
takes CPU away (rate) without changing the work per connection, though its cache and scheduler
contention still move it (docs/benchmarks.md: on a shared VM both stay noisy).

Micro loops, first and in this process's own thread CPU time (robust to other load): getppid(),
which no family hooks (its extra cost is the syscall tracing slow path alone), and a UDP datagram to
itself on 127.0.0.1 (per-call and per-packet hooks). Attached minus detached, ns per operation.

Every program is empty (returns 0, or 1 where 0 would drop or deny): the figure is the kernel's cost
of the hook itself (dispatch, argument marshalling, the syscall tracing slow path), the floor under
whatever a real program then does. With counts on (the default), a last slice per family is run with
``kernel.bpf_stats_enabled=1`` to read how often each family's programs ran per connection (stats
collection costs time itself, so that slice is not used for ratios).

Traffic is loopback only; every loop is bounded; programs are detached in ``finally`` (SIGINT and
SIGTERM unwind there); cgroup programs are BPF links and tracepoints perf/raw fds, so the kernel
detaches them even if the bench is SIGKILLed; the workload processes die with the bench.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing as mp
import os
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from churn import ping, server  # noqa: E402 - the same loopback server and connection as the churn bench

# ---------------------------------------------------------------------------------------------
# Hook families. A hook is (kind, target): "tp" = a tracepoint "cat:name" through perf
# (BPF_PROG_TYPE_TRACEPOINT, what BCC's attach_tracepoint and busted use); "raw" = a raw tracepoint
# by name (BPF_RAW_TRACEPOINT_OPEN); "cgroup" = a cgroup attach type on the cgroup v2 root.
# The busted sets mirror busted/ebpf/loader.py (_TP_ATTACH tracepoint tiers, the destroy hook,
# _CAPTURE_ATTACH, _LINEAGE_ATTACH + _LINEAGE_OPTIONAL) at the time of writing.

Hook = tuple[str, str]

_SOCK_TPS = ["sock:inet_sock_set_state", "sock:sock_send_length", "sock:sock_recv_length",
             "tcp:tcp_destroy_sock"]
_READS = ("read", "readv", "recvfrom", "recvmsg")
_WRITES = ("write", "writev", "sendto", "sendmsg")
_CAPTURE_TPS = (["syscalls:sys_enter_connect", "syscalls:sys_exit_connect", "syscalls:sys_enter_close"]
                + [f"syscalls:sys_enter_{n}" for n in _WRITES + _READS]
                + [f"syscalls:sys_exit_{n}" for n in _READS])
_LINEAGE_TPS = ["task:task_newtask", "syscalls:sys_enter_execve", "syscalls:sys_exit_execve",
                "sched:sched_process_exec", "sched:sched_process_exit",
                "syscalls:sys_enter_execveat", "syscalls:sys_exit_execveat"]
_LINEAGE_SCHED_TPS = ["task:task_newtask", "sched:sched_process_exec", "sched:sched_process_exit"]

FAMILIES: dict[str, tuple[str, list[Hook]]] = {
    "noop": ("nothing attached: the noise floor", []),
    "busted-sock-tp": ("busted's flow hooks (lifecycle + bytes + destroy), tracepoint form",
                       [("tp", t) for t in _SOCK_TPS]),
    "capture-syscalls": ("busted's capture hooks: syscall tracepoints", [("tp", t) for t in _CAPTURE_TPS]),
    "one-syscall-tp": ("sys_enter_execve only", [("tp", "syscalls:sys_enter_execve")]),
    "lineage": ("busted's lineage hooks, tier syscall (opt-in since issue 21)", [("tp", t) for t in _LINEAGE_TPS]),
    "lineage-sched": ("busted's lineage hooks, default tier: no syscall tracepoint",
                      [("tp", t) for t in _LINEAGE_SCHED_TPS]),
    "raw-sock": ("the flow hooks as raw tracepoints", [("raw", t.split(":")[1]) for t in _SOCK_TPS]),
    "raw-syscalls": ("raw_syscalls sys_enter + sys_exit as raw tracepoints",
                     [("raw", "sys_enter"), ("raw", "sys_exit")]),
    "cgroup-skb": ("cgroup skb ingress + egress on the cgroup v2 root",
                   [("cgroup", "CGROUP_INET_INGRESS"), ("cgroup", "CGROUP_INET_EGRESS")]),
    "sock-ops": ("sock_ops on the cgroup v2 root", [("cgroup", "CGROUP_SOCK_OPS")]),
    "busted-sock-mixed": ("the flow hooks, inet_sock_set_state as a tracepoint (its 4-tuple is in the "
                          "event record), send/recv length and destroy as raw tracepoints",
                          [("tp", "sock:inet_sock_set_state")] + [("raw", t.split(":")[1]) for t in _SOCK_TPS[1:]]),
    "capture-cgroup": ("a capture without syscall hooks: cgroup skb ingress + egress, sock_addr connect4/6 and "
                       "udp sendmsg4/6 on the cgroup v2 root",
                       [("cgroup", t) for t in ("CGROUP_INET_INGRESS", "CGROUP_INET_EGRESS", "CGROUP_INET4_CONNECT",
                                                "CGROUP_INET6_CONNECT", "CGROUP_UDP4_SENDMSG", "CGROUP_UDP6_SENDMSG")]),
    "tcp-probe": ("tcp:tcp_probe (busted's arrival.c: once per received TCP segment)", [("tp", "tcp:tcp_probe")]),
    "busted-all": ("all of busted's current hooks: flow + capture + lineage",
                   [("tp", t) for t in _SOCK_TPS + _CAPTURE_TPS + _LINEAGE_TPS]),
}

# One function per program type and, for cgroup hooks, per attach type (sock_addr programs are loaded
# for their attach type): BCC caches a loaded function by name, whatever its type. Cgroup programs
# return 1 (let the packet pass, allow the connect/sendmsg); 0 would drop or deny.
_CGROUP_PROG = {
    "CGROUP_INET_INGRESS": "CGROUP_SKB", "CGROUP_INET_EGRESS": "CGROUP_SKB",
    "CGROUP_SOCK_OPS": "SOCK_OPS",
    "CGROUP_INET4_CONNECT": "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT": "CGROUP_SOCK_ADDR",
    "CGROUP_UDP4_SENDMSG": "CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG": "CGROUP_SOCK_ADDR",
}
_EMPTY_C = "int bh_tp(void *ctx) { return 0; }\nint bh_raw(void *ctx) { return 0; }\n" + "".join(
    f"int bh_{t.lower()}(void *ctx) {{ return 1; }}\n" for t in _CGROUP_PROG)

# ---------------------------------------------------------------------------------------------
# Statistics (pure).


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q out of range: {q}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_ci(values: Sequence[float], conf: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median: the order statistics x(j), x(k)
    with P(j <= B < k) >= conf for B ~ Binomial(n, 1/2). Widest (min, max) when n is too small."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci of no values")
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    # Symmetric: drop j order statistics from each end while the covered mass stays >= conf.
    j = 0
    while j + 1 < (n + 1) // 2 and 1.0 - 2 * sum(pmf[: j + 2]) >= conf:
        j += 1
    return xs[j], xs[n - 1 - j]


def paired_ratios(pairs: Sequence[tuple[float, float]]) -> list[float]:
    """attached/detached rate per pair; a pair whose detached slice saw nothing is skipped."""
    return [on / off for on, off in pairs if off > 0]


def summarize(ratios: Sequence[float]) -> dict[str, float]:
    """median, p10, p90 and a 95 % CI of the median of paired ratios."""
    lo, hi = median_ci(ratios)
    return {"n": len(ratios), "median": statistics.median(ratios), "p10": quantile(ratios, 0.1),
            "p90": quantile(ratios, 0.9), "ci_lo": lo, "ci_hi": hi}


def attached_first(pair_index: int) -> bool:
    """Slice order within a pair: on/off, off/on, on/off, ... (linear drift cancels over 2 pairs)."""
    return pair_index % 2 == 0


def rotate(items: Sequence[str], k: int) -> list[str]:
    """items rotated left by k (family order per round)."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


# ---------------------------------------------------------------------------------------------
# Workload: the churn server and connection, clients counting in shared memory.


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): a killed bench leaves no workload behind."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _server(port_q: mp.Queue, stop_at: float) -> None:
    _die_with_parent()
    server(port_q, stop_at)


def counting_client(port: int, slot: int, counts: ctypes.Array, stop_at: float) -> None:
    _die_with_parent()
    while time.monotonic() < stop_at:
        if ping(port):
            counts[slot] += 1  # only this process writes this slot


class Workload:
    def __init__(self, procs: int, seconds: float) -> None:
        self.counts = mp.RawArray(ctypes.c_uint64, procs)
        stop_at = time.monotonic() + seconds
        port_q: mp.Queue = mp.Queue()
        self.srv = mp.Process(target=_server, args=(port_q, stop_at + 2), daemon=True)
        self.srv.start()
        port = port_q.get(timeout=10)
        self.clients = [mp.Process(target=counting_client, args=(port, i, self.counts, stop_at), daemon=True)
                        for i in range(procs)]
        for p in self.clients:
            p.start()

    def total(self) -> int:
        return sum(self.counts[:])

    def cpu_ns(self) -> int:
        """CPU time of the server and clients so far (schedstat, ns). Without IRQ time accounting
        (this kernel) loopback softirq work done in a workload process is charged to it too."""
        total = 0
        for p in [self.srv, *self.clients]:
            with open(f"/proc/{p.pid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total

    def rate(self, seconds: float) -> tuple[float, int, float]:
        """Over the next ``seconds`` (this process sleeps meanwhile): connections/s, connections,
        and the workload's CPU ns per connection."""
        c0, n0, t0 = self.total(), self.cpu_ns(), time.monotonic()
        time.sleep(seconds)
        c1, n1, t1 = self.total(), self.cpu_ns(), time.monotonic()
        conns = c1 - c0
        return conns / (t1 - t0), conns, (n1 - n0) / conns if conns else 0.0

    def stop(self) -> None:
        for p in [*self.clients, self.srv]:
            p.kill()
        for p in [*self.clients, self.srv]:
            p.join(5)


# ---------------------------------------------------------------------------------------------
# Attaching and detaching in place.

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}[os.uname().machine]

# bpf(BPF_LINK_CREATE): a cgroup attachment owned by a file descriptor, so the kernel detaches it
# when this process exits however it exits (a BPF_PROG_ATTACH attachment would outlive a SIGKILL).
# Links share the cgroup with other programs (multi mode). union bpf_attr.link_create (uapi): prog_fd,
# target_fd, attach_type, flags.
_BPF_LINK_CREATE = 28


def cgroup_link(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    attr = ctypes.create_string_buffer(struct.pack("<IIII", prog_fd, cgroup_fd, attach_type, 0), 64)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_BPF_SYSCALL, _BPF_LINK_CREATE, attr, 64)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"BPF_LINK_CREATE attach type {attach_type}")
    return fd


def cgroup2_root() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    raise RuntimeError("no cgroup v2 mount")


class Family:
    """One BCC object with the empty programs for a family; attach() / detach() in place."""

    def __init__(self, name: str, hooks: list[Hook], cgroup_fd: int) -> None:
        from bcc import BPF, BPFAttachType

        self.name, self.hooks, self.cgroup_fd = name, hooks, cgroup_fd
        self.bpf = BPF(text=_EMPTY_C) if hooks else None
        self.attached: list[Hook] = []
        self.links: dict[str, int] = {}  # cgroup attach type -> link fd
        self.fns: dict[str, object] = {}
        if self.bpf is not None:  # load now: no verifier run inside a slice
            for kind, target in hooks:
                if kind == "tp":
                    self.fns["tp"] = self.bpf.load_func(b"bh_tp", BPF.TRACEPOINT)
                elif kind == "raw":
                    self.fns["raw"] = self.bpf.load_func(b"bh_raw", BPF.RAW_TRACEPOINT)
                else:
                    self.fns[target] = self.bpf.load_func(f"bh_{target.lower()}".encode(),
                                                          getattr(BPF, _CGROUP_PROG[target]),
                                                          attach_type=getattr(BPFAttachType, target))

    def attach(self) -> None:
        from bcc import BPFAttachType

        for kind, target in self.hooks:
            if kind == "tp":
                self.bpf.attach_tracepoint(tp=target.encode(), fn_name=b"bh_tp")
            elif kind == "raw":
                self.bpf.attach_raw_tracepoint(tp=target.encode(), fn_name=b"bh_raw")
            else:
                self.links[target] = cgroup_link(self.fns[target].fd, self.cgroup_fd,
                                                 getattr(BPFAttachType, target))
            self.attached.append((kind, target))

    def detach(self) -> None:
        """Detach everything attached; never raises on a hook that is already gone."""
        while self.attached:
            kind, target = self.attached.pop()
            try:
                if kind == "tp":
                    self.bpf.detach_tracepoint(tp=target.encode())
                elif kind == "raw":
                    self.bpf.detach_raw_tracepoint(tp=target.encode())
                else:
                    os.close(self.links.pop(target))
            except Exception as exc:  # noqa: BLE001 - keep detaching the rest
                print(f"detach {kind} {target}: {exc}", file=sys.stderr)

    def prog_fds(self) -> list[int]:
        return [fn.fd for fn in self.fns.values()]

    def close(self) -> None:
        self.detach()
        if self.bpf is not None:
            self.bpf.cleanup()


# bpf(BPF_OBJ_GET_INFO_BY_FD) into struct bpf_prog_info (uapi): run_time_ns at 192, run_cnt at 200.
_INFO_SIZE = 232


def prog_runs(fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of the program behind fd; counted only while bpf_stats are enabled."""
    info = ctypes.create_string_buffer(_INFO_SIZE)
    attr = ctypes.create_string_buffer(struct.pack("<IIQ", fd, _INFO_SIZE, ctypes.addressof(info)), 16)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_BPF_SYSCALL, 15, attr, 16) != 0:
        raise OSError(ctypes.get_errno(), "BPF_OBJ_GET_INFO_BY_FD")
    run_time_ns, run_cnt = struct.unpack_from("<QQ", info.raw, 192)
    return run_cnt, run_time_ns


_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def count_slice(fam: Family, wl: Workload, seconds: float) -> dict:
    """One attached slice with bpf_stats on: program runs per connection and ns per run."""
    before = [prog_runs(fd) for fd in fam.prog_fds()]
    old = Path(_STATS).read_text().strip()
    Path(_STATS).write_text("1")
    try:
        fam.attach()
        try:
            rate, conns, _ = wl.rate(seconds)
        finally:
            fam.detach()
    finally:
        Path(_STATS).write_text(old)
    after = [prog_runs(fd) for fd in fam.prog_fds()]
    runs = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    ns = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return {"conns": conns, "runs": runs, "runs_per_conn": runs / conns if conns else 0.0,
            "ns_per_run": ns / runs if runs else 0.0}


# ---------------------------------------------------------------------------------------------
# Micro loops, before the churn workload starts, in this thread: its own CPU time per operation (thread_time_ns),
# which other load on the machine barely moves. getppid() is hooked by no family: its cost is the
# syscall tracing slow path alone. A UDP datagram to itself on 127.0.0.1 (send + recv on connected
# sockets) passes sock_send/recv_length, sendto/recvfrom, and cgroup skb egress + ingress.

_MICRO_SYSCALLS = 200_000
_MICRO_UDP = 20_000


def paired_deltas(pairs: Sequence[tuple[float, float]]) -> list[float]:
    """attached - detached per pair (ns per operation)."""
    return [on - off for on, off in pairs]


class Micro:
    def __init__(self) -> None:
        self.a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.a.bind(("127.0.0.1", 0))
        self.b.bind(("127.0.0.1", 0))
        self.a.connect(self.b.getsockname())
        self.b.connect(self.a.getsockname())
        # A TCP pair on 127.0.0.1: per-segment TCP hooks (tcp_probe) see its traffic, UDP's do not.
        with socket.create_server(("127.0.0.1", 0)) as lst:
            self.c = socket.create_connection(lst.getsockname())
            self.d, _ = lst.accept()
        for s in (self.c, self.d):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def measure(self) -> dict[str, float]:
        getppid = os.getppid
        t = time.thread_time_ns()
        for _ in range(_MICRO_SYSCALLS):
            getppid()
        syscall_ns = (time.thread_time_ns() - t) / _MICRO_SYSCALLS
        send, recv = self.a.send, self.b.recv
        t = time.thread_time_ns()
        for _ in range(_MICRO_UDP):
            send(b"x")
            recv(8)
        udp_ns = (time.thread_time_ns() - t) / _MICRO_UDP
        send, recv = self.c.send, self.d.recv
        t = time.thread_time_ns()
        for _ in range(_MICRO_UDP):
            send(b"x")
            recv(8)
        tcp_ns = (time.thread_time_ns() - t) / _MICRO_UDP
        return {"getppid_ns": syscall_ns, "udp_ns": udp_ns, "tcp_ns": tcp_ns}

    def close(self) -> None:
        for s in (self.a, self.b, self.c, self.d):
            s.close()


def run_micro(fams: dict[str, Family], names: list[str], pairs: int, out: dict[str, list[dict]]) -> None:
    """Fills ``out`` (family -> pairs) in place, so an interrupted run keeps what it measured."""
    micro = Micro()
    out.update({n: [] for n in names})
    try:
        micro.measure()  # warm caches and the allocator
        for i in range(pairs):
            for n in rotate(names, i):
                got = {}
                for on in ((True, False) if attached_first(i) else (False, True)):
                    try:
                        if on:
                            fams[n].attach()
                        got[on] = micro.measure()
                    finally:
                        fams[n].detach()
                out[n].append({"on": got[True], "off": got[False]})
    finally:
        micro.close()


def micro_summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    res = {}
    for k in rows[0]["on"] if rows else ():
        d = paired_deltas([(r["on"][k], r["off"][k]) for r in rows])
        res[k] = {"delta_median": statistics.median(d), "delta_p10": quantile(d, 0.1),
                  "delta_p90": quantile(d, 0.9), "off_median": statistics.median(r["off"][k] for r in rows)}
    return res


# ---------------------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict:
    names = a.families.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families: {unknown}; known: {', '.join(FAMILIES)}")
    cg_fd = os.open(cgroup2_root(), os.O_RDONLY)
    fams: dict[str, Family] = {}
    wl = None
    pairs: dict[str, list[dict]] = {n: [] for n in names}
    counts: dict[str, dict] = {}
    micro: dict[str, list[dict]] = {}
    try:
        t = time.monotonic()
        for n in names:
            fams[n] = Family(n, FAMILIES[n][1], cg_fd)
        print(f"compiled and loaded {len(fams)} families in {time.monotonic() - t:.1f} s", file=sys.stderr)
        # The workload's whole life, bounded: slices, gaps, counts, with room to spare.
        budget = (a.rounds * len(names) * a.pairs * 2 * (a.seconds + a.settle) + len(names) * (a.seconds + 1)
                  + 60 + a.warmup)
        if a.micro_pairs:  # first: quick, and the churn workload is not running yet
            run_micro(fams, names, a.micro_pairs, micro)
            save(a.out, build(a, names, pairs, counts, micro))
            for n in names:
                m = micro_summary(micro[n])
                print(f"micro {n}: getppid {m['getppid_ns']['delta_median']:+.0f} ns, "
                      f"UDP send+recv {m['udp_ns']['delta_median']:+.0f} ns, "
                      f"TCP send+recv {m['tcp_ns']['delta_median']:+.0f} ns", file=sys.stderr, flush=True)
        if a.rounds:
            wl = Workload(a.procs, budget)
            time.sleep(a.warmup)
        for r in range(a.rounds):
            for n in rotate(names, r):
                fam = fams[n]
                for i in range(a.pairs):
                    got = {}
                    for on in ((True, False) if attached_first(i) else (False, True)):
                        try:
                            if on:
                                fam.attach()
                            time.sleep(a.settle)
                            rate, _, cpu = wl.rate(a.seconds)
                            got[on] = (rate, cpu)
                        finally:
                            fam.detach()
                    pairs[n].append({"round": r, "pair": i, "on": got[True][0], "off": got[False][0],
                                     "on_cpu_ns": got[True][1], "off_cpu_ns": got[False][1]})
                rs = paired_ratios([(p["on"], p["off"]) for p in pairs[n] if p["round"] == r])
                cs = paired_ratios([(p["on_cpu_ns"], p["off_cpu_ns"]) for p in pairs[n] if p["round"] == r])
                print(f"round {r} {n}: median ratio {statistics.median(rs):.3f} "
                      f"({min(rs):.3f}..{max(rs):.3f}), CPU/conn {statistics.median(cs):.3f} "
                      f"({min(cs):.3f}..{max(cs):.3f}), ~{pairs[n][-1]['off']:.0f} conn/s off",
                      file=sys.stderr, flush=True)
                save(a.out, build(a, names, pairs, counts, micro))  # an interrupted run keeps what it measured
        if a.counts and wl is not None:
            for n in names:
                if fams[n].hooks:
                    time.sleep(a.settle)
                    counts[n] = count_slice(fams[n], wl, a.seconds)
    finally:
        for fam in fams.values():
            fam.close()
        if wl is not None:
            wl.stop()
        os.close(cg_fd)
        save(a.out, build(a, names, pairs, counts, micro))
    return build(a, names, pairs, counts, micro)


def build(a: argparse.Namespace, names: list[str], pairs: dict[str, list[dict]], counts: dict[str, dict],
          micro: dict[str, list[dict]]) -> dict:
    """The result document from whatever has been measured so far."""
    table = []
    for n in names:
        row = {"family": n, "what": FAMILIES[n][0], "hooks": [f"{k}:{t}" for k, t in FAMILIES[n][1]]}
        if pairs[n]:
            row.update(**summarize(paired_ratios([(p["on"], p["off"]) for p in pairs[n]])),
                       cpu=summarize(paired_ratios([(p["on_cpu_ns"], p["off_cpu_ns"]) for p in pairs[n]])),
                       conn_per_s_off=statistics.median(p["off"] for p in pairs[n]),
                       cpu_us_per_conn_off=statistics.median(p["off_cpu_ns"] for p in pairs[n]) / 1e3)
        if micro.get(n):
            row["micro"] = micro_summary(micro[n])
        if n in counts:
            row.update(runs_per_conn=counts[n]["runs_per_conn"], ns_per_run=counts[n]["ns_per_run"])
        table.append(row)
    return {"args": vars(a), "kernel": os.uname().release, "cpus": os.cpu_count(), "pairs": pairs,
            "counts": counts, "micro": micro, "table": table}


def save(path: str, res: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


def markdown(res: dict) -> str:
    a = res["args"]
    out = [f"kernel {res['kernel']}, {res['cpus']} CPUs"]
    if a["rounds"]:
        out += ["", f"Churn: {a['rounds']} rounds x {a['pairs']} pairs x {a['seconds']:g} s slices, "
                f"{a['procs']} client processes", "",
                "| family | hooks | conn/s ratio: median | p10–p90 | 95% CI of median "
                "| CPU/conn ratio: median | p10–p90 | 95% CI of median | pairs | runs/conn | ns/run |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in res["table"]:
            rpc = f"{row['runs_per_conn']:.1f}" if "runs_per_conn" in row else "–"
            npr = f"{row['ns_per_run']:.0f}" if "ns_per_run" in row else "–"
            c = row["cpu"]
            out.append(f"| {row['family']} | {len(row['hooks'])} | {row['median']:.3f} | "
                       f"{row['p10']:.3f}–{row['p90']:.3f} | {row['ci_lo']:.3f}–{row['ci_hi']:.3f} | "
                       f"{c['median']:.3f} | {c['p10']:.3f}–{c['p90']:.3f} | {c['ci_lo']:.3f}–{c['ci_hi']:.3f} | "
                       f"{row['n']} | {rpc} | {npr} |")
    if a["micro_pairs"]:
        out += ["", f"Micro loops: {a['micro_pairs']} pairs, ns per operation attached - detached "
                "(median, p10..p90), this thread's CPU time", "",
                "| family | getppid(): Δ ns | (p10..p90) | UDP send+recv: Δ ns | (p10..p90) "
                "| TCP send+recv: Δ ns | (p10..p90) |", "|---|---|---|---|---|---|---|"]
        for row in res["table"]:
            m = row.get("micro")
            if m:
                cells = [f"{m[k]['delta_median']:+.0f} | {m[k]['delta_p10']:+.0f}..{m[k]['delta_p90']:+.0f}"
                         if k in m else "– | –" for k in ("getppid_ns", "udp_ns", "tcp_ns")]
                out.append(f"| {row['family']} | " + " | ".join(cells) + " |")
        base = next((r["micro"] for r in res["table"] if r.get("micro")), None)
        if base:
            out.append(f"\ndetached: getppid() {base['getppid_ns']['off_median']:.0f} ns, "
                       f"UDP send+recv {base['udp_ns']['off_median']:.0f} ns"
                       + (f", TCP send+recv {base['tcp_ns']['off_median']:.0f} ns" if "tcp_ns" in base else ""))
    return "\n".join(out)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks that detach


def main() -> None:
    # A shell starts background jobs with SIGINT ignored; a bench must stop cleanly on INT and TERM.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=5, help="attached/detached slice pairs per family per round")
    ap.add_argument("--seconds", type=float, default=3.0, help="one slice")
    ap.add_argument("--settle", type=float, default=0.25, help="pause after attach/detach before counting")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--no-counts", dest="counts", action="store_false",
                    help="skip the bpf_stats slice that counts program runs per connection")
    ap.add_argument("--micro-pairs", type=int, default=10,
                    help="attached/detached pairs of the micro loops per family, run first (0: none)")
    ap.add_argument("--out", default=str(HERE / "results" / "hooks.json"))
    a = ap.parse_args()
    if a.rounds < 0 or a.pairs < 1 or a.seconds <= 0 or a.micro_pairs < 0:
        raise SystemExit("--pairs and --seconds must be positive, --rounds and --micro-pairs not negative")
    print(markdown(run(a)))  # run() saved it to --out


if __name__ == "__main__":
    main()
