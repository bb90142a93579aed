"""Reading a store: the query methods ``Store`` (busted/sinks/sqlite.py) offers, on read-only
connections of their own."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from busted.errors import StoreError
from busted.sinks._codec import event_from_dict
from busted.sinks.store_rows import _BOOL_COLS, _FLOW_COLS, _TABLES_WITH_TS


class StoreQueries:
    """The reading half of ``Store``: every query opens its own read-only connection
    (``self._reader()``), so any thread may read and reads never block the writer."""

    # provided by Store: a fresh read-only connection as a context manager, and the error a
    # sqlite3 failure becomes
    _reader: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _error: Callable[[sqlite3.Error, str], StoreError]

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

    def calls(self, since: float | None = None, until: float | None = None, pid: int | None = None,
              comm: str | None = None, provider: str | None = None,
              model: str | None = None) -> list[dict[str, Any]]:
        """One dict per LLM call (the ``llm_calls`` columns: ``ts`` = ``wall_time``, then every
        ``LlmCall`` field), oldest first. ``model`` matches the request or the response model."""
        extra = ("(request_model = ? OR response_model = ?)", [model, model]) if model is not None else None
        return self._typed_rows("llm_calls", extra, since=since, until=until, pid=pid, comm=comm,
                                provider=provider)

    def mcp_messages(self, since: float | None = None, until: float | None = None, pid: int | None = None,
                     comm: str | None = None, method: str | None = None) -> list[dict[str, Any]]:
        """One dict per MCP message (the ``mcp_messages`` columns), oldest first; ``method``
        matches ``jsonrpc_method``."""
        extra = ("jsonrpc_method = ?", [method]) if method is not None else None
        return self._typed_rows("mcp_messages", extra, since=since, until=until, pid=pid, comm=comm)

    def summaries(self, since: float | None = None, until: float | None = None, pid: int | None = None,
                  comm: str | None = None) -> list[dict[str, Any]]:
        """One dict per FlowSummary (busy-host mode; the ``flow_summaries`` columns), oldest first."""
        return self._typed_rows("flow_summaries", None, since=since, until=until, pid=pid, comm=comm)

    def _typed_rows(self, table: str, extra: tuple[str, list[Any]] | None, **filters: Any) -> list[dict[str, Any]]:
        where, args = self._where(**filters)
        if extra is not None:
            where += (" AND " if where else " WHERE ") + extra[0]
            args += extra[1]
        with self._reader() as db:
            try:
                cur = db.execute(f"SELECT * FROM {table}{where} ORDER BY ts, id", args)
                names = [c[0] for c in cur.description]
                rows = cur.fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # an older store read before any writer migrated it
                    return []
                raise self._error(exc, f"reading {table}") from exc
            except sqlite3.Error as exc:
                raise self._error(exc, f"reading {table}") from exc
        out = []
        for row in rows:
            d = dict(zip(names, row, strict=True))
            d.pop("id", None)
            if "cmdline" in d:
                d["cmdline"] = json.loads(d["cmdline"]) if d["cmdline"] else None
            for c in _BOOL_COLS & d.keys():
                if d[c] is not None:
                    d[c] = bool(d[c])
            out.append(d)
        return out

    def dataframe(self, table: str = "flows", **filters: Any) -> Any:
        """A pandas DataFrame of ``flows`` (default; plus ``opened_at``/``closed_at`` datetimes),
        ``events`` (as ``busted.to_dataframe``, any kind) or another table (plus a ``time`` column).
        ``filters``: since, until, pid, comm, provider (and kinds, for events)."""
        from busted.sinks.dataframe import _pandas

        pd = _pandas()  # EnvironmentProblem naming `pip install 'busted[pandas]'` if missing
        if table == "flows":
            df = pd.DataFrame(self.flows(**filters), columns=list(_FLOW_COLS))
            df["opened_at"] = pd.to_datetime(df["opened"], unit="s", utc=True)
            df["closed_at"] = pd.to_datetime(df["closed"], unit="s", utc=True)
            return df
        if table == "events":
            from busted.sinks.dataframe import frame_from_dicts

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
