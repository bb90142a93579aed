"""``busted doctor --security``: the installation checked the way a root monitor trusts it.

Each check is a ``Check(status, what, detail)`` with status OK, WARN or FAIL; ``detail`` says what
was found and, unless OK, what to do. The rules are the monitor's own, not copies: the bytecode
cache's trust rule (``ebpf/bytecode.py``) and the output-file rules (``busted/_safe.py``).
docs/security.md lists the checks with the threat model.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import stat
import sys
from dataclasses import dataclass

from busted._safe import dir_problem, file_problem

__all__ = ["FAIL", "OK", "WARN", "Check", "render", "security_checks"]

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN or FAIL
    what: str  # e.g. "bytecode cache", "--store"
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"status": self.status, "check": self.what, "detail": self.detail}


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):o}"


def _code_dirs() -> list[Check]:
    """Where root imports busted and BCC from: another user who can write there runs code as root."""
    out = []
    for name in ("busted", "bcc"):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if not origin:
            out.append(Check(WARN if name == "bcc" else FAIL, f"{name} code", "not found by this interpreter"))
            continue
        why = dir_problem(os.path.dirname(origin))
        out.append(Check(FAIL, f"{name} code", f"{os.path.dirname(origin)}: {why}: that user's code would run "
                         "as root; install it where only root can write") if why else
                   Check(OK, f"{name} code", f"{os.path.dirname(origin)} writable only by its owner (root or you)"))
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    why = dir_problem(exe_dir)
    out.append(Check(FAIL, "interpreter", f"{sys.executable}: {why}; reinstall it where only root can write")
               if why else Check(OK, "interpreter", f"{sys.executable} (in {exe_dir}, writable only by root or you)"))
    # Every directory on sys.path is read at start (.pth files run code): as root, none may be another user's.
    dirs = [p for p in dict.fromkeys(os.path.abspath(p or ".") for p in sys.path) if os.path.isdir(p)]
    bad = [(p, w) for p in dirs if (w := dir_problem(p))]
    out.append(Check(FAIL, "import path", f"{bad[0][0]}: {bad[0][1]} ({len(bad)} of {len(dirs)} sys.path "
                     "directories); start busted from a directory only root can write, installed in one too")
               if bad else Check(OK, "import path", f"{len(dirs)} sys.path directories, each writable only by "
                                 "root or you"))
    return out


def _cache() -> list[Check]:
    from busted.ebpf.bytecode import _trusted, cache_dir  # the rule the monitor reads the cache with

    d = cache_dir()
    if d is None:
        return [Check(OK, "bytecode cache", "off (BUSTED_BPF_CACHE=off): every start compiles, in an isolated child")]
    try:
        st = os.stat(d)
    except FileNotFoundError:
        return [Check(OK, "bytecode cache", f"{d} does not exist yet; the first start creates it 0700")]
    except OSError as exc:
        return [Check(WARN, "bytecode cache", f"{d}: cannot check ({exc.strerror})")]
    if not _trusted(st):
        return [Check(WARN, "bytecode cache", f"{d} (owner uid {st.st_uid}, mode {_mode(st)}) is not trusted: the "
                      f"monitor ignores it and compiles at every start (~2 s). Fix: chown {os.geteuid()} {d}; "
                      f"chmod 700 {d}; or set BUSTED_BPF_CACHE to a directory only you can write")]
    ignored = []
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        try:
            if name.endswith(".json") and not _trusted(os.lstat(p)):
                ignored.append(name)
        except OSError:
            pass
    if ignored:
        return [Check(WARN, "bytecode cache", f"{d}: {len(ignored)} file(s) not owned by uid {os.geteuid()} or "
                      f"writable by others are ignored (e.g. {ignored[0]}); remove them")]
    return [Check(OK, "bytecode cache", f"{d} owned by uid {st.st_uid}, mode {_mode(st)}")]


def _input_file(flag: str, path: str, bad: str, effect: str) -> Check:
    """A file the monitor reads and acts on (policy, prices): writable by root or you only."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return Check(FAIL, flag, f"{path}: cannot read ({exc.strerror})")
    why = dir_problem(os.path.dirname(os.path.abspath(path)))
    if st.st_uid not in (0, os.geteuid()):
        why = f"owned by uid {st.st_uid}"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"writable by group or others (mode {_mode(st)})"
    if why:
        return Check(bad, flag, f"{path}: {why}: another user could {effect}. Fix: chown root {path}; "
                     f"chmod go-w {path} (and the directories above it)")
    return Check(OK, flag, f"{path} owned by uid {st.st_uid}, mode {_mode(st)}")


