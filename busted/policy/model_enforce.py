"""``model`` deny rules enforced in the kernel (issue 22): compilation and the programs of
busted/ebpf/policy_model.c, loaded by the Enforcer (busted/policy/enforce.py) into its BPF object.

What the kernel can check: a deny rule whose keys are ``model`` (exact names, or a prefix written
``name*``) and optionally one ``uid``, with only deny rules before it (first match wins: an
earlier allow or audit rule could match a request the kernel cannot fully see, so a later model
deny is left to user space rather than blocking what the policy may allow). Names are compared
byte for byte, as user space compares them (``fnmatch`` on the value, case-sensitive): ``gpt-4o``
does not match ``gpt-4o-mini``; names are at most ``NAME_MAX`` bytes. Everything else is reported
by user space at ``llm_request`` (``enforced=False``) and said by ``notes``.

Maps (two generations, like the rest of the policy): ``mdl_names`` (LPM trie: ``name\\0`` for an
exact name, ``name`` for a prefix) -> (rule index, uid check). The kernel's decisions arrive on the
policy's ring as point ``llm_request`` records (``decision``).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from busted.events import Event, EventsLost, LossPlace, PolicyDecision

__all__ = ["MDL_COUNTS", "ModelGuard", "ModelRules", "compile_models"]

NAME_MAX = 64  # MDL_NAME_MAX in policy_model.c
MAX_ENTRIES = 1024  # per generation (mdl_names holds 2 x)
POINT_MODEL = 3
F_UID = 1
# mdl_counts slots; the last four are losses, reported as EventsLost
MDL_COUNTS = ("marked", "dropped", "missed", "ring_full", "map_refused", "beyond_window")
_LOSSES = {
    "missed": (LossPlace.KERNEL_MISS,
               "policy: a denied model's request left from softirq, not stopped (reported as a decision)"),
    "ring_full": (LossPlace.KERNEL_RING, "policy: model decision records lost, ring full (the verdicts stood)"),
    "map_refused": (LossPlace.KERNEL_MAP, "policy: denied model write or socket not recorded (map refused)"),
    "beyond_window": (LossPlace.PARSE,
                      "policy: TLS writes over 4096 bytes with no \"model\" key in their first 4096: "
                      "not judged in the kernel (user space still judges the call)"),
}
# The TLS write entries (tlslibs.TLS_SYMBOLS) and the program for each.
_MVAL = struct.Struct("<IIII")  # struct mdl_val: rule, flags, uid, pad
_PROG_KPROBE, _PROG_TRACEPOINT, _PROG_CGROUP_SKB = 2, 5, 8  # bpf_prog_type
_HOOKS = {"SSL_write": "mdl_ssl_write", "SSL_write_ex": "mdl_ssl_write_ex",
          "gnutls_record_send": "mdl_gnutls_send"}


@dataclass
class ModelRules:
    """A policy's model rules as the kernel holds them."""

    entries: dict[bytes, tuple[int, int, int]] = field(default_factory=dict)  # key -> (rule, flags, uid)
    kernel: set[str] = field(default_factory=set)  # names of the rules the kernel enforces
    notes: list[str] = field(default_factory=list)


def _entry(pattern: str) -> bytes | None:
    """The mdl_names key bytes of a pattern: ``name\\0`` (exact), ``name`` (``name*``), or None
    when the kernel cannot match it (other globs, too long)."""
    if pattern.endswith("*") and not any(ch in pattern[:-1] for ch in "*?["):
        raw = pattern[:-1].encode()
        return raw if 0 < len(raw) <= NAME_MAX else None
    if any(ch in pattern for ch in "*?["):
        return None
    raw = pattern.encode()
    return raw + b"\0" if 0 < len(raw) <= NAME_MAX else None


