"""Compiled BPF bytecode: made by BCC in a short-lived child process, cached, loaded without BCC.

Why: compiling with BCC costs ~1.8 s and maps LLVM into the process (~75 MB resident just to
import it, ~160 MB after a compile). The monitor instead asks a child process (``python -m
busted.ebpf.compile``) to compile the C text. The child returns each function's instructions,
the maps BCC declared, and which instruction refers to which map; it then exits, and LLVM with it.
The result is cached on disk, keyed by everything that could change the bytecode (the C text, the
kernel's release and build, the BCC version), so the next start loads it directly (tens of ms).

Loading here means: create the maps (fresh, empty), rewrite each map reference (a 64-bit
``ld_imm64`` whose source register is BPF_PSEUDO_MAP_FD) from the child's map fd to ours, and
``BPF_PROG_LOAD`` the functions that the plan attaches. The kernel's verifier checks every program
exactly as when BCC loads it.

The cache holds code the kernel will run, so it is trusted only if the directory and the file
belong to this user and nobody else can write them; otherwise it is ignored (and recompiled).
``BUSTED_BPF_CACHE=off`` disables it; ``BUSTED_BPF_CACHE=/path`` moves it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field

from busted._safe import CHILD_CWD, child_env, python_argv, read_text_trusted
from busted._safe import trusted as _trusted  # one trust rule for every file busted trusts
from busted.ebpf import bpfsys
from busted.ebpf.probe import _bcc_version

__all__ = ["Compiled", "cache_dir", "compile_source", "get_compiled"]

FORMAT = 1
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1


@dataclass
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    child_fd: int
    key_desc: str = ""
    leaf_desc: str = ""


@dataclass
class Compiled:
    """What a compile produced; ``source`` tells whether it came from the cache or a child."""

    maps: list[MapSpec]
    funcs: dict[str, bytes]
    license: str = "GPL"
    kern_version: int = 0
    source: str = "compile"  # "cache" | "compile"
    compile_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "license": self.license, "kern_version": self.kern_version,
            "maps": [dict(m.__dict__) for m in self.maps],
            "funcs": {k: base64.b64encode(v).decode() for k, v in self.funcs.items()},
        })

    @classmethod
    def from_json(cls, text: str) -> Compiled:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError("unknown bytecode cache format")
        return cls(maps=[MapSpec(**m) for m in d["maps"]],
                   funcs={k: base64.b64decode(v) for k, v in d["funcs"].items()},
                   license=d["license"], kern_version=int(d["kern_version"]))


class CompileFailed(Exception):
    """The child could not compile; ``kind`` is "headers", "permission", "bcc" or "compile"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def cache_key(source: str) -> str:
    u = os.uname()
    h = hashlib.sha256()
    for part in (str(FORMAT), u.release, u.version, u.machine, _bcc_version() or "", source):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def cache_dir() -> str | None:
    """Where compiled programs are kept, or None when caching is off."""
    env = os.environ.get("BUSTED_BPF_CACHE", "")
    if env.lower() in ("off", "0", "no"):
        return None
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/busted/bpf"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "busted", "bpf")


def _read_text(path: str) -> str | None:
    try:
        return read_text_trusted(path)
    except (OSError, ValueError):
        return None


def read_trusted(path: str) -> object:
    """The JSON in ``path`` if the file and its directory pass the trust rules, else None."""
    text = _read_text(path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _cache_read(path: str) -> Compiled | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return Compiled.from_json(text)
    except (ValueError, KeyError, TypeError):
        return None  # unreadable or from another version: compile again


def _write_text(d: str, name: str, text: str) -> bool:
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        if not _trusted(os.stat(d)):
            return False
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(d, name))  # atomic: readers see the old file or the new one
        return True
    except OSError:
        return False  # a read-only or full disk only costs the next start some work


def write_trusted(d: str, name: str, data: object) -> None:
    _write_text(d, name, json.dumps(data))


def _cache_write(d: str, path: str, comp: Compiled) -> None:
    if _write_text(d, os.path.basename(path), comp.to_json()):
        _prune(d)


MAX_CACHED = 32  # compiled variants kept (plans x options); the least recently written go first


