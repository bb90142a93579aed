"""The SQLite store: round trips, restarts, locks, corruption, retention, drops, migration."""

import json
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import needs
import pytest
from events_factory import sample_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busted import StoreError
from busted.events import (
    Direction,
    DnsAnswer,
    DnsRecord,
    Event,
    EventsLost,
    Evidence,
    FlowClassified,
    FlowClosed,
    FlowOpened,
    LossPlace,
    TlsClientHello,
)
from busted.sinks import SCHEMA_VERSION, Store, event_from_dict


@dataclass(frozen=True, kw_only=True)
class FakeLlmCall(Event):
    """Stands in for the LLM-call events later work adds: stored generically (``events``)."""

    kind: ClassVar[str] = "test_llm_call"
    flow_id: int
    pid: int
    comm: str
    provider: str
    model: str
    endpoint: str = "/v1/chat/completions"
    input_tokens: int = 0
    output_tokens: int = 0
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


def _rows(path, sql, *args):
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


# -- round trips ---------------------------------------------------------------------------------


def test_round_trip_equal_across_restarts(tmp_path):
    db = tmp_path / "b.db"
    first = sample_events(flow_id=1)
    with Store(db) as s:
        s.write_many(first)
    second = sample_events(t0=1_800_000_000.0, flow_id=2, pid=200)
    s = Store(db)  # restart: appends
    s.write_many(second)
    s.close()
    assert s.stats()["written"] == len(second) and s.stats()["queued"] == 0
    with Store.open_readonly(db) as r:
        assert list(r.events()) == first + second
        flows = r.flows()
        assert [f["flow_id"] for f in flows] == [1, 2]
        f = flows[0]
        got = (f["provider"], f["evidence"], f["bytes_sent"], f["bytes_received"])
        assert got == ("openai", "sni", 811, 2233)
        assert f["opened"] == pytest.approx(1_700_000_000.1) and f["closed"] == pytest.approx(1_700_000_001.1)
        assert f["direction"] == "connect" and f["duration_ns"] == 1_000_000_000 and f["preexisting"] is False
        assert f["cmdline"] == ["curl", "-H", "Authorization: [REDACTED]", "https://api.openai.com"]
        assert list(r.events(kinds=["flow_closed"], pid=200))[0].flow_id == 2
        assert list(r.events(since=1_750_000_000.0)) == second
        assert list(r.events(until=1_750_000_000.0)) == first
        assert [e.kind for e in r.events(comm="curl", kinds="dns_answer")] == ["dns_answer"] * 2
        # provider also finds the flow's TLS hello (which carries no provider itself)
        kinds = [e.kind for e in r.events(provider="openai", pid=100)]
        assert kinds == ["flow_opened", "tls_client_hello", "flow_classified", "flow_closed"]
        assert r.flows(provider="openai", since=1_750_000_000.0)[0]["flow_id"] == 2


