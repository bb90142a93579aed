"""Real BPF under load: short-lived processes at a target of 5,000/s for 10 s (a C spawner, two
workers), one in ten making a TCP connection. Every connection's flow carries its exe and ppid
from the kernel's lineage records, the process table stays within its bound, and anything lost
is an EventsLost. The rate reached is printed (run with -s): this 2-core VM does not reach 5,000/s,
and above ~3,000/s the reader falls behind and the ring overflows (reported, see docs/agents.md).
"""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

import busted
from busted import EventsLost, FlowOpened

SRC = Path(__file__).with_name("data") / "spawner.c"
RATE, SECONDS, EVERY, WORKERS = 5000, 10, 10, 2
MAX_PROCS = 4096


@pytest.fixture(scope="module")
def spawner(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("the load test needs a C compiler (cc) to build its spawner")
    out = tmp_path_factory.mktemp("spawner") / "bst-spawn"
    build = subprocess.run([cc, "-O2", "-static", "-o", str(out), str(SRC)], capture_output=True, text=True)
    if build.returncode != 0:  # no static libc: a dynamic one is slower to start, still valid
        subprocess.run([cc, "-O2", "-o", str(out), str(SRC)], check=True)
    return str(out)


@pytest.mark.parametrize("tier", ["tracepoint", "syscall"])
def test_short_lived_process_storm(spawner, tier):
    """Tier "syscall" copies argv at execve; the default reads /proc when the exec record is
    decoded, too late for these processes (they live microseconds): their argv is counted lost."""
    with busted.Monitor(classify=False, preexisting=False, max_procs=MAX_PROCS, comm="bst-spawn",
                        probes={"lineage": tier}) as mon:
        proc = subprocess.Popen([spawner, str(RATE), str(SECONDS), str(EVERY), str(WORKERS)],
                                stdout=subprocess.PIPE, text=True)
        port = int(proc.stdout.readline().split()[1])
        opened: list[FlowOpened] = []
        lost: list[EventsLost] = []
        biggest = 0
        t0 = time.monotonic()
        deadline = t0 + SECONDS + 60
        while proc.poll() is None and time.monotonic() < deadline:
            for ev in mon.events(timeout=0.2):
                if isinstance(ev, FlowOpened) and ev.dport == port:
                    opened.append(ev)
                elif isinstance(ev, EventsLost):
                    lost.append(ev)
                biggest = max(biggest, len(mon.lineage))
                if proc.poll() is not None:
                    break
        out = proc.communicate(timeout=60)[0]
        done = [line.split() for line in out.splitlines() if line.startswith("DONE")]
        assert len(done) == WORKERS, out
        spawned = sum(int(d[1]) for d in done)
        connects = sum(int(d[2]) for d in done)
        elapsed_s = max(int(d[3]) for d in done) / 1000
        # Drain: flows of the last children (bounded by the idle timeout).
        for ev in mon.events(timeout=2):
            if isinstance(ev, FlowOpened) and ev.dport == port:
                opened.append(ev)
            elif isinstance(ev, EventsLost):
                lost.append(ev)
        stats = mon.stats()
        table = mon.lineage
        biggest = max(biggest, len(table))
    rate = spawned / elapsed_s
    print(f"\nlineage load: {spawned} processes in {elapsed_s:.1f} s = {rate:.0f}/s (target {RATE}/s), "
          f"{connects} connections, {len(opened)} flows seen, lineage records {table.records} "
          f"(forks {table.forks}, execs {table.execs}, exits {table.exits}), table max {biggest}/{MAX_PROCS}, "
          f"live evictions {table.evicted_live}, argv from /proc {table.argv_from_proc}, "
          f"argv lost {table.argv_lost}, lost {stats.lost}")
    assert spawned > 0 and connects > 0
    # Every flow names its program and its parent, from the kernel's records (the processes were
    # gone long before most of these events were read).
    # Every flow names its program, its parent and its argv from the kernel's records (the processes
    # were gone long before most of these events were read) -- unless the ring overflowed (the
    # Python reader starved of CPU by the spawner), and then it was reported as EventsLost.
    ring_lost = sum(e.count for e in lost if e.where.name == "KERNEL_RING")
    missing = [e for e in opened if not (e.exe and e.exe.endswith("bst-spawn") and e.ppid)]
    no_argv = [e for e in opened if e.cmdline != (e.exe, "connect", str(port))]
    print(f"flows without exe/ppid: {len(missing)}, without argv: {len(no_argv)}; "
          f"ring records lost: {ring_lost}")
    if missing:
        assert ring_lost > 0, missing[:5]
    if tier == "syscall":
        if no_argv:
            assert ring_lost > 0, no_argv[:5]
    else:
        # No argv is wrong, only absent -- unless the exec record itself was lost with the ring
        # (reported): the child is then taken for the program it forked from, as with any tier.
        wrong = [e for e in no_argv if e.cmdline]
        if wrong:
            assert ring_lost > 0, wrong[:5]
        assert len(no_argv) <= table.argv_lost + ring_lost
        assert table.argv_from_proc + table.argv_lost == table.execs
    assert all(e.ppid != e.pid for e in opened if e.ppid)
    # Bounded.
    assert biggest <= MAX_PROCS and len(table) <= MAX_PROCS
    # Nothing vanished silently: a flow not seen is matched by a reported loss.
    if len(opened) < connects:
        assert sum(e.count for e in lost) > 0, (len(opened), connects)
    else:
        assert len(opened) == connects
    assert sum(e.count for e in lost if e.where.name == "USER_TABLE") == table.evicted_live