def _prune(d: str) -> None:
    entries = []
    for name in os.listdir(d):
        if name.endswith(".json") and name != "tls-symbols.json":
            try:
                entries.append((os.stat(os.path.join(d, name)).st_mtime, name))
            except OSError:
                pass
    for _mtime, name in sorted(entries)[:-MAX_CACHED]:
        try:
            os.unlink(os.path.join(d, name))
        except OSError:
            pass


def compile_source(source: str, timeout: float = 300.0) -> Compiled:
    """Compile ``source`` with BCC in a child process (LLVM never enters this process)."""
    import time

    t0 = time.monotonic()
    try:
        # Isolated (-I, cwd /, scrubbed env): as root, `python -m` from the caller's directory would
        # import whatever json.py or bcc/ another user left there, and cache its output as trusted.
        proc = subprocess.run(python_argv("busted.ebpf.compile"), input=source.encode(), cwd=CHILD_CWD,
                              env=child_env(), capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CompileFailed("compile", f"BPF compiler process: {exc}") from exc
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    try:
        reply = json.loads(lines[-1])
    except (ValueError, IndexError):
        raise CompileFailed("compile", f"BPF compiler process exited {proc.returncode}: "
                            f"{err.strip()[-2000:] or out.strip()[-2000:]}") from None
    if "error" in reply:
        raise CompileFailed(reply["error"], reply.get("message", "") + ("\n" + err[-2000:] if err else ""))
    comp = Compiled.from_json(json.dumps(reply["compiled"]))
    comp.compile_s = time.monotonic() - t0
    comp.warnings = [ln for ln in err.splitlines() if ln.strip()][-20:]
    return comp


def get_compiled(source: str) -> Compiled:
    """The bytecode for ``source``: from the cache when valid, else compiled (and cached)."""
    d = cache_dir()
    path = os.path.join(d, cache_key(source) + ".json") if d else None
    if path is not None:
        comp = _cache_read(path)
        if comp is not None:
            comp.source = "cache"
            return comp
    comp = compile_source(source)
    if d is not None and path is not None:
        _cache_write(d, path, comp)
    return comp


@dataclass
class Loaded:
    maps: dict[str, bpfsys.Map]
    progs: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in self.progs.values():
            _close(fd)
        self.progs.clear()
        for m in self.maps.values():
            _close(m.fd)
        self.maps.clear()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def create_maps(comp: Compiled) -> Loaded:
    loaded = Loaded(maps={})
    try:
        for m in comp.maps:
            fd = bpfsys.map_create(m.type, m.key_size, m.value_size, m.max_entries, m.flags, m.name)
            loaded.maps[m.name] = bpfsys.Map(fd, m.name, m.type, m.key_size, m.value_size, m.max_entries,
                                             leaf_desc=m.leaf_desc, key_desc=m.key_desc)
    except BaseException:
        loaded.close()
        raise
    return loaded


def relocate(insns: bytes, fd_map: dict[int, int]) -> bytes:
    """Rewrite the map fds inside ``ld_imm64`` map references (child fd -> our fd)."""
    code = bytearray(insns)
    i = 0
    n = len(code)
    while i + 8 <= n:
        if code[i] == _LD_IMM64:
            if (code[i + 1] >> 4) == _PSEUDO_MAP_FD:
                old = int.from_bytes(code[i + 4:i + 8], "little", signed=True)
                if old not in fd_map:
                    raise ValueError(f"instruction {i // 8} refers to unknown map fd {old}")
                code[i + 4:i + 8] = fd_map[old].to_bytes(4, "little", signed=True)
            i += 16  # ld_imm64 takes two instruction slots
        else:
            i += 8
    return bytes(code)


def load_function(comp: Compiled, loaded: Loaded, name: str, prog_type: int, *,
                  expected_attach_type: int = 0) -> int:
    """Load function ``name`` (once) with this process's map fds; returns its program fd."""
    if name in loaded.progs:
        return loaded.progs[name]
    if name not in comp.funcs:
        raise KeyError(name)
    fd_map = {m.child_fd: loaded.maps[m.name].fd for m in comp.maps}
    fd = bpfsys.load_prog(prog_type, relocate(comp.funcs[name], fd_map), name=name,
                          license=comp.license, kern_version=comp.kern_version,
                          expected_attach_type=expected_attach_type)
    loaded.progs[name] = fd
    return fd
