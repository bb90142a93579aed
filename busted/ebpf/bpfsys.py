"""The few bpf(2) and perf_event_open(2) calls the monitor needs, without BCC.

The monitor process loads cached bytecode (see ``bytecode.py``) and talks to the kernel through
these calls only, so it never maps BCC or LLVM (~75 MB of resident pages just to import them).
Everything here is stable uapi: ``union bpf_attr`` commands, ``struct perf_event_attr``, the BPF
ring buffer's memory layout. Attachments are perf-event file descriptors owned by this process,
so the kernel detaches every program when the process exits, however it exits (SIGKILL too).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import struct
from collections.abc import Iterator

__all__ = ["TRACE_UPROBE_MULTI", "BpfError", "Map", "RingReader", "load_prog", "load_prog_stats", "map_create",
           "possible_cpus", "cgroup_link", "perf_attach_tracepoint", "perf_attach_probe", "prog_recursion_misses",
           "uprobe_multi_link"]

_MACHINE = os.uname().machine
_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(_MACHINE)
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(_MACHINE)

# bpf(2) commands
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _MAP_NEXT_KEY, _PROG_LOAD = 0, 1, 2, 3, 4, 5
_OBJ_GET_INFO_BY_FD = 15
_LINK_CREATE = 28
TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type (kernel >= 6.6)
_F_UPROBE_MULTI_RETURN = 1
_MAP_LOOKUP_AND_DELETE = 21
# map types whose values are one slot per possible CPU
_PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
MAP_TYPE_RINGBUF = 27

_PERF_TYPE_TRACEPOINT = 2
_PERF_SAMPLE_RAW = 1 << 10
_PERF_FLAG_FD_CLOEXEC = 8
_PERF_EVENT_IOC_ENABLE = 0x2400
_PERF_EVENT_IOC_SET_BPF = 0x40042408
_PERF_ATTR_SIZE = 128

_RB_BUSY = 1 << 31
_RB_DISCARD = 1 << 30
_RB_HDR = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) or perf_event_open(2) call failed; ``log`` holds the verifier's words if any."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.log = log


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    if _NR_BPF is None:
        raise BpfError(errno.ENOSYS, f"bpf() on {_MACHINE}")
    r = _libc.syscall(_NR_BPF, cmd, attr, len(attr))
    if r < 0:
        raise BpfError(ctypes.get_errno(), what)
    return r


def _attr(fmt: str, *vals: object, size: int = 128) -> ctypes.Array:
    buf = ctypes.create_string_buffer(size)
    struct.pack_into(fmt, buf, 0, *vals)
    return buf


def possible_cpus() -> int:
    """How many slots a per-CPU map value has (the kernel sizes it by *possible* CPUs)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: str = "") -> int:
    attr = _attr("<IIIIIII16s", map_type, key_size, value_size, max_entries, flags, 0, 0,
                 name.encode()[:15])
    return _bpf(_MAP_CREATE, attr, f"creating map {name}")


def load_prog(prog_type: int, insns: bytes, *, name: str, license: str = "GPL", kern_version: int = 0,
              expected_attach_type: int = 0) -> int:
    """Load one program; on failure the verifier's log is in the raised BpfError."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())

    def attempt(log_size: int) -> int:
        log = ctypes.create_string_buffer(log_size) if log_size else None
        attr = _attr("<IIQQIIQII16sII", prog_type, len(insns) // 8, ctypes.addressof(code),
                     ctypes.addressof(lic), 1 if log_size else 0, log_size,
                     ctypes.addressof(log) if log is not None else 0, kern_version, 0,
                     name.encode()[:15], 0, expected_attach_type)
        try:
            return _bpf(_PROG_LOAD, attr, f"loading program {name}")
        except BpfError as exc:
            if log is not None:
                exc.log = log.value.decode(errors="replace")
            raise

    try:
        return attempt(0)
    except BpfError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSYS):
            raise
    return attempt(1 << 20)  # again, only to get the verifier's explanation


def load_prog_stats(prog_type: int, insns: bytes, *, name: str, license: str = "GPL", kern_version: int = 0,
                    expected_attach_type: int = 0) -> tuple[int, str]:
    """Load one program asking the verifier for its statistics only (log level 4, BPF_LOG_STATS:
    "processed N insns ... peak_states ..." and "verification time N usec"); (fd, that text).
    For bench/verifier_cost.py: the monitor loads with ``load_prog``, no log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(1 << 16)
    attr = _attr("<IIQQIIQII16sII", prog_type, len(insns) // 8, ctypes.addressof(code),
                 ctypes.addressof(lic), 4, len(log), ctypes.addressof(log), kern_version, 0,
                 name.encode()[:15], 0, expected_attach_type)
    try:
        fd = _bpf(_PROG_LOAD, attr, f"loading program {name}")
    except BpfError as exc:
        exc.log = log.value.decode(errors="replace")
        raise
    return fd, log.value.decode(errors="replace")


