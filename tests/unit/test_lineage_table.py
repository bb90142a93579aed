"""The lineage table and the lineage-aware proc source, driven with plain records (no kernel)."""

import struct

import pytest

from busted.classify.agents import AgentCatalog
from busted.events import Ancestor, FlowOpened, LossPlace
from busted.host.lineage import NO_LINEAGE, LineageProc, LineageTable
from busted.host.procinfo import ProcInfo
from busted.pipeline.flows import FlowTable
from busted.sinks._codec import event_from_dict
from busted.wire.layout import LIN_HDR, LINF, REC_EXEC, REC_EXIT, REC_FORK, c_definitions
from busted.wire.records import LinRecord, decode_any, decode_lineage

NOPROC = ProcInfo(None, None, None, None, None)


def fork(pid, ppid, comm="x", ts=1, cg=1):
    return LinRecord(REC_FORK, pid, ts, cg, ppid, ppid, 0, 0, comm)


def exe(pid, path, argv, ts=2, cg=1, flags=0):
    return LinRecord(REC_EXEC, pid, ts, cg, 0, pid, 0, flags, path.rsplit("/", 1)[-1][:15], path, tuple(argv))


def exit_(pid, ts=3):
    return LinRecord(REC_EXIT, pid, ts, 1, 0, pid, 0, 0, "x")


# -- wire ------------------------------------------------------------------------------------------

def _exec_bytes(pid, fname: bytes, args: bytes, flags=0):
    """An exec record as lineage.c sends it: header, filename + NUL, the argv bytes used."""
    hdr = LIN_HDR.pack(type=REC_EXEC, pid=pid, ts_ns=7, cgroup=9, tid=pid, uid=1000, len=len(args),
                       flen=len(fname) + 1, flags=flags, comm=b"curl")
    return hdr + fname + b"\0" + args


def test_golden_lineage_header():
    assert LIN_HDR.size == 64
    assert LIN_HDR.offsets() == {"type": 0, "pid": 4, "ts_ns": 8, "cgroup": 16, "ppid": 24, "tid": 28,
                                 "uid": 32, "len": 36, "flen": 40, "flags": 44, "comm": 48}
    raw = bytes.fromhex("05000000" "0a000000" "0100000000000000" "0200000000000000"
                        "03000000" "03000000" "e8030000" "00000000" "00000000" "00000000") + b"bash".ljust(16, b"\0")
    assert decode_any(raw) == LinRecord(REC_FORK, 10, 1, 2, 3, 3, 1000, 0, "bash")
    assert "struct lin_exec" in c_definitions() and "#define REC_EXEC 6" in c_definitions()


def test_exec_record_decodes_filename_and_argv():
    raw = _exec_bytes(5, b"/usr/bin/curl", b"curl\0-s\0http://x/\0")
    r = decode_any(raw)
    assert (r.type, r.pid, r.filename, r.argv, r.comm, r.cgroup) == (REC_EXEC, 5, "/usr/bin/curl",
                                                                      ("curl", "-s", "http://x/"), "curl", 9)
    # The last argument cut without its terminator is kept as cut.
    assert decode_lineage(_exec_bytes(5, b"/x", b"a\0bcd", LINF.ARGV_TRUNCATED)).argv == ("a", "bcd")
    assert decode_lineage(_exec_bytes(5, b"/x", b"", LINF.NO_ARGV)).argv == ()
    with pytest.raises(struct.error):
        decode_lineage(raw[:70])  # header whole, filename cut
    # Hand-written: exec of /bin/x (flen 7) with argv x, a (len 4), flags ARGV_UNREAD.
    golden = bytes.fromhex("06000000" "2a000000" "0100000000000000" "0200000000000000"
                           "00000000" "2b000000" "00000000" "04000000" "07000000" "08000000") + \
        b"x".ljust(16, b"\0") + b"/bin/x\0" + b"x\0a\0"
    assert decode_any(golden) == LinRecord(REC_EXEC, 42, 1, 2, 0, 43, 0, LINF.ARGV_UNREAD, "x", "/bin/x", ("x", "a"))