def compile_models(policy: Any) -> ModelRules:
    """The kernel's share of ``policy``'s model rules (see the module doc)."""
    out = ModelRules()
    earlier_non_deny = None
    for i, r in enumerate(policy.rules):
        if r.model is not None and r.action == "deny":
            others = [k for k in r.match_keys() if k not in ("model", "uid")]
            why = None
            if others:
                why = f"with {', '.join(others)}"
            elif r.uid is not None and len(r.uid) != 1:
                why = "with several uid values"
            elif earlier_non_deny is not None:
                why = f"after the {earlier_non_deny!r} rule, which is not a deny"
            keys = [_entry(p) for p in r.model]
            if why is None and None in keys:
                bad = r.model[keys.index(None)]
                why = f"pattern {bad!r} (the kernel matches exact names and 'prefix*', up to {NAME_MAX} bytes)"
            if why is None and len(out.entries) + len(keys) > MAX_ENTRIES:
                why = f"over the kernel's {MAX_ENTRIES} model names"
            if why is not None:
                out.notes.append(f"{r.name}: model checked in user space only ({why}); not enforced")
            else:
                uid = r.uid[0] if r.uid is not None else 0
                for k in keys:
                    assert k is not None
                    out.entries.setdefault(k, (i, F_UID if r.uid is not None else 0, uid))
                out.kernel.add(r.name)
                out.notes.append(f"{r.name}: model checked in the kernel at the TLS library's write "
                                 "(the request's JSON \"model\" in its first 4096 bytes; docs/policy.md)")
        if r.action != "deny" and earlier_non_deny is None:
            earlier_non_deny = r.name
    # An LPM lookup returns the longest entry only: a shorter prefix entry of another rule with a
    # different uid check would not be consulted for the longer names it covers.
    for k, v in out.entries.items():
        for p, pv in out.entries.items():
            if p != k and not p.endswith(b"\0") and k.startswith(p) and pv[1:] != v[1:]:
                short, longer = p.decode(errors="replace"), k.rstrip(b"\0").decode(errors="replace")
                out.notes.append(f"model patterns {short}* and {longer} have different uid checks: "
                                 "in the kernel the longer one decides for the names both match")
    return out


def check_notes(policy: Any) -> list[str]:
    """What ``busted policy check`` says about the kernel and the policy's model rules."""
    return compile_models(policy).notes


class ModelGuard:
    """The model programs of an Enforcer's BPF object: uprobes on the TLS write functions of every
    library it is given, the egress program on the scope cgroup and the send tracepoint. Attached
    when a policy first has kernel model rules; detached by ``close`` (or process exit)."""

    def __init__(self, obj: Any, cg_fd_of: Any) -> None:
        self.obj = obj  # busted.policy.enforce.PolicyObject: the maps and programs, shared with the Enforcer
        self._cg_fd_of = cg_fd_of  # () -> the scope cgroup's fd (opened by the Enforcer)
        self._links: list[int] = []
        self._files: dict[tuple[int, int], str] = {}
        self.failed: dict[str, str] = {}
        self.attached = False
        self.rules = ModelRules()
        self._reported = dict.fromkeys(_LOSSES, 0)

    # -- maps ----------------------------------------------------------------------------------

    def write(self, rules: ModelRules, gen: int) -> None:
        """Write ``rules`` into generation ``gen`` (the Enforcer flips pol_gen afterwards)."""
        from busted.policy.enforce import lpm_key, lpm_split

        t = self.obj.maps["mdl_names"]
        for k in list(t.keys()):
            if lpm_split(k)[0] == gen:
                t.delete(k)
        size = t.key_size - 8  # struct mdl_key's name bytes (MDL_NAME_MAX + 4)
        for raw, (rule, flags, uid) in rules.entries.items():
            t.update(lpm_key(gen, raw, size), _MVAL.pack(rule, flags, uid, 0))
        self.rules = rules

    @staticmethod
    def programs() -> list[tuple[str, int, int]]:
        """(function, prog type, attach type) of every model program: the Enforcer verifies them
        with its own at load when the policy has kernel model rules."""
        from busted.ebpf import bpfsys

        return ([(fn, _PROG_KPROBE, 0) for fn in ("mdl_scan", "mdl_judge", "mdl_path", *_HOOKS.values())]
                + [("mdl_egress", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS), ("mdl_send_done", _PROG_TRACEPOINT, 0)])

    def ensure_attached(self) -> None:
        """Attach the programs once a policy has kernel model rules (not before: the egress and
        send hooks cost every packet and send something)."""
        if self.attached or not self.rules.entries:
            return
        from busted.ebpf import bpfsys
        from busted.ebpf.tlslibs import inspect_fd, open_path, system_libraries
        from busted.policy.enforce import _attach_cgroup

        obj = self.obj
        for slot, fn in enumerate(("mdl_scan", "mdl_judge", "mdl_path")):
            obj.set_prog_slot("mdl_tail", slot, obj.prog(fn, _PROG_KPROBE))  # KPROBE, as the uprobes
        egress = obj.prog("mdl_egress", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS)
        send = obj.prog("mdl_send_done", _PROG_TRACEPOINT)
        self._links.append(_attach_cgroup(egress, self._cg_fd_of(), bpfsys.CGROUP_INET_EGRESS))
        self._links.append(bpfsys.perf_attach_tracepoint("sock", "sock_send_length", send))
        self.attached = True
        for path in system_libraries():
            fd = open_path(path)
            if fd is None:
                continue
            try:
                got = inspect_fd(fd)
                if got is not None and got.kind is not None:
                    self.attach_fd(fd, got.key, got.offsets, path)
            finally:
                os.close(fd)

    def attach_fd(self, fd: int, key: tuple[int, int], offsets: dict[str, int], label: str) -> bool:
        """Put the write-entry uprobes on the TLS library open at ``fd`` (the TlsScanner calls this
        for each file it probes, so the same files are covered)."""
        if not self.attached or key in self._files:
            return key in self._files
        from busted.ebpf import bpfsys

        links = []
        try:
            for sym, fn in _HOOKS.items():
                if sym in offsets:
                    prog = self.obj.prog(fn, _PROG_KPROBE)  # uprobes are kprobe programs
                    links.append(bpfsys.perf_attach_probe("uprobe", f"/proc/self/fd/{fd}", offsets[sym], prog))
        except Exception as exc:  # noqa: BLE001 - a library we cannot probe is reported, not fatal
            for fd_ in links:
                os.close(fd_)
            self.failed[label] = f"{type(exc).__name__}: {exc}"
            return False
        self._links.extend(links)
        self._files[key] = label
        return True

    @property
    def files(self) -> list[str]:
        return list(self._files.values())

    def counts(self) -> dict[str, int]:
        from busted.policy.enforce import percpu_sum

        t = self.obj.maps["mdl_counts"]
        return {what: percpu_sum(t, i) for i, what in enumerate(MDL_COUNTS)}

    def losses(self) -> list[Event]:
        now = self.counts()
        out: list[Event] = []
        ns, wall = time.monotonic_ns(), time.time()
        for what, (where, detail) in _LOSSES.items():
            n = now[what] - self._reported[what]
            if n > 0:
                self._reported[what] = now[what]
                out.append(EventsLost(ts_ns=ns, wall_time=wall, where=where, count=n, detail=detail))
        return out

    def close(self) -> None:
        for fd in self._links:
            try:
                os.close(fd)
            except OSError:
                pass
        self._links = []
        self.attached = False


