"""The Python API's other shapes: async iteration, callbacks, stop events, stats, closed use."""

import asyncio
import threading

import pytest
from conftest import Peer

import busted
from busted import Direction, FlowClosed, FlowOpened


def test_async_iteration_inside_a_running_loop():
    async def main():
        async with busted.Monitor(comm="bst-cli") as mon:
            loop = asyncio.get_running_loop()

            def traffic():
                server = Peer("server", "127.0.0.1", 0, 5, "bst-srv")
                Peer("client", "127.0.0.1", server.port, 7, "bst-cli").wait()
                server.wait()

            fut = loop.run_in_executor(None, traffic)
            got = []
            async for ev in mon.aevents(timeout=3):
                got.append(ev)
                if isinstance(ev, FlowClosed):
                    break
            await fut
            return got

    got = asyncio.run(main())
    closed = [e for e in got if isinstance(e, FlowClosed)]
    assert closed and closed[0].comm == "bst-cli" and closed[0].bytes_sent == 7


def test_callbacks_and_stop_event():
    seen = []
    stop = threading.Event()
    with busted.Monitor(comm="bst-cli") as mon:
        off = mon.on(FlowOpened, seen.append)
        mon.on(FlowClosed, lambda ev: stop.set())
        server = Peer("server", "127.0.0.1", 0, 5, "bst-srv")
        Peer("client", "127.0.0.1", server.port, 7, "bst-cli").wait()
        server.wait()
        mon.run(timeout=10, stop_event=stop)
        assert stop.is_set()
        off()
        st = mon.stats()
    assert [e.direction for e in seen] == [Direction.CONNECT]
    assert st.events >= 2 and st.records >= 2 and st.plan["lifecycle"] == "tracepoint" and st.lost == {}
    assert st.startup_s > 0


def test_closed_monitor_says_what_to_do():
    mon = busted.Monitor()
    mon.close()
    with pytest.raises(busted.MonitorClosed, match="create a new Monitor"):
        mon.start()


def test_process_without_bpf_capabilities_is_told_what_to_do():
    """Root with an empty capability bounding set (what a locked-down container gives)."""
    import subprocess
    import sys

    code = ("import busted\ntry:\n    busted.Monitor().start()\nexcept busted.PermissionDenied as e:\n"
            "    print('DENIED', e)\n")
    r = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("DENIED"), (r.stdout, r.stderr)
    assert "root" in r.stdout and "CAP_BPF" in r.stdout
