"""Disk full (issue 8.6, 8.7): the store and the JSONL sink on a small tmpfs.

Needs root (mount); run under the shared lock:
    flock /tmp/busted-kernel.lock .venv/bin/python -m pytest -q tests/unit/test_sinks_diskfull.py
"""

import contextlib
import errno
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import needs
import pytest
from events_factory import sample_events

from busted import StoreError
from busted.events import EventsLost, LossPlace
from busted.sinks import JsonlSink, Store


@contextlib.contextmanager
def small_tmpfs(size: str):
    needs.root("mounting a tmpfs")
    d = tempfile.mkdtemp(prefix="busted-full-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        needs.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield Path(d)
    finally:
        if subprocess.run(["umount", d]).returncode != 0:  # still busy (a failed test left a file open)
            subprocess.run(["umount", "-l", d], check=True)
        os.rmdir(d)


def _fill(path: Path, limit: int = 1 << 30) -> int:
    """Write zeros to ``path`` until the disk is full; returns the bytes written."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while n < limit:
            try:
                n += os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                try:  # the last few bytes
                    n += os.write(fd, b"\0" * 64)
                    continue
                except OSError:
                    return n
    finally:
        os.close(fd)
    raise AssertionError("the disk never filled")


def _wait(cond, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _accounted(st) -> int:
    return st["written"] + st["queued"] + st["dropped"] + st["invalid"]


# -- store ---------------------------------------------------------------------------------------


def _until_refused(s: Store, msgs: list[str]) -> int:
    """Feed events at the writer's pace until the store says it cannot write; returns how many."""
    total = 0
    for i in range(2000):
        s.write_many(sample_events(flow_id=i))
        total += 6
        try:
            s.flush(timeout=10)
        except StoreError:
            break
    _wait(lambda: msgs, "the store to say it cannot write")
    return total


def test_store_disk_full_is_told_bounded_and_recovers():
    msgs: list[str] = []
    with small_tmpfs("1m") as d:
        s = Store(d / "s.db", queue_size=120, batch_size=30, flush_interval=0.02, on_error=msgs.append)
        try:
            _fill(d / "ballast")
            total = _until_refused(s, msgs)
            assert "cannot write the store (database or disk is full" in msgs[0], msgs
            st = s.stats()
            assert st["failing"] is not None and "full" in st["last_error"] and st["dropped"] == 0
            for i in range(140):  # the backlog is bounded: beyond queue_size new events are dropped
                s.write_many(sample_events(flow_id=10_000 + i))
                total += 6
            st = s.stats()
            assert st["queued"] <= 120 and st["dropped"] >= 140 * 6 - 120
            assert _accounted(st) == total  # every event is written, waiting or counted as dropped
            assert any("dropping new ones" in m for m in msgs[1:]), msgs
            with pytest.raises(StoreError, match="not yet written") as ei:  # refused twice: returns early
                s.flush(timeout=30)
            assert "free space" in str(ei.value)
            os.unlink(d / "ballast")  # space comes back: the writer's retries get through
            _wait(lambda: s.stats()["failing"] is None and s.stats()["queued"] == 0, "the store to recover")
            s.flush()
            assert any("writes again" in m for m in msgs), msgs
        finally:
            s.close()
        st = s.stats()
        assert _accounted(st) == total and st["loss_records"] >= 1 and st["queued"] == 0
        rep = s.report()
        assert rep["written"] + rep["lost"] == total and rep["lost"] == st["dropped"] > 0
        with Store.open_readonly(d / "s.db") as r:
            evs = list(r.events())
        losses = [e for e in evs if isinstance(e, EventsLost) and e.where == LossPlace.SINK]
        assert len(evs) - len(losses) == st["written"]
        assert sum(e.count for e in losses) == st["dropped"]  # the gap is in the store, exactly
        assert any("while the store could not write (OperationalError: database or disk is full)" in e.detail
                   for e in losses), losses


def test_store_disk_full_until_close_tells_the_truth_quickly():
    msgs: list[str] = []
    with small_tmpfs("512k") as d:
        s = Store(d / "s.db", queue_size=50, flush_interval=0.02, on_error=msgs.append)
        _fill(d / "ballast")
        total = _until_refused(s, msgs)
        for i in range(20):
            s.write_many(sample_events(flow_id=10_000 + i))
            total += 6
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"closed with \d+ events not written") as ei:
            s.close(timeout=10)
        assert time.monotonic() - t0 < 8  # not the full timeout: the disk refused twice, that is enough
        assert "kept in memory" not in str(ei.value) and "lost unless taken from Store.pending()" in str(ei.value)
        rep = s.report()
        assert rep["unwritten"] == len(s.pending()) > 0 and rep["dropped"] > 0
        assert rep["written"] + rep["lost"] == total and rep["lost"] == rep["dropped"] + rep["unwritten"]
        assert rep["text"] == (f"store {d / 's.db'}: {rep['written']} events written, {rep['lost']} lost (dropped "
                               f"{rep['dropped']}, not written at close {rep['unwritten']})")
        assert msgs[-1] != rep["text"]  # the exception carries it, not a second message


