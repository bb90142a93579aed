"""Enforcement: a policy compiled for the kernel, and the cgroup programs that hold it.

Only loaded with ``Monitor(policy=..., enforce=True)``; audit and dry run load nothing here.

Compilation (docs/policy.md has the long form). Rule *i* of the policy gets bit *i*. Every
destination the kernel can recognise carries a mask of the rules whose ``provider``/``hostname``
keys it satisfies, plus ``ANY_BIT`` when it belongs to some provider (rules without a destination
key, and the default, use that bit):

* names (``pol_names``): the catalog's hostnames and suffixes of each provider, and the rules'
  hostnames (``api.x.com`` exactly, ``*.x.com`` as "under x.com"); other globs and the catalog's
  mid-name patterns are not compiled (user space still reports them);
* addresses (``pol_addr4/6``, LPM tries): the catalog's CIDRs, and the addresses of DNS answers for
  those names, learned per uid (``pol_learn4/6``) by the BPF DNS parser from UDP answers as they
  arrive for the uid's sockets, and from DNS-over-TCP ``DnsAnswer`` events for the flow's uid.

Process keys become per-rule checks in the kernel: ``uid`` (exact), ``comm`` (16 bytes),
``cgroup`` (the path's cgroup id compared with the caller's ancestor at that level). A rule with
several values is expanded into one kernel entry per combination. ``exe`` (an exact path or a
``prefix*``) is checked at connect against the caller's process in ``pol_exe_proc`` (kept by the
exec/fork/exit tracepoints, seeded from /proc) looked up in the ``pol_exe`` trie; ``container``
against the caller's or socket's cgroup ancestry in ``pol_ctr`` (the containers' top cgroups, kept
current from ``cgroup_mkdir`` records). ``model`` and other exe globs cannot be checked in the
kernel: a deny rule with them is reported from user space but not enforced, and an allow/audit rule
with them ends the kernel's search when its other keys hold (over-allowing is the safe side).

Reload is atomic: conf, rules, name and address masks and learned addresses exist in two
generations and ``pol_gen`` names the one in force; a reload writes the other completely, then
flips ``pol_gen`` (one 4-byte write). A kernel decision reads ``pol_gen`` once and uses that
generation throughout (a DNS answer's stages carry it), so it sees one policy, never a mix.

Budgets (busted/policy/budgets.py, busted/policy/budget_enforce.py): kernel budget *j* takes destination bit
61 - *j*; exhausted scopes go into the ``pol_budget`` map, checked at connect after the rules.

Programs are compiled by BCC in a child process and cached (busted/ebpf/bytecode.py), loaded here
with busted's own loader (``PolicyObject``: no BCC or LLVM in this process), and attached with BPF
links (``BPF_LINK_CREATE``) or perf events, held by file descriptor and never pinned: when the
process exits, however it exits, the kernel detaches them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from cachetools import LRUCache

from busted.classify.containers import container_of
from busted.classify.names import normalize_name
from busted.ebpf import bpfsys, bytecode
from busted.errors import BccNotInstalled, KernelHeadersMissing, PermissionDenied, PolicyError, ProbeLoadError
from busted.events import DnsAnswer, Event, EventsLost, FlowOpened, LossPlace, PolicyDecision
from busted.policy.model_enforce import NAME_MAX as MDL_NAME_MAX
from busted.policy.rules import MAX_KERNEL_ENTRIES, Policy, Rule
from busted.policy.rules import MAX_RULES as _MAX_RULES
from busted.wire.layout import Layout

__all__ = ["CGROUP2_MOUNTS", "Compiled", "Enforcer", "PolicyRuntime", "cgroup2_mount", "compile_policy",
           "name_entry", "name_mask"]

ANY_BIT = 63
AMBIG_BIT = 62
MAX_RULES = _MAX_RULES  # bits 0..61; 62 and 63 are reserved
MAX_KERNEL_RULES = MAX_KERNEL_ENTRIES
POL_ALLOW, POL_AUDIT, POL_DENY = 0, 1, 2
POL_DEFAULT = 0xFFFF
PR_UID, PR_COMM, PR_CGROUP, PR_USER_ONLY, PR_EXE, PR_CTR = 1, 2, 4, 8, 16, 32
POINT_CONNECT, POINT_TLS = 1, 2
# not decisions: a cgroup_mkdir record, an exec by a relative filename (3 is POINT_MODEL, below)
POINT_CGROUP, POINT_EXE = 5, 6
# pol_conf.flags: kernel exe rules, container rules, kernel budgets per exe, per container
CF_EXE, CF_CTR, CF_BEXE, CF_BCTR = 1, 2, 4, 8
AGG_WINDOW_NS = 1_000_000_000  # identical kernel decisions within this window become one event
AGG_MAX_KEYS = 4096  # open aggregation windows; past it the oldest is reported early
# pol_counts slots (policy_enforce.c); the last three are losses, reported as EventsLost.
POL_COUNTS = ("denied_sockets", "sni_unjudged", "dns_learned", "ring_full", "learn_refused", "denied_sk_refused",
              "exe_refused", "exe_unknown")
_COUNT_LOSSES = {
    "ring_full": (LossPlace.KERNEL_RING, "policy: decision records lost, ring full (the verdicts stood)"),
    "learn_refused": (LossPlace.KERNEL_MAP, "policy: learned address refused by the kernel map: not learned"),
    "denied_sk_refused": (LossPlace.KERNEL_MAP,
                          "policy: denied socket not remembered (map refused): its next segment is judged again"),
    "exe_refused": (LossPlace.KERNEL_MAP,
                    "policy: process not tracked (pol_exe_proc full): its exe is unknown to exe rules"),
}
_ACTION_CODE = {"allow": POL_ALLOW, "audit": POL_AUDIT, "deny": POL_DENY}
POINT_MODEL = 3  # policy_model.c: a request naming a denied model (busted/policy/model_enforce.py)
_POINTS = {POINT_CONNECT: "connect", POINT_TLS: "tls_client_hello", POINT_MODEL: "llm_request"}
CGROUP2_MOUNTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")

POL_CONF = Layout.of("pol_conf", ("own_tgid", "u32"), ("nrules", "u32"), ("dflt", "u32"), ("flags", "u32"))
POL_RULE = Layout.of(
    "pol_rule",
    ("cg_id", "u64"),
    ("comm_lo", "u64"),
    ("comm_hi", "u64"),
    ("action", "u32"),
    ("flags", "u32"),
    ("uid", "u32"),
    ("cg_level", "u32"),
    ("bit", "u32"),
    ("index", "u32"),
)
POL_REC = Layout.of(
    "pol_rec",
    ("ts_ns", "u64"),
    ("cgroup", "u64"),
    ("cookie", "u64"),
    ("pid", "u32"),
    ("tid", "u32"),
    ("uid", "u32"),
    ("rule", "u32"),
    ("point", "u32"),
    ("family", "u32"),
    ("dport", "u32"),
    ("daddr", "u8", 16),
    ("comm", "char", 16),
    ("exe", "char", 128),  # connect: the caller's program as pol_exe_proc knows it (EXE_MAX)
)
# What follows a pol_rec for a ClientHello decision: why the SNI could not be judged (0: it was),
# whether the hello was dropped, and the name seen (its last 128 bytes).
POL_TLS_EXT = Layout.of("pol_tls_ext", ("reason", "u32"), ("verdict", "u32"), ("nl", "u32"), ("pad", "u32"),
                        ("name", "char", 256))
SNI_REASONS = {1: "sni_beyond_reassembly_bound", 2: "malformed_hello", 3: "hello_bytes_missed",
               4: "no_room_for_partial_hello"}


MAX_ADDRS = 65536  # pol_addr4/6 (policy CIDRs) and pol_learn4/6 (LRU) entries, per family
MAX_NAMES = 16384  # pol_names entries
EXE_MAX = 128  # bytes of a process's exe path the kernel keeps (the exe trie's key size)
MAX_EXES = 4096  # pol_exe entries (exe patterns and their aliases), per generation
MAX_PROCS = 65536  # pol_exe_proc: processes tracked (not preallocated)
MAX_CTR_CGROUPS = 4096  # pol_ctr: container cgroups, per generation
CG_LEVELS = 16  # cgroup ancestry levels the kernel looks up for container rules


def c_definitions(max_addrs: int = MAX_ADDRS, max_names: int = MAX_NAMES) -> str:
    consts = {
        "POL_MAX_RULES": MAX_KERNEL_RULES, "POL_MAX_ADDRS": max_addrs, "POL_MAX_NAMES": max_names,
        "POL_ALLOW": POL_ALLOW, "POL_AUDIT": POL_AUDIT, "POL_DENY": POL_DENY, "POL_DEFAULT": POL_DEFAULT,
        "PR_UID": PR_UID, "PR_COMM": PR_COMM, "PR_CGROUP": PR_CGROUP, "PR_USER_ONLY": PR_USER_ONLY,
        "POINT_CONNECT": POINT_CONNECT, "POINT_TLS": POINT_TLS, "POINT_CGROUP": POINT_CGROUP, "POINT_EXE": POINT_EXE,
        "PR_EXE": PR_EXE, "PR_CTR": PR_CTR,
        "POL_CF_EXE": CF_EXE, "POL_CF_CTR": CF_CTR, "POL_CF_BEXE": CF_BEXE, "POL_CF_BCTR": CF_BCTR,
        "POL_EXE_MAX": EXE_MAX, "POL_MAX_EXES": MAX_EXES, "POL_MAX_PROCS": MAX_PROCS,
        "POL_MAX_CTR_CGROUPS": MAX_CTR_CGROUPS, "POL_CG_LEVELS": CG_LEVELS,
    }
    out = ["/* Generated from busted/policy/enforce.py: edit it there. */"]
    out += [f"#define {k} {v}" for k, v in consts.items()]
    out += [lay.c_struct() for lay in (POL_CONF, POL_RULE, POL_REC, POL_TLS_EXT)]
    out.append("struct sys_enter_args { u64 common; s32 nr; s32 pad; u64 arg[6]; };")
    out.append("struct sys_exit_args { u64 common; s32 nr; s32 pad; s64 ret; };")
    return "\n".join(out) + "\n"


def build_source() -> str:
    from busted.policy.budgets import c_definitions as budget_definitions

    ebpf = resources.files("busted.ebpf")
    src = ebpf.joinpath("policy_enforce.c").read_text()
    # model rules (busted/policy/model_enforce.py): one object, so they share pol_gen, the ring and pol_denied_sk
    return c_definitions() + budget_definitions() + src + ebpf.joinpath("policy_model.c").read_text()


# -- names ---------------------------------------------------------------------------------------

NAME_MAX = 128  # the kernel's key size; longer names are matched in user space only


def name_entry(name: str, subtree: bool) -> bytes:
    """The kernel's LPM key bytes for a name: lower-cased, backwards, then NUL (exactly this name)
    or '.' (anything under it)."""
    return normalize_name(name).encode()[::-1] + (b"." if subtree else b"\0")


def _prefix_keys(key: bytes) -> list[bytes]:
    """The entries that can be a proper prefix of ``key``: name_entry() makes every entry end in
    '.' (a subtree) or NUL (exactly, last byte only), so only the prefixes that end at a dot."""
    out = []
    j = key.find(b".")
    while 0 <= j < len(key) - 1:
        out.append(key[: j + 1])
        j = key.find(b".", j + 1)
    return out


def fold_names(entries: dict[bytes, int]) -> dict[bytes, int]:
    """Each entry's mask ORed with those of every shorter entry that is a prefix of it: the kernel's
    longest-prefix lookup returns one entry, which must carry all that match. Linear in the
    entries (a dict probe per label), not quadratic: a reload compiles thousands of names."""
    out = {}
    for key, mask in entries.items():
        m = mask
        for p in _prefix_keys(key):
            m |= entries.get(p, 0)
        out[key] = m
    return out


def name_mask(names: dict[bytes, int], name: str) -> int:
    """The Python twin of the BPF lookup: the longest entry that is a prefix of the name's key
    (``names`` as compile_policy makes them: entries ending in '.' or NUL)."""
    key = name_entry(name, subtree=False)
    if len(key) > NAME_MAX:
        key = key[:NAME_MAX]
    m = names.get(key)
    if m is not None:
        return m
    for p in reversed(_prefix_keys(key)):
        m = names.get(p)
        if m is not None:
            return m
    return 0


# -- cgroups -------------------------------------------------------------------------------------

def cgroup2_mount() -> str | None:
    """The cgroup v2 mount: /sys/fs/cgroup/unified on hybrid hosts, else /sys/fs/cgroup."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[2:3] == ["cgroup2"]]
    except OSError:
        mounts = []
    for m in CGROUP2_MOUNTS:
        if m in mounts:
            return m
    return mounts[0] if mounts else None


