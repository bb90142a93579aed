"""Which files to put TLS plaintext uprobes on.

A uprobe is attached to a *file* (an inode), so one attachment covers every process that maps that
file, including processes started later. We look at:

* the system's OpenSSL and GnuTLS libraries (``libssl.so.*``, ``libgnutls.so.*`` in the usual
  library directories, which only root can write);
* every other TLS library a running process *maps* (venvs, conda, vendored wheels, containers),
  from the lines of ``/proc/<pid>/maps``; never a directory listing;
* executables that embed OpenSSL and export its symbols (node), through ``/proc/<pid>/exe``.

Everything a process maps is attacker-controlled (any local user can map any file, in a mount
namespace of their own), so a mapped file is opened through the kernel's own link to *that*
mapping, ``/proc/<pid>/map_files/<range>`` (or ``/proc/<pid>/exe``), never by resolving its path
again: a path can have been replaced since, or lead out of a container through a symlink. The file
opened must be the inode the maps line names, a regular file, at most ``MAX_FILE_BYTES``, and an
ELF file that defines the functions (read from its dynamic symbol table with pyelftools). Files
are identified by (device, inode); the verdict is cached by (device, inode, size, mtime, ctime),
negative ones too, so the same file is looked at once. Stripped or symbol-less TLS stacks (Go
crypto/tls, rustls, BoringSSL in Bun single-file binaries, Java) are out of reach: their flows are
still classified by SNI.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
from dataclasses import dataclass
from typing import BinaryIO

from cachetools import LRUCache

__all__ = ["MAX_CANDIDATES_PER_PID", "MAX_FILE_BYTES", "TLS_SYMBOLS", "Candidate", "Inspected",
           "exported_symbols", "inspect_fd", "kind_of", "mapped_candidates", "open_candidate", "open_path",
           "scan", "scan_pid", "symbol_offsets", "system_libraries"]

TLS_SYMBOLS = frozenset({"SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex",
                         "gnutls_record_send", "gnutls_record_recv"})

_LIB_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/lib", "/lib/x86_64-linux-gnu",
             "/usr/lib/x86_64-linux-gnu")
_NAMES = ("libssl", "libgnutls")
_EMBEDDERS = ("node", "nodejs")  # executables that link OpenSSL statically and export it

MAX_FILE_BYTES = 512 << 20  # node is ~100 MB; a bigger "library" is not parsed
MAX_CANDIDATES_PER_PID = 16  # TLS-named files one process maps that are looked at (the rest: counted)


@dataclass(frozen=True)
class Candidate:
    """A file a process maps executable (or runs), as its maps line names it."""

    pid: int
    path: str  # as the process names it: shown, never opened (a path can be swapped)
    dev: int  # the mapped inode's device and number (from the maps line; 0 if unknown)
    ino: int
    source: str  # the kernel's link to exactly this mapping: /proc/<pid>/map_files/<range> or exe
    exe: bool = False


@dataclass(frozen=True)
class Inspected:
    """An opened file's identity and what it offers."""

    key: tuple[int, int]  # (st_dev, st_ino): the attachment key
    kind: str | None  # "openssl", "gnutls" or None (not a TLS library)
    offsets: dict[str, int]  # TLS function -> file offset (where a uprobe goes)


def _kind(syms: object) -> str | None:
    s = set(syms)  # type: ignore[call-overload]
    if s & {"SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex"}:
        return "openssl"
    if s & {"gnutls_record_send", "gnutls_record_recv"}:
        return "gnutls"
    return None


def _read_symbols(f: BinaryIO) -> dict[str, int]:
    """TLS function -> file offset for the functions the ELF file ``f`` defines ({} if none or not ELF)."""
    try:
        from elftools.elf.elffile import ELFFile
        from elftools.elf.hash import ELFHashSection, GNUHashSection
        from elftools.elf.sections import SymbolTableSection
    except ImportError:  # pragma: no cover - a declared dependency
        return {}
    try:
        elf = ELFFile(f)
        # The dynamic linker's own hash table answers "is NAME defined" without reading the
        # whole symbol table (node has ~100k symbols: 2 s in Python, 30 ms through the hash).
        table = elf.get_section_by_name(".gnu.hash") or elf.get_section_by_name(".hash")
        if isinstance(table, GNUHashSection | ELFHashSection):
            syms = [table.get_symbol(name) for name in TLS_SYMBOLS]
        else:
            sec = elf.get_section_by_name(".dynsym")
            if not isinstance(sec, SymbolTableSection):
                return {}
            syms = [s for i, s in enumerate(sec.iter_symbols()) if i < 1_000_000 and s.name in TLS_SYMBOLS]
        found = {s.name: s["st_value"] for s in syms if s is not None and s["st_shndx"] != "SHN_UNDEF"
                 and s["st_info"]["type"] == "STT_FUNC"}
        # A symbol's value is a virtual address; a uprobe wants the offset in the file: the
        # loadable segment that holds the address says how the two differ.
        loads = [(p["p_vaddr"], p["p_memsz"], p["p_offset"]) for p in elf.iter_segments()
                 if p["p_type"] == "PT_LOAD"]
        out = {}
        for name, vaddr in found.items():
            for seg_va, size, seg_off in loads:
                if seg_va <= vaddr < seg_va + size:
                    out[name] = vaddr - seg_va + seg_off
                    break
        return out
    except Exception:  # not ELF, truncated, malformed: not a candidate
        return {}