def test_typed_tables(tmp_path):
    p = tmp_path / "t.db"
    with Store(p) as s:
        s.write_many(sample_events())
    assert _rows(p, "SELECT qname, qtype, rcode, answers, cname_chain FROM dns_answers") == [
        ("api.openai.com", "A", "NOERROR",
         '[{"name": "api.openai.com", "rtype": "A", "value": "10.231.1.65", "ttl": 60}]',
         '["api.openai.com"]')]
    assert _rows(p, "SELECT flow_id, sni, alpn, versions, saddr, sport, dport FROM tls_hellos") == [
        (4242, "api.openai.com", '["h2", "http/1.1"]', '["TLS1.3", "TLS1.2"]', "10.0.0.1", 40000, 443)]
    assert _rows(p, "SELECT place, count, detail FROM losses") == [("kernel_ring", 3, "ring buffer full")]
    assert _rows(p, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _rows(p, "PRAGMA journal_mode") == [("wal",)]


def test_classification_updates_the_flow_row(tmp_path):
    evs = sample_events()
    opened, classified = evs[1], evs[3]
    with Store(tmp_path / "c.db") as s:
        s.write(replace(opened, provider=None, hostname=None, evidence=Evidence.UNKNOWN, confidence=0.0))
        s.flush()
        (f,) = s.flows()
        assert f["provider"] is None and f["closed"] is None and f["bytes_sent"] is None
        s.write(classified)
        s.flush()
        (f,) = s.flows()
        assert (f["provider"], f["hostname"], f["evidence"], f["confidence"]) == ("openai", "api.openai.com",
                                                                                  "sni", 0.95)
        assert f["opened"] == pytest.approx(opened.wall_time) and f["closed"] is None


def test_close_without_open_still_makes_a_flow_row(tmp_path):
    ev = sample_events()[4]
    pre = replace(ev, flow_id=7, preexisting=True, duration_ns=0)  # start unknown
    with Store(tmp_path / "c.db") as s:
        s.write_many([ev, pre])
    with Store.open_readonly(tmp_path / "c.db") as r:
        f, g = r.flows()
        assert f["bytes_sent"] == 811 and f["opened"] == pytest.approx(ev.wall_time - 1.0)
        assert g["flow_id"] == 7 and g["opened"] is None and g["closed"] == pytest.approx(ev.wall_time)
        assert g["preexisting"] is True
        assert [x["flow_id"] for x in r.flows(since=ev.wall_time - 0.5)] == [7]  # by close time when no open


def test_future_kinds_are_stored_generically(tmp_path):
    p = tmp_path / "f.db"
    call = FakeLlmCall(ts_ns=9, wall_time=1_700_000_002.0, flow_id=4242, pid=100, comm="python3",
                       provider="openai", model="gpt-4o", input_tokens=12, output_tokens=34,
                       headers=(("Authorization", "Bearer sk-secret"), ("accept", "json")))
    with Store(p) as s:
        s.write(call)
    assert _rows(p, "SELECT kind, flow_id, provider FROM events") == [("test_llm_call", 4242, "openai")]
    tables = {r[0] for r in _rows(p, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"meta", "events", "flows", "dns_answers", "tls_hellos", "losses", "llm_calls",
                      "mcp_messages", "flow_summaries"}
    assert _rows(p, "SELECT count(*) FROM llm_calls") == [(0,)]  # a kind of its own, not an llm_call
    assert "sk-secret" not in Path(p).read_bytes().decode("latin-1")
    # a kind no class claims (written by a newer busted): skipped as objects, visible raw
    db = sqlite3.connect(p)
    db.execute("INSERT INTO events(ts, kind, json) VALUES (?, ?, ?)",
               (1_700_000_004.0, "from_the_future", json.dumps({"kind": "from_the_future", "x": 1})))
    db.commit()
    db.close()
    with Store.open_readonly(p) as r:
        got = list(r.events())
        assert [e.kind for e in got] == ["test_llm_call"]
        assert got[0].headers == (("Authorization", "[REDACTED]"), ("accept", "json"))
        assert got[0] == replace(call, headers=(("Authorization", "[REDACTED]"), ("accept", "json")))
        assert [d["kind"] for d in r.events(raw=True)][-1] == "from_the_future"


def test_writes_from_threads(tmp_path):
    s = Store(tmp_path / "t.db", batch_size=7)
    ths = [threading.Thread(target=lambda i=i: s.write_many(sample_events(flow_id=i))) for i in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    s.close()
    st_ = s.stats()
    assert st_["written"] == 48 and st_["queued"] == 0 and st_["batches"] >= 48 // 7
    with Store.open_readonly(tmp_path / "t.db") as r:
        assert len(list(r.events())) == 8 * 6 and len(r.flows()) == 8


def test_write_does_not_wait_for_the_database(tmp_path):
    p = tmp_path / "w.db"
    s = Store(p, busy_timeout=5)
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the writer thread is now stuck waiting for the lock
    try:
        for i in range(2000):
            s.write_many(sample_events(flow_id=i))
        # Every call returned while the database was locked: nothing could be committed yet, so
        # the caller never waited for SQLite (a synchronous write would block or fail here).
        st = s.stats()
        assert st["written"] == 0 and st["queued"] == 12_000 and st["dropped"] == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    s.close(timeout=30)
    assert s.stats()["written"] == 12_000


def test_reading_while_writing(tmp_path):
    p = tmp_path / "rw.db"
    with Store(p) as s:
        s.write_many(sample_events(flow_id=1))
        s.flush()
        assert len(list(s.events())) == 6  # the writer's own reads use their own connection
        with Store.open_readonly(p) as r:
            s.write_many(sample_events(flow_id=2))
            s.flush()
            assert len(list(r.events())) == 12 and len(r.flows()) == 2


def test_readonly_refuses_writes_and_missing_files(tmp_path):
    p = tmp_path / "r.db"
    Store(p).close()
    r = Store.open_readonly(p)
    with pytest.raises(StoreError, match="read-only"):
        r.write(sample_events()[0])
    r.close()
    r.close()
    with pytest.raises(StoreError, match="no such store"):
        Store.open_readonly(tmp_path / "missing.db")
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "no" / "such" / "dir.db")


def test_close_is_idempotent_and_final(tmp_path):
    s = Store(tmp_path / "i.db")
    s.write(sample_events()[0])
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.write(sample_events()[0])


# -- errors --------------------------------------------------------------------------------------


def test_corrupt_file_is_a_clear_error(tmp_path):
    p = tmp_path / "x.db"
    p.write_bytes(b"this is not sqlite at all" * 100)
    for opener in (Store, Store.open_readonly):
        with pytest.raises(StoreError, match="not a busted store, or corrupted") as ei:
            opener(p)
        assert str(p) in str(ei.value) and "Move it aside" in str(ei.value)


def test_foreign_sqlite_database_is_refused(tmp_path):
    p = tmp_path / "other.db"
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a busted store"):
        Store(p)
    with pytest.raises(StoreError, match="not a busted store"):
        Store.open_readonly(p)
    assert _rows(p, "SELECT name FROM sqlite_master") == [("customers",)]  # untouched


def test_newer_schema_is_refused(tmp_path):
    p = tmp_path / "n.db"
    Store(p).close()
    db = sqlite3.connect(p)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    for opener in (Store, Store.open_readonly):
        with pytest.raises(StoreError, match=rf"newer busted \(schema 99 > {SCHEMA_VERSION}\); upgrade busted"):
            opener(p)


_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, flow_id INTEGER,
    pid INTEGER, comm TEXT, provider TEXT, json TEXT NOT NULL);
CREATE TABLE flows (flow_id INTEGER PRIMARY KEY, opened REAL, closed REAL, direction TEXT, pid INTEGER,
    tid INTEGER, uid INTEGER, ppid INTEGER, comm TEXT, exe TEXT, cmdline TEXT, cgroup_id INTEGER,
    netns INTEGER, family INTEGER, saddr TEXT, sport INTEGER, daddr TEXT, dport INTEGER, preexisting INTEGER,
    hostname TEXT, provider TEXT, evidence TEXT, confidence REAL, bytes_sent INTEGER, bytes_received INTEGER,
    duration_ns INTEGER);
CREATE TABLE dns_answers (id INTEGER PRIMARY KEY, ts REAL NOT NULL, pid INTEGER, comm TEXT, netns INTEGER,
    transport TEXT, server TEXT, qname TEXT, qtype TEXT, rcode TEXT, answers TEXT, cname_chain TEXT);
CREATE TABLE tls_hellos (id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER, comm TEXT,
    daddr TEXT, dport INTEGER, sni TEXT, alpn TEXT, versions TEXT, ja4 TEXT);
CREATE TABLE losses (id INTEGER PRIMARY KEY, ts REAL NOT NULL, place TEXT, count INTEGER, detail TEXT);
CREATE TABLE llm_calls (id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER, comm TEXT,
    provider TEXT, model TEXT, endpoint TEXT, input_tokens INTEGER, output_tokens INTEGER, status INTEGER,
    duration_ns INTEGER);
CREATE TABLE policy_decisions (id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER,
    comm TEXT, provider TEXT, decision TEXT, rule TEXT, reason TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_older_schema_is_migrated_keeping_its_data(tmp_path):
    p = tmp_path / "v1.db"
    old = sample_events(flow_id=1)[0]
    db = sqlite3.connect(p)
    db.executescript(_V1)
    db.execute("INSERT INTO events(ts, kind, pid, comm, json) VALUES (?,?,?,?,?)",
               (old.wall_time, old.kind, old.pid, old.comm, json.dumps(old.to_dict())))
    db.commit()
    db.close()
    new = sample_events(flow_id=2)
    with Store(p) as s:
        s.write_many(new)
    assert _rows(p, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _rows(p, "SELECT saddr, sport FROM tls_hellos") == [("10.0.0.1", 40000)]
    assert _rows(p, "SELECT name FROM sqlite_master WHERE name = 'policy_decisions'") == []
    assert _rows(p, "SELECT count(*) FROM llm_calls") == [(0,)]  # the v1 placeholder was replaced
    with Store.open_readonly(p) as r:
        assert list(r.events()) == [old, *new]


# The v2 schema as the previous code created it (placeholder llm_calls/policy_decisions included):
# a frozen copy on purpose, so the migration test cannot follow later edits of the current schema.
_V2 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, flow_id INTEGER, pid INTEGER,
    comm TEXT, provider TEXT, json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind, ts);
CREATE INDEX IF NOT EXISTS events_flow ON events(flow_id);
CREATE TABLE IF NOT EXISTS flows (
    flow_id INTEGER PRIMARY KEY, opened REAL, closed REAL, direction TEXT, pid INTEGER, tid INTEGER,
    uid INTEGER, ppid INTEGER, comm TEXT, exe TEXT, cmdline TEXT, cgroup_id INTEGER, netns INTEGER,
    family INTEGER, saddr TEXT, sport INTEGER, daddr TEXT, dport INTEGER, preexisting INTEGER,
    hostname TEXT, provider TEXT, evidence TEXT, confidence REAL,
    bytes_sent INTEGER, bytes_received INTEGER, duration_ns INTEGER);
CREATE INDEX IF NOT EXISTS flows_opened ON flows(opened);
CREATE INDEX IF NOT EXISTS flows_provider ON flows(provider, opened);
CREATE INDEX IF NOT EXISTS flows_last ON flows(coalesce(closed, opened));
CREATE TABLE IF NOT EXISTS dns_answers (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, pid INTEGER, comm TEXT, netns INTEGER, transport TEXT,
    server TEXT, qname TEXT, qtype TEXT, rcode TEXT, answers TEXT, cname_chain TEXT);
CREATE INDEX IF NOT EXISTS dns_ts ON dns_answers(ts);
CREATE TABLE IF NOT EXISTS tls_hellos (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER, comm TEXT, daddr TEXT,
    dport INTEGER, sni TEXT, alpn TEXT, versions TEXT, ja4 TEXT, saddr TEXT, sport INTEGER);
CREATE INDEX IF NOT EXISTS tls_ts ON tls_hellos(ts);
CREATE TABLE IF NOT EXISTS losses (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, place TEXT, count INTEGER, detail TEXT);
CREATE INDEX IF NOT EXISTS losses_ts ON losses(ts);
CREATE TABLE IF NOT EXISTS llm_calls (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER, comm TEXT, provider TEXT,
    model TEXT, endpoint TEXT, input_tokens INTEGER, output_tokens INTEGER, status INTEGER,
    duration_ns INTEGER, hostname TEXT, method TEXT);
CREATE INDEX IF NOT EXISTS llm_ts ON llm_calls(ts);
CREATE TABLE IF NOT EXISTS policy_decisions (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER, comm TEXT, provider TEXT,
    decision TEXT, rule TEXT, reason TEXT, model TEXT);
CREATE INDEX IF NOT EXISTS policy_ts ON policy_decisions(ts);
"""



def old_store(p, ddl: str, version: int, events) -> sqlite3.Connection:
    """A store as an older busted wrote it: its DDL, its schema version, ``events`` in ``events``."""
    db = sqlite3.connect(p)
    db.executescript(ddl)
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    for ev in events:
        d = ev.to_dict()
        db.execute("INSERT INTO events(ts, kind, flow_id, pid, comm, provider, json) VALUES (?,?,?,?,?,?,?)",
                   (ev.wall_time, ev.kind, d.get("flow_id"), d.get("pid"), d.get("comm"), d.get("provider"),
                    json.dumps(d)))
    return db


def test_v2_store_is_migrated_dropping_the_placeholder_tables(tmp_path):
    p = tmp_path / "v2.db"
    old = sample_events(flow_id=1)
    closed = old[4]
    db = old_store(p, _V2, 2, old)
    db.execute("INSERT INTO flows(flow_id, opened, closed, comm, provider, bytes_sent, bytes_received) "
               "VALUES (1, ?, ?, 'curl', 'openai', 811, 2233)", (closed.wall_time - 1.0, closed.wall_time))
    db.execute("INSERT INTO dns_answers(ts, qname) VALUES (?, 'api.openai.com')", (old[0].wall_time,))
    db.commit()
    db.close()
    new = sample_events(t0=1_800_000_000.0, flow_id=2)
    with Store(p) as s:
        s.write_many(new)
    assert _rows(p, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _rows(p, "SELECT name FROM sqlite_master WHERE name IN ('policy_decisions', 'policy_ts')") == []
    assert "model" not in [c[1] for c in _rows(p, "PRAGMA table_info(llm_calls)")]  # the placeholder's
    assert _rows(p, "SELECT count(*) FROM dns_answers") == [(2,)]
    with Store.open_readonly(p) as r:
        assert r.schema_version == SCHEMA_VERSION
        assert list(r.events()) == old + new
        assert [(f["flow_id"], f["provider"], f["bytes_received"]) for f in r.flows()] == [
            (1, "openai", 2233), (2, "openai", 2233)]


def test_locked_at_open_is_a_clear_error(tmp_path):
    p = tmp_path / "o.db"
    Store(p).close()
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer, in WAL mode
    try:
        with pytest.raises(StoreError, match="locked by another process") as ei:
            Store(p, busy_timeout=0.2)
        assert str(p) in str(ei.value) and "Stop the other writer" in str(ei.value)
    finally:
        other.execute("ROLLBACK")
        other.close()
    Store(p).close()  # fine once the lock is gone


def test_locked_later_loses_nothing(tmp_path):
    p = tmp_path / "l.db"
    msgs = []
    s = Store(p, busy_timeout=0.1, flush_interval=0.05, on_error=msgs.append)
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    evs = sample_events()
    s.write_many(evs)
    with pytest.raises(StoreError, match="not yet written") as ei:
        s.flush(timeout=1.0)
    assert str(p) in str(ei.value) and "kept in memory" in str(ei.value)
    st_ = s.stats()
    assert st_["queued"] == len(evs) and st_["retries"] >= 1 and "locked" in st_["last_error"]
    assert st_["written"] == 0
    other.execute("COMMIT")
    other.close()
    s.flush(timeout=10)
    assert s.stats()["last_error"] is None and s.stats()["failing"] is None
    s.close()
    assert len(msgs) == 2, msgs  # told once when it started, once when it ended
    assert msgs[0].startswith(f"{p}: cannot write the store (database is locked; another program holds")
    assert msgs[1].startswith(f"{p}: the store writes again, after ") and msgs[1].endswith("; nothing was lost")
    with Store.open_readonly(p) as r:
        assert list(r.events()) == evs


def test_lock_never_released_close_raises_and_keeps_events(tmp_path):
    p = tmp_path / "k.db"
    s = Store(p, busy_timeout=0.1, flush_interval=0.05)
    other = sqlite3.connect(p, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        evs = sample_events()
        s.write_many(evs)
        with pytest.raises(StoreError, match="closed with 6 events not written") as ei:
            s.close(timeout=0.5)
        assert "lost unless taken from Store.pending()" in str(ei.value)  # the truth, no promise of retries
        assert s.report()["text"] == f"store {p}: 0 events written, 6 lost (not written at close 6)"
        assert s.pending() == evs  # handed back, in order
        s.close()  # idempotent, no second raise
    finally:
        other.execute("ROLLBACK")
        other.close()
    with Store(p) as s2:  # the caller can write them to a store that works
        s2.write_many(s.pending())
    with Store.open_readonly(p) as r:
        assert list(r.events()) == evs


def test_queue_full_drops_are_counted_and_recorded(tmp_path):
    p = tmp_path / "q.db"
    s = Store(p, queue_size=3, batch_size=1000, flush_interval=5)
    evs = sample_events()
    with s._cv:  # hold the writer so the queue cannot drain
        for ev in evs:
            s.write(ev)
    assert s.stats()["dropped"] == 3
    s.close()
    assert (s.stats()["written"], s.stats()["loss_records"]) == (3, 1)  # 3 events + the loss record
    assert s.report()["text"] == f"store {p}: 3 events written, 3 lost (dropped 3)"
    with Store.open_readonly(p) as r:
        got = list(r.events())
    assert got[:3] == evs[:3]
    (lost,) = got[3:]
    assert isinstance(lost, EventsLost) and lost.where == LossPlace.SINK and lost.count == 3
    assert lost.detail == "busted.sinks.Store: 3 events dropped, its backlog of 3 being full"


def test_an_unencodable_event_is_counted_not_fatal(tmp_path):
    @dataclass(frozen=True, kw_only=True)
    class Broken(Event):
        kind: ClassVar[str] = "test_broken"

        def to_dict(self):
            raise RuntimeError("boom")

    p = tmp_path / "u.db"
    s = Store(p)
    good = sample_events()
    s.write_many([good[0], Broken(ts_ns=1, wall_time=1.0), *good[1:]])
    with pytest.raises(StoreError, match="1 events could not be encoded"):
        s.flush()
    s.flush()  # reported once
    s.close()
    assert s.stats()["invalid"] == 1 and s.stats()["written"] == 6
    with Store.open_readonly(p) as r:
        assert list(r.events()) == good


def test_odd_values_do_not_poison_the_writer(tmp_path):
    ev = replace(sample_events()[1], comm="bad\udcff", cgroup_id=2**64 - 1, exe="/usr/bin/\u00e9")
    p = tmp_path / "o.db"
    with Store(p) as s:
        s.write(ev)
    with Store.open_readonly(p) as r:
        assert list(r.events()) == [ev]
        (f,) = r.flows()
    assert f["cgroup_id"] == float(2**64 - 1) and f["comm"] == "bad\\udcff"


# -- retention -----------------------------------------------------------------------------------


def test_retention_by_age(tmp_path):
    now = time.time()
    s = Store(tmp_path / "r.db", retention_seconds=3600)
    s.write_many(sample_events(t0=now - 7200, flow_id=1) + sample_events(t0=now, flow_id=2))
    s.flush()
    assert s.trim(now=now) == 6 + 1 + 3  # six events, the flow, its dns/tls/loss rows
    assert {e.flow_id for e in s.events(kinds=["flow_closed"])} == {2}
    assert [f["flow_id"] for f in s.flows()] == [2]
    s.close()
    for table in ("dns_answers", "tls_hellos", "losses"):
        assert _rows(tmp_path / "r.db", f"SELECT count(*) FROM {table}") == [(1,)]


def test_retention_runs_in_the_writer(tmp_path):
    now = time.time()
    s = Store(tmp_path / "p.db", retention_seconds=60, trim_interval=0.05, flush_interval=0.02)
    s.write_many(sample_events(t0=now - 600, flow_id=1))
    deadline = time.monotonic() + 5
    while s.stats()["trimmed"] < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.stats()["trimmed"] == 10 and list(s.events()) == []
    s.close()


def test_retention_by_size(tmp_path):
    now = time.time()
    p = tmp_path / "big.db"
    s = Store(p, max_bytes=200_000, batch_size=100)
    for i in range(300):
        s.write_many(sample_events(t0=now + i, flow_id=1000 + i))
    s.flush()
    assert s.trim() > 0
    page = _rows(p, "PRAGMA page_size")[0][0]
    used = _rows(p, "PRAGMA page_count")[0][0] - _rows(p, "PRAGMA freelist_count")[0][0]
    assert used * page <= 200_000
    kept = [e.flow_id for e in s.events(kinds=["flow_closed"])]
    assert 0 < len(kept) < 300 and kept == list(range(1300 - len(kept), 1300))  # the newest are kept
    s.close()
    assert p.stat().st_size <= 200_000 + 64 * 1024


# -- codec ---------------------------------------------------------------------------------------

_text = st.text(max_size=20)
_int = st.integers(0, 2**63 - 1)
_opt_int = st.none() | _int
_ident = dict(ts_ns=_int, wall_time=st.floats(0, 4e9), flow_id=_int, direction=st.sampled_from(Direction),
              pid=st.integers(0, 2**22), tid=st.integers(0, 2**22), uid=st.integers(0, 2**32 - 1),
              comm=st.text(max_size=15), ppid=st.none() | st.integers(0, 2**22), exe=st.none() | _text,
              cmdline=st.none() | st.lists(_text, max_size=4).map(tuple), cgroup_id=_int, netns=_opt_int,
              family=st.sampled_from([4, 6]), saddr=_text, sport=st.integers(0, 65535), daddr=_text,
              dport=st.integers(0, 65535), preexisting=st.booleans(), hostname=st.none() | _text,
              provider=st.none() | _text, evidence=st.sampled_from(Evidence), confidence=st.floats(0, 1))
_record = st.builds(DnsRecord, name=_text, rtype=st.sampled_from(["A", "AAAA", "CNAME"]), value=_text,
                    ttl=_int)
EVENTS = st.one_of(
    st.builds(FlowOpened, **_ident),
    st.builds(FlowClassified, **_ident),
    st.builds(FlowClosed, **_ident, bytes_sent=_int, bytes_received=_int, duration_ns=_int),
    st.builds(EventsLost, ts_ns=_int, wall_time=st.floats(0, 4e9), where=st.sampled_from(LossPlace),
              count=_int, detail=_text),
    st.builds(DnsAnswer, ts_ns=_int, wall_time=st.floats(0, 4e9), pid=st.none() | st.integers(0, 2**22),
              tid=st.none() | st.integers(0, 2**22), comm=st.none() | _text, netns=_opt_int,
              transport=st.sampled_from(["udp", "tcp"]), server=st.none() | _text, qname=_text, qtype=_text,
              rcode=_text, answers=st.lists(_record, max_size=3).map(tuple),
              cname_chain=st.lists(_text, max_size=3).map(tuple)),
    st.builds(TlsClientHello, ts_ns=_int, wall_time=st.floats(0, 4e9), flow_id=_int,
              pid=st.integers(0, 2**22), comm=_text, saddr=_text, sport=st.integers(0, 65535), daddr=_text,
              dport=st.integers(0, 65535),
              sni=st.none() | _text, alpn=st.lists(_text, max_size=3).map(tuple),
              versions=st.lists(_text, max_size=3).map(tuple), ja4=_text),
)


@settings(max_examples=300)
@given(ev=EVENTS)
def test_codec_round_trip_any_event(ev):
    assert event_from_dict(json.loads(json.dumps(ev.to_dict()))) == ev


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(evs=st.lists(EVENTS, min_size=1, max_size=8))
def test_store_round_trip_any_events(evs):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "h.db"
        with Store(p, batch_size=3) as s:
            s.write_many(evs[: len(evs) // 2])
        with Store(p) as s:
            s.write_many(evs[len(evs) // 2 :])
        with Store.open_readonly(p) as r:
            assert list(r.events()) == evs


def test_codec_errors():
    with pytest.raises(ValueError, match="unknown event kind 'nope'"):
        event_from_dict({"kind": "nope"})
    with pytest.raises(ValueError, match="cannot rebuild a flow_opened"):
        event_from_dict({"kind": "flow_opened", "ts_ns": 1})
    d = sample_events()[0].to_dict()
    assert event_from_dict({**d, "field_from_a_newer_busted": 1}) == sample_events()[0]


# -- pandas --------------------------------------------------------------------------------------


def test_store_dataframes(tmp_path):
    pd = needs.module("pandas")
    p = tmp_path / "d.db"
    with Store(p) as s:
        s.write_many(sample_events(flow_id=1) + sample_events(t0=1_800_000_000.0, flow_id=2, pid=7))
    with Store.open_readonly(p) as r:
        flows = r.dataframe()
        assert list(flows["flow_id"]) == [1, 2] and flows["bytes_received"].sum() == 2 * 2233
        assert isinstance(flows["opened_at"].iloc[0], pd.Timestamp)
        assert len(r.dataframe("flows", pid=7)) == 1
        ev = r.dataframe("events", kinds=["flow_closed"])
        assert list(ev["kind"]) == ["flow_closed"] * 2
        dns = r.dataframe("dns_answers", since=1_750_000_000.0)
        assert list(dns["pid"]) == [7] and str(dns["time"].dt.year.iloc[0]) == "2027"
        assert len(r.dataframe("losses")) == 2
        with pytest.raises(StoreError, match="cannot be filtered by"):
            r.dataframe("losses", pid=1)
        with pytest.raises(StoreError, match="unknown table"):
            r.dataframe("secrets")
    empty = tmp_path / "e.db"
    Store(empty).close()
    with Store.open_readonly(empty) as r:
        assert len(r.dataframe()) == 0 and "bytes_sent" in r.dataframe().columns


def test_a_reader_who_cannot_write_the_directory(tmp_path):
    """A store made by root (the monitor), read by an unprivileged user after the writer is gone."""
    import shutil
    import subprocess
    import sys

    needs.root("to read as another user")
    needs.tool("setpriv")
    d = Path(tempfile.mkdtemp(prefix="busted-ro-"))
    try:
        d.chmod(0o755)
        p = d / "s.db"
        with Store(p) as s:
            s.write_many(sample_events())
        p.chmod(0o644)
        code = (f"from busted.sinks import Store\nr = Store.open_readonly({str(p)!r})\n"
                "print(len(list(r.events())), r.flows()[0]['provider'])")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code]
        r = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=60)
        if "Permission denied" in r.stderr and "s.db" not in r.stderr:
            needs.skip("the interpreter or checkout is not readable by uid 65534")
        assert r.stdout.split() == ["6", "openai"], r.stderr
    finally:
        shutil.rmtree(d)


# -- one writer ----------------------------------------------------------------------------------


def test_a_second_writer_is_refused_readers_are_not(tmp_path):
    """Two writers would store every event twice: the second, in another process, gets advice."""
    import subprocess
    import sys

    p = tmp_path / "one.db"
    code = ("import sys\nfrom busted.sinks import Store\nfrom events_factory import sample_events\n"
            f"s = Store({str(p)!r})\ns.write_many(sample_events())\ns.flush()\nprint('ready', flush=True)\n"
            "sys.stdin.readline()\ns.close()\n")
    env = {"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"}
    first = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match=rf"another busted \(pid {first.pid}\) is writing this store") as ei:
            Store(p)
        assert "choose another --store path" in str(ei.value) and "busted query --store" in str(ei.value)
        with Store.open_readonly(p) as r:  # reading while it writes is fine
            assert len(list(r.events())) == 6
        second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                timeout=60, input="\n")
        assert second.returncode == 1 and "StoreError" in second.stderr and "is writing this store" in second.stderr
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    with Store(p) as s:  # the lock goes with its holder
        s.write_many(sample_events(flow_id=9))
    with Store.open_readonly(p) as r:
        assert len(list(r.events())) == 12  # each event once


def test_two_writers_in_one_process_are_refused_too(tmp_path):
    p = tmp_path / "same.db"
    s = Store(p)
    try:
        with pytest.raises(StoreError, match="is writing this store"):
            Store(p)
    finally:
        s.close()
    Store(p).close()  # released at close


# -- retention while writing -----------------------------------------------------------------------


def test_a_size_cap_keeps_the_file_bounded_while_writing(tmp_path):
    """The writer enforces max_bytes by itself, every trim_interval, and the file gives space back."""
    import os

    p = tmp_path / "cap.db"
    cap = 1 << 20
    s = Store(p, max_bytes=cap, trim_interval=0.02, batch_size=200)
    biggest = 0
    now = time.time()
    for chunk in range(150):
        for i in range(20):
            s.write_many(sample_events(t0=now + chunk * 20 + i, flow_id=chunk * 20 + i))
        s.flush()
        biggest = max(biggest, p.stat().st_size)
    deadline = time.monotonic() + 10
    page = _rows(p, "PRAGMA page_size")[0][0]
    while s.stats()["trimmed"] == 0 or _rows(p, "PRAGMA page_count")[0][0] * page > cap:
        assert time.monotonic() < deadline, "the writer did not trim"
        time.sleep(0.02)
    st_ = s.stats()
    s.close()
    assert st_["written"] == 150 * 20 * 6 and st_["trimmed"] > 0
    # over the cap by at most what arrives between two trims (unbounded, these events take ~11 MB)
    assert biggest <= 2 * cap
    assert os.path.getsize(p) <= cap + 64 * 1024
    kept = [e.flow_id for e in Store.open_readonly(p).events(kinds=["flow_closed"])]
    assert 0 < len(kept) < 3000 and kept == list(range(3000 - len(kept), 3000))  # the newest are kept


def test_retention_flags_parse():
    from busted.sinks import DEFAULT_MAX_BYTES, DEFAULT_RETENTION_SECONDS, parse_age, parse_size

    assert (DEFAULT_RETENTION_SECONDS, DEFAULT_MAX_BYTES) == (7 * 86400, 1 << 30)
    assert [parse_age(t) for t in ("7d", "12h", "90m", "3600", "1.5h", "2w", "off", "0")] == [
        604800, 43200, 5400, 3600, 5400, 1209600, None, None]
    assert [parse_size(t) for t in ("1GiB", "500M", "64k", "1048576", "2 MB", "none")] == [
        1 << 30, 500 << 20, 64 << 10, 1 << 20, 2 << 20, None]
    for bad in ("7 days", "-1d", "x"):
        with pytest.raises(ValueError, match="retention age"):
            parse_age(bad)
    with pytest.raises(ValueError, match="retention size"):
        parse_size("1 gigabyte")


# -- LLM calls and MCP messages (schema v4) ----------------------------------------------------------


def test_calls_and_mcp_messages_have_typed_tables(tmp_path):
    from events_factory import sample_calls

    from busted.events import LlmCall, McpMessage
    from busted.sinks.store_rows import _CALL_COLS, _MCP_COLS

    # every field of the events has its column (ts holds wall_time)
    assert set(_CALL_COLS) - {"ts"} | {"wall_time"} == {f.name for f in fields(LlmCall)}
    assert set(_MCP_COLS) - {"ts"} | {"wall_time"} == {f.name for f in fields(McpMessage)}
    p = tmp_path / "c.db"
    call, req, resp = sample_calls()
    other = replace(call, ts_ns=20, wall_time=call.wall_time + 5, pid=200, provider="anthropic",
                    request_model="claude-3-5-haiku", response_model=None, input_tokens=None, stream=None)
    with Store(p) as s:
        s.write_many([*sample_events(), call, req, resp, other])
    db_cols = [c[1] for c in _rows(p, "PRAGMA table_info(llm_calls)")]
    assert db_cols == ["id", *_CALL_COLS]
    assert [c[1] for c in _rows(p, "PRAGMA table_info(mcp_messages)")] == ["id", *_MCP_COLS]
    idx = {r[0] for r in _rows(p, "SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"llm_ts", "llm_provider", "llm_model", "llm_pid", "llm_flow", "mcp_ts", "mcp_flow"} <= idx
    with Store.open_readonly(p) as r:
        rows = r.calls()
        assert len(rows) == 2
        d = call.to_dict()
        want = {c: d[c] for c in _CALL_COLS if c != "ts"}
        assert {c: rows[0][c] for c in want} == want  # exact, bools and lists included
        assert rows[0]["ts"] == call.wall_time
        assert rows[1]["input_tokens"] is None and rows[1]["stream"] is None  # unknown stays unknown
        assert [c["pid"] for c in r.calls(provider="anthropic")] == [200]
        assert [c["pid"] for c in r.calls(model="gpt-4o-mini-2024-07-18")] == [100]
        assert r.calls(since=call.wall_time + 1)[0]["pid"] == 200
        msgs = r.mcp_messages()
        assert [(m["jsonrpc_method"], m["direction_sent"], m["error_code"]) for m in msgs] == [
            ("tools/call", True, None), (None, False, -32601)]
        assert [m["tool"] for m in r.mcp_messages(method="tools/call")] == ["search"]
        assert list(r.events(kinds=["llm_call", "mcp_message"])) == [call, req, resp, other]
        df = r.dataframe("llm_calls")
        assert list(df.input_tokens.isna()) == [False, True] and int(df.output_tokens.sum()) == 90


def test_call_text_fields_are_redacted_in_the_store(tmp_path):
    from events_factory import SECRET, sample_calls

    p = tmp_path / "s.db"
    call = sample_calls(secret=SECRET)[0]
    assert SECRET in call.path and SECRET in call.user_agent and SECRET in call.prompt
    with Store(p) as s:
        s.write(call)
    blob = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("s.db"))
    assert SECRET.encode() not in blob
    with Store.open_readonly(p) as r:
        (row,) = r.calls()
        assert row["path"] == "/v1/chat/completions?key=[REDACTED]"
        assert row["user_agent"] == "OpenAI/Python 1.54.0 [REDACTED]" and row["prompt"] == "hello [REDACTED]"
        (ev,) = r.events()
        assert ev.path == row["path"]


def test_retention_trims_calls_too(tmp_path):
    from events_factory import sample_calls

    p = tmp_path / "r.db"
    old = sample_calls(t0=1_000.0)
    new = sample_calls(t0=1_000_000.0, flow_id=9)
    with Store(p, retention_seconds=100) as s:
        s.write_many(old + new)
        s.flush()
        s.trim(now=1_000_050.0)
    assert _rows(p, "SELECT count(*) FROM llm_calls") == [(1,)]
    assert _rows(p, "SELECT count(*), min(flow_id) FROM mcp_messages") == [(2, 9)]


def test_v3_store_is_migrated_spreading_its_calls(tmp_path):
    """A v3 store kept LlmCall/McpMessage events only in `events`; v4 spreads them, losing nothing."""
    from events_factory import SECRET, sample_calls

    p = tmp_path / "v3.db"
    old = [*sample_events(flow_id=1), *sample_calls(flow_id=1, secret=SECRET)]
    db = old_store(p, _V2.split("CREATE TABLE IF NOT EXISTS llm_calls")[0], 3, old)  # v3 = v2 minus the placeholders
    db.commit()
    db.close()
    new = sample_calls(t0=1_800_000_000.0, flow_id=2)
    with Store(p) as s:
        s.write_many(new)
    assert _rows(p, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    with Store.open_readonly(p) as r:
        assert r.schema_version == SCHEMA_VERSION
        assert [(c["flow_id"], c["input_tokens"]) for c in r.calls()] == [(1, 120), (2, 120)]
        assert SECRET not in json.dumps(r.calls())  # the backfill redacts as writing does
        assert [m["flow_id"] for m in r.mcp_messages()] == [1, 1, 2, 2]
        assert len(list(r.events())) == len(old) + len(new)


def test_calls_of_an_unmigrated_store_are_empty(tmp_path):
    p = tmp_path / "v3r.db"
    db = sqlite3.connect(p)
    db.executescript(_V2.split("CREATE TABLE IF NOT EXISTS llm_calls")[0])
    db.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    db.commit()
    db.close()
    with Store.open_readonly(p) as r:
        assert r.calls() == [] and r.mcp_messages() == []


def test_v4_store_is_migrated_to_v5_losing_nothing(tmp_path):
    """v5 adds pod_qos and proc_start_time to flows, llm_calls and mcp_messages: the rows a v4
    store holds (with their lineage columns) stay as they were, the new columns NULL for them."""
    from events_factory import sample_calls

    from busted.events import Ancestor

    p = tmp_path / "v4.db"
    who = dict(agent="claude-code", agent_pid=10, agent_evidence="exe:claude", container_id="ab" * 32,
               container_runtime="containerd", pod_uid="6f5bd2a4-9c3e-4d1a-8b7f-2e6c9d0a1b3c",
               ancestry=(Ancestor(100, "curl", "/usr/bin/curl"), Ancestor(10, "claude", "/tmp/claude")))
    old = [replace(ev, **who) if hasattr(ev, "agent") else ev
           for ev in [*sample_events(flow_id=1), *sample_calls(flow_id=1)]]
    db = old_store(p, (Path(__file__).parent / "fixtures" / "store_schema_v4.sql").read_text(), 4, old)
    db.execute("INSERT INTO flows(flow_id, opened, closed, comm, provider, bytes_received, agent, container_id, "
               "pod_uid, ancestry) VALUES (1, 1.0, 2.0, 'curl', 'openai', 2233, 'claude-code', ?, ?, ?)",
               (who["container_id"], who["pod_uid"], json.dumps(old[1].to_dict()["ancestry"])))
    db.execute("INSERT INTO llm_calls(ts, flow_id, agent, input_tokens) VALUES (1.5, 1, 'claude-code', 120)")
    db.execute("INSERT INTO mcp_messages(ts, flow_id, agent, jsonrpc_method) VALUES (1.6, 1, 'claude-code', 'x')")
    db.commit()
    db.close()
    new = [replace(ev, pod_qos="burstable", proc_start_time=1_799_999_999.25, **who)
           for ev in (*sample_events(t0=1_800_000_000.0, flow_id=2)[1:5], sample_calls(t0=1_800_000_000.0,
                                                                                      flow_id=2)[0])
           if hasattr(ev, "agent")]  # the TLS hello carries no identity
    with Store(p) as s:
        s.write_many(new)
    assert _rows(p, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _rows(p, "SELECT flow_id, agent, container_id, pod_uid, pod_qos, proc_start_time, bytes_received "
                 "FROM flows ORDER BY flow_id") == [
        (1, "claude-code", who["container_id"], who["pod_uid"], None, None, 2233),
        (2, "claude-code", who["container_id"], who["pod_uid"], "burstable", 1_799_999_999.25, 2233)]
    assert _rows(p, "SELECT flow_id, agent, input_tokens, pod_qos, proc_start_time FROM llm_calls ORDER BY id") == [
        (1, "claude-code", 120, None, None), (2, "claude-code", 120, "burstable", 1_799_999_999.25)]
    assert _rows(p, "SELECT flow_id, agent, jsonrpc_method, pod_qos FROM mcp_messages") == [
        (1, "claude-code", "x", None)]
    with Store.open_readonly(p) as r:
        assert r.schema_version == SCHEMA_VERSION
        assert list(r.events()) == old + new  # every event, exactly, the new fields included
        assert [f["pod_qos"] for f in r.flows()] == [None, "burstable"]


def test_a_new_store_has_the_v5_columns_on_every_identity_table(tmp_path):
    p = tmp_path / "n5.db"
    with Store(p):
        pass
    for table in ("flows", "llm_calls", "mcp_messages"):
        cols = {c[1]: c[2] for c in _rows(p, f"PRAGMA table_info({table})")}
        assert (cols["pod_qos"], cols["proc_start_time"]) == ("TEXT", "REAL"), table


def test_v6_store_gains_ttft_source(tmp_path):
    """v7 adds llm_calls.ttft_source; the rows of a v6 store keep NULL there, new rows get theirs."""
    from events_factory import sample_calls

    p = tmp_path / "v6.db"
    call = sample_calls(flow_id=1)[0]
    with Store(p) as s:
        s.write_many([call])
    db = sqlite3.connect(p)
    db.execute("ALTER TABLE llm_calls DROP COLUMN ttft_source")  # as v6 wrote it
    db.execute("ALTER TABLE llm_calls DROP COLUMN response_id")
    db.execute("UPDATE llm_calls SET flow_id = 1")
    db.execute("UPDATE meta SET value='6' WHERE key='schema_version'")
    db.commit()
    db.close()
    with Store(p) as s:
        s.write_many([replace(call, flow_id=2, ts_ns=99, ttft_source="read")])
    assert _rows(p, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _rows(p, "SELECT flow_id, ttft_source FROM llm_calls ORDER BY flow_id") == [(1, None), (2, "read")]
    with Store.open_readonly(p) as r:
        assert [c["ttft_source"] for c in r.calls()] == [None, "read"]


def test_v7_store_gains_response_id(tmp_path):
    """v8 adds llm_calls.response_id; the rows of a v7 store keep NULL there, new rows get theirs."""
    from events_factory import sample_calls

    p = tmp_path / "v7.db"
    call = sample_calls(flow_id=1)[0]
    with Store(p) as s:
        s.write_many([call])
    db = sqlite3.connect(p)
    db.execute("ALTER TABLE llm_calls DROP COLUMN response_id")  # as v7 wrote it
    db.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    db.commit()
    db.close()
    with Store(p) as s:
        s.write_many([replace(call, flow_id=2, ts_ns=99, response_id="msg_013Zva2CMHLNnXjNJJKqJ2EF")])
    assert _rows(p, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _rows(p, "SELECT flow_id, response_id FROM llm_calls ORDER BY flow_id") == [
        (1, None), (2, "msg_013Zva2CMHLNnXjNJJKqJ2EF")]
    with Store.open_readonly(p) as r:
        assert [c["response_id"] for c in r.calls()] == [None, "msg_013Zva2CMHLNnXjNJJKqJ2EF"]