def cgroup_id(path: str) -> int:
    """A cgroup v2 directory's id (its inode number, what bpf_get_current_cgroup_id returns)."""
    return os.stat(path).st_ino


class CgroupPaths:
    """cgroup id -> path under the v2 mount, by walking the tree (cached; rescanned on a miss at
    most every ``rescan_s``)."""

    def __init__(self, mount: str | None = None, rescan_s: float = 2.0) -> None:
        self.mount = mount or cgroup2_mount()
        self._ids: dict[int, str] = {}
        self._rescan_s = rescan_s
        self._last = -1e9

    def _scan(self) -> None:
        self._last = time.monotonic()
        if not self.mount:
            return
        ids: dict[int, str] = {}
        budget = 100_000  # bounded walk
        for root, dirs, _files in os.walk(self.mount):
            budget -= 1 + len(dirs)
            if budget < 0:
                break
            try:
                ids[os.stat(root).st_ino] = "/" + os.path.relpath(root, self.mount).removeprefix(".")
            except OSError:
                continue
        self._ids = ids

    def __call__(self, cgid: int) -> str | None:
        p = self._ids.get(cgid)
        if p is None and time.monotonic() - self._last >= self._rescan_s:
            self._scan()
            p = self._ids.get(cgid)
        return p


# -- exe paths -----------------------------------------------------------------------------------

def exe_key(pattern: str) -> bytes | None:
    """The exe trie's key for an exe glob, or None when the kernel cannot express it: an exact
    path is ``path\\0``, a path with one trailing ``*`` (fnmatch's ``*`` spans ``/``) is the prefix
    before it. Anything else (``*/curl``, ``/usr/*/curl``, ``[ab]``) is user space only."""
    if not pattern.startswith("/"):
        return None
    if not _glob_chars(pattern):
        raw = pattern.encode()
        return raw + b"\0" if len(raw) <= EXE_MAX - 2 else None  # room for the NUL the kernel keeps
    head = pattern[:-1]
    if pattern.endswith("*") and not _glob_chars(head):
        raw = head.encode()
        return raw if len(raw) <= EXE_MAX - 1 else None
    return None


class _Spellings:
    """The other paths by which an exec can name a program, as this host is laid out at load time:
    directory links at the top (merged /usr: ``/bin -> usr/bin``) both ways, what a link resolves
    to (a rule on ``/usr/bin/python3`` also holds for ``/usr/bin/python3.11``, which /proc shows),
    and links in the same directory that resolve to it (``python3 -> python3.11``). Bounded: a few
    directories listed once per compile."""

    def __init__(self, roots: tuple[str, ...] = ("/", "/usr", "/usr/local"), max_entries: int = 20000) -> None:
        self._max = max_entries
        self._dirs: dict[str, list[tuple[str, str]]] = {}
        self.links = [(p, r) for p, r in self._links_in_many(roots) if os.path.isdir(p)]

    def _links_in_many(self, dirs: tuple[str, ...]) -> list[tuple[str, str]]:
        return [x for d in dirs for x in self._links_in(d)]

    def _links_in(self, d: str) -> list[tuple[str, str]]:
        """(link, what it resolves to) for the symbolic links in directory ``d``."""
        got = self._dirs.get(d)
        if got is None:
            got = []
            try:
                with os.scandir(d) as it:
                    for n, e in enumerate(it):
                        if n >= self._max:
                            break
                        if e.is_symlink():
                            got.append((e.path, os.path.realpath(e.path)))
            except OSError:
                pass
            self._dirs[d] = got
        return got

    def _dir_aliases(self, paths: set[str]) -> set[str]:
        out = set(paths)
        for q in paths:
            for link, real in self.links:
                if q.startswith(real + "/"):
                    out.add(link + q[len(real):])
                elif q.startswith(link + "/"):
                    out.add(real + q[len(link):])
        return out

    def of(self, pattern: str) -> set[str]:
        prefix = pattern.endswith("*")
        path = pattern[:-1] if prefix else pattern
        out = self._dir_aliases({path})
        if not prefix and os.path.exists(path):
            target = os.path.realpath(path)
            out.add(target)
            for d in {os.path.dirname(q) for q in self._dir_aliases({path, target})}:
                out.update(link for link, real in self._links_in(d) if real == target)
            out = self._dir_aliases(out)
        return {q + "*" if prefix else q for q in out}


def fold_exes(entries: dict[bytes, int]) -> dict[bytes, int]:
    """Each exe entry's mask ORed with those of the entries that are proper prefixes of it (an LPM
    lookup returns the longest only). A probe per byte of the key: linear in the entries."""
    return {k: m | _or_prefixes(entries, k) for k, m in entries.items()}


