"""The embedded store: SQLite in WAL mode, batched writes off the event path, versioned schema.

    with Store("busted.db") as store:        # writer
        store.write(event)                   # enqueues only; a thread commits batches
    with Store.open_readonly("busted.db") as store:
        for ev in store.events(kinds=["flow_closed"], provider="openai"): ...

Why SQLite + WAL: one file, no server, readers (``busted query``, notebooks) never block the
writer, and it is in the standard library.

Every event lands in ``events`` as its exact JSON (so any kind, including future ones, round-trips);
known kinds are also spread into typed tables (``flows``, ``dns_answers``, ``tls_hellos``,
``losses``; ``llm_calls`` and ``policy_decisions`` are reserved for those events).
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import threading
import time
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
    TlsClientHello,
)
from busted.sinks._codec import event_from_dict, redact

__all__ = ["SCHEMA_VERSION", "Store"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, flow_id INTEGER, pid INTEGER,
    comm TEXT, provider TEXT, json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind, ts);
CREATE TABLE IF NOT EXISTS flows (
    flow_id INTEGER PRIMARY KEY, opened REAL, closed REAL, direction TEXT, pid INTEGER, tid INTEGER,
    uid INTEGER, ppid INTEGER, comm TEXT, exe TEXT, cmdline TEXT, cgroup_id INTEGER, netns INTEGER,
    family INTEGER, saddr TEXT, sport INTEGER, daddr TEXT, dport INTEGER, preexisting INTEGER,
    hostname TEXT, provider TEXT, evidence TEXT, confidence REAL,
    bytes_sent INTEGER, bytes_received INTEGER, duration_ns INTEGER);
CREATE INDEX IF NOT EXISTS flows_opened ON flows(opened);
CREATE INDEX IF NOT EXISTS flows_provider ON flows(provider, opened);
CREATE TABLE IF NOT EXISTS dns_answers (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, pid INTEGER, comm TEXT, netns INTEGER, transport TEXT,
    server TEXT, qname TEXT, qtype TEXT, rcode TEXT, answers TEXT, cname_chain TEXT);
CREATE INDEX IF NOT EXISTS dns_ts ON dns_answers(ts);
CREATE TABLE IF NOT EXISTS tls_hellos (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER, comm TEXT, daddr TEXT,
    dport INTEGER, sni TEXT, alpn TEXT, versions TEXT, ja4 TEXT);
CREATE TABLE IF NOT EXISTS losses (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, place TEXT, count INTEGER, detail TEXT);
CREATE TABLE IF NOT EXISTS llm_calls (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER, comm TEXT, provider TEXT,
    model TEXT, endpoint TEXT, input_tokens INTEGER, output_tokens INTEGER, status INTEGER,
    duration_ns INTEGER);
CREATE TABLE IF NOT EXISTS policy_decisions (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, flow_id INTEGER, pid INTEGER, comm TEXT, provider TEXT,
    decision TEXT, rule TEXT, reason TEXT);
"""

_FLOW_COLS = ("flow_id", "opened", "closed", "direction", "pid", "tid", "uid", "ppid", "comm", "exe", "cmdline",
              "cgroup_id", "netns", "family", "saddr", "sport", "daddr", "dport", "preexisting", "hostname",
              "provider", "evidence", "confidence", "bytes_sent", "bytes_received", "duration_ns")
_TABLES_WITH_TS = {"events": "ts", "dns_answers": "ts", "tls_hellos": "ts", "losses": "ts", "llm_calls": "ts",
                   "policy_decisions": "ts", "flows": "coalesce(closed, opened)"}