# -- the table -------------------------------------------------------------------------------------

def test_fork_exec_exit_and_inheritance():
    t = LineageTable()
    t.feed(fork(10, 1))
    t.feed(exe(10, "/tmp/claude", ["/tmp/claude", "--api-key", "sk-ant-abcdef123456"]))
    t.feed(fork(11, 10, comm="claude"))
    p11 = t.get(11)
    assert (p11.ppid, p11.exe) == (10, "/tmp/claude")  # not exec'd yet: the parent's program
    assert t.get(10).argv == ("/tmp/claude", "--api-key", "[REDACTED]")
    t.feed(exe(11, "/usr/bin/curl", ["curl"]))
    assert t.get(11).exe == "/usr/bin/curl" and t.get(10).exe == "/tmp/claude"
    t.feed(exit_(11, ts=50))
    assert t.get(11).exit_ns == 50  # kept after exit: flows decoded later still find it


def test_exec_of_a_process_older_than_the_monitor():
    t = LineageTable()
    t.feed(exe(20, "/usr/bin/python3", ["python3", "-m", "aider"]))
    p = t.get(20)
    assert p.ppid is None and p.exe == "/usr/bin/python3"


def test_bounded_exited_first_and_live_evictions_are_losses():
    t = LineageTable(max_procs=16, report_ns=0)
    for pid in range(100, 110):
        t.feed(fork(pid, 1))
        t.feed(exit_(pid))
    for pid in range(200, 216):  # 16 live ones: all 10 exited go first, no loss
        assert t.feed(fork(pid, 1, ts=5)) == 0
    assert len(t) == 16 and t.evicted_live == 0
    assert t.get(100) is None and t.get(200) is not None
    lost = sum(t.feed(fork(pid, 1, ts=10 + pid)) for pid in range(300, 305))
    assert len(t) == 16 and t.evicted_live == 5 and lost == 5
    assert t.get(200) is None  # oldest running went first


def test_losses_are_reported_in_batches():
    t = LineageTable(max_procs=16, report_ns=1000)
    reported = [t.feed(fork(pid, 1, ts=pid)) for pid in range(1, 40)]
    assert sum(reported) + t.take_unreported() == t.evicted_live == 39 - 16
    assert sum(1 for n in reported if n) < t.evicted_live  # not one event per process


def test_pid_reuse_replaces_the_entry():
    t = LineageTable()
    t.feed(fork(30, 1))
    t.feed(exe(30, "/bin/old", ["old"]))
    t.feed(fork(30, 2, ts=9))  # exit lost, pid reused
    assert t.get(30).ppid == 2 and t.get(30).exe is None


# -- the proc source -------------------------------------------------------------------------------

def _source(t, procs=None, cgroups=None, **kw):
    procs = procs or {}
    return LineageProc(t, lambda pid: procs.get(pid, NOPROC), agents=AgentCatalog.builtin(),
                       cgroup_path=lambda cg: (cgroups or {}).get(cg), **kw)


def _claude_chain(t, cg=1):
    t.feed(fork(10, 1, cg=cg))
    t.feed(exe(10, "/tmp/t/claude", ["/tmp/t/claude"], cg=cg))
    t.feed(fork(11, 10, cg=cg))
    t.feed(exe(11, "/bin/bash", ["bash", "-c", "curl x; true"], cg=cg))
    t.feed(fork(12, 11, cg=cg))
    t.feed(exe(12, "/usr/bin/curl", ["curl", "-H", "Authorization: Bearer sk-zzzzzzzz", "x"], cg=cg))
    for pid in (12, 11, 10):
        t.feed(exit_(pid))