def _or_prefixes(entries: dict[bytes, int], key: bytes) -> int:
    m = 0
    for j in range(1, len(key)):
        m |= entries.get(key[:j], 0)
    return m


def exe_mask(exes: dict[bytes, int], path: str) -> int:
    """The Python twin of the kernel's exe lookup: the longest entry that prefixes the path as the
    kernel keeps it (its first EXE_MAX - 1 bytes, then NUL)."""
    key = path.encode()[: EXE_MAX - 1] + b"\0"
    for j in range(len(key), 0, -1):
        m = exes.get(key[:j])
        if m is not None:
            return m
    return 0


# -- containers ----------------------------------------------------------------------------------

def container_cgroups(mount: str | None, max_dirs: int = 100_000) -> dict[int, tuple[str, str]]:
    """cgroup id -> (path, container id) for the top cgroup of every container under the v2 mount
    (a path busted.classify.containers names a container in, whose parent names another or none).
    What is below a container's top cgroup is reached through the ancestry in the kernel."""
    out: dict[int, tuple[str, str]] = {}
    if not mount:
        return out
    stack: list[tuple[str, str, str | None]] = [(mount, "/", None)]
    n = 0
    while stack and n < max_dirs:  # bounded: a hostile tree cannot keep us here
        d, rel, parent_cid = stack.pop()
        n += 1
        cid = container_of(rel).container_id if rel != "/" else None
        if cid is not None and cid != parent_cid:
            try:
                out[os.stat(d).st_ino] = (rel, cid)
            except OSError:
                continue
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append((e.path, rel.rstrip("/") + "/" + e.name, cid))
        except OSError:
            continue
    return out


def container_rule_bits(policy: Policy, cid: str) -> int:
    """The bits (rule indices) of the rules whose ``container`` prefixes hold for ``cid``."""
    bits = 0
    for i, r in enumerate(policy.rules):
        if r.container is not None and any(cid.startswith(p) for p in r.container):
            bits |= 1 << i
    return bits


# -- compilation ---------------------------------------------------------------------------------

@dataclass
class Compiled:
    """A policy as the kernel holds it."""

    rules: list[bytes] = field(default_factory=list)  # packed pol_rule entries, in order
    names: dict[bytes, int] = field(default_factory=dict)  # name_entry() -> mask (folded)
    cidrs: dict[tuple[int, int, int], int] = field(default_factory=dict)  # (family, addr, plen) -> mask
    default: int = POL_AUDIT
    notes: list[str] = field(default_factory=list)  # what the kernel cannot check, per rule
    kernel_deny: set[str] = field(default_factory=set)  # deny rules the kernel enforces
    exes: dict[bytes, int] = field(default_factory=dict)  # exe_key() -> rule-index bits (folded)
    ctr: dict[int, int] = field(default_factory=dict)  # container top cgroup id -> rule-index bits
    ctr_scope: dict[int, int] = field(default_factory=dict)  # ... -> its container id's scope_hash()
    flags: int = 0  # CF_EXE | CF_CTR | CF_BEXE | CF_BCTR
    user_only: list[str] = field(default_factory=list)  # "rule: key value" the kernel cannot check
    budgets: dict[str, int] = field(default_factory=dict)  # budget name -> kernel index (busted.policy.budgets)
    models: Any = None  # busted.policy.model_enforce.ModelRules: the model rules the kernel checks


def _glob_chars(s: str) -> bool:
    return any(c in s for c in "*?[")


def compile_policy(policy: Policy, catalog: Any, *, cgroup_mount: str | None = None) -> Compiled:
    """Compile ``policy`` against the provider ``catalog`` (busted.classify.Catalog)."""
    if len(policy.rules) > MAX_RULES:
        raise PolicyError(f"at most {MAX_RULES} rules can be enforced in the kernel, this policy has "
                          f"{len(policy.rules)}", path=policy.source)
    c = Compiled(default=_ACTION_CODE[policy.default])
    mount = cgroup_mount or cgroup2_mount()

    def add_name(name: str, bits: int, subtree: bool, exact: bool = True) -> None:
        keys = ([name_entry(name, False)] if exact else []) + ([name_entry(name, True)] if subtree else [])
        for k in keys:
            if len(k) > NAME_MAX:
                c.notes.append(f"name {name} is longer than the kernel's {NAME_MAX - 1} bytes: user space only")
                continue
            c.names[k] = c.names.get(k, 0) | bits

    def add_cidr(cidr: str, bits: int) -> None:
        net = ipaddress.ip_network(cidr, strict=False)
        key = (net.version, int(net.network_address), net.prefixlen)
        c.cidrs[key] = c.cidrs.get(key, 0) | bits

    def provider_bits(pid: str) -> int:
        bits = 1 << ANY_BIT
        for i, r in enumerate(policy.rules):
            if r.provider is not None and pid in r.provider and r.hostname is None:
                bits |= 1 << i
        return bits

    for p in catalog.providers.values():
        bits = provider_bits(p.id)
        for h in p.hostnames:
            add_name(h, bits, subtree=False)
        for s in p.suffixes:
            add_name(s, bits, subtree=True)
        for cidr in p.cidrs:
            add_cidr(cidr, bits)
    spell: _Spellings | None = None
    ctrs: dict[int, tuple[str, str]] | None = None
    for i, r in enumerate(policy.rules):
        unsure: list[str] = ["model"] if r.model is not None else []
        kflags = 0
        if r.exe is not None:
            keys = {p: exe_key(p) for p in r.exe}
            bad = [p for p, k in keys.items() if k is None]
            if bad:  # one alternative the kernel cannot see: the whole key is user space's
                unsure.extend(f"exe {p}" for p in bad)
                c.user_only.extend(f"{r.name}: exe {p}" for p in bad)
            else:
                spell = spell or _Spellings()
                for p in r.exe:
                    for q in spell.of(p):
                        k = exe_key(q)
                        if k is not None:
                            c.exes[k] = c.exes.get(k, 0) | 1 << i
                kflags |= PR_EXE
                c.flags |= CF_EXE
        if r.container is not None:
            if ctrs is None:
                ctrs = container_cgroups(mount)
            for cgid, (_path, cid) in ctrs.items():
                if any(cid.startswith(p) for p in r.container):
                    c.ctr[cgid] = c.ctr.get(cgid, 0) | 1 << i
            kflags |= PR_CTR
            c.flags |= CF_CTR
        if r.provider is not None:
            missing = [x for x in r.provider if x not in catalog.providers]
            if missing:
                c.notes.append(f"{r.name}: provider {', '.join(missing)} is not in the catalog")
        if r.hostname is not None:
            for h in r.hostname:
                if h.startswith("*.") and not _glob_chars(h[2:]):
                    add_name(h[2:], 1 << i, subtree=True, exact=False)
                elif not _glob_chars(h):
                    add_name(h, 1 << i, subtree=False)
                else:
                    unsure.append(f"hostname {h}")
            if r.provider is not None:
                c.notes.append(f"{r.name}: provider and hostname both given: the kernel checks the hostname")
        entries = _expand(r, i, unsure, mount, c.notes, kflags)
        if unsure:
            c.notes.append(f"{r.name}: checked in user space only ({', '.join(unsure)})"
                           + ("; not enforced" if r.action == "deny" else "; ends the kernel's search"))
        elif r.action == "deny" and entries:
            c.kernel_deny.add(r.name)
        c.rules.extend(entries)
    if policy.budgets:
        from busted.policy.budgets import compile_budgets

        c.budgets = compile_budgets(policy, catalog, add_name, add_cidr, c.notes)
        if any(b.per == "exe" and b.name in c.budgets for b in policy.budgets):
            c.flags |= CF_BEXE
        if any(b.per == "container" and b.name in c.budgets for b in policy.budgets):
            c.flags |= CF_BCTR  # every container's top cgroup, to key a caller by its container
    if c.flags & (CF_CTR | CF_BCTR):
        from busted.policy.budgets import scope_hash

        for cgid, (_path, cid) in (ctrs if ctrs is not None else container_cgroups(mount)).items():
            if cgid in c.ctr or c.flags & CF_BCTR:
                c.ctr.setdefault(cgid, 0)
                c.ctr_scope[cgid] = scope_hash(cid)
    _compile_models(policy, c)
    c.names = fold_names(c.names)
    c.exes = fold_exes(c.exes)
    if len(c.exes) > MAX_EXES:
        raise PolicyError(f"the policy's exe patterns need {len(c.exes)} kernel entries; at most {MAX_EXES}",
                          path=policy.source)
    if len(c.ctr) > MAX_CTR_CGROUPS:
        raise PolicyError(f"the policy's containers have {len(c.ctr)} cgroups; the kernel holds at most "
                          f"{MAX_CTR_CGROUPS}", path=policy.source)
    if len(c.rules) > MAX_KERNEL_RULES:
        raise PolicyError(f"the policy expands to {len(c.rules)} kernel rule entries (one per uid x comm x "
                          f"cgroup value); at most {MAX_KERNEL_RULES}", path=policy.source)
    # The kernel's name and address maps are sized at load: a policy that does not fit is refused
    # here, before any map is written (not by a map error half way through a reload).
    if len(c.names) > MAX_NAMES:
        raise PolicyError(f"the policy and catalog need {len(c.names)} kernel name entries; at most {MAX_NAMES}",
                          path=policy.source)
    for fam in (4, 6):
        n = sum(1 for k in c.cidrs if k[0] == fam)
        if n > MAX_ADDRS:
            raise PolicyError(f"the policy and catalog need {n} IPv{fam} kernel address ranges; at most {MAX_ADDRS}",
                              path=policy.source)
    return c


