"""The embedded store: SQLite in WAL mode, batched writes off the event path, versioned schema.

    with Store("busted.db") as store:        # writer
        store.write(event)                   # enqueues only; a thread commits batches
    with Store.open_readonly("busted.db") as store:
        for ev in store.events(kinds=["flow_closed"], provider="openai"): ...

Why SQLite + WAL: one file, no server, in the standard library, and readers (``busted query``,
notebooks, another process) never block the writer nor are blocked by it.

Every event lands in ``events`` as its exact JSON (so any kind, including future ones, round-trips);
known kinds are also spread into typed tables (``flows``, ``dns_answers``, ``tls_hellos``,
``losses``; ``llm_calls`` and ``policy_decisions`` take events that look like LLM calls / policy
decisions). Nothing is lost silently: a full queue is counted (and recorded in the store as an
``EventsLost``), a failed batch stays in memory and is retried, and ``flush()``/``close()`` raise
``StoreError`` while anything is still unwritten (``pending()`` hands those events back).
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from busted.errors import StoreError
from busted.events import (
    DnsAnswer,
    Event,
    EventsLost,
    FlowClassified,
    FlowClosed,
    FlowEvent,
    FlowOpened,
    LossPlace,
    TlsClientHello,
)
from busted.sinks._codec import event_from_dict, redact

__all__ = ["SCHEMA_VERSION", "Store"]

SCHEMA_VERSION = 2

# The newest schema. A new store gets it whole; an older one is first brought here by _MIGRATIONS.
_SCHEMA = """
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

# from_version -> statements that bring a store of that version to from_version + 1.
# (Indexes and new tables come from _SCHEMA, which runs after the migrations.)
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "ALTER TABLE tls_hellos ADD COLUMN saddr TEXT",
        "ALTER TABLE tls_hellos ADD COLUMN sport INTEGER",
        "ALTER TABLE llm_calls ADD COLUMN hostname TEXT",
        "ALTER TABLE llm_calls ADD COLUMN method TEXT",
        "ALTER TABLE policy_decisions ADD COLUMN model TEXT",
    ],
}

_FLOW_COLS = ("flow_id", "opened", "closed", "direction", "pid", "tid", "uid", "ppid", "comm", "exe",
              "cmdline", "cgroup_id", "netns", "family", "saddr", "sport", "daddr", "dport", "preexisting",
              "hostname", "provider", "evidence", "confidence", "bytes_sent", "bytes_received", "duration_ns")
_CLASS_COLS = ("hostname", "provider", "evidence", "confidence")
_CLOSE_COLS = ("closed", "bytes_sent", "bytes_received", "duration_ns")


def _flow_upsert(update: Iterable[str]) -> str:
    cols = ", ".join(_FLOW_COLS)
    sets = ", ".join(update)
    return (f"INSERT INTO flows({cols}) VALUES ({', '.join('?' * len(_FLOW_COLS))}) "
            f"ON CONFLICT(flow_id) DO UPDATE SET {sets}")


# FlowOpened: identity + opened (keeps what a FlowClosed that came first recorded).
_SQL_OPENED = _flow_upsert(f"{c}=excluded.{c}" for c in _FLOW_COLS if c not in ("flow_id", *_CLOSE_COLS))
# FlowClassified: only the classification changes.
_SQL_CLASSIFIED = _flow_upsert(f"{c}=excluded.{c}" for c in _CLASS_COLS)
# FlowClosed: everything, but an opened time already known wins over one derived from duration.
_SQL_CLOSED = _flow_upsert([*(f"{c}=excluded.{c}" for c in _FLOW_COLS if c not in ("flow_id", "opened")),
                            "opened=coalesce(flows.opened, excluded.opened)"])
_SQL_EVENT = "INSERT INTO events(ts, kind, flow_id, pid, comm, provider, json) VALUES (?,?,?,?,?,?,?)"
_SQL_DNS = ("INSERT INTO dns_answers(ts, pid, comm, netns, transport, server, qname, qtype, rcode, answers,"
            " cname_chain) VALUES (?,?,?,?,?,?,?,?,?,?,?)")
