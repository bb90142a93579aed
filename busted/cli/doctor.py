"""``busted doctor``: what this kernel offers, which probe tiers busted would use, and
(``--security``) the installation as a root monitor trusts it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from busted._text import printable as _p
from busted.cli.outputs import _parse_probes
from busted.errors import BustedError, UsageError

# -- doctor ------------------------------------------------------------------------------------

# What a tier costs or lacks that its availability does not say (docs/kernel.md, tiers).
_TIER_NOTES = {
    ("bytes", "syscall"): " (syscall tracepoints: every syscall of every process pays the slow path)",
    ("capture", "cgroup"): " (cgroup skb + sock_addr programs on the cgroup v2 root: per packet, no syscall hook)",
    ("capture", "syscall"): " (syscall tracepoints: every syscall of every process pays the slow path)",
    ("lineage", "tracepoint"): " (argv from /proc when the exec is decoded)",
    ("lineage", "sched-fork"): " (argv from /proc when the exec is decoded)",
    ("lineage", "syscall"): " (opt-in: argv copied at execve; syscall tracepoints tax every syscall)",
}

_UNPRIVILEGED = ("not running as root, and without CAP_BPF+CAP_PERFMON: this user cannot load BPF or see "
                 "tracefs. Run `sudo busted doctor`.")


_WITHOUT_PLAINTEXT = "flows + SNI classification only (no LlmCall or McpMessage events)"
_TLS_FILES_SHOWN = 8


def _llm_calls_report(caps: Any, plan: Any) -> dict[str, Any]:
    """Whether LLM calls can be read here (the plan's ``plaintext`` tier, uprobes) and, if so,
    which TLS library files would be probed (``tlslibs.scan()``; the list is cut at a few)."""
    from busted.ebpf import tlslibs
    from busted.ebpf.plan import _plaintext_why_not

    # Without a plan (no privileges, a forced tier refused) only the kernel's side can be judged.
    why = _plaintext_why_not(caps, plan.capture, plan.bytes) if plan else \
        _plaintext_why_not(caps, "syscall", "tracepoint")
    tier = plan.plaintext if plan else None
    if plan and tier == "off" and why is None:
        why = "turned off (--probes plaintext=off)"
    d: dict[str, Any] = {"uprobes": caps.uprobes, "plaintext": tier, "why_not": why, "tls_files": None,
                         "tls_files_total": None, "without": _WITHOUT_PLAINTEXT}
    if caps.uprobes and caps.privileged:  # unprivileged, other processes' maps are unreadable
        try:
            found = tlslibs.scan()
        except OSError as exc:  # /proc vanished under us: say so, do not fail the doctor
            d["why_not_scanned"] = str(exc)
        else:
            d["tls_files"] = [{"path": p, "kind": k} for p, k in sorted(found.items())][:_TLS_FILES_SHOWN]
            d["tls_files_total"] = len(found)
    return d


def _doctor_security(args: argparse.Namespace, out: TextIO) -> int:
    from busted.cli.security import FAIL, render, security_checks

    checks = security_checks(**{k: getattr(args, k) for k in ("policy", "prices", "store", "jsonl", "metrics", "ui")})
    if args.json:
        json.dump({"security": [c.to_dict() for c in checks]}, out, indent=2)
        out.write("\n")
    else:
        for line in render(checks):  # paths are printed, never interpreted
            out.write(_p(line) + "\n")
    return 1 if any(c.status == FAIL for c in checks) else 0


def _doctor(args: argparse.Namespace, out: TextIO) -> int:
    if args.security:
        return _doctor_security(args, out)
    given = [f for f in ("policy", "prices", "store", "jsonl", "metrics", "ui") if getattr(args, f)]
    if given:
        raise UsageError(f"doctor --{given[0]} is checked only with --security; add --security")
    from busted.ebpf.loader import MAX_FLOWS, RINGBUF_BYTES, build_source
    from busted.ebpf.plan import (
        BYTES_TIERS,
        CAPTURE_TIERS,
        LIFECYCLE_TIERS,
        LINEAGE_TIERS,
        _bytes_ok,
        _capture_ok,
        _lifecycle_ok,
        _lineage_ok,
        choose_plan,
        syscall_tiers,
    )
    from busted.ebpf.probe import probe

    force = _parse_probes(args.probes)
    caps = probe()
    # Without privileges tracefs is invisible, so every tracepoint would look MISSING: say why instead.
    hidden = not caps.privileged and caps.tracefs is None
    plan = None
    plan_err = None
    if not caps.privileged:
        plan_err = _UNPRIVILEGED
    else:
        try:
            plan = choose_plan(caps, force)
        except BustedError as exc:
            plan_err = str(exc)
    if args.ebpf:
        if plan is None:
            print(_p(f"busted: {plan_err}"), file=sys.stderr)
            return 1
        # Exactly what Monitor() loads: the same defaults (a test pins Monitor's to these).
        out.write(build_source(plan, ringbuf_bytes=RINGBUF_BYTES, max_flows=MAX_FLOWS))
        return 0
    if args.json:
        d = caps.to_dict()
        if hidden:
            d["tracefs"] = d["tracepoints"] = None  # unknown, not absent
        d["plan"] = plan.describe() if plan else None
        d["plan_syscall_tiers"] = syscall_tiers(plan) if plan else None
        d["plan_error"] = plan_err
        d["llm_calls"] = _llm_calls_report(caps, plan)
        json.dump(d, out, indent=2)
        out.write("\n")
        return 0 if plan else 1

    def yn(b: bool) -> str:
        return "yes" if b else "NO"

    def w(line: str) -> None:  # paths, versions and BCC's words are printed, never interpreted
        out.write(_p(line) + "\n")

    if not caps.privileged:
        w(f"NOT PRIVILEGED  uid {os.geteuid()}: {_UNPRIVILEGED}")
        if hidden:
            w("                tracefs, tracepoints and tiers below are unknown, not missing.")
    w(f"kernel          {caps.kernel_release}")
    w(f"privileges      {'root/CAP_BPF' if caps.privileged else 'NO (see the first line)'}")
    w(f"bcc             {caps.bcc_version or 'NOT importable (apt-get install python3-bpfcc)'}")
    if caps.headers:
        note = ""
        if caps.headers_mismatch:
            note = (f"  (linked from another kernel: {caps.headers_version}; safe because busted's BPF "
                    "reads no kernel-internal struct)")
        w(f"headers         {caps.headers}{note}")
    else:
        w(f"headers         NOT found for {caps.kernel_release}: install linux-headers-{caps.kernel_release}"
          " or run ./bootstrap.sh")
    w(f"BTF             {yn(caps.btf)}")
    from busted.ebpf.bytecode import cache_dir

    cdir = cache_dir()
    if cdir is None:
        w("bytecode cache  off (BUSTED_BPF_CACHE=off): every start compiles (~2 s)")
    else:
        n = len([f for f in os.listdir(cdir) if f.endswith(".json")]) if os.path.isdir(cdir) else 0
        w(f"bytecode cache  {cdir} ({n} compiled; BUSTED_BPF_CACHE moves or disables it)")
    if hidden:
        w("tracefs         unknown (not visible without privileges)")
    else:
        w(f"tracefs         {caps.tracefs or 'NOT mounted (mount -t tracefs nodev /sys/kernel/tracing)'}")
    w(f"kprobes         {'available' if caps.kprobes else 'unavailable (no kprobe PMU / CONFIG_KPROBES off)'}")
    w(f"uprobes         {'available' if caps.uprobes else 'unavailable'}")
    w(f"ring buffer     {yn(caps.ringbuf)}")
    w(f"cgroup v2       {caps.cgroup2 or 'not mounted'}")
    if hidden:
        w("tracepoints     unknown: not visible without privileges")
        w("tiers           unknown: not visible without privileges")
    else:
        w("tracepoints")
        for tp, ok in sorted(caps.tracepoints.items()):
            if not tp.startswith("syscalls/") or not ok:
                w(f"  {tp:<36}{'present' if ok else 'MISSING'}")
        nsys = sum(1 for tp, ok in caps.tracepoints.items() if tp.startswith("syscalls/") and ok)
        w(f"  syscalls/* (connect, accept, read, write, ...) {nsys} of "
          f"{sum(1 for tp in caps.tracepoints if tp.startswith('syscalls/'))} present")
        w("tiers")
        for name, tiers, check in (("lifecycle", LIFECYCLE_TIERS, _lifecycle_ok),
                                   ("bytes", BYTES_TIERS, _bytes_ok), ("capture", CAPTURE_TIERS, _capture_ok),
                                   ("lineage", LINEAGE_TIERS, _lineage_ok)):
            for t in tiers:
                why = check(caps, t)
                note = _TIER_NOTES.get((name, t), "")
                w(f"  {name:<10}{t:<12}{'available' if why is None else 'unavailable: ' + why}{note}")
    llm = _llm_calls_report(caps, plan)
    if hidden and not caps.uprobes:
        w("LLM calls       unknown: uprobes are not visible without privileges")
    elif not caps.uprobes:
        w(f"LLM calls       unavailable: this kernel has no uprobes; you see {_WITHOUT_PLAINTEXT}")
    elif plan is None:
        w("LLM calls       unknown until a plan is chosen (uprobes available)")
    elif llm["why_not"]:
        w(f"LLM calls       off: {llm['why_not']}; you see {_WITHOUT_PLAINTEXT}")
    else:
        w("LLM calls       plaintext uprobe: TLS library plaintext and plain HTTP are read")
    if llm["tls_files"] is not None:
        total = llm["tls_files_total"]
        w(f"  TLS files to probe: {total}" + ("" if total else " (none found: TLS flows get SNI only)"))
        for f in llm["tls_files"]:
            w(f"  {f['kind']:<10}{f['path']}")
        if total > len(llm["tls_files"]):
            w(f"  ... and {total - len(llm['tls_files'])} more")
    if plan:
        w("chosen plan")
        for k, v in plan.describe().items():
            w(f"  {k:<10}{v}")
        taxed = syscall_tiers(plan)
        w("syscall hooks   " + (f"{', '.join(taxed)} register syscall tracepoints: every syscall of every "
                                 "process pays the tracing slow path" if taxed else
                                 "none (no syscall tracepoint: unrelated syscalls pay nothing)"))
        return 0
    w(f"chosen plan     NONE: {'needs privileges (see the first line)' if not caps.privileged else plan_err}")
    return 1
