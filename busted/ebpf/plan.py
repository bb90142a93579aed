"""The probe plan: which tier serves each capability, chosen from the capability probe.

Every tier can be forced (``Monitor(probes={"bytes": "syscall"})``) so tests cover each one; a
forced tier the kernel cannot run raises ``ProbeUnavailable`` saying what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from busted.ebpf.probe import TRACEPOINTS, Capabilities
from busted.errors import ProbeUnavailable

__all__ = ["BYTES_TIERS", "CAPTURE_TIERS", "LIFECYCLE_TIERS", "LINEAGE_TIERS", "ProbePlan", "choose_plan",
           "syscall_tiers"]

LIFECYCLE_TIERS = ("tracepoint", "kprobe")
BYTES_TIERS = ("tracepoint", "syscall", "kprobe")
# Process lineage (lineage.c), best first. No tier but "syscall" registers a syscall tracepoint
# (each one puts every syscall of every process on the tracing slow path: docs/benchmarks.md):
#   "tracepoint"  task:task_newtask (threads skipped in the kernel) + sched:sched_process_{exec,exit};
#                 argv read from /proc when the exec record is decoded
#   "sched-fork"  the same with sched:sched_process_fork (thread creations reach user space too)
#   "syscall"     "tracepoint" + syscalls:sys_{enter,exit}_execve{,at}: argv copied in the kernel at
#                 execve, so processes that exit within a millisecond keep theirs. Opt-in (forced).
#   "off"
LINEAGE_TIERS = ("tracepoint", "sched-fork", "syscall", "off")
# Payload capture (DNS answers, TLS ClientHellos, plain HTTP), best first:
#   "cgroup"   cgroup skb ingress/egress + sock_addr programs on the cgroup v2 root (capture_cgroup.c):
#              per packet of the sockets it follows, nothing on unrelated syscalls
#   "syscall"  the socket syscalls' tracepoints (capture.c): every syscall of the host pays the
#              tracing slow path; for kernels without cgroup v2
#   "off"
CAPTURE_TIERS = ("cgroup", "syscall", "off")
_LINEAGE_COMMON = ("sched/sched_process_exec", "sched/sched_process_exit")
_LINEAGE_EXECVE = ("syscalls/sys_enter_execve", "syscalls/sys_exit_execve")


@dataclass(frozen=True)
class ProbePlan:
    lifecycle: str = "tracepoint"
    bytes: str = "tracepoint"
    # Where flows end: "destroy" (tcp:tcp_destroy_sock, final byte counts) or "close-state".
    flow_end: str = "destroy"
    # One of CAPTURE_TIERS: where DNS answers, TLS ClientHellos and plain-HTTP bytes are copied.
    capture: str = "cgroup"
    # "uprobe": TLS library plaintext (and plain HTTP) for LLM calls; "off".
    plaintext: str = "off"
    # Process lineage from fork/exec/exit tracepoints: one of LINEAGE_TIERS.
    lineage: str = "off"

    def describe(self) -> dict[str, str]:
        return {"lifecycle": self.lifecycle, "bytes": self.bytes, "flow_end": self.flow_end,
                "capture": self.capture, "plaintext": self.plaintext, "lineage": self.lineage}


def _missing(caps: Capabilities, tps: tuple[str, ...]) -> list[str]:
    return [tp for tp in tps if not caps.has(tp)]


def _lifecycle_ok(caps: Capabilities, tier: str) -> str | None:
    """None if the tier can run, else why not."""
    if tier == "tracepoint":
        miss = _missing(caps, ("sock/inet_sock_set_state",))
        return f"missing tracepoint {', '.join(miss)}" if miss else None
    if tier == "kprobe":
        if not caps.kprobes:
            return "this kernel has no kprobes (CONFIG_KPROBES off or no kprobe PMU)"
        miss = _missing(caps, ("syscalls/sys_enter_connect", "syscalls/sys_enter_accept4"))
        return f"missing tracepoint {', '.join(miss)}" if miss else None
    return f"unknown lifecycle tier {tier!r}; choose one of {LIFECYCLE_TIERS}"


def _bytes_ok(caps: Capabilities, tier: str) -> str | None:
    if tier == "tracepoint":
        miss = _missing(caps, TRACEPOINTS["bytes"])
    elif tier == "syscall":
        miss = _missing(caps, TRACEPOINTS["syscall"])
    elif tier == "kprobe":
        return None if caps.kprobes else "this kernel has no kprobes (CONFIG_KPROBES off or no kprobe PMU)"
    else:
        return f"unknown bytes tier {tier!r}; choose one of {BYTES_TIERS}"
    return f"missing tracepoints {', '.join(miss)}" if miss else None


def _lineage_ok(caps: Capabilities, tier: str) -> str | None:
    if tier == "off":
        return None
    if tier == "tracepoint":
        miss = _missing(caps, (*_LINEAGE_COMMON, "task/task_newtask"))
    elif tier == "sched-fork":
        miss = _missing(caps, (*_LINEAGE_COMMON, "sched/sched_process_fork"))
    elif tier == "syscall":
        miss = _missing(caps, (*_LINEAGE_COMMON, "task/task_newtask", *_LINEAGE_EXECVE))
    else:
        return f"unknown lineage tier {tier!r}; choose one of {LINEAGE_TIERS}"
    return f"missing tracepoints {', '.join(miss)}" if miss else None


def syscall_tiers(plan: ProbePlan) -> list[str]:
    """The plan's tiers that register syscall tracepoints ("bytes=syscall", ...): each of them puts
    every syscall of every process on the kernel's tracing slow path (docs/benchmarks.md)."""
    uses = [("lifecycle", "kprobe"), ("bytes", "syscall"), ("capture", "syscall"), ("lineage", "syscall")]
    d = plan.describe()
    return [f"{k}={t}" for k, t in uses if d[k] == t]