def _info(fd: int, size: int) -> bytes:
    info = ctypes.create_string_buffer(size)
    attr = _attr("<IIQ", fd, size, ctypes.addressof(info), size=16)
    _bpf(_OBJ_GET_INFO_BY_FD, attr, "reading object info")
    return info.raw


def map_info(fd: int) -> tuple[int, int, int, int, int, str]:
    """(type, key_size, value_size, max_entries, flags, name) of the map behind ``fd``."""
    raw = _info(fd, 88)
    mtype, _id, ksz, vsz, maxe, flags = struct.unpack_from("<6I", raw)
    name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return mtype, ksz, vsz, maxe, flags, name


# struct bpf_prog_info: recursion_misses sits at byte 208 (kernel >= 5.12).
_PROG_INFO_SIZE = 232
_RECURSION_MISSES_AT = 208


def prog_recursion_misses(fd: int) -> int:
    """recursion_misses of the BPF program behind ``fd``, 0 if unreadable (older kernels)."""
    if _NR_BPF is None:
        return 0
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = _attr("<IIQ", fd, _PROG_INFO_SIZE, ctypes.addressof(info), size=16)
    if _libc.syscall(_NR_BPF, _OBJ_GET_INFO_BY_FD, attr, len(attr)) != 0:
        return 0
    filled = struct.unpack_from("<I", attr.raw, 4)[0]  # the kernel writes back what it filled
    if filled < _RECURSION_MISSES_AT + 8:
        return 0
    return struct.unpack_from("<Q", info.raw, _RECURSION_MISSES_AT)[0]


