"""The embedded store: SQLite in WAL mode, batched writes off the event path, versioned schema.

    with Store("busted.db") as store:        # writer
        store.write(event)                   # enqueues only; a thread commits batches
        store.write_encoded(items)           # the same for busted.sinks.encode(event)s, one lock
    with Store.open_readonly("busted.db") as store:
        for ev in store.events(kinds=["flow_closed"], provider="openai"): ...

Why SQLite + WAL: one file, no server, in the standard library, and readers (``busted query``,
notebooks, another process) never block the writer nor are blocked by it.

Every event lands in ``events`` as its exact JSON (so any kind, including future ones, round-trips);
known kinds are also spread into typed tables (``flows`` -- one row per flow, its latest state from a
``FlowView`` --, ``dns_answers``, ``tls_hellos``, ``losses``, ``llm_calls``, ``mcp_messages``,
``flow_summaries`` -- busy-host mode's per process x quiet peer sums --).
One writer per store (a lock file); any number of readers.

Nothing is lost silently. When the database refuses a write (disk full, I/O error, locked) the
batch is kept and retried (backing off to every 2 s: space may come back) and ``on_error`` is told
at once; at most ``queue_size`` events wait in memory, newer ones are dropped, counted and recorded
as an ``EventsLost`` row once writing works again. ``close()`` reports the truth (``report()``:
written, lost) and raises ``StoreError`` if events remain unwritten (``pending()`` hands them back).

This module opens, locks, writes and trims; the schema and its migrations are in ``store_schema``,
how an event becomes rows in ``store_rows``, the queries in ``store_query``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from busted._safe import dir_problem, file_problem, open_private
from busted.errors import StoreError, UsageError
from busted.events import (
    Event,
    EventsLost,
    LossPlace,
)
from busted.sinks._codec import Encoded, dumps, redacted_dict
from busted.sinks.flowview import FlowView
from busted.sinks.store_query import StoreQueries
from busted.sinks.store_rows import (
    _SQL_EVENT,
    _SQL_FLOW,
    _TABLES_WITH_TS,
    _backfill,
    _flow_rows,
    _FlowRow,
    _Row,
    _row,
    _strict,
    _typed,
)
from busted.sinks.store_schema import _MIGRATIONS, _SCHEMA, SCHEMA_VERSION, _one, _run_migration, _used_bytes

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_RETENTION_SECONDS", "SCHEMA_VERSION", "Store", "parse_age", "parse_size"]

# Retention `busted monitor --store` applies unless told otherwise (--retention-age/--retention-size):
# a week of history, and at most 1 GiB of data (about 11 minutes at the 1.6 MB/s measured with 500
# connections/s; days at ordinary rates). The library's Store keeps everything unless given limits.
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_BYTES = 1 << 30

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _parse_amount(text: str, units: dict[str, int], suffix: str, what: str, examples: str) -> float | None:
    """A positive number with an optional unit letter (from ``units``) -> number x unit;
    "0"/"off"/"none" -> None."""
    t = text.strip().lower()
    if t in ("0", "off", "none"):
        return None
    m = re.fullmatch(rf"(\d+(?:\.\d+)?)\s*([{''.join(u for u in units if u)}]?){suffix}", t)
    if not m or float(m[1]) <= 0:
        raise UsageError(f"retention {what} {text!r}: expected e.g. {examples}")
    return float(m[1]) * units[m[2] or next(iter(units))]


def parse_age(text: str) -> float | None:
    """"7d", "12h", "90m", "3600" (seconds) -> seconds; "0"/"off"/"none" -> None (keep all)."""
    return _parse_amount(text, _AGE_UNITS, "", "age", "7d, 12h, 90m, 3600 (seconds) or off")


def parse_size(text: str) -> int | None:
    """"1GiB", "500M", "64k", "1048576" (bytes) -> bytes (binary units); "0"/"off"/"none" -> None."""
    n = _parse_amount(text, _SIZE_UNITS, "(?:i?b)?", "size", "1GiB, 500MiB, 64k, a byte count, or off")
    return None if n is None else int(n)


def _read_problem(st: os.stat_result) -> str | None:
    """Why a store file (``lstat``) must not be read by this user, or None: the output-file rules
    of busted/_safe.py (not a link, regular, one link, not group/other-writable), except that a
    file root owns is trusted too (root made the store; any user may query it)."""
    if st.st_uid == 0 and os.geteuid() != 0 and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})" \
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) else None
    return file_problem(st)


class Store(StoreQueries):
    """SQLite event store; see the module docstring.

    ``write`` is thread-safe and never blocks on the database; one writer thread commits batches
    of up to ``batch_size`` events, at least every ``flush_interval`` seconds. At most
    ``queue_size`` events wait in memory; more are dropped and counted. Retention
    (``retention_seconds``, ``max_bytes``) is applied by the writer every ``trim_interval`` s.
    ``on_error(message)`` is called (from the writer thread, or ``write``'s caller) when writing
    starts failing, when drops start, and when writing works again. ``max_flows`` bounds the
    ``FlowView`` behind the ``flows`` rows. Only one writer may open a store (``<path>.lock``).
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 retention_seconds: float | None = None, max_bytes: int | None = None, batch_size: int = 500,
                 flush_interval: float = 0.5, queue_size: int = 100_000, busy_timeout: float = 5.0,
                 trim_interval: float = 5.0, on_error: Callable[[str], None] | None = None,
                 max_flows: int = 65536) -> None:
        self.path = Path(path)
        self.on_error = on_error
        self.readonly = readonly
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        self.batch_size = max(1, batch_size)
        self.flush_interval = flush_interval
        self.queue_size = queue_size
        self.busy_timeout = busy_timeout
        self.trim_interval = trim_interval
        self._q: collections.deque[Event | Encoded] = collections.deque()
        self._cv = threading.Condition()
        self._dblock = threading.Lock()  # the write connection: writer thread vs trim() callers
        self._inflight = 0  # accepted events taken from _q and not yet committed (or found invalid)
        self._retry: collections.deque[list[_Row]] = collections.deque()  # encoded batches to commit, in order
        self._flows = FlowView(max_flows=max_flows)  # the `flows` rows: latest state per flow
        self._lockfd: int | None = None
        self._failing_since: float | None = None  # monotonic time the database began refusing writes
        self._dropped_at_failure = 0
        self._told_dropping = False
        self._drop_cause: str | None = None
        self._lost_batched = 0  # drops in an encoded loss record not yet committed
        self._invalid_error: str | None = None
        self._closed = False
        self._stop = False
        self._thread_done = False
        self._close_db_on_exit = False
        self._lost_recorded = 0  # drops already recorded in the store as EventsLost
        self._invalid_reported = 0
        self._stats = {"written": 0, "loss_records": 0, "dropped": 0, "invalid": 0, "batches": 0, "retries": 0,
                       "trimmed": 0}
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
        self._take_lock()
        try:
            self._own_files()
            db = sqlite3.connect(str(p), timeout=self.busy_timeout, check_same_thread=False,
                                 isolation_level=None)
        except sqlite3.Error as exc:
            self._release_lock()
            raise self._error(exc, "opening") from exc
        except BaseException:
            self._release_lock()
            raise
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
                            _run_migration(db, stmt)
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                if 0 < version < 4:
                    _backfill(db)
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
            self._release_lock()
            raise self._error(exc, "opening") from exc
        except StoreError:
            db.close()
            self._release_lock()
            raise
        return db

    def _take_lock(self) -> None:
        """One writer per store: an exclusive flock on ``<store>.lock``, held until close. Readers
        only probe it with a shared flock for an instant (``_writer_running``), so a refusal is
        retried for up to 0.2 s before it is taken for another writer."""
        lock = self.path.parent / (self.path.name + ".lock")
        try:
            fd, _ = open_private(lock, os.O_RDWR, "--store")  # busted/_safe.py: no links, 0600, ours
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the writer lock {lock} ({exc.strerror}); this user must "
                             "be able to write it and its directory (or read with `busted query`)") from exc
        try:
            for attempt in range(20):  # bounded: a reader's probe lasts microseconds
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 19:
                        raise
                    time.sleep(0.01)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StoreError(f"{self.path}: another busted (pid {holder}) is writing this store; only one writer "
                             "may write a store (a second would store every event twice). Stop it or choose "
                             "another --store path; reading while it runs is fine (`busted query --store`, "
                             "Store.open_readonly()).") from exc
        try:  # the holder's pid, for the message above; best effort (the disk may be full)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._lockfd = fd

    def _own_files(self) -> None:
        """The database and its -wal/-shm, created 0600 by us (SQLite gives the -wal and -shm it
        makes the database's mode) or checked like the lock: no links, ours (busted/_safe.py).
        A -journal is only checked: an empty one would be taken for a rollback journal."""
        for suffix in ("", "-wal", "-shm"):
            try:
                fd, _ = open_private(f"{self.path}{suffix}", os.O_RDWR, "--store")
            except OSError as exc:
                raise StoreError(f"{self.path}{suffix}: cannot open ({exc.strerror}); check that the file and "
                                 "its directory are writable by this user") from exc
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            why = file_problem(os.lstat(f"{self.path}-journal"))
            if why:
                raise StoreError(f"--store {self.path}-journal: {why}; refusing to open the store. Remove it "
                                 "or choose another path")

    def _release_lock(self) -> None:
        fd, self._lockfd = self._lockfd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
        self._release_lock()

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
        """Before the first read: the store, its directory and its -wal/-shm/-journal must not be
        under another user's control (busted/_safe.py rules; a file may be root's or ours). A reader
        as root in a directory someone else can write would let SQLite open (and truncate) a
        planted ``-shm`` link, or read a database that user shaped."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no such store; write one with "
                             f"`busted monitor --store {self.path}`") from None
        why = _read_problem(st)
        where = dir_problem(self.path.parent.absolute())
        if why or where:
            raise StoreError(f"{self.path}: {why or where}; refusing to read a store another user controls. "
                             "Copy it to a directory only you (or root) can write and query the copy, or "
                             "query it as the user who owns it")
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                why = _read_problem(os.lstat(f"{self.path}{suffix}"))
                if why:
                    raise StoreError(f"{self.path}{suffix}: {why}; refusing to read the store. Remove it "
                                     "if no busted is writing the store, or query it as its owner")
        with self._reader() as db:
            try:
                version = self._check_version(db)
            except sqlite3.Error as exc:
                raise self._error(exc, "opening read-only") from exc
        self.schema_version = version

    def _writer_running(self) -> bool:
        """Whether a writer holds ``<store>.lock`` (True when that cannot be told). The probe takes a
        shared flock for an instant; ``_take_lock`` retries briefly, so a writer starting then waits."""
        try:
            fd = os.open(f"{self.path}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # every writer creates it before opening the database
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # releases the shared lock, if taken
        return False

    def _ro_connect_uri(self) -> str:
        """``mode=ro``, plus ``immutable=1`` when no writer runs and no WAL holds data: then SQLite
        takes no locks and creates no ``-shm``/``-wal`` next to the store. With a writer, the
        ``-shm`` is its own (created 0600 by ``_own_files``). With a WAL left by a writer that
        stopped uncleanly, its ``-shm`` is created here first, 0600 and never through a link."""
        if self._writer_running():
            return self._ro_uri
        try:
            wal = os.lstat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            wal = 0
        if not wal:
            return self._ro_uri + "&immutable=1"
        with contextlib.suppress(OSError):  # cannot write there: SQLite says so, as before
            os.close(open_private(f"{self.path}-shm", os.O_RDWR, "--store")[0])
        return self._ro_uri

    def _connect_ro(self) -> sqlite3.Connection:
        uri = self._ro_connect_uri()
        db = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, check_same_thread=False)
        try:
            _one(db, "SELECT count(*) FROM sqlite_master")
        except sqlite3.OperationalError as exc:
            db.close()
            # A WAL store with no -shm file, in a directory we may not write (e.g. made by root),
            # while the writer lock cannot be read: read it as immutable if no WAL holds data.
            msg = str(exc)
            if ("unable to open" not in msg and "readonly" not in msg) or "immutable" in uri or \
                    (self.path.parent / (self.path.name + "-wal")).exists():
                raise
            db = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=self.busy_timeout, check_same_thread=False)
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
        """Queue one event. Never waits for the database. At most ``queue_size`` events wait in
        memory (also while the disk refuses writes); beyond that new events are dropped, counted
        (``stats()["dropped"]``) and recorded as an ``EventsLost`` row once writing works again."""
        self._check_writable()
        tell = None
        with self._cv:
            if len(self._q) + self._inflight >= self.queue_size:
                tell = self._drop()
            else:
                self._q.append(event)
                if len(self._q) >= self.batch_size:
                    self._cv.notify_all()
        if tell:
            self._tell(tell)

    def _check_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only; open it with Store(path) to write")
        if self._closed:
            raise StoreError(f"{self.path}: store is closed; open a new Store to write more")

    def write_many(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.write(ev)

    def write_encoded(self, items: Iterable[Encoded | Event]) -> None:
        """Queue events already encoded (``busted.sinks.encode``: the JSONL line is the ``events``
        row's JSON; a plain event among them is encoded by the writer), under one lock; otherwise
        as ``write``. The CLI hands each batch it takes
        from the Monitor to every output this way, encoded once."""
        self._check_writable()
        tell = None
        with self._cv:
            for item in items:
                if len(self._q) + self._inflight >= self.queue_size:
                    tell = self._drop() or tell
                else:
                    self._q.append(item)
            if len(self._q) >= self.batch_size:
                self._cv.notify_all()
        if tell:
            self._tell(tell)

    def _drop(self) -> str | None:
        """Count one event the full backlog refuses. Caller holds _cv. Returns a message to tell."""
        self._stats["dropped"] += 1
        if self._failing_since is not None:
            self._drop_cause = self.last_error
            if not self._told_dropping:
                self._told_dropping = True
                return (f"{self.path}: {self.queue_size} events wait in memory for the store; dropping "
                        "new ones from now on (counted, and recorded in the store once it can write)")
        return None

    def pending(self) -> list[Event]:
        """Events accepted but not yet committed (e.g. after ``close()`` raised), oldest first."""
        with self._cv:
            held = [r.src for b in self._retry for r in b if r.src is not None]
            return held + [q.event if isinstance(q, Encoded) else q for q in self._q]

    def _tell(self, msg: str) -> None:
        """Say it now (``on_error``): the store's trouble must not wait for close()."""
        if self.on_error is not None:
            try:
                self.on_error(msg)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the writer
                pass

    def _writer(self) -> None:
        next_trim = time.monotonic() + self.trim_interval
        backoff = 0.05
        try:
            while True:
                with self._cv:
                    if not self._q and not self._retry and not self._stop and not self._unrecorded():
                        self._cv.wait(min(self.flush_interval, max(0.0, next_trim - time.monotonic()))
                                      if self._wants_trim() else self.flush_interval)
                    if self._stop:
                        return
                    evs: list[Event | Encoded] = []
                    lost = 0
                    if not self._retry:
                        evs = [self._q.popleft() for _ in range(min(self.batch_size, len(self._q)))]
                        self._inflight += len(evs)
                        lost = self._unrecorded()
                if evs or lost:
                    batch = self._encode(evs, lost)  # once per event: FlowView sees each event once
                    with self._cv:
                        if batch:
                            self._retry.append(batch)
                        self._cv.notify_all()
                if self._retry:
                    if self._commit():
                        backoff = 0.05
                    else:
                        with self._cv:
                            if not self._stop:
                                self._cv.wait(backoff)  # flush()/close() wake it for one more try
                        backoff = min(backoff * 2, 2.0)
                if self._wants_trim() and time.monotonic() >= next_trim and self._failing_since is None:
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
            if close_db:
                self._close_db()

    def _unrecorded(self) -> int:
        """Drops not yet in (a batch headed for) the store as an EventsLost row. Caller holds _cv."""
        return self._stats["dropped"] - self._lost_recorded - self._lost_batched

    def _wants_trim(self) -> bool:
        return bool(self.retention_seconds or self.max_bytes)

    def _encode(self, evs: list[Event | Encoded], lost: int) -> list[_Row]:
        """Encode events into rows, outside any transaction. An event that cannot be encoded is
        counted (``invalid``), not retried."""
        rows: list[_Row] = []
        invalid = 0
        if lost:  # drops since the last record: the gap goes into the store itself ("loss is data")
            with self._cv:
                cause, self._drop_cause = self._drop_cause, None
            detail = (f"busted.sinks.Store: {lost} events dropped, its backlog of {self.queue_size} being full"
                      + (f" while the store could not write ({cause})" if cause else ""))
            evs = [*evs, EventsLost(ts_ns=time.monotonic_ns(), wall_time=time.time(), where=LossPlace.SINK,
                                    count=lost, detail=detail)]
        for i, item in enumerate(evs):
            is_loss_record = lost and i == len(evs) - 1
            ev = item.event if isinstance(item, Encoded) else item
            try:
                if isinstance(item, Encoded):
                    d, js = item.data, item.line
                else:
                    d = redacted_dict(ev)
                    js = dumps(d, cls=type(ev))
                if not isinstance(ev.wall_time, int | float):
                    raise TypeError(f"wall_time is {type(ev.wall_time).__name__}")
                row = _row(ev.wall_time, ev.kind, d.get("flow_id"), d.get("pid"), d.get("comm"), d.get("provider"),
                           js)
                rows.append(_Row(None if is_loss_record else ev, row, _typed(ev, d, self._flows),
                                 lost if is_loss_record else 0))
            except Exception as exc:  # noqa: BLE001 - a bad event must not stop the writer
                invalid += 1
                self._invalid_error = f"cannot encode a {getattr(ev, 'kind', type(ev).__name__)} event: {exc!r}"
        with self._cv:
            self._stats["invalid"] += invalid
            self._inflight -= invalid
            self._lost_batched += lost
        return rows

    def _commit(self) -> bool:
        """Commit the oldest held batch in one transaction. A database error that may pass (disk full,
        I/O error, locked) keeps the batch for a retry and returns False; an error caused by the
        data splits the batch to find the culprit, which is counted as invalid and dropped."""
        batch = self._retry[0]
        try:
            self._transaction(batch)
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError, sqlite3.ProgrammingError,
                ValueError, TypeError, OverflowError) as exc:  # the data's fault, not the database's
            with self._cv:
                self._retry.popleft()
                if len(batch) > 1:  # find the culprit: one event per transaction
                    self._retry.extendleft(reversed([[r] for r in batch]))
                else:
                    self._stats["invalid"] += 1 if batch[0].src is not None else 0
                    self._inflight -= 1 if batch[0].src is not None else 0
                    self._lost_batched -= batch[0].lost  # the gap is recorded with a later batch
                    kind = getattr(batch[0].src, "kind", "events_lost")
                    self._invalid_error = f"cannot store a {kind} event: {exc!r}"
                self._cv.notify_all()
            return True
        except sqlite3.Error as exc:  # the database's: full, I/O error, locked, ...
            msg = f"{type(exc).__name__}: {exc}"
            with self._cv:
                self._stats["retries"] += 1
                self.last_error = msg
                first = self._failing_since is None
                if first:
                    self._failing_since = time.monotonic()
                    self._dropped_at_failure = self._stats["dropped"]
                self._cv.notify_all()
            if first:
                why = "another program holds the database" if "locked" in str(exc) or "busy" in str(exc) else \
                    "is the disk full or failing?"
                self._tell(f"{self.path}: cannot write the store ({exc}; {why}). Up to "
                           f"{self.queue_size} events wait in memory and writing is retried; beyond that "
                           "new events are dropped and counted.")
            return False
        n = sum(1 for r in batch if r.src is not None)
        with self._cv:
            self._retry.popleft()
            self._stats["written"] += n
            self._stats["batches"] += 1
            self._stats["loss_records"] += len(batch) - n
            lost = sum(r.lost for r in batch)
            self._lost_recorded += lost
            self._lost_batched -= lost
            self._inflight -= n
            since, self._failing_since = self._failing_since, None
            dropped_meanwhile = self._stats["dropped"] - self._dropped_at_failure
            if since is not None:
                self._told_dropping = False
            self.last_error = None
            self._cv.notify_all()
        if since is not None:
            meanwhile = (f"{dropped_meanwhile} events were dropped meanwhile (recorded as events_lost)"
                         if dropped_meanwhile else "nothing was lost")
            self._tell(f"{self.path}: the store writes again, after {time.monotonic() - since:.1f} s; {meanwhile}")
        return True

    def _transaction(self, batch: list[_Row]) -> None:
        with self._dblock:
            db = self._db
            assert db is not None
            try:
                self._statements(db, batch, strict=False)
            except (OverflowError, UnicodeEncodeError):
                # an int beyond int64 or a lone surrogate that _row left to SQLite: the batch again,
                # every value as _sql makes it (a failure now is the caller's to handle)
                self._statements(db, batch, strict=True)

    @staticmethod
    def _statements(db: sqlite3.Connection, batch: list[_Row], strict: bool) -> None:
        """The batch's rows in one transaction (rolled back if a statement fails)."""
        fix = _strict if strict else None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_SQL_EVENT, [r.event for r in batch] if fix is None else [fix(r.event) for r in batch])
            # One executemany per statement, each table's rows in order (the tables do not
            # depend on each other), and one upsert per flow: its rows merged as the upsert
            # would merge them (open, classification, close of one flow are usually together).
            by_sql: dict[str, list[tuple[Any, ...]]] = {}
            flows: dict[Any, list[_FlowRow]] = {}
            for r in batch:
                if r.typed is None:
                    continue
                sql, params = r.typed
                if isinstance(params, _FlowRow):
                    flows.setdefault(params.state.flow_id, []).append(params)
                else:
                    by_sql.setdefault(sql, []).append(params)
            if flows:
                rows = [_flow_rows(changes) for changes in flows.values()]
                db.executemany(_SQL_FLOW, rows if fix is None else [fix(row) for row in rows])
            for sql, params_list in by_sql.items():
                db.executemany(sql, params_list if fix is None else [fix(p) for p in params_list])
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
                        if used <= self.max_bytes:  # the usual case: no count(*) scan every trim
                            break
                        n = _one(db, "SELECT count(*) FROM events")
                        if n == 0:
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
        happen within ``timeout``, or sooner when the database keeps refusing (two failed tries
        while waiting: disk full, I/O error, locked); the events stay queued (``pending()``) and
        are retried. Also raises if events were rejected as unencodable since the last flush."""
        if self.readonly:
            return
        end = time.monotonic() + timeout
        with self._cv:
            retries0 = self._stats["retries"]
            self._cv.notify_all()
            while self._q or self._inflight or self._unrecorded() or self._lost_batched:
                n = len(self._q) + self._inflight
                if self._thread_done:
                    raise StoreError(f"{self.path}: the store's writer has stopped; "
                                     f"{n} events not written ({self.last_error})")
                left = end - time.monotonic()
                refused = self._failing_since is not None and self._stats["retries"] - retries0 >= 2
                if left <= 0 or refused:
                    raise StoreError(f"{self.path}: {n} events not yet written "
                                     f"({self.last_error or 'writer busy'}); they are kept in memory (up to "
                                     f"{self.queue_size}, see pending()) and retried until close(). If the disk "
                                     "is full, free space; if another process holds the database, stop it.")
                self._cv.wait(min(left, 0.05))
                self._cv.notify_all()
            invalid = self._stats["invalid"] - self._invalid_reported
            self._invalid_reported = self._stats["invalid"]
        if invalid:
            raise StoreError(f"{self.path}: {invalid} events could not be encoded and were not stored "
                             f"({self._invalid_error}); this is a bug in the event's producer")

    def close(self, timeout: float = 10.0) -> None:
        """Flush and close. Idempotent. Whatever happens, ``report()`` then tells the truth (written,
        lost). Raises StoreError if queued events could not be written: they are lost unless taken
        from ``pending()``."""
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
            unwritten = len(self._q) + self._inflight
        if close_now:
            self._close_db()
        rep = self.report()
        if unwritten:
            raise StoreError(f"{self.path}: closed with {unwritten} events not written ({self.last_error}); they "
                             "are lost unless taken from Store.pending(). " + rep["text"]) from err
        if err is not None:
            raise err

    def report(self) -> dict[str, Any]:
        """The truth so far: ``written`` events, ``lost`` ones (dropped + invalid + not written when
        closed) and a one-line ``text`` saying so."""
        with self._cv:
            written, dropped, invalid = self._stats["written"], self._stats["dropped"], self._stats["invalid"]
            unwritten = len(self._q) + self._inflight if self._closed else 0
        lost = dropped + invalid + unwritten
        parts = [f"{k} {v}" for k, v in (("dropped", dropped), ("unencodable", invalid),
                                          ("not written at close", unwritten)) if v]
        text = f"store {self.path}: {written} events written, {lost} lost" + (f" ({', '.join(parts)})"
                                                                                 if parts else "")
        return {"written": written, "lost": lost, "dropped": dropped, "invalid": invalid,
                "unwritten": unwritten, "text": text}

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """written, loss_records (EventsLost rows it added), dropped (backlog full), invalid
        (unencodable), batches, retries, trimmed, queued (not yet committed), failing (seconds the
        database has refused writes, or None), last_error (None once a batch succeeds again)."""
        with self._cv:
            failing = None if self._failing_since is None else time.monotonic() - self._failing_since
            return {**self._stats, "queued": len(self._q) + self._inflight, "failing": failing,
                    "last_error": self.last_error}