def _j(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


class Store:
    """SQLite event store. See the module docstring. Thread-safe ``write``; one writer thread."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 retention_seconds: float | None = None, max_bytes: int | None = None, batch_size: int = 500,
                 flush_interval: float = 0.5, queue_size: int = 100_000, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue_size = queue_size
        self._q: collections.deque[Event] = collections.deque()
        self._cv = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._stats = {"written": 0, "dropped": 0, "batches": 0, "retries": 0, "trimmed": 0}
        self.last_error: str | None = None
        self._db = self._open(busy_timeout)
        self._thread: threading.Thread | None = None
        if not readonly:
            self._thread = threading.Thread(target=self._writer, name="busted-store", daemon=True)
            self._thread.start()

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> Store:
        return cls(path, readonly=True)

    # -- opening -----------------------------------------------------------------------------

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        p = self.path
        try:
            if self.readonly:
                if not p.exists():
                    raise StoreError(f"{p}: no such store; write one with `busted monitor --store {p}`")
                db = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=busy_timeout, check_same_thread=False)
            else:
                if p.parent and not p.parent.exists():
                    raise StoreError(f"{p}: directory {p.parent} does not exist")
                db = sqlite3.connect(str(p), timeout=busy_timeout, check_same_thread=False,
                                     isolation_level=None)
            version = self._check_version(db)
            if not self.readonly:
                if version == 0:
                    db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # lets retention give space back
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                if version == 0:
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return db
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            if "locked" in msg or "busy" in msg:
                raise StoreError(f"{p}: the database is locked by another process (waited {busy_timeout:.0f} s). "
                                 "Stop the other writer or choose another --store path.") from exc
            if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
                raise StoreError(f"{p}: not a busted store or corrupted ({msg}). Move it aside and start a new "
                                 "one, or recover it with `sqlite3 FILE .recover`.") from exc
            raise StoreError(f"{p}: cannot open the store: {msg}") from exc

    def _check_version(self, db: sqlite3.Connection) -> int:
        has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            if self.readonly:
                raise StoreError(f"{self.path}: not a busted store (no meta table)")
            return 0
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: written by a newer busted (schema {version} > {SCHEMA_VERSION}); "
                             "upgrade busted to read it")
        return version  # older versions would be migrated here; 1 is the first

    # -- writing -----------------------------------------------------------------------------

    def write(self, event: Event) -> None:
        """Queue one event. Never blocks; if the queue is full the event is counted as dropped."""
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        if self._closed:
            raise StoreError(f"{self.path}: store is closed")
        with self._cv:
            if len(self._q) >= self.queue_size:
                self._stats["dropped"] += 1
                return
            self._q.append(event)
            if len(self._q) >= self.batch_size:
                self._cv.notify()

    def write_many(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.write(ev)

    def _writer(self) -> None:
        next_trim = time.monotonic() + 5
        backoff = 0.05
        while True:
            with self._cv:
                if not self._q and not self._closed:
                    self._cv.wait(self.flush_interval)
                if not self._q:
                    if self._closed:
                        return
                    continue
                batch = [self._q.popleft() for _ in range(min(self.batch_size, len(self._q)))]
                self._inflight = len(batch)
            try:
                self._commit(batch)
                backoff = 0.05
                self.last_error = None
                with self._cv:
                    self._stats["written"] += len(batch)
                    self._stats["batches"] += 1
                    self._inflight = 0
                    self._cv.notify_all()
            except sqlite3.Error as exc:
                # Keep the batch (in order, in front) and retry: a lock is usually temporary.
                self.last_error = f"{type(exc).__name__}: {exc}"
                with self._cv:
                    self._q.extendleft(reversed(batch))
                    self._inflight = 0
                    self._stats["retries"] += 1
                    self._cv.notify_all()
                    if self._closed and self._give_up:
                        return
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            if (self.retention_seconds or self.max_bytes) and time.monotonic() >= next_trim:
                next_trim = time.monotonic() + 5
                try:
                    self.trim()
                except sqlite3.Error as exc:
                    self.last_error = f"retention: {exc}"

    _give_up = False

    def _commit(self, batch: list[Event]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = []
            for ev in batch:
                d = redact(ev.to_dict())
                rows.append((ev.wall_time, ev.kind, getattr(ev, "flow_id", None), getattr(ev, "pid", None),
                             getattr(ev, "comm", None), getattr(ev, "provider", None), json.dumps(d)))
                self._typed(db, ev, d)
            db.executemany("INSERT INTO events(ts, kind, flow_id, pid, comm, provider, json) VALUES (?,?,?,?,?,?,?)",
                           rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _typed(self, db: sqlite3.Connection, ev: Event, d: dict[str, Any]) -> None:
        if isinstance(ev, FlowEvent):
            row = {k: d.get(k) for k in _FLOW_COLS}
            row["cmdline"] = _j(d.get("cmdline"))
            row["preexisting"] = int(bool(d.get("preexisting")))
            if isinstance(ev, FlowClosed):
                row["closed"] = ev.wall_time
                row["opened"] = ev.wall_time - ev.duration_ns / 1e9 if ev.duration_ns else None
                sets = [c for c in _FLOW_COLS if c not in ("flow_id", "opened")]
                sets.append("opened")
                upd = ", ".join(f"{c}=excluded.{c}" if c != "opened" else
                                "opened=coalesce(flows.opened, excluded.opened)" for c in sets)
            elif isinstance(ev, FlowOpened):
                row["opened"] = ev.wall_time
                upd = ", ".join(f"{c}=excluded.{c}" for c in _FLOW_COLS
                                if c not in ("flow_id", "closed", "bytes_sent", "bytes_received", "duration_ns"))
            elif isinstance(ev, FlowClassified):
                upd = ", ".join(f"{c}=excluded.{c}" for c in ("hostname", "provider", "evidence", "confidence"))
            else:
                return
            cols = ", ".join(_FLOW_COLS)
            db.execute(f"INSERT INTO flows({cols}) VALUES ({', '.join('?' * len(_FLOW_COLS))}) "
                       f"ON CONFLICT(flow_id) DO UPDATE SET {upd}", [row[c] for c in _FLOW_COLS])
        elif isinstance(ev, DnsAnswer):
            db.execute("INSERT INTO dns_answers(ts, pid, comm, netns, transport, server, qname, qtype, rcode, answers,"
                       " cname_chain) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (ev.wall_time, ev.pid, ev.comm, ev.netns, ev.transport, ev.server, ev.qname, ev.qtype,
                        ev.rcode, _j(d["answers"]), _j(d["cname_chain"])))
        elif isinstance(ev, TlsClientHello):
            db.execute("INSERT INTO tls_hellos(ts, flow_id, pid, comm, daddr, dport, sni, alpn, versions, ja4)"
                       " VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (ev.wall_time, ev.flow_id, ev.pid, ev.comm, ev.daddr, ev.dport, ev.sni, _j(d["alpn"]),
                        _j(d["versions"]), ev.ja4))
        elif isinstance(ev, EventsLost):
            db.execute("INSERT INTO losses(ts, place, count, detail) VALUES (?,?,?,?)",
                       (ev.wall_time, d["where"], ev.count, ev.detail))
        elif hasattr(ev, "model") and hasattr(ev, "provider"):  # LLM call events, duck-typed
            db.execute("INSERT INTO llm_calls(ts, flow_id, pid, comm, provider, model, endpoint, input_tokens,"
                       " output_tokens, status, duration_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (ev.wall_time, d.get("flow_id"), d.get("pid"), d.get("comm"), d.get("provider"),
                        d.get("model"), d.get("endpoint"), d.get("input_tokens"), d.get("output_tokens"),
                        d.get("status"), d.get("duration_ns")))
        elif hasattr(ev, "decision"):
            db.execute("INSERT INTO policy_decisions(ts, flow_id, pid, comm, provider, decision, rule, reason)"
                       " VALUES (?,?,?,?,?,?,?,?)",
                       (ev.wall_time, d.get("flow_id"), d.get("pid"), d.get("comm"), d.get("provider"),
                        d.get("decision"), d.get("rule"), d.get("reason")))

    def trim(self, now: float | None = None) -> int:
        """Apply retention now (the writer thread also does it every 5 s). Returns rows deleted."""
        now = time.time() if now is None else now
        deleted = 0
        db = self._db
        if self.retention_seconds:
            cutoff = now - self.retention_seconds
            for table, ts in _TABLES_WITH_TS.items():
                deleted += db.execute(f"DELETE FROM {table} WHERE {ts} < ?", (cutoff,)).rowcount
        if self.max_bytes:
            for _ in range(10):  # bounded; usually one pass: drop the oldest share that is over the limit
                page = db.execute("PRAGMA page_size").fetchone()[0]
                used = (db.execute("PRAGMA page_count").fetchone()[0]
                        - db.execute("PRAGMA freelist_count").fetchone()[0]) * page
                n = db.execute("SELECT count(*) FROM events").fetchone()[0]
                if used <= self.max_bytes or n == 0:
                    break
                drop = max(1, int(n * (1 - 0.9 * self.max_bytes / used)))  # keep ~90% of the limit
                row = db.execute("SELECT ts FROM events ORDER BY ts LIMIT 1 OFFSET ?", (min(drop, n - 1),)).fetchone()
                cutoff = row[0] if row and drop < n else float("inf")
                for table, ts in _TABLES_WITH_TS.items():
                    deleted += db.execute(f"DELETE FROM {table} WHERE {ts} < ?", (cutoff,)).rowcount
                db.execute("PRAGMA incremental_vacuum")
        if deleted:
            db.execute("PRAGMA incremental_vacuum")
            self._stats["trimmed"] += deleted
        return deleted

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything written so far is committed. Raises StoreError (events stay queued)
        if that does not happen within ``timeout``."""
        if self.readonly:
            return
        end = time.monotonic() + timeout
        with self._cv:
            self._cv.notify_all()
            while self._q or self._inflight:
                left = end - time.monotonic()
                if left <= 0:
                    raise StoreError(f"{self.path}: {len(self._q) + self._inflight} events not yet written "
                                     f"({self.last_error or 'writer busy'}); they are kept in memory")
                self._cv.wait(min(left, 0.1))
                self._cv.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Flush and close. Idempotent. Raises StoreError if queued events could not be written."""
        if self._closed:
            return
        err: StoreError | None = None
        try:
            self.flush(timeout)
        except StoreError as exc:
            err = exc
        with self._cv:
            self._closed = True
            self._give_up = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._db.close()
        if err is not None:
            raise err

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {**self._stats, "queued": len(self._q) + self._inflight, "last_error": self.last_error}

    # -- reading -----------------------------------------------------------------------------

    def _where(self, *, since: float | None, until: float | None, pid: int | None, comm: str | None,
               provider: str | None, ts: str = "ts") -> tuple[str, list[Any]]:
        clauses, args = [], []
        for cond, val in ((f"{ts} >= ?", since), (f"{ts} <= ?", until), ("pid = ?", pid), ("comm = ?", comm),
                          ("provider = ?", provider)):
            if val is not None:
                clauses.append(cond)
                args.append(val)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def events(self, kinds: Iterable[str] | None = None, since: float | None = None, until: float | None = None,
               pid: int | None = None, comm: str | None = None, provider: str | None = None) -> Iterator[Event]:
        """The stored events, oldest first, rebuilt as the original objects."""
        where, args = self._where(since=since, until=until, pid=pid, comm=comm, provider=provider)
        if kinds:
            ks = list(kinds)
            where += (" AND " if where else " WHERE ") + f"kind IN ({','.join('?' * len(ks))})"
            args += ks
        for (js,) in self._db.execute(f"SELECT json FROM events{where} ORDER BY id", args):
            try:
                yield event_from_dict(json.loads(js))
            except ValueError:
                continue  # a kind this version does not know

    def flows(self, since: float | None = None, until: float | None = None, pid: int | None = None,
              comm: str | None = None, provider: str | None = None) -> list[dict[str, Any]]:
        where, args = self._where(since=since, until=until, pid=pid, comm=comm, provider=provider, ts="opened")
        cur = self._db.execute(f"SELECT * FROM flows{where} ORDER BY opened", args)
        names = [c[0] for c in cur.description]
        out = []
        for row in cur:
            d = dict(zip(names, row, strict=True))
            d["cmdline"] = json.loads(d["cmdline"]) if d["cmdline"] else None
            d["preexisting"] = bool(d["preexisting"])
            out.append(d)
        return out

    def dataframe(self, table: str = "flows", **filters: Any) -> Any:
        """A pandas DataFrame of ``flows`` (default), ``events`` or any store table."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise StoreError("Store.dataframe needs pandas: pip install 'busted[pandas]'") from exc
        if table == "flows":
            return pd.DataFrame(self.flows(**filters))
        if table == "events":
            from busted.dataframe import to_dataframe

            return to_dataframe(self.events(**filters))
        if table not in _TABLES_WITH_TS:
            raise StoreError(f"unknown table {table!r}; one of {sorted(_TABLES_WITH_TS)}")
        return pd.read_sql_query(f"SELECT * FROM {table} ORDER BY ts", self._db)
