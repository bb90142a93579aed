"""The declared wire layouts against what BCC compiled, and the kernel-side loss bookkeeping."""

import ctypes
import json
import os
import socket
import time

from busted.ebpf.loader import FlowProgram, prog_recursion_misses
from busted.ebpf.plan import choose_plan
from busted.ebpf.probe import probe
from busted.events import FlowClosed, LossPlace
from busted.wire.layout import CAP_HDR, FL, FLOW, REC_HDR, REC_OPEN


def _offsets(ctype) -> dict[str, int]:
    return {name: getattr(ctype, name).offset for name, _t in ctype._fields_}


def compiled_type(desc: str):
    """The ctypes type BCC describes for a map's key or value (the compiler's own view)."""
    from bcc import BPF

    return BPF._decode_table_type(json.loads(desc))


def test_bcc_compiled_the_declared_layouts():
    prog = FlowProgram(choose_plan(probe(), None), ringbuf_bytes=1 << 16, max_flows=64)
    try:
        leaf = compiled_type(prog.maps["flows"].leaf_desc)
        assert ctypes.sizeof(leaf) == FLOW.size
        assert _offsets(leaf) == FLOW.offsets()
        # every program's recursion_misses is readable (kernel >= 5.12) and starts at zero
        fds = prog.prog_fds
        assert fds and all(prog_recursion_misses(fd) == 0 for fd in fds)
        assert prog.losses() == {1: 0, 2: 0, 6: 0}
    finally:
        prog.close()
    assert REC_HDR.size == 24 and CAP_HDR.size == 88


def test_sweep_ends_a_flow_whose_socket_is_gone():
    """A flow the kernel still tracks but whose socket no longer exists (its end was skipped by
    the kernel) is closed by the sweep, with a KERNEL_MISS loss, and leaves the kernel map."""
    import busted

    mon = busted.Monitor(preexisting=False, sweep_interval=0.5, pid=os.getpid())
    with mon:
        # A real flow, so the table knows it; then make it look stale: its map entry gets a
        # 4-tuple that no socket has and an old open time.
        srv = socket.create_server(("127.0.0.1", 0))
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        deadline = time.monotonic() + 10
        opened = None
        while opened is None and time.monotonic() < deadline:
            for ev in mon.events(timeout=0.2):
                if ev.kind == "flow_opened" and ev.sport == cli.getsockname()[1]:
                    opened = ev
                    break
        assert opened is not None
        table = mon._program.maps["flows"]
        leaf = compiled_type(table.leaf_desc)
        key, v = next((k, leaf.from_buffer_copy(raw)) for k, raw in table.items()
                      if (lv := leaf.from_buffer_copy(raw)).flags & FL.HAVE_TUPLE
                      and lv.sport == cli.getsockname()[1] and lv.direction == 1)
        v.sport, v.open_ns, v.sent = 1, 1, 77  # nobody has local port 1
        table.update(key, bytes(v))
        got = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(isinstance(e, FlowClosed) for e in got):
            got.extend(mon.events(timeout=0.3))
        conn.close()
        cli.close()
        srv.close()
    lost = [e for e in got if e.kind == "events_lost" and e.where == LossPlace.KERNEL_MISS]
    closed = [e for e in got if isinstance(e, FlowClosed) and e.flow_id == opened.flow_id]
    assert len(lost) == 1 and lost[0].count == 1
    assert len(closed) == 1 and closed[0].bytes_sent == 77
    assert mon.stats().lost["KERNEL_MISS"] == 1
    assert REC_OPEN == 1
