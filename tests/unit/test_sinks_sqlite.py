import sqlite3
import threading
import time

import pytest
from events_factory import sample_events
from hypothesis import given, settings
from hypothesis import strategies as st

from busted import StoreError
from busted.events import Direction, Evidence, FlowOpened
from busted.sinks import Store, event_from_dict, redact


def test_round_trip_equal_across_restarts(tmp_path):
    db = tmp_path / "b.db"
    first = sample_events(flow_id=1)
    with Store(db) as s:
        s.write_many(first)
    second = sample_events(t0=1_800_000_000.0, flow_id=2, pid=200)
    with Store(db) as s:  # restart: appends
        s.write_many(second)
    with Store.open_readonly(db) as r:
        assert list(r.events()) == first + second
        flows = r.flows()
        assert [f["flow_id"] for f in flows] == [1, 2]
        f = flows[0]
        assert (f["provider"], f["evidence"], f["bytes_sent"], f["bytes_received"]) == ("openai", "sni", 811, 2233)
        assert f["opened"] == pytest.approx(1_700_000_000.1) and f["closed"] == pytest.approx(1_700_000_001.1)
        assert list(r.events(kinds=["flow_closed"], pid=200))[0].flow_id == 2
        assert list(r.events(since=1_750_000_000.0)) == second


def test_close_without_open_still_makes_a_flow_row(tmp_path):
    ev = sample_events()[4]
    with Store(tmp_path / "c.db") as s:
        s.write(ev)
    with Store.open_readonly(tmp_path / "c.db") as r:
        (f,) = r.flows()
        assert f["bytes_sent"] == 811 and f["opened"] == pytest.approx(ev.wall_time - 1.0)


def test_corrupt_file_is_a_clear_error(tmp_path):
    p = tmp_path / "x.db"
    p.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a busted store or corrupted"):
        Store(p)
    with pytest.raises(StoreError, match="no such store"):
        Store.open_readonly(tmp_path / "missing.db")


def test_newer_schema_is_refused(tmp_path):
    p = tmp_path / "n.db"
    Store(p).close()
    db = sqlite3.connect(p)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer busted"):
        Store(p)


def test_locked_database_loses_nothing(tmp_path):
    p = tmp_path / "l.db"
    s = Store(p, busy_timeout=0.1, flush_interval=0.05)
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    evs = sample_events()
    s.write_many(evs)
    with pytest.raises(StoreError, match="not yet written"):
        s.flush(timeout=1.0)
    assert s.stats()["queued"] == len(evs) and s.stats()["retries"] >= 1 and "locked" in s.stats()["last_error"]
    other.execute("COMMIT")
    other.close()
    s.flush(timeout=10)
    s.close()
    with Store.open_readonly(p) as r:
        assert list(r.events()) == evs


def test_locked_at_open_is_a_clear_error(tmp_path):
    p = tmp_path / "o.db"
    Store(p).close()
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("PRAGMA journal_mode=DELETE")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked"):
            Store(p, busy_timeout=0.2)
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_queue_full_drops_are_counted(tmp_path):
    s = Store(tmp_path / "q.db", queue_size=3, batch_size=1000, flush_interval=5)
    with s._cv:  # hold the writer so the queue cannot drain
        for ev in sample_events():
            s.write(ev)
    assert s.stats()["dropped"] == 3
    s.close()


def test_retention_by_age_and_size(tmp_path):
    s = Store(tmp_path / "r.db", retention_seconds=3600)
    now = time.time()
    s.write_many(sample_events(t0=now - 7200, flow_id=1) + sample_events(t0=now, flow_id=2))
    s.flush()
    assert s.trim(now=now) > 0
    assert {e.flow_id for e in s.events(kinds=["flow_closed"])} == {2}
    s.close()
    s = Store(tmp_path / "big.db", max_bytes=200_000)
    for i in range(300):
        s.write_many(sample_events(t0=now + i, flow_id=1000 + i))
    s.flush()
    s.trim()
    page = s._db.execute("PRAGMA page_size").fetchone()[0]
    used = (s._db.execute("PRAGMA page_count").fetchone()[0] - s._db.execute("PRAGMA freelist_count").fetchone()[0])
    assert used * page <= 200_000
    assert len(list(s.events(kinds=["flow_closed"]))) < 300
    s.close()


def test_writes_from_threads(tmp_path):
    s = Store(tmp_path / "t.db")
    ths = [threading.Thread(target=lambda i=i: s.write_many(sample_events(flow_id=i))) for i in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    s.close()
    with Store.open_readonly(tmp_path / "t.db") as r:
        assert len(list(r.events())) == 8 * 6 and len(r.flows()) == 8


def test_redact_any_depth():
    d = {"a": {"Authorization": "Bearer x", "headers": [["x-api-key", "k"], ["accept", "json"]]}, "api-key": "z"}
    r = redact(d)
    assert r["a"]["Authorization"] == "[REDACTED]" and r["api-key"] == "[REDACTED]"
    assert r["a"]["headers"] == [["x-api-key", "[REDACTED]"], ["accept", "json"]]


@settings(max_examples=60)
@given(comm=st.text(max_size=15), pid=st.integers(0, 2**31), cmd=st.none() | st.lists(st.text(), max_size=4),
       conf=st.floats(0, 1), ev=st.sampled_from(list(Evidence)), port=st.integers(0, 65535))
def test_codec_round_trip(comm, pid, cmd, conf, ev, port):
    e = FlowOpened(ts_ns=1, wall_time=2.5, flow_id=9, direction=Direction.ACCEPT, pid=pid, tid=pid, uid=0,
                   comm=comm, cmdline=None if cmd is None else tuple(cmd), family=6, saddr="::1", sport=port,
                   daddr="::1", dport=1, evidence=ev, confidence=conf)
    assert event_from_dict(e.to_dict()) == e