def test_chain_and_agent_from_records_alone():
    t = LineageTable()
    _claude_chain(t)
    info = _source(t).get(12)
    assert (info.ppid, info.exe, info.comm) == (11, "/usr/bin/curl", "curl")
    assert info.cmdline == ("curl", "-H", "Authorization: [REDACTED]", "x")
    lin = info.lineage
    assert lin["ancestry"] == (Ancestor(12, "curl", "/usr/bin/curl"), Ancestor(11, "bash", "/bin/bash"),
                               Ancestor(10, "claude", "/tmp/t/claude"))
    assert (lin["agent"], lin["agent_pid"], lin["agent_evidence"]) == ("claude-code", 10, "exe:claude")
    assert lin["container_id"] is None


def test_chain_continues_through_proc_and_is_bounded():
    t = LineageTable()
    _claude_chain(t)
    t.feed(fork(1000, 1))  # unrelated
    procs = {1: ProcInfo(0, "/sbin/init", ("init",), None, 1, "systemd")}
    procs.update({pid: ProcInfo(pid - 1, "/bin/sh", ("sh",), None, pid, "sh") for pid in range(2, 10)})
    # 10's parent is 1 in the records; make it 9 to go through /proc: 12 11 10 9 8 7 6 5 (bound 8)
    t.get(10).ppid = 9
    lin = _source(t, procs).lineage(12)
    assert [a.pid for a in lin["ancestry"]] == [12, 11, 10, 9, 8, 7, 6, 5]
    short = _source(t, procs, max_depth=2).lineage(12)
    assert [a.pid for a in short["ancestry"]] == [12, 11]
    assert short["agent"] is None  # the agent is further up than we looked


def test_cycle_in_hostile_records_terminates():
    t = LineageTable()
    t.feed(fork(5, 6))
    t.feed(fork(6, 5))
    t.feed(exe(5, "/a", ["a"]))
    t.feed(exe(6, "/b", ["b"]))
    assert [a.pid for a in _source(t).lineage(5)["ancestry"]] == [5, 6]


def test_container_boundary_ends_the_chain():
    cid = "ab" * 32
    t = LineageTable()
    t.feed(fork(40, 1, cg=7))  # containerd-shim, outside
    t.feed(exe(40, "/usr/bin/containerd-shim-runc-v2", ["containerd-shim-runc-v2"], cg=7))
    t.feed(fork(41, 40, cg=8))
    t.feed(exe(41, "/usr/bin/python3", ["python3", "-m", "aider"], cg=8))
    t.feed(fork(42, 41, cg=8))
    t.feed(exe(42, "/usr/bin/curl", ["curl"], cg=8))
    src = _source(t, cgroups={7: "/system.slice/containerd.service",
                             8: f"/kubepods/besteffort/pod1b2c3d4e-0000-4000-8000-000000000001/{cid}"})
    lin = src.lineage(42)
    assert [a.pid for a in lin["ancestry"]] == [42, 41]
    assert (lin["container_id"], lin["container_runtime"], lin["pod_uid"]) == (
        cid, "kubernetes", "1b2c3d4e-0000-4000-8000-000000000001")
    assert (lin["agent"], lin["agent_evidence"]) == ("aider", "module:aider")
    assert lin["pod_qos"] == "besteffort"


def test_unknown_process_has_no_lineage_and_proc_fallback_works():
    t = LineageTable()
    src = _source(t, {77: ProcInfo(1, "/usr/bin/codex", ("codex",), 5, 3, "codex")})
    assert src.get(999).lineage == NO_LINEAGE
    info = src.get(77)
    assert info.exe == "/usr/bin/codex" and info.lineage["agent"] == "codex-cli"
    assert src.get(0).lineage is None