def _compile_models(policy: Policy, c: Compiled) -> None:
    """Model deny rules the kernel checks at the TLS write (busted/policy/model_enforce.py): their
    "user space only" note is replaced by the model compiler's."""
    from busted.policy.model_enforce import compile_models

    c.models = compile_models(policy)
    for name in c.models.kernel:
        c.notes = [n for n in c.notes if not (n.startswith(f"{name}: checked in user space only") and "model" in n)]
        c.kernel_deny.add(name)
    c.notes.extend(c.models.notes)


def _expand(r: Rule, i: int, unsure: list[str], mount: str | None, notes: list[str], kflags: int = 0) -> list[bytes]:
    bit = ANY_BIT if r.provider is None and r.hostname is None else i
    flags = (PR_USER_ONLY if unsure else 0) | kflags
    cgs: list[tuple[int, int] | None] = [None]
    if r.cgroup is not None:
        cgs = []
        for path in r.cgroup:
            full = os.path.join(mount or "/nonexistent", path.lstrip("/"))
            try:
                cgs.append((cgroup_id(full), 0 if path == "/" else path.strip("/").count("/") + 1))
            except OSError:
                notes.append(f"{r.name}: cgroup {path} does not exist (yet): not matched in the kernel")
        if not cgs:
            return []
    out = []
    for uid in r.uid or (None,):
        for comm in r.comm or (None,):
            for cg in cgs:
                cb = (comm or "").encode()[:15].ljust(16, b"\0")
                lo, hi = struct.unpack("<QQ", cb)
                out.append(POL_RULE.pack(
                    cg_id=cg[0] if cg else 0, comm_lo=lo if comm else 0, comm_hi=hi if comm else 0,
                    action=_ACTION_CODE[r.action], uid=uid or 0, cg_level=cg[1] if cg else 0, bit=bit,
                    index=i, flags=flags | (PR_UID if uid is not None else 0)
                    | (PR_COMM if comm is not None else 0) | (PR_CGROUP if cg else 0)))
    return out


# -- the kernel side -------------------------------------------------------------------------------

_PROG_KPROBE, _PROG_TRACEPOINT, _PROG_CGROUP_SKB, _PROG_SOCK_OPS, _PROG_SOCK_ADDR = 2, 5, 8, 13, 18  # bpf_prog_type
_ATTACH = {  # program -> (prog type, attach type); connect4 last: once it shows, all are there
    "pol_sockops": (_PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS),
    "pol_egress": (_PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS),
    "pol_dns_ingress": (_PROG_CGROUP_SKB, bpfsys.CGROUP_INET_INGRESS),
    "pol_connect6": (_PROG_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT),
    "pol_connect4": (_PROG_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT),
}
_TAILS = [  # (prog array, slot, program, prog type, expected attach type)
    ("pol_dns_tail", 0, "pol_dns_mask", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_INGRESS),
    ("pol_dns_tail", 1, "pol_dns_answers", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_INGRESS),
    ("pol_dns_tail", 2, "pol_dns_name", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_INGRESS),
    ("pol_skb_tail", 0, "pol_egress_judge", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS),
    ("pol_skb_tail", 1, "pol_egress_hello", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS),
    ("pol_skb_tail", 2, "pol_egress_parse", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS),
    ("pol_skb_tail", 3, "pol_egress_name", _PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS),
]
# policy_enforce.c's TRACEPOINT_PROBEs, which BCC names tracepoint__<category>__<event> (BCC attached
# them itself when it loaded the object in this process; the loader here attaches them).
_TRACEPOINTS = [("sched", "sched_process_exec"), ("task", "task_newtask"), ("sched", "sched_process_exit"),
                ("cgroup", "cgroup_mkdir"), ("cgroup", "cgroup_rmdir")]
_NOEXIST = 1  # BPF_NOEXIST: a map update that never replaces an entry

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_LPM_HEAD = struct.Struct("<II")  # prefixlen, gen: the head of every policy LPM key
_CKEY = struct.Struct("<QII")  # pol_ckey: id, gen, pad
_CVAL = struct.Struct("<QQ")  # pol_cval: mask, scope
_LKEY4 = struct.Struct("<I4sI")  # pol_lkey4: uid, addr (network order), gen
_LKEY6 = struct.Struct("<I16sI")  # pol_lkey6: uid, addr, gen
# (key size, value size) of every map user space writes or reads, as policy_enforce.c declares them:
# checked against what the compiler reports, so a change on one side fails at load, not in a map write.
_MAP_SIZES = {
    "pol_gen": (4, 4), "pol_conf": (4, POL_CONF.size), "pol_rules": (4, 2 * POL_RULE.size),
    "pol_exe": (8 + EXE_MAX, 8), "pol_names": (8 + NAME_MAX, 8), "pol_addr4": (12, 8), "pol_addr6": (24, 8),
    "pol_learn4": (_LKEY4.size, 8), "pol_learn6": (_LKEY6.size, 8), "pol_ctr": (_CKEY.size, _CVAL.size),
    "pol_exe_proc": (4, EXE_MAX), "pol_counts": (4, 8), "pol_budget": (16, 8), "pol_denied_sk": (8, 4),
    "pol_dns_tail": (4, 4), "pol_skb_tail": (4, 4),
    "mdl_names": (8 + MDL_NAME_MAX + 4, 16), "mdl_counts": (4, 8), "mdl_tail": (4, 4),  # policy_model.c
}


