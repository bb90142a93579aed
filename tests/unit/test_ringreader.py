"""busted.ebpf.bpfsys.RingReader against a ring laid out in a memfd exactly as the kernel maps a
BPF ring buffer (uapi): consumer page, producer page, data. No BPF, no root."""

from __future__ import annotations

import mmap
import os
import select
import struct
import time

import pytest

from busted.ebpf import bpfsys

PAGE = mmap.PAGESIZE
SIZE = 64 * 1024  # data area; records here never straddle its end, so one copy of it is enough
BUSY, DISCARD = 1 << 31, 1 << 30


class _NoEpoll:  # a memfd cannot be registered with epoll; read() does not need it
    def register(self, *a: object) -> None: ...
    def close(self) -> None: ...


@pytest.fixture
def ring(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(select, "epoll", _NoEpoll)
    fd = os.memfd_create("ring")
    os.ftruncate(fd, 2 * PAGE + 2 * SIZE)
    raw = mmap.mmap(fd, 2 * PAGE + 2 * SIZE)
    reader = bpfsys.RingReader(fd, SIZE)
    yield reader, raw
    reader.close()
    raw.close()
    os.close(fd)


def put(raw: mmap.mmap, pos: int, payload: bytes, flags: int = 0) -> int:
    """Write one record at producer position ``pos``; the next position."""
    off = 2 * PAGE + (pos & (SIZE - 1))
    struct.pack_into("<II", raw, off, len(payload) | flags, 0)
    raw[off + 8: off + 8 + len(payload)] = payload
    return pos + ((len(payload) + 8 + 7) & ~7)


def positions(raw: mmap.mmap) -> tuple[int, int]:
    return struct.unpack_from("<Q", raw, 0)[0], struct.unpack_from("<Q", raw, PAGE)[0]


def test_reads_committed_records_in_order_skips_discarded_and_stops_at_busy(ring) -> None:
    reader, raw = ring
    pos = put(raw, 0, b"first")
    pos = put(raw, pos, b"dropped", DISCARD)
    pos = put(raw, pos, b"second-record")
    busy_at = pos
    pos = put(raw, pos, b"in flight", BUSY)
    pos = put(raw, pos, b"after it")
    struct.pack_into("<Q", raw, PAGE, pos)
    assert reader.read(1) == [b"first"]
    assert reader.read(10) == [b"second-record"]  # the discarded one is skipped, the busy one waits
    assert positions(raw)[0] == busy_at
    assert reader.pending() == pos - busy_at
    assert reader.read(10) == []
    struct.pack_into("<I", raw, 2 * PAGE + busy_at, len(b"in flight"))  # committed now
    assert reader.read(10) == [b"in flight", b"after it"]
    assert positions(raw) == (pos, pos) and reader.pending() == 0


def test_consumer_position_is_never_seen_torn(ring) -> None:
    """The kernel reads the consumer position while we write it. A position written byte by byte
    can be read half old, half new: it looks far behind, and the kernel then refuses reservations
    into a nearly empty ring. Another process samples the word while the reader advances it across
    byte carries; every sample must be one the reader wrote (monotonic, 8-aligned)."""
    reader, raw = ring
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        bad = n = prev = 0
        word = memoryview(raw).cast("Q")
        end = time.monotonic() + 3
        while time.monotonic() < end and n < 5_000_000:
            v = word[0]
            bad += v < prev or v & 7
            prev, n = v, n + 1
            if v >= 1 << 40:  # the parent's end mark
                break
        os.write(w, struct.pack("<QQ", n, bad))
        os._exit(0)
    payload = b"x" * 24
    pos = (1 << 20) - 8 * 32  # start just below a carry into the third byte
    struct.pack_into("<QQ", raw, 0, pos, 0)
    struct.pack_into("<Q", raw, PAGE, pos)
    reader.read(1)
    for _ in range(100_000):  # bounded: ~0.5 s; a carry into byte 1 every 8 records
        pos = put(raw, pos, payload)
        struct.pack_into("<Q", raw, PAGE, pos)
        assert reader.read(4) == [payload]
    with memoryview(raw) as whole, whole.cast("Q") as word:
        word[0] = 1 << 40
    n, bad = struct.unpack("<QQ", os.read(r, 16))
    os.waitpid(child, 0)
    assert n > 1000, "the sampling process did not run"
    assert bad == 0, f"{bad} of {n} samples saw a torn consumer position"


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64"])
def test_monitor_start_refuses_a_machine_whose_ordering_the_reader_does_not_handle(monkeypatch, machine) -> None:
    """The reader's position loads and stores are ordered by x86-64's TSO only: elsewhere the
    program is refused before anything is loaded, with what to do in the message."""
    import platform

    from busted.ebpf import loader, probe
    from busted.ebpf.plan import ProbePlan
    from busted.errors import EnvironmentProblem

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(probe, "_has_cap_bpf", lambda: False)  # never load BPF from a unit test
    with pytest.raises(EnvironmentProblem) as exc:
        loader.FlowProgram(ProbePlan())
    msg = str(exc.value)
    assert machine in msg and "x86-64" in msg and "Run busted on an x86-64 host" in msg


def test_x86_64_is_accepted() -> None:
    from busted.ebpf.loader import check_architecture

    check_architecture("x86_64")
    check_architecture("AMD64")
