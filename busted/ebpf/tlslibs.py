"""Which files to put TLS plaintext uprobes on.

A uprobe is attached to a *file* (an inode), so one attachment covers every process that maps that
file, including processes started later. We look for:

* the system's OpenSSL and GnuTLS libraries (``libssl.so.*``, ``libgnutls.so.*`` in the usual
  library directories);
* every other copy a running process maps (venvs, conda, vendored wheels), from
  ``/proc/<pid>/maps``; files of processes in other mount namespaces are reached through
  ``/proc/<pid>/root``;
* executables that embed OpenSSL and export its symbols (node), from ``/proc/<pid>/exe``.

Each candidate's ELF dynamic symbol table is read (pyelftools) to see which of the functions it
defines; files are deduplicated by (device, inode). Stripped or symbol-less TLS stacks (Go
crypto/tls, rustls, BoringSSL in Bun single-file binaries, Java) are out of reach: their flows are
still classified by SNI.
"""

from __future__ import annotations

import glob
import os
import shutil
from functools import lru_cache

__all__ = ["TLS_SYMBOLS", "exported_symbols", "kind_of", "scan", "scan_pid", "symbol_offsets",
           "system_libraries"]

TLS_SYMBOLS = frozenset({"SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex",
                         "gnutls_record_send", "gnutls_record_recv"})

_LIB_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/lib", "/lib/x86_64-linux-gnu",
             "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu")
_NAMES = ("libssl", "libgnutls")
_EMBEDDERS = ("node", "nodejs")  # executables that link OpenSSL statically and export it


def _file_id(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, int(st.st_mtime)


@lru_cache(maxsize=4096)
def _symbols_of(file_id: tuple[int, int, int], path: str) -> dict[str, int]:
    """TLS function -> file offset (where a uprobe goes) for the functions ``path`` defines."""
    try:
        from elftools.elf.elffile import ELFFile
        from elftools.elf.hash import ELFHashSection, GNUHashSection
        from elftools.elf.sections import SymbolTableSection
    except ImportError:  # pragma: no cover - a declared dependency
        return {}
    try:
        with open(path, "rb") as f:
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
                syms = [s for s in sec.iter_symbols() if s.name in TLS_SYMBOLS]
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
    except Exception:  # not ELF, truncated, unreadable: not a candidate
        return {}


def exported_symbols(path: str) -> frozenset[str]:
    """The TLS functions ``path`` defines and exports (empty if none, or not an ELF file)."""
    return frozenset(symbol_offsets(path))


def symbol_offsets(path: str) -> dict[str, int]:
    """TLS function -> file offset, for the functions ``path`` defines and exports."""
    fid = _file_id(path)
    if fid is None:
        return {}
    key = f"{fid[0]}:{fid[1]}:{fid[2]}:{path}"
    known = _disk.get(key)
    if known is None:
        known = _disk[key] = dict(_symbols_of(fid, path))
        _disk_dirty[0] = True
        if len(_disk) > 2 * _DISK_MAX:  # bounded: files seen in containers come and go
            _disk.pop(next(iter(_disk)))
    return dict(known)


# Reading ELF symbol tables with pyelftools is most of a warm start (~0.3 s for the system's
# libraries), and the files rarely change: the answers are kept beside the bytecode cache, by
# (device, inode, mtime, path), under the same trust rules (offsets say where uprobes go).
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
            if isinstance(k, str) and isinstance(v, dict) and all(
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


def kind_of(path: str) -> str | None:
    """"openssl", "gnutls" or None, by the symbols the file exports."""
    syms = exported_symbols(path)
    if {"SSL_write", "SSL_read"} & syms or {"SSL_write_ex", "SSL_read_ex"} & syms:
        return "openssl"
    if {"gnutls_record_send", "gnutls_record_recv"} & syms:
        return "gnutls"
    return None


def system_libraries() -> dict[str, str]:
    """path -> kind for the OpenSSL/GnuTLS libraries in the usual library directories, and for
    runtimes on PATH known to embed OpenSSL with its symbols exported (node): probed at start so
    a process started later is traced from its first call."""
    out: dict[str, str] = {}
    for d in _LIB_DIRS:
        for name in _NAMES:
            for path in sorted(glob.glob(f"{d}/{name}.so*")):
                kind = kind_of(path)
                if kind:
                    out[os.path.realpath(path)] = kind
    for name in _EMBEDDERS:
        exe = shutil.which(name)
        if exe and kind_of(os.path.realpath(exe)) == "openssl":
            out[os.path.realpath(exe)] = "openssl"
    return out


def scan_pid(pid: int, proc: str = "/proc") -> dict[str, str]:
    """path -> kind for the TLS libraries process ``pid`` maps and its executable, if it exports
    the symbols. Paths are usable from this mount namespace."""
    out: dict[str, str] = {}
    root = f"{proc}/{pid}/root"
    seen: set[str] = set()
    try:
        with open(f"{proc}/{pid}/maps") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1]:
            continue
        path = parts[5]
        base = os.path.basename(path)
        if path in seen or not path.startswith("/") or not base.startswith(_NAMES):
            continue
        seen.add(path)
        mapped_ino = int(parts[4]) if parts[4].isdigit() else 0
        local = path
        fid = _file_id(path)
        if fid is None or (mapped_ino and fid[1] != mapped_ino):
            local = root + path  # another mount namespace (a container): reach it through its root
        kind = kind_of(local)
        if kind:
            out[local] = kind
    try:
        exe = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        exe = ""
    if exe and not exe.endswith(" (deleted)"):
        local = exe if _file_id(exe) is not None else root + exe
        # Only OpenSSL embedded in an executable is looked for (node and its kin).
        if kind_of(local) == "openssl":
            out[local] = "openssl"
    return out


def scan(proc: str = "/proc") -> dict[str, str]:
    """path -> kind: the system libraries and every TLS library or executable running processes
    use. One entry per file (device, inode), whatever paths lead to it."""
    found = system_libraries()
    for name in os.listdir(proc):
        if name.isdigit():
            found.update(scan_pid(int(name), proc))
    out: dict[str, str] = {}
    ids: set[tuple[int, int]] = set()
    for path, kind in found.items():
        fid = _file_id(path)
        if fid is None or (fid[0], fid[1]) in ids:
            continue
        ids.add((fid[0], fid[1]))
        out[path] = kind
    return out