@pytest.mark.parametrize(("path", "qos"), [
    ("/kubepods/pod1b2c3d4e-0000-4000-8000-000000000001/" + "cd" * 32, "guaranteed"),  # cgroupfs
    ("/kubepods/burstable/pod1b2c3d4e-0000-4000-8000-000000000001/" + "cd" * 32, "burstable"),
    ("/kubepods.slice/kubepods-pod1b2c3d4e_0000_4000_8000_000000000001.slice/cri-containerd-" + "cd" * 32
     + ".scope", "guaranteed"),  # systemd
    ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c3d4e_0000_4000_8000_000000000001"
     ".slice/crio-" + "cd" * 32 + ".scope", "besteffort"),
    ("/docker/" + "cd" * 32, None),  # not a pod: no QoS class
])
def test_pod_qos_from_both_cgroup_layouts(path, qos):
    t = LineageTable()
    t.feed(fork(50, 1, cg=3))
    t.feed(exe(50, "/usr/bin/curl", ["curl"], cg=3))
    lin = _source(t, cgroups={3: path}).lineage(50)
    assert lin["pod_qos"] == qos and lin["container_id"] == "cd" * 32


def test_start_time_from_the_fork_record_else_from_proc():
    t = LineageTable()
    t.feed(fork(60, 1, ts=5_000_000_000))  # forked 5 s after the monotonic clock's zero
    t.feed(exe(60, "/usr/bin/curl", ["curl"], ts=5_100_000_000))
    t.feed(exe(61, "/usr/bin/wget", ["wget"]))  # forked before we watched: no fork record
    procs = {61: ProcInfo(1, "/usr/bin/wget", ("wget",), None, 250, "wget", None, 1_700_000_002.5),
             62: ProcInfo(1, "/usr/bin/nc", ("nc",), None, 300, "nc", None, 1_700_000_003.0)}
    src = _source(t, procs, wall_offset=1_700_000_000.0)
    assert src.get(60).lineage["proc_start_time"] == 1_700_000_005.0  # the fork, not the exec
    assert src.get(60).start_time == 1_700_000_005.0
    assert src.get(61).lineage["proc_start_time"] == 1_700_000_002.5
    assert src.get(62).lineage["proc_start_time"] == 1_700_000_003.0  # /proc only
    assert src.get(999).lineage["proc_start_time"] is None


def test_proc_start_time_is_the_wall_time_the_process_started():
    import subprocess
    import time

    from busted.host.procinfo import read_proc

    before = time.time()
    child = subprocess.Popen(["sleep", "5"])
    try:
        info = read_proc(child.pid)
        after = time.time()
    finally:
        child.kill()
        child.wait()
    # /proc counts in clock ticks (10 ms): allow one tick either side
    assert before - 0.02 <= info.start_time <= after + 0.02, (before, info.start_time, after)


def test_a_fork_only_child_runs_its_parents_program():
    """Children that fork without exec (a shell's subshell, a forking server, a Python worker) keep
    their parent's exe and argv, from the table or, for a parent older than the Monitor, /proc."""
    t = LineageTable()
    t.feed(fork(70, 5, ts=10))  # 5: older than the Monitor, alive (only in /proc)
    t.feed(fork(71, 70, ts=11))  # a grandchild, fork-only too
    t.feed(exit_(71, ts=12))
    t.feed(exit_(70, ts=13))
    procs = {5: ProcInfo(1, "/usr/bin/python3.11", ("python3", "storm.py"), None, 9, "python3")}
    src = _source(t, procs)
    info = src.get(71)
    assert (info.exe, info.cmdline, info.ppid) == ("/usr/bin/python3.11", ("python3", "storm.py"), 70)
    assert [(a.pid, a.exe) for a in info.lineage["ancestry"]] == [
        (71, "/usr/bin/python3.11"), (70, "/usr/bin/python3.11"), (5, "/usr/bin/python3.11")]
    # a parent in the table that exec'd before the fork lends its program; one that exec'd after does not
    t.feed(fork(80, 1, ts=20))
    t.feed(exe(80, "/bin/bash", ["bash"], ts=21))
    t.feed(fork(81, 80, ts=22))
    t.feed(fork(82, 80, ts=23))
    t.feed(exe(80, "/usr/bin/vim", ["vim"], ts=30))  # bash exec'd vim after forking 82 (fed late on purpose)
    assert src.get(81).exe == "/bin/bash"  # inherited at its fork record
    t.feed(fork(83, 80, ts=31))
    assert src.get(83).exe == "/usr/bin/vim"
    t.get(82).exe = None  # as if 80 was unknown at 82's fork, then exec'd vim later
    assert src.get(82).exe is None