# -- JSONL ---------------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a truncated last line"
    return [json.loads(ln) for ln in data.splitlines()]


def test_jsonl_disk_full_counts_never_crashes_never_tears_a_line():
    msgs: list[str] = []
    with small_tmpfs("256k") as d:
        p = d / "x.jsonl"
        s = JsonlSink(p, flush_interval=0.05, max_backlog=20_000, on_error=msgs.append)
        total = 0
        try:
            for i in range(400):  # ~1 MB of lines into 256 KiB
                for ev in sample_events(flow_id=i):
                    s.write(ev)
                    total += 1
                if msgs and s.dropped:
                    break
            assert msgs and "cannot write the JSONL output" in msgs[0] and "No space left" in msgs[0], msgs
            assert s.dropped > 0 and s.last_error is not None
            assert len(_lines(p)) == s.written  # whole lines only, exactly those counted
        finally:
            s.close()  # the old sink raised OSError here (ENOSPC from the final flush)
        rep = s.report()
        assert rep["written"] + rep["lost"] == total and rep["lost"] == s.dropped + rep["unwritten"] > 0
        assert len(_lines(p)) == rep["written"]


def test_jsonl_space_comes_back():
    msgs: list[str] = []
    with small_tmpfs("256k") as d:
        p = d / "y.jsonl"
        _fill(d / "ballast")
        s = JsonlSink(p, flush_interval=0.05, on_error=msgs.append)
        try:
            evs = sample_events()
            for ev in evs:
                s.write(ev)
            _wait(lambda: msgs, "the sink to say it cannot write")
            assert p.stat().st_size == 0 and s.written == 0
            os.unlink(d / "ballast")
            _wait(lambda: s.written == len(evs), "the timer to write the kept lines")
            assert [ln["kind"] for ln in _lines(p)] == [e.kind for e in evs]
            assert "writes again" in msgs[-1]
        finally:
            s.close()
        assert s.report()["lost"] == 0


def test_jsonl_full_at_close_keeps_whole_lines():
    """Issue 8.7: ENOSPC from close() crashed the monitor and left a truncated last line."""
    with small_tmpfs("256k") as d:
        p = d / "z.jsonl"
        s = JsonlSink(p, flush_interval=3600)  # nothing written before close
        try:
            for n in range(150):  # ~330 KB of lines, more than the disk holds
                for ev in sample_events(flow_id=n):
                    s.write(ev)
            assert 0 < s.written < 150 * 6  # 64 KiB chunks went out, the rest is buffered
            _fill(d / "ballast")  # what is left is the slack of the file's last page: a cut mid-line
        finally:
            s.close()
        rep = s.report()
        lines = _lines(p)
        assert len(lines) == rep["written"] and rep["written"] + rep["lost"] == 150 * 6


# -- the CLI's outputs -----------------------------------------------------------------------------


def test_cli_outputs_on_a_full_disk_say_so_and_the_summary_still_comes(capsys):
    """Issue 8.6/8.7 end to end (without BPF: the CLI's output loop fed recorded events)."""
    import io
    import re

    from busted.cli import _parser, _run_monitor, _Sinks

    with small_tmpfs("256k") as d:
        args = _parser().parse_args(["monitor", "--json", "--store", str(d / "s.db"), "--jsonl", str(d / "x.jsonl")])
        evs = [ev for i in range(300) for ev in sample_events(flow_id=i)]

        def capture():
            _fill(d / "ballast")  # the disk fills up once the monitor runs
            yield from evs

        t0 = time.monotonic()
        summary = _run_monitor(args, io.StringIO(), capture(), sinks=_Sinks(args))
        assert time.monotonic() - t0 < 15  # no 10 s wait for a disk that refuses
        err = capsys.readouterr().err.splitlines()
        assert sum(summary.kinds.values()) == len(evs)  # the summary is there to print
        store = [ln for ln in err if "s.db" in ln]
        jsonl = [ln for ln in err if "x.jsonl" in ln]
        assert "cannot write the store" in store[0], err
        m = re.search(r"closed with (\d+) events not written .* (\d+) events written, (\d+) lost", store[-1])
        assert m and int(m[1]) > 0 and int(m[2]) + int(m[3]) == len(evs), err
        assert "kept in memory" not in store[-1]
        assert "cannot write the JSONL output" in jsonl[0], err
        m = re.fullmatch(rf"busted: jsonl {d / 'x.jsonl'}: (\d+) events written, (\d+) lost "
                         r"\(not written at close (\d+)\)", jsonl[-1])
        assert m and int(m[1]) + int(m[2]) == len(evs) and m[2] == m[3], err  # within the 8 MiB backlog
        assert len(_lines(d / "x.jsonl")) == int(m[1])