class Map:
    """One BPF map by file descriptor; keys and values are bytes in the kernel's layout."""

    def __init__(self, fd: int, name: str, map_type: int, key_size: int, value_size: int,
                 max_entries: int, leaf_desc: str = "", key_desc: str = "") -> None:
        self.fd, self.name, self.type = fd, name, map_type
        self.key_size, self.value_size, self.max_entries = key_size, value_size, max_entries
        self.leaf_desc, self.key_desc = leaf_desc, key_desc
        self.ncpus = possible_cpus() if map_type in _PERCPU_TYPES else 1
        # per-CPU values are laid out one 8-byte-aligned slot per possible CPU
        self.slot = (value_size + 7) & ~7 if self.ncpus > 1 or map_type in _PERCPU_TYPES else value_size
        self._kbuf = ctypes.create_string_buffer(max(key_size, 1))
        self._kbuf2 = ctypes.create_string_buffer(max(key_size, 1))
        self._vbuf = ctypes.create_string_buffer(max(self.slot * self.ncpus, 1))

    def _op(self, cmd: int, key: bytes | None, value: int, flags: int, what: str) -> int:
        kaddr = 0
        if key is not None:
            ctypes.memmove(self._kbuf, key, self.key_size)
            kaddr = ctypes.addressof(self._kbuf)
        attr = _attr("<IIQQQ", self.fd, 0, kaddr, value, flags, size=32)
        r = _libc.syscall(_NR_BPF, cmd, attr, len(attr))
        return 0 if r == 0 else ctypes.get_errno()

    def lookup(self, key: bytes) -> bytes | None:
        err = self._op(_MAP_LOOKUP, key, ctypes.addressof(self._vbuf), 0, "lookup")
        if err == errno.ENOENT:
            return None
        if err:
            raise BpfError(err, f"map {self.name} lookup")
        return self._vbuf.raw[: self.slot * self.ncpus]

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i * self.slot: i * self.slot + self.value_size] for i in range(self.ncpus)]

    def take(self, key: bytes) -> bytes | None:
        """Read and delete one entry atomically (kernel >= 5.14 for hash maps); where the kernel
        cannot, read then delete. None if it is gone."""
        err = self._op(_MAP_LOOKUP_AND_DELETE, key, ctypes.addressof(self._vbuf), 0, "lookup and delete")
        if err == 0:
            return self._vbuf.raw[: self.slot * self.ncpus]
        if err == errno.ENOENT:
            return None
        if err not in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: the kernel's ENOTSUPP
            raise BpfError(err, f"map {self.name} lookup and delete")
        value = self.lookup(key)
        if value is not None:
            self.delete(key)
        return value

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        val = ctypes.create_string_buffer(value, max(len(value), 1))
        err = self._op(_MAP_UPDATE, key, ctypes.addressof(val), flags, "update")
        if err:
            raise BpfError(err, f"map {self.name} update")

    def delete(self, key: bytes) -> bool:
        """False if the key was not there."""
        err = self._op(_MAP_DELETE, key, 0, 0, "delete")
        if err == errno.ENOENT:
            return False
        if err:
            raise BpfError(err, f"map {self.name} delete")
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key (a snapshot walk: entries added or removed meanwhile may or may not show)."""
        key: bytes | None = None
        for _ in range(self.max_entries + 1):  # bounded even if the map churns under us
            kaddr = 0
            if key is not None:
                ctypes.memmove(self._kbuf, key, self.key_size)
                kaddr = ctypes.addressof(self._kbuf)
            attr = _attr("<IIQQQ", self.fd, 0, kaddr, ctypes.addressof(self._kbuf2), 0, size=32)
            if _libc.syscall(_NR_BPF, _MAP_NEXT_KEY, attr, len(attr)) != 0:
                err = ctypes.get_errno()
                if err == errno.ENOENT:
                    return
                raise BpfError(err, f"map {self.name} next key")
            key = self._kbuf2.raw[: self.key_size]
            yield key

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())


class RingReader:
    """Reads a BPF ring buffer map through its shared memory (uapi layout): a consumer page we
    write, then the producer page and the data area mapped twice in a row, so a record never
    wraps. Records are copied out in batches: no per-record callback into Python."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size, self.mask = fd, size, size - 1
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        # The positions are 8-byte words the kernel reads and writes concurrently: access them as
        # one native aligned load/store each ('Q' memoryview items). struct's "<Q" goes byte by
        # byte, and a consumer position torn that way can look a whole ring behind to the kernel,
        # which then fails reservations (KERNEL_RING) while the ring is nearly empty.
        self._cons_pos = memoryview(self._cons).cast("Q")
        self._prod_pos = memoryview(self._prod)[:8].cast("Q")
        self._data = memoryview(self._prod)[page:]
        self._hdrs = self._data.cast("I")  # record headers: 8-byte aligned u32 words
        self._ep = select.epoll()
        self._ep.register(fd, select.EPOLLIN)

    def wait(self, timeout_ms: int) -> bool:
        """Block until the kernel has records (or the timeout); True if there are some."""
        try:
            return bool(self._ep.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1, 1))
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            return False

    def read(self, limit: int) -> list[bytes]:
        """Up to ``limit`` committed records, oldest first; the space is given back at once."""
        out: list[bytes] = []
        if limit <= 0:
            return out
        cons = self._cons_pos[0]
        prod = self._prod_pos[0]
        data, hdrs, mask = self._data, self._hdrs, self.mask
        while cons < prod and len(out) < limit:
            off = cons & mask
            hdr = hdrs[off >> 2]
            if hdr & _RB_BUSY:  # reserved, not yet committed: later records wait for it
                break
            ln = hdr & ~(_RB_BUSY | _RB_DISCARD)
            if not hdr & _RB_DISCARD:
                out.append(data[off + _RB_HDR: off + _RB_HDR + ln].tobytes())
            cons += (ln + _RB_HDR + 7) & ~7
        self._cons_pos[0] = cons
        return out

    def pending(self) -> int:
        """Bytes the kernel has committed or reserved that we have not read."""
        return self._prod_pos[0] - self._cons_pos[0]

    def close(self) -> None:
        try:
            self._ep.close()
            for view in (self._hdrs, self._data, self._cons_pos, self._prod_pos):
                view.release()
            self._prod.close()
            self._cons.close()
        except (BufferError, ValueError):
            pass


def _perf_event_open(attr: ctypes.Array, what: str) -> int:
    if _NR_PERF_EVENT_OPEN is None:
        raise BpfError(errno.ENOSYS, f"perf_event_open on {_MACHINE}")
    # pid -1, cpu 0: a trace event's BPF program runs on every CPU whatever the event's CPU.
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, attr, -1, 0, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise BpfError(ctypes.get_errno(), what)
    return fd