# Verdicts by file identity (device, inode, size, mtime, ctime): a file is parsed once, also when
# it is not a TLS library (a user can make many such files; each costs one fstat afterwards).
_verdicts: LRUCache[tuple[int, int, int, int, int], dict[str, int]] = LRUCache(maxsize=8192)


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def inspect_fd(fd: int) -> Inspected | None:
    """What the file open at ``fd`` offers: None unless a regular file of at most MAX_FILE_BYTES.
    Cheap checks first (type, size, ELF magic), then the dynamic symbol table, once per identity."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
        return None
    ident = _identity(st)
    key = (st.st_dev, st.st_ino)
    offsets = _verdicts.get(ident)
    if offsets is None:
        disk_key = ":".join(map(str, ident))
        offsets = _disk.get(disk_key)
        if offsets is None:
            offsets = {}
            try:
                if os.pread(fd, 4, 0) == b"\x7fELF":
                    with open(fd, "rb", closefd=False) as f:
                        offsets = _read_symbols(f)
            except OSError:
                offsets = {}
            if offsets:  # only real TLS libraries go to disk: junk must not evict them
                _disk[disk_key] = offsets
                _disk_dirty[0] = True
                if len(_disk) > 2 * _DISK_MAX:  # bounded: files seen in containers come and go
                    _disk.pop(next(iter(_disk)))
        _verdicts[ident] = offsets
    return Inspected(key, _kind(offsets) if offsets else None, dict(offsets))


def _open_regular(path: str, *, nofollow: bool) -> tuple[int, os.stat_result] | None:
    """An O_RDONLY fd on the regular file at ``path``: looked at with O_PATH first, so a FIFO or a
    device is never opened for reading (that can block or have side effects)."""
    flags = os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        pfd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            return None
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    finally:
        os.close(pfd)
    try:
        st2 = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):  # pragma: no cover - reopened the same fd
        os.close(fd)
        return None
    return fd, st2


def open_path(path: str) -> int | None:
    """An fd on the regular file at ``path`` (trusted paths only: system libraries, tests)."""
    got = _open_regular(path, nofollow=False)
    return got[0] if got is not None else None


def open_candidate(c: Candidate, proc: str = "/proc") -> int | None:
    """An fd on exactly the file ``c`` maps, or None (gone, changed, not a regular file).

    Through the kernel's link to the mapping; where that is refused (it needs CAP_SYS_ADMIN), through
    the process's root and its path, accepted only if that is the very inode the maps line names."""
    got = _open_regular(c.source, nofollow=False)
    if got is None and not c.exe and c.dev and c.ino:
        got = _open_regular(f"{proc}/{c.pid}/root{c.path}", nofollow=True)
        if got is not None and (got[1].st_dev, got[1].st_ino) != (c.dev, c.ino):
            os.close(got[0])
            return None
    if got is None:
        return None
    fd, st = got
    if c.ino and st.st_ino != c.ino:  # replaced since the maps line was read
        os.close(fd)
        return None
    return fd