_SQL_TLS = ("INSERT INTO tls_hellos(ts, flow_id, pid, comm, saddr, sport, daddr, dport, sni, alpn, versions,"
            " ja4) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
_SQL_LOSS = "INSERT INTO losses(ts, place, count, detail) VALUES (?,?,?,?)"
_LLM_COLS = ("flow_id", "pid", "comm", "provider", "model", "endpoint", "hostname", "method", "input_tokens",
             "output_tokens", "status", "duration_ns")
_SQL_LLM = (f"INSERT INTO llm_calls(ts, {', '.join(_LLM_COLS)}) "
            f"VALUES ({', '.join('?' * (len(_LLM_COLS) + 1))})")
_POLICY_COLS = ("flow_id", "pid", "comm", "provider", "model", "decision", "rule", "reason")
_SQL_POLICY = (f"INSERT INTO policy_decisions(ts, {', '.join(_POLICY_COLS)}) "
               f"VALUES ({', '.join('?' * (len(_POLICY_COLS) + 1))})")

# table -> the expression retention compares with a cutoff
_TABLES_WITH_TS = {"events": "ts", "dns_answers": "ts", "tls_hellos": "ts", "losses": "ts", "llm_calls": "ts",
                   "policy_decisions": "ts", "flows": "coalesce(closed, opened)"}
_INT64 = (-(2**63), 2**63 - 1)


def _sql(v: Any) -> Any:
    """A value SQLite takes as is: bools as 0/1, ints beyond int64 as REAL (what an INTEGER column
    makes of them anyway; the exact value stays in ``events.json``), lists/dicts as JSON,
    strings that are not valid UTF-8 (lone surrogates) escaped."""
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, str):
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return v.encode("utf-8", "backslashreplace").decode("utf-8")
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v if _INT64[0] <= v <= _INT64[1] else float(v)
    if isinstance(v, list | tuple | dict):
        return json.dumps(v, default=str)
    return str(v)


def _row(*values: Any) -> tuple[Any, ...]:
    return tuple(_sql(v) for v in values)


def _typed(ev: Event, d: dict[str, Any]) -> tuple[str, tuple[Any, ...]] | None:
    """The typed-table statement for one event (None: it lives only in ``events``)."""
    ts = ev.wall_time
    if isinstance(ev, FlowOpened | FlowClassified | FlowClosed):
        row = {k: d.get(k) for k in _FLOW_COLS}
        if isinstance(ev, FlowClosed):
            row["closed"] = ts
            row["opened"] = ts - ev.duration_ns / 1e9 if ev.duration_ns else None
            sql = _SQL_CLOSED
        elif isinstance(ev, FlowOpened):
            row["opened"] = ts
            sql = _SQL_OPENED
        else:
            sql = _SQL_CLASSIFIED
        return sql, _row(*(row[c] for c in _FLOW_COLS))
    if isinstance(ev, DnsAnswer):
        return _SQL_DNS, _row(ts, ev.pid, ev.comm, ev.netns, ev.transport, ev.server, ev.qname, ev.qtype,
                              ev.rcode, d["answers"], d["cname_chain"])
    if isinstance(ev, TlsClientHello):
        return _SQL_TLS, _row(ts, ev.flow_id, ev.pid, ev.comm, ev.saddr, ev.sport, ev.daddr, ev.dport, ev.sni,
                              d["alpn"], d["versions"], ev.ja4)
    if isinstance(ev, EventsLost):
        return _SQL_LOSS, _row(ts, d["where"], ev.count, ev.detail)
    if isinstance(ev, FlowEvent):
        return None  # a future flow kind: kept in `events`
    if "model" in d and "provider" in d:  # LLM-call events, duck-typed until they exist
        return _SQL_LLM, _row(ts, *(d.get(c) for c in _LLM_COLS))
    if "decision" in d:  # policy decisions, likewise
        return _SQL_POLICY, _row(ts, *(d.get(c) for c in _POLICY_COLS))
    return None


