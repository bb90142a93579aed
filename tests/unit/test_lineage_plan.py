"""The lineage capability in the probe plan and the generated program (no kernel needed)."""

import pytest

from busted.ebpf.loader import build_source
from busted.ebpf.plan import ProbePlan, choose_plan
from busted.ebpf.probe import TRACEPOINTS, Capabilities
from busted.errors import ProbeUnavailable

ALL = [tp for g in TRACEPOINTS.values() for tp in g]


def caps(missing=()):
    return Capabilities(kernel_release="6.18.0", kernel_version=(6, 18), btf=True, tracefs="/x",
                        tracepoints={tp: tp not in missing for tp in ALL})


def test_tiers_in_order():
    assert choose_plan(caps()).lineage == "tracepoint"
    assert choose_plan(caps(["task/task_newtask"])).lineage == "sched-fork"
    assert choose_plan(caps(["sched/sched_process_exec"])).lineage == "off"
    assert choose_plan(caps(), {"lineage": "off"}).lineage == "off"
    assert choose_plan(caps(), {"lineage": "sched-fork"}).describe()["lineage"] == "sched-fork"
    assert choose_plan(caps(), {"lineage": "syscall"}).lineage == "syscall"


def test_default_needs_no_syscall_tracepoint():
    """The default tier runs where no execve syscall tracepoint exists; only the opt-in needs them."""
    no_execve = caps(["syscalls/sys_enter_execve", "syscalls/sys_exit_execve"])
    assert choose_plan(no_execve).lineage == "tracepoint"
    with pytest.raises(ProbeUnavailable, match="sys_enter_execve"):
        choose_plan(no_execve, {"lineage": "syscall"})
    # Never chosen unless forced, even where it could run.
    assert choose_plan(caps()).lineage != "syscall"


def test_forced_tier_that_cannot_run_says_why():
    with pytest.raises(ProbeUnavailable, match="task/task_newtask"):
        choose_plan(caps(["task/task_newtask"]), {"lineage": "tracepoint"})
    with pytest.raises(ProbeUnavailable, match="unknown lineage tier"):
        choose_plan(caps(), {"lineage": "kprobe"})


def test_source_has_lineage_only_when_planned():
    on = build_source(ProbePlan(lineage="tracepoint"))
    assert "bst_lin_exec" in on and "#define LIN_FORK_SCHED 1" not in on
    assert "#define LIN_FORK_SCHED 1" in build_source(ProbePlan(lineage="sched-fork"))
    assert "bst_lin_exec" not in build_source(ProbePlan(lineage="off"))
    assert "#define LIN_ARGV_SYSCALL 1" not in on
    assert "#define LIN_ARGV_SYSCALL 1" in build_source(ProbePlan(lineage="syscall"))
    assert "bst_lin_exec" not in build_source(ProbePlan())  # a plan built by hand keeps the old program
