"""Probe plan choice from capabilities (pure: no kernel needed)."""

import dataclasses

import pytest

from busted.ebpf.plan import ProbePlan, choose_plan
from busted.ebpf.probe import TRACEPOINTS, Capabilities
from busted.errors import ProbeUnavailable


def caps(*, tps=None, kprobes=False, cgroup2=None) -> Capabilities:
    all_tps = [tp for g in TRACEPOINTS.values() for tp in g]
    present = set(all_tps if tps is None else tps)
    return Capabilities(kernel_release="6.18.0", kernel_version=(6, 18), btf=True, tracefs="/x",
                        tracepoints={tp: tp in present for tp in all_tps}, kprobes=kprobes, cgroup2=cgroup2)


def test_everything_present_picks_tracepoints():
    p = choose_plan(caps())
    assert p == ProbePlan("tracepoint", "tracepoint", "destroy", "syscall", plaintext="off", lineage="tracepoint")


def test_plaintext_needs_uprobes_and_says_why():
    c = caps()
    assert choose_plan(c).plaintext == "off"  # no uprobe PMU in these capabilities
    with pytest.raises(ProbeUnavailable, match="no uprobes"):
        choose_plan(c, {"plaintext": "uprobe"})
    c = dataclasses.replace(c, uprobes=True)
    assert choose_plan(c).plaintext == "uprobe"
    assert choose_plan(c, {"plaintext": "off"}).plaintext == "off"
    with pytest.raises(ProbeUnavailable, match="needs a capture tier"):
        choose_plan(c, {"capture": "off", "plaintext": "uprobe"})
    assert choose_plan(c, {"capture": "off"}).plaintext == "off"


def test_no_sock_length_tracepoints_falls_back_to_syscalls():
    tps = [t for t in TRACEPOINTS["lifecycle"] + TRACEPOINTS["syscall"]]
    assert choose_plan(caps(tps=tps)).bytes == "syscall"


def test_old_kernel_without_tracepoints_uses_kprobes():
    p = choose_plan(caps(tps=TRACEPOINTS["syscall"], kprobes=True))
    assert (p.lifecycle, p.bytes, p.flow_end) == ("kprobe", "kprobe", "close-state")


def test_no_destroy_tracepoint_ends_at_close_state():
    tps = [t for g in TRACEPOINTS.values() for t in g if t != "tcp/tcp_destroy_sock"]
    assert choose_plan(caps(tps=tps)).flow_end == "close-state"


def test_forced_tier_that_cannot_run_says_why():
    with pytest.raises(ProbeUnavailable, match="no kprobes"):
        choose_plan(caps(), {"bytes": "kprobe"})
    with pytest.raises(ProbeUnavailable, match="unknown probe capability"):
        choose_plan(caps(), {"bites": "tracepoint"})
    with pytest.raises(ProbeUnavailable, match="no lifecycle tier"):
        choose_plan(caps(tps=[]))


def test_forcing_each_runnable_tier():
    c = caps(kprobes=True)
    for lifecycle in ("tracepoint", "kprobe"):
        for nbytes in ("tracepoint", "syscall", "kprobe"):
            if lifecycle == "kprobe" and nbytes == "syscall":
                with pytest.raises(ProbeUnavailable):
                    choose_plan(c, {"lifecycle": lifecycle, "bytes": nbytes})
                continue
            p = choose_plan(c, {"lifecycle": lifecycle, "bytes": nbytes})
            assert (p.lifecycle, p.bytes) == (lifecycle, nbytes)


def test_missing_headers_are_detected_before_compiling(tmp_path, monkeypatch):
    from busted.ebpf.loader import headers_available
    from busted.errors import KernelHeadersMissing

    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    no_kheaders = str(tmp_path / "kheaders.tar.xz")
    assert not headers_available("9.9.9-none", modules=str(tmp_path), kheaders=no_kheaders)
    (tmp_path / "9.9.9-none" / "build" / "include").mkdir(parents=True)
    assert headers_available("9.9.9-none", modules=str(tmp_path), kheaders=no_kheaders)
    (tmp_path / "kheaders.tar.xz").write_bytes(b"")
    assert headers_available("9.9.9-other", modules=str(tmp_path), kheaders=no_kheaders)
    msg = str(KernelHeadersMissing("9.9.9-none"))
    assert "linux-headers-9.9.9-none" in msg and "bootstrap.sh" in msg


def test_capture_prefers_cgroup_programs_and_falls_back_to_syscalls():
    # cgroup v2 mounted: packets at the cgroup root, no syscall tracepoint
    assert choose_plan(caps(cgroup2="/sys/fs/cgroup")).capture == "cgroup"
    # no cgroup v2: the syscall tracepoints, then nothing
    assert choose_plan(caps()).capture == "syscall"
    no_sys = [t for t in TRACEPOINTS["lifecycle"] + TRACEPOINTS["bytes"]]
    assert choose_plan(caps(tps=no_sys)).capture == "off"
    assert choose_plan(caps(tps=no_sys, cgroup2="/cg")).capture == "cgroup"
    # every tier can be forced, and a forced one that cannot run says why
    assert choose_plan(caps(cgroup2="/cg"), {"capture": "syscall"}).capture == "syscall"
    with pytest.raises(ProbeUnavailable, match="no cgroup v2 mount"):
        choose_plan(caps(), {"capture": "cgroup"})
    with pytest.raises(ProbeUnavailable, match="unknown capture tier"):
        choose_plan(caps(cgroup2="/cg"), {"capture": "packets"})
    # plaintext (plain HTTP) runs on either capture tier
    c = dataclasses.replace(caps(cgroup2="/cg"), uprobes=True)
    assert choose_plan(c).plaintext == "uprobe"
    assert choose_plan(c, {"capture": "syscall"}).plaintext == "uprobe"


def test_chunk_bytes_beyond_what_the_kernel_stages_is_refused_with_the_reason():
    """A piece is staged in a per-CPU array, whose values the kernel caps at 32 KiB: 32768 and
    65536 used to pass this check and fail later in the compile ("Argument list too long")."""
    from busted.ebpf.loader import MAX_CHUNK_BYTES, build_source
    from busted.errors import UsageError

    plan = ProbePlan(plaintext="uprobe")
    for ok in (256, 4096, MAX_CHUNK_BYTES):
        assert f"#define PT_CHUNK_BYTES {ok}" in build_source(plan, chunk_bytes=ok)
    for bad in (128, 300, 32768, 65536):
        with pytest.raises(UsageError, match="power of two between 256 and 16384"):
            build_source(plan, chunk_bytes=bad)