# -- through the flow table ------------------------------------------------------------------------

def test_flow_table_routes_lineage_records_and_fills_flow_events():
    from busted.wire.layout import FL, FLOW, REC_HDR, REC_OPEN

    t = LineageTable()
    src = _source(t)
    ft = FlowTable(proc=src.get, lineage=t)
    for rec in (fork(10, 1), exe(10, "/tmp/t/claude", ["claude"])):
        if rec.type == REC_EXEC:
            raw = _exec_bytes(rec.pid, b"/tmp/t/claude", b"claude\0")
        else:
            raw = LIN_HDR.pack(type=rec.type, pid=rec.pid, ts_ns=rec.ts_ns, cgroup=1, ppid=rec.ppid, comm=b"x")
        assert ft.feed(raw) == []
    assert t.get(10).exe == "/tmp/t/claude"
    raw = REC_HDR.pack(type=REC_OPEN, ts_ns=5, sk=1) + FLOW.pack(
        pid=10, tid=10, flags=FL.ATTRIBUTED | FL.HAVE_TUPLE, family=2, sport=1, dport=2, direction=1, comm=b"claude")
    ev = ft.feed(raw)[0]
    assert isinstance(ev, FlowOpened) and ev.agent == "claude-code" and ev.ancestry[0].pid == 10
    assert ev.proc_start_time == 1e-9 + src.wall_offset  # its fork record's time (ts_ns=1)
    assert event_from_dict(ev.to_dict()) == ev  # the store/JSONL round trip keeps the new fields


def test_flow_table_reports_lineage_losses():
    t = LineageTable(max_procs=16, report_ns=0)
    ft = FlowTable(lineage=t)
    evs = []
    for pid in range(1, 30):
        evs += ft.feed(LIN_HDR.pack(type=REC_FORK, pid=pid, ts_ns=pid, ppid=1))
    assert sum(e.count for e in evs) == 29 - 16 and all(e.where == LossPlace.USER_TABLE for e in evs)
    assert ft.lost["USER_TABLE"] == 13


def test_flow_table_without_lineage_ignores_its_records():
    ft = FlowTable()
    assert ft.feed(LIN_HDR.pack(type=REC_FORK, pid=3, ppid=1)) == []


def test_flow_table_without_lineage_still_has_the_start_time_from_proc():
    from busted.wire.layout import FL, FLOW, REC_HDR, REC_OPEN

    info = ProcInfo(1, "/usr/bin/curl", ("curl",), None, 250, "curl", None, 1_700_000_002.5)
    ft = FlowTable(proc=lambda pid: info)
    raw = REC_HDR.pack(type=REC_OPEN, ts_ns=5, sk=1) + FLOW.pack(
        pid=10, tid=10, flags=FL.ATTRIBUTED | FL.HAVE_TUPLE, family=2, sport=1, dport=2, direction=1, comm=b"curl")
    ev = ft.feed(raw)[0]
    assert (ev.proc_start_time, ev.agent, ev.ancestry) == (1_700_000_002.5, None, None)


def test_unread_argument_falls_back_to_proc_while_it_lives():
    t = LineageTable()
    t.feed(fork(60, 1))
    t.feed(exe(60, "/usr/bin/curl", ["curl", "", "http://x/"], flags=LINF.ARGV_UNREAD))
    alive = {60: ProcInfo(1, "/usr/bin/curl", ("curl", "-s", "http://x/"), None, 9, "curl")}
    assert _source(t, alive).get(60).cmdline == ("curl", "-s", "http://x/")
    assert _source(t).get(60).cmdline == ("curl", "", "http://x/")  # gone: the kernel's copy, gap kept


