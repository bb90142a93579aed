"""The store's schema: its tables, their version, and the migrations from every earlier version
(busted/sinks/sqlite.py opens and migrates; nothing here writes an event)."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

SCHEMA_VERSION = 8

# The flow identity as the call and MCP tables store it (one list, so the two cannot drift apart).
_IDENTITY_DDL = """flow_id INTEGER, direction TEXT, pid INTEGER, tid INTEGER, uid INTEGER, comm TEXT, ppid INTEGER,
    exe TEXT, cmdline TEXT, cgroup_id INTEGER, netns INTEGER, family INTEGER, saddr TEXT, sport INTEGER,
    daddr TEXT, dport INTEGER, preexisting INTEGER, hostname TEXT, provider TEXT, evidence TEXT,
    confidence REAL, ancestry TEXT, agent TEXT, agent_pid INTEGER, agent_evidence TEXT, container_id TEXT,
    container_runtime TEXT, pod_uid TEXT, pod_qos TEXT, proc_start_time REAL"""

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
    bytes_sent INTEGER, bytes_received INTEGER, duration_ns INTEGER,
    ancestry TEXT, agent TEXT, agent_pid INTEGER, agent_evidence TEXT, container_id TEXT,
    container_runtime TEXT, pod_uid TEXT, pod_qos TEXT, proc_start_time REAL);
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
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, ts_ns INTEGER,
    {identity},
    api TEXT, operation TEXT, method TEXT, path TEXT, http_version TEXT, stream_id INTEGER,
    request_model TEXT, response_model TEXT, stream INTEGER, status INTEGER, error_type TEXT,
    input_tokens INTEGER, output_tokens INTEGER, cache_read_tokens INTEGER, cache_write_tokens INTEGER,
    reasoning_tokens INTEGER, total_tokens INTEGER, finish_reason TEXT, tool_calls INTEGER,
    request_bytes INTEGER, response_bytes INTEGER, time_to_first_token_ns INTEGER, duration_ns INTEGER,
    user_agent TEXT, complete INTEGER, cost_usd REAL, price_source TEXT, prompt TEXT, completion TEXT,
    ttft_source TEXT, response_id TEXT);
CREATE INDEX IF NOT EXISTS llm_ts ON llm_calls(ts);
CREATE INDEX IF NOT EXISTS llm_provider ON llm_calls(provider, ts);
CREATE INDEX IF NOT EXISTS llm_model ON llm_calls(request_model, ts);
CREATE INDEX IF NOT EXISTS llm_pid ON llm_calls(pid, ts);
CREATE INDEX IF NOT EXISTS llm_flow ON llm_calls(flow_id);
CREATE TABLE IF NOT EXISTS mcp_messages (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, ts_ns INTEGER,
    {identity},
    direction_sent INTEGER, jsonrpc_method TEXT, jsonrpc_id TEXT, session_id TEXT, tool TEXT,
    error_code INTEGER, is_notification INTEGER);
CREATE INDEX IF NOT EXISTS mcp_ts ON mcp_messages(ts);
CREATE INDEX IF NOT EXISTS mcp_method ON mcp_messages(jsonrpc_method, ts);
CREATE INDEX IF NOT EXISTS mcp_provider ON mcp_messages(provider, ts);
CREATE INDEX IF NOT EXISTS mcp_pid ON mcp_messages(pid, ts);
CREATE INDEX IF NOT EXISTS mcp_flow ON mcp_messages(flow_id);
CREATE TABLE IF NOT EXISTS flow_summaries (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, ts_ns INTEGER, pid INTEGER, uid INTEGER, comm TEXT, exe TEXT,
    cgroup_id INTEGER, direction TEXT, family INTEGER, peer TEXT, port INTEGER, count INTEGER,
    bytes_sent INTEGER, bytes_received INTEGER, start_ns INTEGER, end_ns INTEGER, start_time REAL,
    end_time REAL);
CREATE INDEX IF NOT EXISTS summaries_ts ON flow_summaries(ts);
CREATE INDEX IF NOT EXISTS summaries_peer ON flow_summaries(peer, port, ts);
CREATE INDEX IF NOT EXISTS summaries_pid ON flow_summaries(pid, ts);
""".replace("{identity}", _IDENTITY_DDL)

# from_version -> statements that bring a store of that version to from_version + 1.
# (Indexes and new tables come from _SCHEMA, which runs after the migrations.)
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "ALTER TABLE tls_hellos ADD COLUMN saddr TEXT",
        "ALTER TABLE tls_hellos ADD COLUMN sport INTEGER",
    ],
    # v1/v2 had placeholder tables for LLM calls and policy decisions, events that do not exist
    # yet; whatever was spread into them is also in `events` (as JSON), so nothing is lost.
    2: [
        "DROP TABLE IF EXISTS llm_calls",
        "DROP TABLE IF EXISTS policy_decisions",
    ],
    # v4 adds llm_calls and mcp_messages (from _SCHEMA); rows for the calls and messages already
    # in `events` are spread into them after the migrations (_backfill), so nothing is lost.
    # ... and the flows table gains who is behind each flow (process lineage, agent, container).
    3: [f"ALTER TABLE flows ADD COLUMN {c}" for c in (
        "ancestry TEXT", "agent TEXT", "agent_pid INTEGER", "agent_evidence TEXT", "container_id TEXT",
        "container_runtime TEXT", "pod_uid TEXT")],
    # v5: the pod's QoS class and the process's start time, on every table with the flow identity.
    # A v3 store has no llm_calls/mcp_messages yet: _SCHEMA creates them whole (_run_migration).
    4: [f"ALTER TABLE {t} ADD COLUMN {c}" for t in ("flows", "llm_calls", "mcp_messages")
        for c in ("pod_qos TEXT", "proc_start_time REAL")],
    # v6 adds flow_summaries (from _SCHEMA): busy-host mode's FlowSummary events.
    5: [],
    # v7: what each call's time to first token ends at ("socket" or "read"; NULL in older rows).
    6: ["ALTER TABLE llm_calls ADD COLUMN ttft_source TEXT"],
    # v8: the provider's id of each answer (OTel gen_ai.response.id; NULL in older rows).
    7: ["ALTER TABLE llm_calls ADD COLUMN response_id TEXT"],
}
_ALTER = re.compile(r"ALTER TABLE (\w+) ADD COLUMN")


def _run_migration(db: sqlite3.Connection, stmt: str) -> None:
    """One migration statement; a column added to a table this store does not have yet is skipped
    (_SCHEMA, which runs after the migrations, creates that table with every column)."""
    m = _ALTER.match(stmt)
    if m and not _one(db, "SELECT count(*) FROM sqlite_master WHERE type='table' AND name=?", m[1]):
        return
    db.execute(stmt)


def _one(db: sqlite3.Connection, sql: str, *args: Any) -> Any:
    """The first column of the first row, with the statement run to its end (a half-read statement
    keeps a read transaction open on the connection)."""
    rows = db.execute(sql, args).fetchall()
    return rows[0][0] if rows else None


def _used_bytes(db: sqlite3.Connection) -> int:
    """Bytes of the database that hold data (pages in use, not free pages)."""
    pages: int = _one(db, "PRAGMA page_count")
    free: int = _one(db, "PRAGMA freelist_count")
    size: int = _one(db, "PRAGMA page_size")
    return (pages - free) * size