def _output(flag: str, path: str, sides: tuple[str, ...]) -> list[Check]:
    """Where an output would go: the rules of busted/_safe.py (the monitor refuses what fails them)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return [Check(FAIL, flag, f"{path}: directory {parent} does not exist; create it (mode 700) first")]
    why = dir_problem(parent)
    if why:
        return [Check(FAIL, flag, f"{path}: {why}; the monitor refuses it. Choose a directory only root can "
                      "write, e.g. /var/lib/busted (mode 700)")]
    out = []
    for p in (path, *(path + s for s in sides)):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        why = file_problem(st)
        if why:
            out.append(Check(FAIL, flag, f"{p} {why}; the monitor refuses it. Remove or move it"))
        elif st.st_mode & (stat.S_IRGRP | stat.S_IROTH) and p == path:
            out.append(Check(WARN, flag, f"{p} is readable by other users (mode {_mode(st)}): with "
                             f"--capture-content they read captured prompts. Fix: chmod 600 {p}"))
    if not out:
        exists = os.path.lexists(path)
        out.append(Check(OK, flag, f"{path}: " + ("kept private (mode and owner fine)" if exists else
                                                  "will be created 0600") + f" in {parent}"))
    return out


def _addr(flag: str, addr: str) -> Check:
    host, sep, port = addr.rpartition(":")
    if not sep and addr.isdigit():
        host = ""
    host = host.strip("[]") or "127.0.0.1"  # as --metrics: a bare port listens on loopback
    try:
        ips = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            ips = {ipaddress.ip_address(str(ai[4][0]).split("%")[0]) for ai in socket.getaddrinfo(host, None)}
        except OSError as exc:
            return Check(WARN, flag, f"{addr}: cannot resolve {host!r} ({exc})")
    if ips and all(ip.is_loopback for ip in ips):
        return Check(OK, flag, f"{addr}: loopback only")
    return Check(WARN, flag, f"{addr}: listens beyond loopback ({', '.join(sorted(map(str, ips)))}): whoever "
                 "reaches this host reads what it serves (processes, providers, costs) without a password. Bind "
                 "127.0.0.1 and put an authenticating proxy in front")


def security_checks(*, policy: str | None = None, prices: str | None = None, store: str | None = None,
                    jsonl: str | None = None, metrics: str | None = None, ui: str | None = None) -> list[Check]:
    """Every check, in the order printed. Options not given are not checked (they are not used)."""
    checks = []
    if os.geteuid() != 0:
        checks.append(Check(WARN, "user", f"checked as uid {os.geteuid()}; the monitor runs as root: run "
                            "`sudo busted doctor --security` to check what root would trust"))
    checks += _code_dirs()
    checks += _cache()
    if policy:
        checks.append(_input_file("--policy", policy, FAIL, "change what is allowed, audited and denied"))
    if prices:
        checks.append(_input_file("--prices", prices, FAIL, "change the costs reported"))  # the monitor refuses it
    if store:
        checks += _output("--store", store, (".lock", "-wal", "-shm", "-journal"))
    if jsonl and jsonl != "-":
        checks += _output("--jsonl", jsonl, ())
    for flag, addr in (("--metrics", metrics), ("--ui", ui)):
        if addr:
            checks.append(_addr(flag, addr))
    return checks


def render(checks: list[Check]) -> list[str]:
    return [f"{c.status:<5}{c.what:<16}{c.detail}" for c in checks]