def test_hostile_lineage_records_never_raise():
    import random

    rng = random.Random(12)
    t = LineageTable(max_procs=32)
    src = _source(t)
    ft = FlowTable(lineage=t, proc=src.get)
    for i in range(3000):
        typ = rng.choice([REC_FORK, REC_EXEC, REC_EXIT])
        body = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 10, 60, 64, 200, 400, 1400])))
        raw = typ.to_bytes(4, "little") + body
        for ev in ft.feed(raw):
            assert ev.kind == "events_lost"
        # small pids so that records hit each other's entries
        ft.feed(LIN_HDR.pack(type=typ, pid=i % 7, ppid=rng.randrange(8), ts_ns=i))
        for pid in range(1, 8):
            src.get(pid)
    assert len(t) <= 32


def test_unreported_lineage_losses_flush_with_the_kernel_loss_check():
    t = LineageTable(max_procs=16, report_ns=10**18)  # never due by itself
    ft = FlowTable(lineage=t)
    for pid in range(1, 21):
        assert ft.feed(LIN_HDR.pack(type=REC_FORK, pid=pid, ts_ns=pid, ppid=1)) == []
    evs = ft.kernel_losses({}, 99)
    assert [(e.where, e.count) for e in evs] == [(LossPlace.USER_TABLE, 4)]
    assert ft.kernel_losses({}, 100) == []


# -- argv from /proc (tiers without execve syscall hooks) ------------------------------------------

def test_exec_without_argv_reads_it_when_decoded_and_counts_the_gone():
    asked = []

    def exec_argv(pid, comm):
        asked.append((pid, comm))
        return ("curl", "-H", "Authorization: Bearer sk-secret123456", "http://x/") if pid == 5 else None

    t = LineageTable(exec_argv=exec_argv)
    t.feed(fork(5, 1))
    t.feed(exe(5, "/usr/bin/curl", (), flags=LINF.NO_ARGV))
    p = t.get(5)
    assert asked == [(5, "curl")]
    assert p.exe == "/usr/bin/curl" and p.argv[:2] == ("curl", "-H")
    assert "sk-secret123456" not in " ".join(p.argv)  # redacted as the kernel's copy is
    # A process that exited before its record was read: exe kept, argv unknown (None, not ()), counted.
    t.feed(fork(6, 1))
    t.feed(exe(6, "/usr/bin/true", (), flags=LINF.NO_ARGV))
    assert t.get(6).exe == "/usr/bin/true" and t.get(6).argv is None
    assert (t.argv_from_proc, t.argv_lost) == (1, 1)
    # The kernel's copy (syscall tier) is used as it is: /proc is not asked.
    t.feed(exe(7, "/usr/bin/env", ("env",)))
    assert t.get(7).argv == ("env",) and len(asked) == 2


def test_exec_without_argv_and_no_reader_is_unknown_not_empty():
    t = LineageTable()
    t.feed(exe(5, "/usr/bin/curl", (), flags=LINF.NO_ARGV))
    assert t.get(5).argv is None and t.argv_lost == 0


def test_read_exec_argv_checks_the_program(tmp_path):
    from busted.host.procinfo import read_exec_argv

    d = tmp_path / "42"
    d.mkdir()
    (d / "stat").write_bytes(b"42 (my (odd) comm) S 1 42 42 0 -1 4194560 0 0 0 0")
    (d / "cmdline").write_bytes(b"prog\0-x\0\0")
    assert read_exec_argv(42, "my (odd) comm", root=str(tmp_path)) == ("prog", "-x", "")
    assert read_exec_argv(42, "other", root=str(tmp_path)) is None  # exec'd again / pid reused
    assert read_exec_argv(43, "x", root=str(tmp_path)) is None  # gone
    (d / "stat").write_bytes(b"42 (my (odd) comm) Z 1 42 42 0")
    assert read_exec_argv(42, "my (odd) comm", root=str(tmp_path)) is None  # a zombie