def _attach_cgroup(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    """A cgroup program attached with a BPF link (bpfsys.cgroup_link), failures as busted errors."""
    try:
        return bpfsys.cgroup_link(prog_fd, cgroup_fd, attach_type)
    except bpfsys.BpfError as exc:
        e = exc.errno or errno.EINVAL
        if e == errno.EPERM:
            raise PermissionDenied(f"BPF_LINK_CREATE: {os.strerror(e)}") from exc
        raise ProbeLoadError(f"cannot attach cgroup program (attach type {attach_type}): {os.strerror(e)}") from exc


class PolicyObject:
    """policy_enforce.c + policy_model.c as one loaded object in this process, without BCC: the
    bytecode comes from ``bytecode.get_compiled`` (the cache, or BCC in a child process that exits,
    LLVM with it), the maps are created here and the programs loaded on demand. Shared by the
    Enforcer and its ModelGuard (one pol_gen, one ring, one pol_denied_sk)."""

    def __init__(self, source: str) -> None:
        try:
            self.compiled = bytecode.get_compiled(source)
        except bytecode.CompileFailed as exc:
            if exc.kind == "bcc":
                raise BccNotInstalled(str(exc)) from exc
            if exc.kind == "headers":
                raise KernelHeadersMissing(os.uname().release, str(exc)) from exc
            if exc.kind == "permission":
                raise PermissionDenied(str(exc)) from exc
            raise ProbeLoadError(f"policy program failed to compile or load: {exc}") from exc
        self.bytecode_from = self.compiled.source  # "cache" or "compile"
        specs = {m.name: m for m in self.compiled.maps}
        for name, (ksz, vsz) in _MAP_SIZES.items():
            m = specs.get(name)
            if m is None or (m.key_size, m.value_size) != (ksz, vsz):
                got = f"{m.key_size}/{m.value_size} bytes" if m is not None else "missing"
                raise ProbeLoadError(f"policy program: map {name} is {got}, busted expects key/value {ksz}/{vsz}")
        try:
            self._loaded: bytecode.Loaded | None = bytecode.create_maps(self.compiled)
        except bpfsys.BpfError as exc:
            if exc.errno == errno.EPERM:
                raise PermissionDenied(f"creating the policy's maps: {exc}") from exc
            raise ProbeLoadError(f"policy program failed to compile or load: {exc}") from exc
        self.maps: dict[str, bpfsys.Map] = self._loaded.maps
        self._lock = threading.Lock()  # the TLS scanner's thread loads model uprobe programs too

    def prog(self, fn: str, prog_type: int, attach_type: int = 0) -> int:
        """Function ``fn`` loaded (once) and verified; its program fd. The verifier runs outside
        the lock, so several threads can load at once (``preload``)."""
        comp = self.compiled
        with self._lock:
            if self._loaded is None:
                raise ProbeLoadError("the policy programs are closed")
            have = self._loaded.progs.get(fn)
            if have is not None:
                return have
            fd_map = {m.child_fd: self._loaded.maps[m.name].fd for m in comp.maps}
        if fn not in comp.funcs:
            raise ProbeLoadError(f"policy program: function {fn} is not in the compiled object")
        try:
            fd = bpfsys.load_prog(prog_type, bytecode.relocate(comp.funcs[fn], fd_map), name=fn,
                                  license=comp.license, kern_version=comp.kern_version,
                                  expected_attach_type=attach_type)
        except bpfsys.BpfError as exc:
            if exc.errno == errno.EPERM:
                raise PermissionDenied(f"loading {fn}: {exc}") from exc
            tail = "\n".join(exc.log.strip().splitlines()[-12:])
            raise ProbeLoadError(f"policy program failed to compile or load: the kernel refused {fn}: {exc}\n"
                                 f"{tail}") from exc
        with self._lock:
            if self._loaded is None:  # closed meanwhile
                os.close(fd)
                raise ProbeLoadError("the policy programs are closed")
            have = self._loaded.progs.setdefault(fn, fd)
        if have != fd:  # another thread loaded it first
            os.close(fd)
        return have

    def preload(self, specs: list[tuple[str, int, int]]) -> None:
        """Load (function, prog type, attach type) ``specs`` concurrently, one thread per CPU: the
        verifier is the largest part of a warm start (~0.2 s summed over the programs here,
        bench/verifier_cost.py) and each BPF_PROG_LOAD verifies on the CPU of the thread that
        asked (ctypes lets go of the GIL)."""
        workers = min(len(specs), os.cpu_count() or 1)
        if workers <= 1:
            for spec in specs:
                self.prog(*spec)
            return
        from concurrent.futures import ThreadPoolExecutor

        # longest first (by instruction count, a rough proxy: a short program with a long loop,
        # mdl_scan, can cost more): the others fill the remaining CPUs around them
        order = sorted(specs, key=lambda sp: -len(self.compiled.funcs.get(sp[0], b"")))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="busted-verify") as ex:
            for f in [ex.submit(self.prog, *sp) for sp in order]:
                f.result()  # the first failure is raised (the rest are loaded and closed with the object)

    def set_prog_slot(self, table: str, slot: int, prog_fd: int) -> None:
        """Write a program into a prog array (a tail call's target)."""
        self.maps[table].update(_U32.pack(slot), _U32.pack(prog_fd))

    def close(self) -> None:
        """Programs and maps closed (after every attachment was): the kernel frees them."""
        with self._lock:
            if self._loaded is not None:
                self._loaded.close()
                self._loaded = None
            self.maps = {}


def percpu_sum(m: bpfsys.Map, slot: int) -> int:
    """A per-CPU u64 counter array's slot, summed over CPUs."""
    return sum(_U64.unpack_from(v)[0] for v in m.lookup_percpu(_U32.pack(slot)))


def lpm_key(gen: int, raw: bytes, size: int) -> bytes:
    """A policy LPM key (pol_names, pol_exe, mdl_names): the generation's 32 bits, then ``raw``,
    zero-filled to ``size`` data bytes (the prefix covers the generation and ``raw``)."""
    return _LPM_HEAD.pack(32 + 8 * len(raw), gen) + raw.ljust(size, b"\0")


def _exe_value(path: str) -> bytes:
    """A pol_exe_proc value: the path's first EXE_MAX - 1 bytes, NUL-filled."""
    return os.fsencode(path)[: EXE_MAX - 1].ljust(EXE_MAX, b"\0")