def mapped_candidates(pid: int, proc: str = "/proc") -> tuple[list[Candidate], int]:
    """The TLS-named files ``pid`` maps executable (one per inode, at most MAX_CANDIDATES_PER_PID)
    and its executable; and how many more TLS-named files were left out by that bound."""
    out: list[Candidate] = []
    over = 0
    seen: set[tuple[int, int]] = set()
    try:
        # surrogateescape: a file name that is not UTF-8 must not hide the whole process
        with open(f"{proc}/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1]:
            continue
        path = parts[5]
        if not path.startswith("/") or not os.path.basename(path).startswith(_NAMES):
            continue
        try:
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            dev, ino = os.makedev(major, minor), int(parts[4])
        except ValueError:
            continue
        if (dev, ino) in seen:
            continue
        seen.add((dev, ino))
        if len(out) >= MAX_CANDIDATES_PER_PID:
            over += 1
            continue
        out.append(Candidate(pid, path, dev, ino, f"{proc}/{pid}/map_files/{parts[0]}"))
    try:
        exe = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        exe = ""
    if exe:
        out.append(Candidate(pid, exe, 0, 0, f"{proc}/{pid}/exe", exe=True))
    return out, over


# Reading ELF symbol tables with pyelftools is most of a warm start (~0.3 s for the system's
# libraries), and the files rarely change: the answers are kept beside the bytecode cache, by
# (device, inode, size, mtime, ctime), under the same trust rules (offsets say where uprobes go).
_disk: dict[str, dict[str, int]] = {}
_disk_dirty = [False]
_DISK_MAX = 512


def load_symbol_cache() -> None:
    from busted.ebpf import bytecode

    d = bytecode.cache_dir()
    if d is None:
        return
    data = bytecode.read_trusted(os.path.join(d, "tls-symbols.json"))
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(k, str) and k.count(":") == 4 and isinstance(v, dict) and v and all(
                    isinstance(n, str) and isinstance(o, int) for n, o in v.items()):
                _disk.setdefault(k, v)


def save_symbol_cache() -> None:
    from busted.ebpf import bytecode

    d = bytecode.cache_dir()
    if d is None or not _disk_dirty[0]:
        return
    while len(_disk) > _DISK_MAX:
        _disk.pop(next(iter(_disk)))
    bytecode.write_trusted(d, "tls-symbols.json", _disk)
    _disk_dirty[0] = False


def _inspect_path(path: str) -> Inspected | None:
    fd = open_path(path)
    if fd is None:
        return None
    try:
        return inspect_fd(fd)
    finally:
        os.close(fd)


def symbol_offsets(path: str) -> dict[str, int]:
    """TLS function -> file offset, for the functions ``path`` defines and exports."""
    got = _inspect_path(path)
    return got.offsets if got is not None else {}


def exported_symbols(path: str) -> frozenset[str]:
    """The TLS functions ``path`` defines and exports (empty if none, or not an ELF file)."""
    return frozenset(symbol_offsets(path))


def kind_of(path: str) -> str | None:
    """"openssl", "gnutls" or None, by the symbols the file exports."""
    got = _inspect_path(path)
    return got.kind if got is not None else None


def system_libraries() -> dict[str, str]:
    """path -> kind for the OpenSSL/GnuTLS libraries in the usual library directories, and for
    runtimes on PATH known to embed OpenSSL with its symbols exported (node): probed at start so
    a process started later is traced from its first call."""
    out: dict[str, str] = {}
    for d in _LIB_DIRS:
        for name in _NAMES:
            for path in sorted(glob.glob(f"{d}/{name}.so*"))[:16]:
                kind = kind_of(path)
                if kind:
                    out[os.path.realpath(path)] = kind
    for name in _EMBEDDERS:
        exe = shutil.which(name)
        if exe and kind_of(os.path.realpath(exe)) == "openssl":
            out[os.path.realpath(exe)] = "openssl"
    return out


def inspect_candidate(c: Candidate, proc: str = "/proc") -> Inspected | None:
    """Open and inspect one candidate (None: gone, changed, not a TLS file we probe)."""
    fd = open_candidate(c, proc)
    if fd is None:
        return None
    try:
        got = inspect_fd(fd)
    finally:
        os.close(fd)
    if got is None or got.kind is None or (c.exe and got.kind != "openssl"):
        return None  # only OpenSSL embedded in an executable is looked for (node and its kin)
    return got


def scan_pid(pid: int, proc: str = "/proc") -> dict[str, str]:
    """path (as the process names it) -> kind for the TLS libraries process ``pid`` maps and its
    executable, if it exports the symbols."""
    out: dict[str, str] = {}
    cands, _ = mapped_candidates(pid, proc)
    for c in cands:
        got = inspect_candidate(c, proc)
        if got is not None and got.kind is not None:
            out[c.path] = got.kind
    return out


def scan(proc: str = "/proc") -> dict[str, str]:
    """path -> kind: the system libraries and every TLS library or executable running processes
    map. One entry per file (device, inode), whatever paths lead to it (what ``busted doctor``
    shows)."""
    out: dict[str, str] = {}
    ids: set[tuple[int, int]] = set()
    for path, kind in system_libraries().items():
        got = _inspect_path(path)
        if got is not None and got.key not in ids:
            ids.add(got.key)
            out[path] = kind
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        cands, _ = mapped_candidates(int(name), proc)
        for c in cands:
            got = inspect_candidate(c, proc)
            if got is not None and got.key not in ids:
                ids.add(got.key)
                out[c.path] = got.kind or ""
    return out