def _one(db: sqlite3.Connection, sql: str, *args: Any) -> Any:
    """The first column of the first row, with the statement run to its end (a half-read statement
    keeps a read transaction open on the connection)."""
    rows = db.execute(sql, args).fetchall()
    return rows[0][0] if rows else None


def _used_bytes(db: sqlite3.Connection) -> int:
    """Bytes of the database that hold data (pages in use, not free pages)."""
    return (_one(db, "PRAGMA page_count") - _one(db, "PRAGMA freelist_count")) * _one(db, "PRAGMA page_size")


class Store:
    """SQLite event store; see the module docstring.

    ``write`` is thread-safe and never blocks on the database; one writer thread commits batches
    of up to ``batch_size`` events, at least every ``flush_interval`` seconds. At most
    ``queue_size`` events wait in memory; more are dropped and counted. Retention
    (``retention_seconds``, ``max_bytes``) is applied by the writer every ``trim_interval`` s.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 retention_seconds: float | None = None, max_bytes: int | None = None, batch_size: int = 500,
                 flush_interval: float = 0.5, queue_size: int = 100_000, busy_timeout: float = 5.0,
                 trim_interval: float = 5.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        self.batch_size = max(1, batch_size)
        self.flush_interval = flush_interval
        self.queue_size = queue_size
        self.busy_timeout = busy_timeout
        self.trim_interval = trim_interval
        self._q: collections.deque[Event] = collections.deque()
        self._cv = threading.Condition()
        self._dblock = threading.Lock()  # the write connection: writer thread vs trim() callers
        self._inflight = 0
        self._closed = False
        self._stop = False
        self._thread_done = False
        self._close_db_on_exit = False
        self._lost_recorded = 0  # drops already recorded in the store as EventsLost
        self._invalid_reported = 0
        self._isolate = 0  # after a batch failed on a bad event: this many go one per transaction
        self._stats = {"written": 0, "dropped": 0, "invalid": 0, "batches": 0, "retries": 0, "trimmed": 0}
        self.last_error: str | None = None
        self._ro_uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=ro"
        self._db: sqlite3.Connection | None = None
        self.journal_mode: str | None = None
        self.schema_version = SCHEMA_VERSION
        self._thread: threading.Thread | None = None
        if readonly:
            self._check_readable()
        else:
            self._db = self._open_writer()
            self._thread = threading.Thread(target=self._writer, name="busted-store", daemon=True)
            self._thread.start()

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> Store:
        """Open an existing store for reading only (safe while another process writes it)."""
        return cls(path, readonly=True)

    # -- opening -----------------------------------------------------------------------------

    def _error(self, exc: sqlite3.Error, doing: str) -> StoreError:
        msg = str(exc)
        p = self.path
        if "locked" in msg or "busy" in msg:
            return StoreError(f"{p}: the database is locked by another process (waited "
                              f"{self.busy_timeout:g} s while {doing}). Stop the other writer (only one "
                              "busted may write a store), or choose another --store path.")
        if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
            return StoreError(f"{p}: not a busted store, or corrupted ({msg}). Move it aside and start a new "
                              "one, or try to salvage it with `sqlite3 FILE .recover | sqlite3 NEW.db`.")
        if "readonly" in msg or "unable to open" in msg or "disk I/O" in msg:
            return StoreError(f"{p}: cannot write the store ({msg}). Check that the file and its directory "
                              "are writable by this user and the disk is not full.")
        return StoreError(f"{p}: store error while {doing}: {msg}")

    def _open_writer(self) -> sqlite3.Connection:
        p = self.path
        if not p.parent.exists():
            raise StoreError(f"{p}: directory {p.parent} does not exist; create it or choose another path")
        if p.is_dir():
            raise StoreError(f"{p} is a directory; give a file path for the store")
        try:
            db = sqlite3.connect(str(p), timeout=self.busy_timeout, check_same_thread=False,
                                 isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error(exc, "opening") from exc
        try:
            version = self._check_version(db)
            if version == 0:
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # lets retention give space back
            mode = _one(db, "PRAGMA journal_mode=WAL")
            self.journal_mode = str(mode).lower()
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={64 << 20}")
            # One write transaction: proves we can take the write lock now (a lock held by another
            # writer is reported here, at open), and makes creation/migration atomic.
            db.execute("BEGIN IMMEDIATE")
            try:
                version = self._check_version(db)  # again, under the lock
                if version:
                    for v in range(version, SCHEMA_VERSION):
                        for stmt in _MIGRATIONS[v]:
                            db.execute(stmt)
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                if version == 0:
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('created', ?)", (repr(time.time()),))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.rollback()
                raise
        except sqlite3.Error as exc:
            db.close()
            raise self._error(exc, "opening") from exc
        except StoreError:
            db.close()
            raise
        return db

    def _check_version(self, db: sqlite3.Connection) -> int:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            if self.readonly:
                raise StoreError(f"{self.path}: not a busted store (no meta table); give the file "
                                 "`busted monitor --store` wrote")
            if tables:
                raise StoreError(f"{self.path}: an SQLite database but not a busted store (it has tables "
                                 f"{', '.join(sorted(tables)[:5])}); choose another path")
            return 0
        version = int(_one(db, "SELECT value FROM meta WHERE key='schema_version'") or 0)
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: written by a newer busted (schema {version} > {SCHEMA_VERSION}); "
                             "upgrade busted to use it")
        if version < 1 and tables - {"meta"}:
            raise StoreError(f"{self.path}: its meta table has no schema_version; not a busted store?")
        return version

    def _check_readable(self) -> None:
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such store; write one with "
                             f"`busted monitor --store {self.path}`")
        with self._reader() as db:
            try:
                version = self._check_version(db)
            except sqlite3.Error as exc:
                raise self._error(exc, "opening read-only") from exc
        self.schema_version = version

    def _connect_ro(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._ro_uri, uri=True, timeout=self.busy_timeout, check_same_thread=False)
        try:
            _one(db, "SELECT count(*) FROM sqlite_master")
        except sqlite3.OperationalError as exc:
            db.close()
            # A WAL store with no writer and no -shm file, in a directory we may not write (e.g. made
            # by root): read it as immutable -- safe, since nobody is writing it.
            msg = str(exc)
            if ("unable to open" not in msg and "readonly" not in msg) or \
                    (self.path.parent / (self.path.name + "-wal")).exists():
                raise
            self._ro_uri += "&immutable=1"
            db = sqlite3.connect(self._ro_uri, uri=True, timeout=self.busy_timeout, check_same_thread=False)
        return db

    class _Conn:
        def __init__(self, store: Store) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            try:
                self.db = self.store._connect_ro()
            except sqlite3.Error as exc:
                raise self.store._error(exc, "reading") from exc
            return self.db

        def __exit__(self, *exc: object) -> None:
            self.db.close()

    def _reader(self) -> Store._Conn:
        """A fresh read-only connection: each query its own, so any thread may read, and reads
        never block the writer."""
        return Store._Conn(self)

    # -- writing -----------------------------------------------------------------------------

    def write(self, event: Event) -> None:
        """Queue one event. Never waits for the database; if the queue is full the event is dropped
        and counted (``stats()["dropped"]``, and an ``EventsLost`` row in the store)."""
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only; open it with Store(path) to write")
        if self._closed:
            raise StoreError(f"{self.path}: store is closed; open a new Store to write more")
        with self._cv:
            if len(self._q) >= self.queue_size:
                self._stats["dropped"] += 1
                return
            self._q.append(event)
            if len(self._q) >= self.batch_size:
                self._cv.notify_all()

    def write_many(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.write(ev)

    def pending(self) -> list[Event]:
        """Events accepted but not yet committed (e.g. after ``close()`` raised), oldest first."""
        with self._cv:
            return list(self._q)

    def _writer(self) -> None:
        next_trim = time.monotonic() + self.trim_interval
        backoff = 0.05
        try:
            while True:
                with self._cv:
                    if not self._q and not self._stop:
                        self._cv.wait(min(self.flush_interval, max(0.0, next_trim - time.monotonic()))
                                      if self._wants_trim() else self.flush_interval)
                    if self._stop:
                        return
                    n = 1 if self._isolate > 0 else self.batch_size
                    batch = [self._q.popleft() for _ in range(min(n, len(self._q)))]
                    self._inflight = len(batch)
                    lost = self._stats["dropped"] - self._lost_recorded
                if batch or lost:
                    if self._commit(batch, lost):
                        backoff = 0.05
                    else:
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
                if self._wants_trim() and time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + self.trim_interval
                    try:
                        self.trim()
                    except StoreError as exc:
                        self.last_error = f"retention: {exc}"
        finally:
            with self._cv:
                self._thread_done = True
                close_db = self._close_db_on_exit
                self._cv.notify_all()
            if close_db and self._db is not None:
                self._db.close()

    def _wants_trim(self) -> bool:
        return bool(self.retention_seconds or self.max_bytes)

    def _commit(self, batch: list[Event], lost: int) -> bool:
        """Commit one batch in one transaction. On a database error the batch goes back to the front
        of the queue (order kept) and False is returned; the caller backs off and retries."""
        events: list[tuple[Any, ...]] = []
        typed: list[tuple[str, tuple[Any, ...]]] = []
        invalid = 0
        evs = list(batch)
        if lost:  # the queue overflowed: record the gap in the store itself ("loss is data")
            evs.append(EventsLost(ts_ns=time.monotonic_ns(), wall_time=time.time(),
                                  where=LossPlace.USER_QUEUE, count=lost,
                                  detail=f"busted.sinks.Store queue full ({self.queue_size} events)"))
        for ev in evs:
            try:  # encode outside the transaction; an event that cannot be encoded is counted, not retried
                d = redact(ev.to_dict())
                if not isinstance(ev.wall_time, int | float):
                    raise TypeError(f"wall_time is {type(ev.wall_time).__name__}")
                events.append(_row(ev.wall_time, ev.kind, d.get("flow_id"), d.get("pid"), d.get("comm"),
                                   d.get("provider"), json.dumps(d, separators=(",", ":"), default=str)))
                t = _typed(ev, d)
                if t is not None:
                    typed.append(t)
            except Exception as exc:  # noqa: BLE001 - a bad event must not stop the writer
                invalid += 1
                self.last_error = f"cannot encode a {getattr(ev, 'kind', type(ev).__name__)} event: {exc!r}"
        try:
            self._transaction(events, typed)
        except sqlite3.Error as exc:
            self.last_error = f"{type(exc).__name__}: {exc} (batch of {len(batch)} kept in memory, retrying)"
            with self._cv:
                self._q.extendleft(reversed(batch))
                self._inflight = 0
                self._stats["retries"] += 1
                self._cv.notify_all()
            return False
        except Exception as exc:  # noqa: BLE001 - not the database's fault: an event it cannot take
            if len(batch) > 1:  # find the culprit: commit these events one at a time
                with self._cv:
                    self._q.extendleft(reversed(batch))
                    self._inflight = 0
                    self._isolate = len(batch)
                return True
            invalid, lost = len(batch), 0  # this event is the culprit; a loss record is retried later
            kind = getattr(batch[0], "kind", "?") if batch else "?"
            self.last_error = f"cannot store a {kind} event: {exc!r}"
        with self._cv:
            self._stats["written"] += len(batch) - invalid + (1 if lost else 0)
            self._stats["invalid"] += invalid
            self._stats["batches"] += 1
            self._lost_recorded += lost
            self._inflight = 0
            if self._isolate:
                self._isolate -= len(batch)
            if not invalid:
                self.last_error = None
            self._cv.notify_all()
        return True

    def _transaction(self, events: list[tuple[Any, ...]], typed: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._dblock:
            db = self._db
            assert db is not None
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_SQL_EVENT, events)
                i = 0
                while i < len(typed):  # consecutive rows of one statement go together, order kept
                    j = i
                    while j < len(typed) and typed[j][0] == typed[i][0]:
                        j += 1
                    db.executemany(typed[i][0], [p for _, p in typed[i:j]])
                    i = j
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.rollback()
                raise

    def trim(self, now: float | None = None) -> int:
        """Apply retention now (the writer also does it every ``trim_interval`` s). Returns rows deleted."""
        if self.readonly or self._db is None:
            raise StoreError(f"{self.path}: opened read-only; retention is applied by the writer")
        now = time.time() if now is None else now
        deleted = 0
        try:
            with self._dblock:
                db = self._db
                if self.retention_seconds:
                    deleted += self._delete_before(db, now - self.retention_seconds)
                if self.max_bytes:
                    for _ in range(10):  # bounded; usually one pass
                        used = _used_bytes(db)
                        n = _one(db, "SELECT count(*) FROM events")
                        if used <= self.max_bytes or n == 0:
                            break
                        # drop the oldest share of events that is over ~90% of the limit (by time)
                        drop = max(1, int(n * (1 - 0.9 * self.max_bytes / used)))
                        if drop >= n:
                            cutoff = float("inf")
                        else:
                            cutoff = _one(db, "SELECT ts FROM events ORDER BY ts LIMIT 1 OFFSET ?", drop)
                        deleted += self._delete_before(db, cutoff)
                        db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page
                if deleted:
                    db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise self._error(exc, "applying retention") from exc
        if deleted:
            with self._cv:
                self._stats["trimmed"] += deleted
        return deleted

    @staticmethod
    def _delete_before(db: sqlite3.Connection, cutoff: float) -> int:
        n = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, ts in _TABLES_WITH_TS.items():
                n += db.execute(f"DELETE FROM {table} WHERE {ts} < ?", (cutoff,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise
        return n

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything written so far is committed. Raises StoreError if that does not
        happen within ``timeout`` (the events stay queued; see ``pending()``), or if events were
        rejected as unencodable since the last flush."""
        if self.readonly:
            return
        end = time.monotonic() + timeout
        with self._cv:
            self._cv.notify_all()
            while self._q or self._inflight or self._stats["dropped"] > self._lost_recorded:
                if self._thread_done:
                    raise StoreError(f"{self.path}: the store's writer has stopped; "
                                     f"{len(self._q)} events not written ({self.last_error})")
                left = end - time.monotonic()
                if left <= 0:
                    raise StoreError(f"{self.path}: {len(self._q) + self._inflight} events not yet written "
                                     f"after {timeout:g} s ({self.last_error or 'writer busy'}); they are "
                                     "kept in memory and retried. If another process holds the database, "
                                     "stop it.")
                self._cv.wait(min(left, 0.05))
                self._cv.notify_all()
            invalid = self._stats["invalid"] - self._invalid_reported
            self._invalid_reported = self._stats["invalid"]
        if invalid:
            raise StoreError(f"{self.path}: {invalid} events could not be encoded and were not stored "
                             f"({self.last_error}); this is a bug in the event's producer")

    def close(self, timeout: float = 10.0) -> None:
        """Flush and close. Idempotent. Raises StoreError if queued events could not be written;
        they remain available from ``pending()``."""
        if self._closed:
            return
        self._closed = True
        if self.readonly:
            return
        err: StoreError | None = None
        try:
            self.flush(timeout)
        except StoreError as exc:
            err = exc
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.busy_timeout + 2)
        with self._cv:
            if self._thread_done:
                close_now = True
            else:  # still inside a database call: it closes the connection when it returns
                close_now = False
                self._close_db_on_exit = True
        if close_now and self._db is not None:
            self._db.close()
        if err is not None:
            raise err

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """written, dropped (queue full), invalid (unencodable), batches, retries, trimmed,
        queued (not yet committed), last_error (None once a batch succeeds again)."""
        with self._cv:
            return {**self._stats, "queued": len(self._q) + self._inflight, "last_error": self.last_error}

    # -- reading -----------------------------------------------------------------------------

    @staticmethod
    def _where(*, since: float | None = None, until: float | None = None, pid: int | None = None,
               comm: str | None = None, provider: str | None = None, ts: str = "ts",
               provider_via_flows: bool = False) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for cond, val in ((f"{ts} >= ?", since), (f"{ts} <= ?", until), ("pid = ?", pid), ("comm = ?", comm)):
            if val is not None:
                clauses.append(cond)
                args.append(val)
        if provider is not None:
            if provider_via_flows:  # events of a flow that was (later) tied to the provider count too
                clauses.append("(provider = ? OR flow_id IN (SELECT flow_id FROM flows WHERE provider = ?))")
                args += [provider, provider]
            else:
                clauses.append("provider = ?")
                args.append(provider)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def events(self, kinds: Iterable[str] | str | None = None, since: float | None = None,
               until: float | None = None, pid: int | None = None, comm: str | None = None,
               provider: str | None = None, *, raw: bool = False) -> Iterator[Any]:
        """The stored events, in write order, rebuilt as the original objects (``raw=True``: the
        stored dicts, including kinds this version has no class for, which are otherwise skipped).
        ``provider`` also matches events of flows classified as that provider (e.g. their TLS hello)."""
        where, args = self._where(since=since, until=until, pid=pid, comm=comm, provider=provider,
                                  provider_via_flows=True)
        if kinds is not None:
            ks = [kinds] if isinstance(kinds, str) else list(kinds)
            where += (" AND " if where else " WHERE ") + f"kind IN ({','.join('?' * len(ks))})"
            args += ks
        with self._reader() as db:
            try:
                for (js,) in db.execute(f"SELECT json FROM events{where} ORDER BY id", args):
                    d = json.loads(js)
                    if raw:
                        yield d
                        continue
                    try:
                        yield event_from_dict(d)
                    except ValueError:
                        continue  # a kind this version does not know: use raw=True to see it
            except sqlite3.Error as exc:
                raise self._error(exc, "reading events") from exc

    def flows(self, since: float | None = None, until: float | None = None, pid: int | None = None,
              comm: str | None = None, provider: str | None = None) -> list[dict[str, Any]]:
        """One dict per flow (columns of the ``flows`` table), by open time; ``since``/``until``
        compare the open time (the close time for flows whose start is unknown)."""
        where, args = self._where(since=since, until=until, pid=pid, comm=comm, provider=provider,
                                  ts="coalesce(opened, closed)")
        with self._reader() as db:
            try:
                cur = db.execute(f"SELECT * FROM flows{where} ORDER BY coalesce(opened, closed), flow_id",
                                 args)
                names = [c[0] for c in cur.description]
                rows = cur.fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "reading flows") from exc
        out = []
        for row in rows:
            d = dict(zip(names, row, strict=True))
            d["cmdline"] = json.loads(d["cmdline"]) if d["cmdline"] else None
            d["preexisting"] = bool(d["preexisting"])
            out.append(d)
        return out

    def dataframe(self, table: str = "flows", **filters: Any) -> Any:
        """A pandas DataFrame of ``flows`` (default; plus ``opened_at``/``closed_at`` datetimes),
        ``events`` (as ``busted.to_dataframe``, any kind) or another table (plus a ``time`` column).
        ``filters``: since, until, pid, comm, provider (and kinds, for events)."""
        from busted.dataframe import _pandas

        pd = _pandas()  # EnvironmentProblem naming `pip install 'busted[pandas]'` if missing
        if table == "flows":
            df = pd.DataFrame(self.flows(**filters), columns=list(_FLOW_COLS))
            df["opened_at"] = pd.to_datetime(df["opened"], unit="s", utc=True)
            df["closed_at"] = pd.to_datetime(df["closed"], unit="s", utc=True)
            return df
        if table == "events":
            from busted.dataframe import frame_from_dicts

            return frame_from_dicts(self.events(raw=True, **filters))
        if table not in _TABLES_WITH_TS:
            raise StoreError(f"unknown table {table!r}; one of {sorted(_TABLES_WITH_TS)}")
        with self._reader() as db:
            cols = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            missing = [k for k in filters if k not in ("since", "until") and k not in cols]
            if missing:
                raise StoreError(f"table {table} cannot be filtered by {missing}; its columns are {cols}")
            where, args = self._where(**filters)
            df = pd.read_sql_query(f"SELECT * FROM {table}{where} ORDER BY ts, id", db, params=args)
        df["time"] = pd.to_datetime(df["ts"], unit="s", utc=True)
        return df