def lpm_split(key: bytes) -> tuple[int, bytes]:
    """(gen, the prefix's data bytes) of a key made by ``lpm_key``."""
    plen, gen = _LPM_HEAD.unpack_from(key)
    return gen, key[8: 8 + max(0, plen // 8 - 4)]


def _budget_name(c: Compiled, idx: int) -> str | None:
    from busted.policy.budgets import BUDGET_RULE_BASE

    if idx < BUDGET_RULE_BASE:
        return None
    return next((n for n, j in c.budgets.items() if j == idx - BUDGET_RULE_BASE), f"#{idx - BUDGET_RULE_BASE}")


def _ip_key(family: int, addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, addr[: 4 if family == 4 else 16])


@dataclass
class _Window:
    """Identical kernel decisions (process x rule x point x destination) in one aggregation window."""

    first: PolicyDecision  # the window's first record, as a decision
    opened_ns: int
    count: int = 0  # records after the one already reported
    first_ns: int = 0
    last_ns: int = 0


class Enforcer:
    """The loaded enforcement programs for one scope cgroup. ``close()`` (or process exit) detaches.

    ``scope``: a cgroup v2 path (relative to the mount, default the root) under which processes
    are policed. Not thread-safe except ``close``: the Monitor's reader thread drives it.
    """

    def __init__(self, policy: Policy, catalog: Any, *, scope: str | None = None,
                 own_tgid: int | None = None) -> None:
        self.mount = cgroup2_mount()
        if self.mount is None:
            raise ProbeLoadError("enforcement needs a cgroup v2 mount (none found in /proc/self/mounts)")
        self.scope = os.path.join(self.mount, (scope or "/").lstrip("/")).rstrip("/") or self.mount
        self.catalog = catalog
        self.own_tgid = own_tgid if own_tgid is not None else os.getpid()
        self._lock = threading.Lock()
        self._links: list[int] = []
        self._cg_fd = -1
        # (uid, addr) -> names of a DNS-over-TCP answer (learned here; UDP answers: in the kernel)
        self._learned: LRUCache[tuple[int, str], tuple[str, ...]] = LRUCache(maxsize=16384)
        # (pid, addr) -> the name a DNS answer that process read gave it: names connect decisions
        self._names: LRUCache[tuple[int | None, str], str] = LRUCache(maxsize=16384)
        self._lost: dict[tuple[LossPlace, str], int] = {}  # counted, not yet reported
        self._kcounts = dict.fromkeys(_COUNT_LOSSES, 0)  # pol_counts losses already reported
        self._windows: dict[tuple, _Window] = {}  # aggregation (insertion order = oldest first)
        self.decisions_in = 0  # kernel records read (tests, stats)
        from busted.host.cgroups import CgroupPaths as _IdPaths

        self._cg_paths = _IdPaths(self.mount)  # names the container of a kernel decision
        self._gen = 0  # the generation in force (pol_gen)
        self._krules: list[list[bytes]] = [[], []]  # packed pol_rule entries per generation
        self._policy = policy
        self.compiled = compile_policy(policy, catalog, cgroup_mount=self.mount)
        self._events: list[Event] = []
        self._ring: bpfsys.RingReader | None = None
        self.maps: dict[str, bpfsys.Map] = {}  # empty once closed
        self.obj = PolicyObject(build_source())  # raises before anything is attached
        self.maps = self.obj.maps
        from busted.policy.model_enforce import ModelGuard

        self.models = ModelGuard(self.obj, lambda: self._cg_fd)
        try:
            ring = self.maps["pol_events"]
            self._ring = bpfsys.RingReader(ring.fd, ring.max_entries)
            # Everything verified up front, concurrently; what follows only attaches.
            self.obj.preload([(f"tracepoint__{cat}__{name}", _PROG_TRACEPOINT, 0) for cat, name in _TRACEPOINTS]
                             + [(fn, ptype, atype) for _t, _s, fn, ptype, atype in _TAILS]
                             + [(fn, ptype, atype) for fn, (ptype, atype) in _ATTACH.items()]
                             + (self.models.programs() if self.compiled.models.entries else []))
            # The exec/fork/exit tracepoints first, then the processes that were already running
            # (seed_exes), before any cgroup program judges them.
            for cat, name in _TRACEPOINTS:
                fd = self.obj.prog(f"tracepoint__{cat}__{name}", _PROG_TRACEPOINT)
                try:
                    self._links.append(bpfsys.perf_attach_tracepoint(cat, name, fd))
                except bpfsys.BpfError as exc:
                    raise ProbeLoadError(f"cannot attach tracepoint {cat}:{name}: {exc}") from exc
            self._write_maps(self.compiled, first=True)
            self.seed_exes()
            for table, slot, fn, ptype, atype in _TAILS:
                self.obj.set_prog_slot(table, slot, self.obj.prog(fn, ptype, atype))
            self._cg_fd = os.open(self.scope, os.O_RDONLY | os.O_DIRECTORY)
            # All verified first, then attached back to back: no window in which some are attached
            # and the rest still in the verifier.
            loaded = [(self.obj.prog(fn, ptype, atype), atype) for fn, (ptype, atype) in _ATTACH.items()]
            for fd, atype in loaded:
                self._links.append(_attach_cgroup(fd, self._cg_fd, atype))
            self.models.ensure_attached()
        except BaseException:
            self.close()
            raise

    @property
    def policy(self) -> Policy:
        return self._policy

    # -- maps ----------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The generation in force (0 or 1): a reload writes the other one, then flips."""
        return self._gen

    def _write_maps(self, c: Compiled, first: bool = False) -> None:
        """Write ``c`` into the generation not in force, completely, then flip ``pol_gen``: one
        4-byte write, so every decision sees the old policy or the new one (issue 18, item 8). An
        error before the flip leaves the generation in force untouched."""
        m = self.maps
        g = 0 if first else 1 - self._gen
        rules = m["pol_rules"]
        # Slot i holds rule i of both generations; the half in force is rewritten with the same
        # bytes, so a reader of it sees no change.
        self._krules[g] = list(c.rules)
        empty = bytes(POL_RULE.struct.size)
        for i in range(max(len(kr) for kr in self._krules)):
            rules.update(_U32.pack(i), b"".join(kr[i] if i < len(kr) else empty for kr in self._krules))
        m["pol_conf"].update(_U32.pack(g), POL_CONF.pack(own_tgid=self.own_tgid, nrules=len(c.rules),
                                                          dflt=c.default, flags=c.flags))
        exes = m["pol_exe"]
        for k in list(exes.keys()):
            kg, raw = lpm_split(k)
            if kg == g and raw not in c.exes:
                exes.delete(k)
        for raw, mask in c.exes.items():
            exes.update(lpm_key(g, raw, EXE_MAX), _U64.pack(mask))
        ctr = m["pol_ctr"]
        for k in list(ctr.keys()):
            cgid, kg, _pad = _CKEY.unpack(k)
            if kg == g and cgid not in c.ctr:
                ctr.delete(k)
        for cgid, mask in c.ctr.items():
            ctr.update(_CKEY.pack(cgid, g, 0), _CVAL.pack(mask, c.ctr_scope.get(cgid, 0)))
        # LPM keys start with the generation (32 bits of every prefix).
        names = m["pol_names"]
        for k in list(names.keys()):
            kg, raw = lpm_split(k)
            if kg == g and raw not in c.names:
                names.delete(k)
        for raw, mask in c.names.items():
            names.update(lpm_key(g, raw, NAME_MAX), _U64.pack(mask))
        want4: dict[tuple[bytes, int], int] = {}
        want6: dict[tuple[bytes, int], int] = {}
        for (fam, addr, plen), mask in c.cidrs.items():
            if fam == 4:
                want4[(addr.to_bytes(4, "big"), plen)] = mask
            else:
                want6[(addr.to_bytes(16, "big"), plen)] = mask
        for t, want, size in ((m["pol_addr4"], want4, 4), (m["pol_addr6"], want6, 16)):
            for k in list(t.keys()):
                klen, kg = _LPM_HEAD.unpack_from(k)
                if kg == g and (k[8: 8 + size], klen - 32) not in want:
                    t.delete(k)
            for (packed, bits), mask in want.items():
                t.update(_LPM_HEAD.pack(32 + bits, g) + packed, _U64.pack(mask))
        self._relearn(c, g)
        self.models.write(c.models, g)
        m["pol_gen"].update(_U32.pack(0), _U32.pack(g))  # the switch, written last
        self._gen = g

    def set_policy(self, policy: Policy) -> None:
        """Compile and load ``policy``; on error (PolicyError) the previous one stays."""
        with self._lock:  # compiled under the lock: no cgroup_mkdir record is applied between walk and switch
            c = compile_policy(policy, self.catalog, cgroup_mount=self.mount)
            try:
                self._write_maps(c)
            except Exception as exc:  # noqa: BLE001 - a map error refuses the policy, never kills the caller
                raise PolicyError(f"the policy could not be written to the kernel's maps: {exc}",
                                  path=getattr(policy, "source", None)) from exc
            self.compiled = c
            self._policy = policy
            try:
                self.models.ensure_attached()  # a reload that brings the first model rules
            except Exception as exc:  # noqa: BLE001 - the policy is in force; the model part is reported
                self._count(LossPlace.KERNEL_MAP, f"policy: model programs not attached: {type(exc).__name__}: {exc}")

    def learn_dns(self, ev: DnsAnswer, uid: int | None = None) -> None:
        """Map a DNS-over-TCP answer's addresses for policy names, for ``uid`` (the owner of the
        flow that carried it) only. UDP answers are learned by the kernel from the packet itself
        (pol_dns_ingress): a UDP DnsAnswer is a read() the capture saw, which a user can forge
        (docs/policy.md, "Evidence and normalisation"), so it only names decisions here."""
        for ip in ev.addresses:
            self._names[(ev.pid, ip)] = ev.qname
        if ev.transport != "tcp" or uid is None:
            return
        with self._lock:  # the reader calls this; set_policy may run in another thread
            try:
                self._learn(ev, uid)
            except Exception as exc:  # noqa: BLE001 - the reader must not die on a map error: counted
                self._count(LossPlace.KERNEL_MAP, f"policy: DNS answer not learned: {type(exc).__name__}: {exc}")

    def _learned_key(self, uid: int, ip: str, gen: int | None = None) -> tuple[bpfsys.Map, bytes]:
        a = ipaddress.ip_address(ip)
        g = self._gen if gen is None else gen
        if a.version == 4:
            return self.maps["pol_learn4"], _LKEY4.pack(uid, a.packed, g)
        return self.maps["pol_learn6"], _LKEY6.pack(uid, a.packed, g)

    def _put_learned(self, uid: int, ip: str, mask: int, gen: int | None = None) -> None:
        t, k = self._learned_key(uid, ip, gen)
        raw = t.lookup(k)
        old = _U64.unpack_from(raw)[0] if raw is not None else 0
        v = mask
        if old and (old & ~(1 << AMBIG_BIT)) != mask:
            v = old | mask | (1 << AMBIG_BIT)
        t.update(k, _U64.pack(v))  # an LRU map: never full

    def _learn(self, ev: DnsAnswer, uid: int) -> None:
        if not self.maps:
            return
        names = (ev.qname, *ev.cname_chain)
        mask = 0
        for n in names:
            mask |= name_mask(self.compiled.names, n)
        for ip in ev.addresses:
            self._learned[(uid, ip)] = names
            if mask:
                self._put_learned(uid, ip, mask)

    def _relearn(self, c: Compiled, gen: int) -> None:
        """Before a reload's switch: the learned masks are bits of the old rules, so generation
        ``gen`` (the one being written) starts empty, and what user space learned (DNS over TCP)
        is judged again into it. The next UDP answer teaches the rest (in the generation in force
        when it arrives); the old generation's entries wait for the next reload's clearing."""
        for t, lay in ((self.maps["pol_learn4"], _LKEY4), (self.maps["pol_learn6"], _LKEY6)):
            for k in list(t.keys()):
                if lay.unpack(k)[2] == gen:
                    t.delete(k)  # False if the LRU evicted it meanwhile
        for (uid, ip), names in list(self._learned.items()):
            mask = 0
            for n in names:
                mask |= name_mask(c.names, n)
            if mask:
                self._put_learned(uid, ip, mask, gen)

    def addr_mask(self, ip: str, uid: int | None = None) -> int:
        """The kernel's mask for an address: the policy's (catalog CIDRs), with what DNS answers
        taught ``uid``'s sockets (as connect() sees it for that uid). For tests and docs."""
        a = ipaddress.ip_address(ip)
        t = self.maps["pol_addr4" if a.version == 4 else "pol_addr6"]
        v = t.lookup(_LPM_HEAD.pack(32 + 8 * len(a.packed), self._gen) + a.packed)
        mask = _U64.unpack_from(v)[0] if v is not None else 0
        if uid is not None:
            lt, lk = self._learned_key(uid, ip)
            lv = lt.lookup(lk)
            mask |= _U64.unpack_from(lv)[0] if lv is not None else 0
        return mask

    def seed_exes(self, proc: str = "/proc", passes: int = 2) -> int:
        """Processes older than the programs: their exe from /proc/PID/exe (root reading /proc),
        written only where the kernel has no entry yet (BPF_NOEXIST: an exec or fork the
        tracepoints saw since is newer than what we read). Two passes catch the children of
        processes not yet seeded when they forked. Returns the entries written."""
        t = self.maps["pol_exe_proc"]
        written = 0
        for _ in range(passes):
            try:
                pids = [int(n) for n in os.listdir(proc) if n.isdigit()][:MAX_PROCS]
            except OSError:
                return written
            for pid in pids:
                try:
                    path = os.readlink(f"{proc}/{pid}/exe")
                except OSError:
                    continue  # a kernel thread, gone, or not ours to read
                try:
                    t.update(_U32.pack(pid), _exe_value(path), _NOEXIST)
                    written += 1
                except bpfsys.BpfError as exc:
                    if exc.errno == errno.E2BIG:  # full (EEXIST: the kernel knows it already)
                        self._count(LossPlace.KERNEL_MAP, _COUNT_LOSSES["exe_refused"][1])
        return written

    def exe_of(self, pid: int) -> str | None:
        """The exe the kernel holds for process ``pid`` (tests, docs), or None."""
        v = self.maps["pol_exe_proc"].lookup(_U32.pack(pid))
        return None if v is None else os.fsdecode(v.split(b"\0", 1)[0])

    def _resolve_exe(self, pid: int, rel: bytes, proc: str = "/proc") -> None:
        """An exec by a relative filename: the kernel's entry becomes /proc/PID/exe, if it still
        holds that filename (the process has not exec'd again since)."""
        t = self.maps["pol_exe_proc"]
        v = t.lookup(_U32.pack(pid))
        if v is None or v.split(b"\0", 1)[0] != rel:
            return
        try:
            path = os.readlink(f"{proc}/{pid}/exe")
        except OSError:
            return  # gone
        try:
            t.update(_U32.pack(pid), _exe_value(path))
        except bpfsys.BpfError:
            self._count(LossPlace.KERNEL_MAP, _COUNT_LOSSES["exe_refused"][1])

    def _on_cgroup(self, r: dict[str, Any]) -> None:
        """A cgroup_mkdir record: a container's top cgroup that a container rule names enters the
        generation in force (checked against the v2 mount: the id is that directory's inode)."""
        if not self.compiled.flags & (CF_CTR | CF_BCTR) or self.mount is None:
            return
        nl = min(r.get("nl", 0), 255)
        rel = "/" + os.fsdecode(r["name"][:nl]).lstrip("/")
        cid = container_of(rel).container_id
        if cid is None or container_of(os.path.dirname(rel)).container_id == cid:
            return
        bits = container_rule_bits(self._policy, cid)
        if not bits and not self.compiled.flags & CF_BCTR:
            return
        try:
            if os.stat(os.path.join(self.mount, rel.lstrip("/"))).st_ino != r["cookie"]:
                return  # another hierarchy (v1), or already gone
        except OSError:
            return
        from busted.policy.budgets import scope_hash

        try:
            self.maps["pol_ctr"].update(_CKEY.pack(r["cookie"], self._gen, 0), _CVAL.pack(bits, scope_hash(cid)))
        except bpfsys.BpfError:  # the map is full
            self._count(LossPlace.KERNEL_MAP, "policy: container cgroup not added (pol_ctr full): not enforced")
            return
        self.compiled.ctr[r["cookie"]] = bits

    def counts(self) -> dict[str, int]:
        """Kernel counters (POL_COUNTS): pol_denied_sk entries taken, ClientHellos whose SNI could
        not be judged, addresses learned from DNS answers; and the losses: decision records the
        ring had no room for, learned addresses and denied sockets a map refused."""
        t = self.maps["pol_counts"]
        return {what: percpu_sum(t, i) for i, what in enumerate(POL_COUNTS)}

    # -- decisions -----------------------------------------------------------------------------

    def _on_rec(self, raw: bytes) -> None:
        """One record of the policy ring: a decision, or a cgroup_mkdir / relative exec note."""
        size = len(raw)
        try:
            r = dict(zip(POL_REC.names(), POL_REC.struct.unpack_from(raw), strict=True))
            if size >= POL_REC.size + POL_TLS_EXT.size:
                r.update(zip(POL_TLS_EXT.names(), POL_TLS_EXT.struct.unpack_from(raw, POL_REC.size), strict=True))
            if r["point"] == POINT_CGROUP:
                self._on_cgroup(r)
                return
            if r["point"] == POINT_EXE:
                self._resolve_exe(r["pid"], r["exe"].split(b"\0", 1)[0])
                return
            self.decisions_in += 1
            self._aggregate(r)
        except Exception:  # a record we cannot read must not stop the reader: counted
            self._count(LossPlace.PARSE, "policy: unreadable decision record")

    def _count(self, where: LossPlace, what: str, n: int = 1) -> None:
        k = (where, what)
        self._lost[k] = self._lost.get(k, 0) + n

    def _aggregate(self, r: dict[str, Any]) -> None:
        """The first of identical decisions (process x rule x point x destination, and for a
        ClientHello the name, the reason and the verdict) is reported at once; the rest of its
        window (AGG_WINDOW_NS) as one decision with ``count``, ``first_ns`` and ``last_ns`` (issue
        18, item 9): a loop cannot flood the history, and every denial is counted."""
        name = r["name"][: min(r.get("nl", 0), 256)] if "name" in r else b""
        key = (r["pid"], r["rule"], r["point"], r["family"], r["daddr"], r["dport"], r["uid"], r["cgroup"],
               r.get("reason", 0), r.get("verdict", 1), name)
        ts = r["ts_ns"]
        w = self._windows.get(key)
        if w is not None and ts - w.opened_ns < AGG_WINDOW_NS:
            if not w.count:
                w.first_ns = ts
            w.count += 1
            w.last_ns = ts
            return
        if w is not None:  # its window is over: report it, this record opens the next one
            self._close_window(key)
        d = self._decision(r)
        self._events.append(d)
        if len(self._windows) >= AGG_MAX_KEYS:
            self._close_window(next(iter(self._windows)))
        self._windows[key] = _Window(first=d, opened_ns=ts)

    def _close_window(self, key: tuple) -> None:
        w = self._windows.pop(key)
        if w.count:
            self._events.append(replace(
                w.first, ts_ns=w.last_ns, wall_time=w.first.wall_time + (w.last_ns - w.first.ts_ns) / 1e9,
                count=w.count, first_ns=w.first_ns, last_ns=w.last_ns))

    def _flush_windows(self, now_ns: int, final: bool = False) -> None:
        """Report the windows that are over (all of them if ``final``). A window over with a
        count (a loop still running) is reported and its key keeps a fresh window, so the loop's
        next denials are counted into it rather than reported one by one. Windows are kept in
        the order they opened (a reopened key moves to the end): the walk stops at the first one
        still open, so a drain costs what it reports, not the number of open windows."""
        due = []
        for key, w in self._windows.items():
            if not final and now_ns - w.opened_ns < AGG_WINDOW_NS:
                break
            due.append((key, w))
        for key, w in due:
            self._close_window(key)
            if w.count and not final:
                self._windows[key] = _Window(first=w.first, opened_ns=now_ns)

    def _losses(self) -> list[Event]:
        """The losses counted since the last call, as EventsLost (the kernel's ring-full count
        included)."""
        try:
            now = self.counts()
            for what, (where, detail) in _COUNT_LOSSES.items():
                if now[what] > self._kcounts[what]:
                    self._count(where, detail, now[what] - self._kcounts[what])
                    self._kcounts[what] = now[what]
        except Exception as exc:  # noqa: BLE001 - counted, the reader goes on
            self._count(LossPlace.KERNEL_MAP, f"policy: counters not read: {type(exc).__name__}")
        models: list[Event] = []
        try:
            guard = getattr(self, "models", None)  # None: an Enforcer not built by __init__ (tests)
            models = guard.losses() if guard is not None else []
        except Exception as exc:  # noqa: BLE001 - counted, the reader goes on
            self._count(LossPlace.KERNEL_MAP, f"policy: model counters not read: {type(exc).__name__}")
        if not self._lost:
            return models
        ns, wall = time.monotonic_ns(), time.time()
        out: list[Event] = models + [EventsLost(ts_ns=ns, wall_time=wall, where=where, count=n, detail=detail)
                            for (where, detail), n in self._lost.items()]
        self._lost = {}
        return out

    def _decision(self, r: dict[str, Any]) -> PolicyDecision:
        pol = self._policy
        if r["point"] == POINT_MODEL:
            from busted.policy.model_enforce import decision

            ip = _ip_key(r["family"], r["daddr"]) if r["family"] else None
            return decision(r, pol, self.catalog, ip, self._names.get((r["pid"] or None, ip)) if ip else None)
        idx = r["rule"]
        budget = _budget_name(self.compiled, idx)
        rule = pol.rules[idx] if budget is None and idx != POL_DEFAULT and idx < len(pol.rules) else None
        if budget is not None:
            name, action = f"budget:{budget}", "deny"
        else:
            name, action = (rule.name, rule.action) if rule is not None else ("default", pol.default)
        ip = _ip_key(r["family"], r["daddr"])
        matched: list[tuple[str, Any]] = [("daddr", ip)]
        enforced = True
        if r["point"] == POINT_TLS:
            # What the hello said, not what the address is known for: the verdict was about it.
            nl = min(r.get("nl", 0), 256)
            sni = r["name"][:nl].decode("ascii", errors="replace") if "name" in r and nl else None
            hostname = normalize_name(sni) if sni else None
            hm = self.catalog.match_host(hostname) if hostname else None
            provider = hm.id if hm is not None else None
            if hostname:
                matched.append(("sni", hostname))
            reason = SNI_REASONS.get(r.get("reason", 0))
            if reason:
                matched.append(("reason", reason))
            if r.get("verdict", 1) == 0:  # not judged, let through: reported, not stopped
                name, action, enforced = "default", "audit", False
            else:
                action = "deny"
        else:
            hostname = self._names.get((r["pid"] or None, ip))
            hm = self.catalog.match_host(hostname) if hostname else None
            m = self.catalog.match_ip(ip)
            provider = hm.id if hm is not None else (m.id if m is not None else None)
            if provider is None and rule is not None and rule.provider is not None and len(rule.provider) == 1:
                provider = rule.provider[0]
        if provider:
            matched.append(("provider", provider))
        comm = r["comm"].split(b"\0", 1)[0].decode(errors="replace") or None
        exe = os.fsdecode(r["exe"].split(b"\0", 1)[0]) or None if "exe" in r else None
        wall = r["ts_ns"] / 1e9 + (time.time() - time.monotonic())
        if budget is not None:
            matched.append(("budget", budget))
        if rule is not None and rule.exe is not None and exe is None and r["pid"]:
            exe = self.exe_of(r["pid"])  # a ClientHello record has none: the process, if it lives
        if rule is not None and rule.exe is not None and exe is not None:
            matched.append(("exe", exe))
        if rule is not None and rule.container is not None:
            cpath = self._cg_paths.path(r["cgroup"])
            cid = container_of(cpath).container_id if cpath else None
            if cid is not None:
                matched.append(("container", cid))
        return PolicyDecision(
            ts_ns=r["ts_ns"], wall_time=wall, rule=name, action=action, enforced=enforced,
            point=_POINTS.get(r["point"], "connect"), matched=tuple(matched), flow_id=None,
            pid=r["pid"] or None, tid=r["tid"] or None, uid=r["uid"], comm=comm, exe=exe, cgroup_id=r["cgroup"],
            daddr=ip, dport=r["dport"], hostname=hostname, provider=provider,
            count=1, first_ns=r["ts_ns"], last_ns=r["ts_ns"],
        )

    def budget_commands(self, cmds: list[Any]) -> list[str]:
        """Carry out busted.policy.budgets Block/Unblock commands in the kernel's budget map; returns the
        names of budgets whose block did not fit (map full)."""
        from busted.policy.budget_enforce import apply_commands

        with self._lock:
            if not self.maps:
                return []
            try:
                return apply_commands(self.maps["pol_budget"], cmds)
            except Exception as exc:  # noqa: BLE001 - the reader must not die on a map error: counted
                self._count(LossPlace.KERNEL_MAP, f"policy: budget map not written: {type(exc).__name__}: {exc}")
                return []

    def consume(self, final: bool = False) -> list[Event]:
        """Decisions the kernel made since the last call (aggregated), and counted losses.
        ``final``: report every open aggregation window (at close)."""
        with self._lock:
            if not self.maps:
                return []
            try:
                self._read_ring()
            except Exception as exc:  # noqa: BLE001 - counted, the reader goes on
                self._count(LossPlace.KERNEL_RING, f"policy: decision ring not read: {type(exc).__name__}")
            self._flush_windows(time.monotonic_ns(), final)
            out, self._events = self._events, []
            return out + self._losses()

    _RING_BATCH = 4096  # records per read
    _RING_BATCHES = 64  # per drain: the ring (512 KiB) holds fewer records than this reads

    def _read_ring(self) -> None:
        """Every record the kernel committed since the last drain (bounded), handled in order."""
        ring = self._ring
        if ring is None:
            return
        for _ in range(self._RING_BATCHES):
            recs = ring.read(self._RING_BATCH)
            for raw in recs:
                self._on_rec(raw)
            if len(recs) < self._RING_BATCH:
                return

    def close(self) -> None:
        with self._lock:
            models = getattr(self, "models", None)
            if models is not None:
                models.close()
            links, self._links = getattr(self, "_links", []), []
            for fd in links:  # detach first, then programs and maps
                try:
                    os.close(fd)
                except OSError:
                    pass
            if getattr(self, "_cg_fd", -1) >= 0:
                os.close(self._cg_fd)
                self._cg_fd = -1
            ring, self._ring = getattr(self, "_ring", None), None
            if ring is not None:
                ring.close()
            obj = getattr(self, "obj", None)
            self.maps = {}
            if obj is not None:
                obj.close()


class PolicyRuntime:
    """What a Monitor runs for a policy: the user-space judge always, the kernel programs only when
    enforcing. Driven by the Monitor's reader thread: ``feed`` right after the flow table (DNS
    answers are mapped into the kernel there, synchronously), ``consume`` at every drain."""

    def __init__(self, policy: Policy, catalog: Any, *, enforce: bool = False, scope: str | None = None,
                 budget_spend: Any = ()) -> None:
        from busted.policy.budget_enforce import BudgetRunner
        from busted.policy.rules import PolicyJudge

        policy.check_providers(catalog.providers)  # dry run or not: a typo never silently matches nothing
        self.catalog = catalog
        self.enforcer: Enforcer | None = None
        if enforce:
            self.enforcer = Enforcer(policy, catalog, scope=scope)
        kernel = self.enforcer.compiled.kernel_deny if self.enforcer else set()
        self.judge = PolicyJudge(policy, cgroup_path=CgroupPaths(), kernel_rules=frozenset(kernel))
        self.budgets = BudgetRunner(policy, self.enforcer, self.judge._cgroup_path, seed=budget_spend)
        # Measurements (bounded samples): seconds spent mapping a DnsAnswer's addresses, and ns from
        # the client's read of the answer (the event's ts_ns) to user space having mapped it.
        self.dns_learn_s: list[float] = []
        self._dns_flow_uid: LRUCache[int, int | None] = LRUCache(maxsize=4096)  # DNS-over-TCP flow -> uid
        self.dns_lag_ns: list[int] = []
        # (pid, model) of requests the kernel stopped: user space's own llm_request verdict on the
        # same call (its plaintext was read before the drop) is not repeated.
        self._model_stopped: LRUCache[tuple[int | None, str], bool] = LRUCache(maxsize=4096)

    @property
    def policy(self) -> Policy:
        return self.judge.policy

    def set_policy(self, policy: Policy) -> None:
        """Install ``policy``; a PolicyError (e.g. too many rules for the kernel) keeps the old one."""
        policy.check_providers(self.catalog.providers)
        if self.enforcer is not None:
            self.enforcer.set_policy(policy)
            self.judge.kernel_rules = frozenset(self.enforcer.compiled.kernel_deny)
        self.judge.policy = policy
        self.budgets.set_policy(policy)

    def feed(self, events: list[Event]) -> list[Event]:
        enf = self.enforcer
        if enf is not None:
            for ev in events:
                if isinstance(ev, FlowOpened) and ev.dport == 53:
                    self._dns_flow_uid[ev.flow_id] = ev.uid
                elif isinstance(ev, DnsAnswer):
                    t0 = time.perf_counter()
                    uid = self._dns_flow_uid.get(ev.flow_id) if ev.flow_id is not None else None
                    enf.learn_dns(ev, uid)
                    if len(self.dns_learn_s) < 4096:
                        self.dns_learn_s.append(time.perf_counter() - t0)
                        self.dns_lag_ns.append(time.monotonic_ns() - ev.ts_ns)
        out = self.judge.feed(events)
        if self._model_stopped:
            out = [e for e in out if not (isinstance(e, PolicyDecision) and e.point == "llm_request"
                                          and (e.pid, str(dict(e.matched).get("model"))) in self._model_stopped)]
        return self.budgets.feed(out)

    def consume(self, final: bool = False) -> list[Event]:
        """The kernel's decisions (aggregated) and counted losses; ``final`` reports every open
        aggregation window (the Monitor's last drain)."""
        self.budgets.tick()
        if self.enforcer is None:
            return []
        out = self.enforcer.consume(final)
        for e in out:
            if isinstance(e, PolicyDecision) and e.point == "llm_request" and e.enforced:
                self._model_stopped[(e.pid, str(dict(e.matched).get("model")))] = True
        return out

    def close(self) -> None:
        if self.enforcer is not None:
            self.enforcer.close()
