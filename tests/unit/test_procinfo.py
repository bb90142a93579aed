"""ProcCache names the process now at a pid (issue 17 item 3): an exec, a pid reused by another
process, seen on the very next lookup, not after the 30 s the cache keeps an entry. A real process
that execs (no lineage), and pid reuse in a fake /proc root (``ProcCache(root=...)``)."""

import os
import shutil
import subprocess
import time
from pathlib import Path

from busted.host.lineage import LineageProc, LineageTable
from busted.host.procinfo import ProcCache
from busted.wire.layout import REC_EXEC, REC_EXIT, REC_FORK
from busted.wire.records import LinRecord


def _wait_exe(pid: int, want: str, timeout: float = 10.0) -> None:
    """Until ``pid`` runs ``want`` with its arguments in place (execve sets the exe link first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if os.readlink(f"/proc/{pid}/exe") == want and f.read():
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never ran {want}")


def test_a_real_exec_is_seen_on_the_next_lookup():
    sh, sleep = os.path.realpath("/bin/sh"), os.path.realpath("/bin/sleep")
    p = subprocess.Popen(["/bin/sh", "-c", "read x; exec /bin/sleep 30"], stdin=subprocess.PIPE)
    try:
        _wait_exe(p.pid, sh)
        cache = ProcCache()
        before = cache.get(p.pid)
        assert before.exe == sh and before.cmdline == ("/bin/sh", "-c", "read x; exec /bin/sleep 30")
        assert cache.get(p.pid) is before  # unchanged: the cached entry, no re-read
        p.stdin.write(b"\n")
        p.stdin.flush()
        _wait_exe(p.pid, sleep)
        after = cache.get(p.pid)
        assert after.exe == sleep and after.cmdline == ("/bin/sleep", "30")
        assert after.start_ticks == before.start_ticks  # one process, two programs
    finally:
        p.kill()
        p.wait()


def _proc_dir(root: Path, pid: int, *, start: int, exe: str, argv: list[str], name: str | None = None,
              ppid: int = 1) -> Path:
    d = root / (name or str(pid))
    (d / "ns").mkdir(parents=True)
    comm = exe.rsplit("/", 1)[-1]
    fields = ["S", str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 30  # rest[19] = field 22, the start time
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    os.symlink(exe, d / "exe")
    os.symlink("net:[4026531840]", d / "ns" / "net")
    return d


def _replace(root: Path, pid: int, **kw) -> None:
    """A new process at ``pid``: a new /proc/<pid> directory, as the kernel makes one."""
    _proc_dir(root, pid, name=f"{pid}.new", **kw)
    os.rename(root / str(pid), root / f"{pid}.old")
    os.rename(root / f"{pid}.new", root / str(pid))
    shutil.rmtree(root / f"{pid}.old")


def test_pid_reuse_in_a_fake_proc_root(tmp_path):
    _proc_dir(tmp_path, 4242, start=1000, exe="/usr/bin/victim", argv=["victim", "--serve"])
    cache = ProcCache(root=str(tmp_path))
    a = cache.get(4242)
    assert (a.exe, a.cmdline, a.start_ticks) == ("/usr/bin/victim", ("victim", "--serve"), 1000)
    # another process gets the pid, running the same program with other arguments
    _replace(tmp_path, 4242, start=2000, exe="/usr/bin/victim", argv=["victim", "--other"])
    b = cache.get(4242)
    assert (b.exe, b.cmdline, b.start_ticks) == ("/usr/bin/victim", ("victim", "--other"), 2000)
    # and another program
    _replace(tmp_path, 4242, start=3000, exe="/usr/bin/attacker", argv=["attacker"])
    c = cache.get(4242)
    assert (c.exe, c.cmdline, c.start_ticks) == ("/usr/bin/attacker", ("attacker",), 3000)
    assert cache.reads == 3


def test_exec_exit_and_zombie_in_a_fake_proc_root(tmp_path):
    d = _proc_dir(tmp_path, 77, start=500, exe="/usr/bin/python3", argv=["python3", "agent.py"])
    cache = ProcCache(root=str(tmp_path))
    assert cache.get(77).exe == "/usr/bin/python3"
    # exec: the same start time, another program
    os.unlink(d / "exe")
    os.symlink("/usr/bin/curl", d / "exe")
    (d / "cmdline").write_bytes(b"curl\0https://api.openai.com\0")
    assert cache.get(77).cmdline == ("curl", "https://api.openai.com")
    # a zombie (no exe, an empty cmdline) and then gone: what it ran last is kept for its late flows
    st = os.stat(d)
    os.unlink(d / "exe")
    (d / "cmdline").write_bytes(b"")
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))  # procfs: one process, one directory, one mtime
    assert cache.get(77).exe == "/usr/bin/curl"
    shutil.rmtree(d)
    assert cache.get(77).cmdline == ("curl", "https://api.openai.com")


def test_lineage_entry_of_an_exited_process_does_not_name_a_reused_pid(tmp_path):
    """The kernel reported the exit of pid 4242; its fork record for the next process there was
    lost: /proc names the process now at the pid, not the table's dead one."""
    table = LineageTable()
    table.feed(LinRecord(REC_FORK, 4242, 1, 1, 1, 1, 0, 0, "victim"))
    table.feed(LinRecord(REC_EXEC, 4242, 2, 1, 0, 4242, 0, 0, "victim", "/usr/bin/victim", ("victim",)))
    table.feed(LinRecord(REC_EXIT, 4242, 3, 1, 0, 4242, 0, 0, "victim"))
    _proc_dir(tmp_path, 4242, start=9000, exe="/usr/bin/other", argv=["other", "--x"])
    lp = LineageProc(table, ProcCache(root=str(tmp_path)).get)
    info = lp.get(4242)
    assert (info.exe, info.cmdline) == ("/usr/bin/other", ("other", "--x"))
    assert info.lineage["ancestry"][0].exe == "/usr/bin/other"
    # a zombie at the pid (no exe): the table's record of what it ran stands
    os.unlink(tmp_path / "4242" / "exe")
    table2 = LineageTable()
    for r in (LinRecord(REC_FORK, 4242, 1, 1, 1, 1, 0, 0, "victim"),
              LinRecord(REC_EXEC, 4242, 2, 1, 0, 4242, 0, 0, "victim", "/usr/bin/victim", ("victim",)),
              LinRecord(REC_EXIT, 4242, 3, 1, 0, 4242, 0, 0, "victim")):
        table2.feed(r)
    assert LineageProc(table2, ProcCache(root=str(tmp_path)).get).get(4242).exe == "/usr/bin/victim"


