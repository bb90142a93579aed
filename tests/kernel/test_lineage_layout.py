"""The lineage record layout as BCC compiled it, for every lineage tier, and the hooks each registers."""

import ctypes
import json

import pytest

from busted.ebpf.loader import FlowProgram
from busted.ebpf.plan import choose_plan
from busted.ebpf.probe import probe
from busted.wire.layout import LIN_ARGS, LIN_FNAME, LIN_HDR


@pytest.mark.parametrize("tier", ["tracepoint", "sched-fork", "syscall"])
def test_bcc_compiled_the_lineage_layout(tier):
    plan = choose_plan(probe(), {"lineage": tier})
    prog = FlowProgram(plan, ringbuf_bytes=1 << 16, max_flows=64)
    try:
        from bcc import BPF

        leaf = BPF._decode_table_type(json.loads(prog.maps["lin_out"].leaf_desc))  # struct lin_exec
        assert ctypes.sizeof(leaf) == LIN_HDR.size + LIN_FNAME + LIN_ARGS
        hdr = dict(leaf._fields_)["h"]
        assert {n: getattr(hdr, n).offset for n, _t in hdr._fields_} == LIN_HDR.offsets()
        fork_tp = "sched:sched_process_fork" if tier == "sched-fork" else "task:task_newtask"
        assert f"tracepoint:{fork_tp}" in prog.attached
        assert "tracepoint:sched:sched_process_exec" in prog.attached
        # Only the opt-in tier registers syscall tracepoints (each taxes every syscall on the host).
        execve = {"tracepoint:syscalls:sys_enter_execve", "tracepoint:syscalls:sys_exit_execve"}
        if tier == "syscall":
            assert execve <= set(prog.attached)
        else:
            assert not [a for a in prog.attached if "execve" in a]
    finally:
        prog.close()