def _set_bpf(pfd: int, prog_fd: int, what: str) -> int:
    try:
        fcntl.ioctl(pfd, _PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(pfd, _PERF_EVENT_IOC_ENABLE, 0)
    except OSError as exc:
        os.close(pfd)
        raise BpfError(exc.errno or errno.EINVAL, what) from exc
    return pfd


def tracefs_root() -> str | None:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(f"{d}/events"):
            return d
    return None


def perf_attach_tracepoint(category: str, name: str, prog_fd: int) -> int:
    """Attach a tracepoint program; returns the perf-event fd that keeps it attached."""
    root = tracefs_root()
    what = f"tracepoint {category}:{name}"
    try:
        with open(f"{root}/events/{category}/{name}/id") as f:
            tp_id = int(f.read())
    except (OSError, TypeError, ValueError) as exc:
        raise BpfError(errno.ENOENT, what) from exc
    attr = _attr("<IIQQQQQI", _PERF_TYPE_TRACEPOINT, _PERF_ATTR_SIZE, tp_id, 1, _PERF_SAMPLE_RAW, 0,
                 0, 1, size=_PERF_ATTR_SIZE)
    return _set_bpf(_perf_event_open(attr, what), prog_fd, what)


def _pmu(kind: str) -> tuple[int, int]:
    """(PMU type, retprobe config bit) of the kprobe or uprobe dynamic PMU."""
    base = f"/sys/bus/event_source/devices/{kind}"
    with open(f"{base}/type") as f:
        ptype = int(f.read())
    bit = 0
    try:
        with open(f"{base}/format/retprobe") as f:
            bit = int(f.read().strip().split(":", 1)[1])
    except (OSError, IndexError, ValueError):
        pass
    return ptype, bit


def perf_attach_probe(kind: str, target: str, offset: int, prog_fd: int, *, ret: bool = False) -> int:
    """Attach a uprobe (``kind`` "uprobe": file path + file offset) or kprobe ("kprobe": function
    name + offset) through the dynamic PMU; returns the perf-event fd that keeps it attached."""
    what = f"{'ret' if ret else ''}{kind} {target}+{offset:#x}"
    try:
        ptype, bit = _pmu(kind)
    except (OSError, ValueError) as exc:
        raise BpfError(errno.ENOENT, f"{what} (no {kind} PMU in this kernel)") from exc
    name = ctypes.create_string_buffer(target.encode())
    attr = _attr("<IIQQQQQII QQ", ptype, _PERF_ATTR_SIZE, (1 << bit) if ret else 0, 1, _PERF_SAMPLE_RAW,
                 0, 0, 1, 0, ctypes.addressof(name), offset, size=_PERF_ATTR_SIZE)
    return _set_bpf(_perf_event_open(attr, what), prog_fd, what)


def uprobe_multi_link(prog_fd: int, path: str, offsets: list[int], *, ret: bool = False) -> int:
    """Attach a program loaded with expected attach type TRACE_UPROBE_MULTI to ``offsets`` of the
    file at ``path`` (kernel >= 6.6); returns the BPF link fd that keeps it attached.

    Why not perf-event uprobes: on kernels >= 6.12 closing each uprobe perf event waits for an
    RCU-tasks-trace grace period under a global mutex (~0.1 s here), one after another; links
    wait for theirs concurrently, so closing many takes about one grace period in all."""
    name = ctypes.create_string_buffer(path.encode())
    offs = (ctypes.c_uint64 * max(1, len(offsets)))(*offsets)
    # union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags, then uprobe_multi:
    # path, offsets, ref_ctr_offsets, cookies (u64 pointers), cnt, flags, pid.
    attr = _attr("<IIIIQQQQIII", prog_fd, 0, TRACE_UPROBE_MULTI, 0, ctypes.addressof(name),
                 ctypes.addressof(offs), 0, 0, len(offsets), _F_UPROBE_MULTI_RETURN if ret else 0, 0)
    return _bpf(_LINK_CREATE, attr, f"uprobe_multi link {path}")


# enum bpf_attach_type values of the cgroup programs busted attaches (uapi)
CGROUP_INET_INGRESS, CGROUP_INET_EGRESS, CGROUP_SOCK_OPS = 0, 1, 3
CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT, CGROUP_UDP4_SENDMSG, CGROUP_UDP6_SENDMSG = 10, 11, 14, 15


def cgroup_link(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    """Attach a cgroup program to the cgroup open at ``cgroup_fd`` as a BPF link; returns the link
    fd, which keeps it attached (the kernel detaches it when the fd's last holder exits). Links
    stack with other programs on the same cgroup (other tools', busted's enforcement)."""
    attr = _attr("<IIII", prog_fd, cgroup_fd, attach_type, 0, size=64)
    return _bpf(_LINK_CREATE, attr, f"cgroup link (attach type {attach_type})")