def decision(r: dict[str, Any], policy: Any, catalog: Any, ip: str | None,
             hostname: str | None = None) -> PolicyDecision:
    """A kernel model record as a PolicyDecision: point ``llm_request``, ``enforced`` True when
    the socket was stopped (verdict 1), False when the request left from softirq (verdict 0)."""
    idx = r["rule"]
    rule = policy.rules[idx] if idx < len(policy.rules) else None
    name = rule.name if rule is not None else f"#{idx}"
    nl = min(r.get("nl", 0), NAME_MAX)
    model = r["name"][:nl].decode("utf-8", errors="replace") if "name" in r else ""
    matched: list[tuple[str, Any]] = [("model", model)]
    provider = None
    if ip is not None:
        matched.insert(0, ("daddr", ip))
        m = catalog.match_host(hostname) if hostname else None
        m = m if m is not None else catalog.match_ip(ip)
        provider = m.id if m is not None else None
    if provider:
        matched.append(("provider", provider))
    enforced = r.get("verdict", 0) == 1
    if not enforced:
        matched.append(("reason", "sent_outside_the_writing_thread"))
    comm = r["comm"].split(b"\0", 1)[0].decode(errors="replace") or None
    wall = r["ts_ns"] / 1e9 + (time.time() - time.monotonic())
    return PolicyDecision(
        ts_ns=r["ts_ns"], wall_time=wall, rule=name, action="deny", enforced=enforced, point="llm_request",
        matched=tuple(matched), flow_id=None, pid=r["pid"] or None, tid=r["tid"] or None, uid=r["uid"],
        comm=comm, cgroup_id=r["cgroup"], daddr=ip, dport=r["dport"] or None, hostname=hostname, provider=provider,
        count=1, first_ns=r["ts_ns"], last_ns=r["ts_ns"])