def test_kernel_generation_skips_the_checks_and_a_new_one_rechecks(tmp_path, monkeypatch):
    """With lineage, a process the table knows is checked against /proc once per generation (its
    fork and exec times), and its exec record names the program."""
    table = LineageTable()
    table.feed(LinRecord(REC_FORK, 300, 1, 1, 1, 1, 0, 0, "sh"))
    table.feed(LinRecord(REC_EXEC, 300, 2, 1, 0, 300, 0, 0, "python3", "/usr/bin/python3", ("python3", "a.py")))
    d = _proc_dir(tmp_path, 300, start=50, exe="/usr/bin/python3", argv=["python3", "a.py"])
    cache = ProcCache(root=str(tmp_path))
    lp = LineageProc(table, cache.get)
    calls = []
    real_stat = os.stat

    def counting_stat(path, *a, **k):
        if str(path).endswith("/300"):  # the checks of pid 300 (its parent, pid 1, is looked up too)
            calls.append(path)
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", counting_stat)
    assert lp.get(300).exe == "/usr/bin/python3"
    assert lp.get(300).exe == "/usr/bin/python3" and lp.get(300).cmdline == ("python3", "a.py")
    assert len(calls) == 1  # the first lookup of this generation only
    # an exec of the same file with other arguments: a new generation from the kernel, checked again
    (d / "cmdline").write_bytes(b"python3\0b.py\0")
    table.feed(LinRecord(REC_EXEC, 300, 5, 1, 0, 300, 0, 0, "python3", "/usr/bin/python3", ("python3", "b.py")))
    assert lp.get(300).cmdline == ("python3", "b.py")
    assert len(calls) == 2


def test_a_process_caught_inside_execve_is_not_kept(tmp_path):
    d = _proc_dir(tmp_path, 55, start=10, exe="/usr/bin/curl", argv=[])
    (d / "cmdline").write_bytes(b"")  # the exe link already new, the arguments not yet set up
    cache = ProcCache(root=str(tmp_path))
    assert cache.get(55).cmdline == ()
    (d / "cmdline").write_bytes(b"curl\0-s\0")
    assert cache.get(55).cmdline == ("curl", "-s")