def _capture_ok(caps: Capabilities, tier: str) -> str | None:
    if tier == "off":
        return None
    if tier == "cgroup":
        # Which connections to follow comes from the lifecycle tier's connect hook (any tier).
        return None if caps.cgroup2 else "no cgroup v2 mount (its skb and sock_addr programs attach to the v2 root)"
    if tier == "syscall":
        return _missing_text(_missing(caps, TRACEPOINTS["syscall"]))
    return f"unknown capture tier {tier!r}; choose one of {CAPTURE_TIERS}"


def _missing_text(miss: list[str]) -> str | None:
    return f"missing tracepoints {', '.join(miss)}" if miss else None


def lineage_syscall_argv(tier: str) -> bool:
    """Whether the lineage tier copies argv at execve (syscall tracepoints) rather than reading
    /proc when the exec record is decoded."""
    return tier == "syscall"


def choose_plan(caps: Capabilities, force: Mapping[str, str] | ProbePlan | None = None) -> ProbePlan:
    """Pick the best tier per capability, honouring ``force`` (a ProbePlan or a partial mapping)."""
    forced: dict[str, str] = {}
    if isinstance(force, ProbePlan):
        forced = force.describe()
    elif force:
        unknown = set(force) - {"lifecycle", "bytes", "flow_end", "capture", "plaintext", "lineage"}
        if unknown:
            raise ProbeUnavailable(
                f"unknown probe capability {sorted(unknown)}; use keys 'lifecycle' and 'bytes'"
            )
        forced = dict(force)

    def pick(name: str, tiers: tuple[str, ...], check) -> str:
        if name in forced:
            why = check(caps, forced[name])
            if why:
                raise ProbeUnavailable(
                    f"{name} tier {forced[name]!r} was forced but cannot run here: {why}. "
                    f"Run `busted doctor` to see which tiers this kernel supports."
                )
            return forced[name]
        reasons = []
        for t in tiers:
            why = check(caps, t)
            if why is None:
                return t
            reasons.append(f"{t}: {why}")
        raise ProbeUnavailable(f"no {name} tier can run on this kernel ({'; '.join(reasons)})")

    lifecycle = pick("lifecycle", LIFECYCLE_TIERS, _lifecycle_ok)
    lineage = pick("lineage", LINEAGE_TIERS, _lineage_ok)
    nbytes = pick("bytes", BYTES_TIERS, _bytes_ok)
    if lifecycle == "kprobe" and nbytes == "syscall":
        if "bytes" in forced:
            raise ProbeUnavailable(
                "the kprobe lifecycle tier cannot be combined with the syscall bytes tier; "
                "use bytes='kprobe' or bytes='tracepoint'"
            )
        nbytes = "kprobe"
    end = forced.get("flow_end")
    if lifecycle == "kprobe":
        end = "close-state"  # tcp_close() ends flows in that tier
    elif end is None:
        end = "destroy" if caps.has("tcp/tcp_destroy_sock") else "close-state"
    elif end not in ("destroy", "close-state"):
        raise ProbeUnavailable(f"unknown flow_end {end!r}; use 'destroy' or 'close-state'")
    elif end == "destroy" and not caps.has("tcp/tcp_destroy_sock"):
        raise ProbeUnavailable("flow_end 'destroy' needs tracepoint tcp/tcp_destroy_sock")
    capture = pick("capture", CAPTURE_TIERS, _capture_ok)
    plaintext = forced.get("plaintext")
    why_not = _plaintext_why_not(caps, capture, nbytes)
    if plaintext is None:
        plaintext = "off" if why_not else "uprobe"
    elif plaintext not in ("uprobe", "off"):
        raise ProbeUnavailable(f"unknown plaintext tier {plaintext!r}; use 'uprobe' or 'off'")
    elif plaintext == "uprobe" and why_not:
        raise ProbeUnavailable(f"plaintext tier 'uprobe' cannot run here: {why_not}")
    return ProbePlan(lifecycle=lifecycle, bytes=nbytes, flow_end=end, capture=capture, plaintext=plaintext,
                     lineage=lineage)


def _plaintext_why_not(caps: Capabilities, capture: str, nbytes: str) -> str | None:
    """None if LLM-call plaintext can be read here, else why not."""
    if not caps.uprobes:
        return "this kernel has no uprobes (CONFIG_UPROBE_EVENTS off): flows and SNI only"
    if capture == "off":
        return "it needs a capture tier (plain HTTP and connection tracking)"
    if nbytes not in ("tracepoint", "syscall"):
        return "it needs the bytes tier 'tracepoint' or 'syscall' (the join to the socket)"
    return None
