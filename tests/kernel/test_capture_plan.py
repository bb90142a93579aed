"""The default plan holds no syscall tracepoint (what `bpftool perf` lists for this process); the
syscall capture tier, forced, does. A module of its own: no other Monitor of this process is alive."""

import json
import os
import subprocess

import busted


def _perf_tracepoints(pid: int) -> list[str]:
    """The tracepoints process ``pid`` holds BPF programs on, as bpftool lists them."""
    p = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return [e.get("tracepoint", "") for e in json.loads(p.stdout or "[]")
            if e.get("pid") == pid and e.get("fd_type") == "tracepoint"]


def test_the_default_plan_registers_no_syscall_tracepoint():
    with busted.Monitor() as m:
        assert m.plan is not None and m.plan.capture == "cgroup" and m.plan.lineage == "tracepoint"
        attached = m._program.attached
        held = _perf_tracepoints(os.getpid())
    assert not [a for a in attached if a.startswith("tracepoint:syscalls:")], attached
    assert {"cgroup:bst_capc_egress", "cgroup:bst_capc_ingress", "cgroup:bst_capc_connect4"} <= set(attached)
    assert "inet_sock_set_state" in held, held  # bpftool sees our tracepoints ...
    assert not [t for t in held if t.startswith(("sys_enter", "sys_exit"))], held  # ... and no syscall one


def test_the_syscall_tier_when_forced_registers_them():
    with busted.Monitor(probes={"capture": "syscall"}) as m:
        attached = m._program.attached
    assert "tracepoint:syscalls:sys_enter_write" in attached
    assert not [a for a in attached if a.startswith("cgroup:")]


def test_doctor_says_which_tiers_register_syscall_hooks():
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("busted"))
    for probes, want in ((None, []), ("capture=syscall", ["capture=syscall"])):
        argv = [exe, "doctor", "--json"] + (["--probes", probes] if probes else [])
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        d = json.loads(p.stdout)
        assert d["plan_syscall_tiers"] == want, d["plan"]
        assert d["plan"]["capture"] == ("syscall" if probes else "cgroup")
