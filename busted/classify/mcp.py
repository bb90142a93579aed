"""Model Context Protocol messages read from HTTP, recognised by shape (``"jsonrpc": "2.0"``).

Two transports (MCP spec, "Transports"):

* Streamable HTTP (2025-03-26 and later): the client POSTs one JSON-RPC message (or a batch) to
  the MCP endpoint, any path; the server answers ``application/json`` or a ``text/event-stream``
  of JSON-RPC messages, or 202 for notifications/responses. A GET with ``Accept:
  text/event-stream`` opens a server->client stream. The session is the ``Mcp-Session-Id``
  header (set by the server on the initialize answer, echoed by the client after).
* HTTP+SSE (2024-11-05): the client GETs an SSE stream whose first event is ``endpoint`` (data:
  the URI to POST to, usually carrying ``?sessionId=``); server messages arrive as ``message``
  events on that stream, POSTs are answered 202.

This module only turns one decoded JSON value into ``McpMessageInfo`` records; the HTTP side
(which body, which direction, which session) is ``busted.classify.llm.CallTracker``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CLIENT_TO_SERVER", "McpMessageInfo", "SERVER_TO_CLIENT", "is_jsonrpc", "mcp_messages"]

CLIENT_TO_SERVER = "client->server"
SERVER_TO_CLIENT = "server->client"
_MAX_BATCH = 256  # messages taken from one JSON-RPC batch (the rest counted by the caller)
_MAX_STR = 256  # method / tool names / ids are cut to this many characters


@dataclass(frozen=True, slots=True)
class McpMessageInfo:
    ts_ns: int  # when the message's bytes were seen (request end, or the SSE event's chunk)
    stream: int  # HTTP/2 stream id, 0 for HTTP/1.1
    direction: str  # CLIENT_TO_SERVER or SERVER_TO_CLIENT
    kind: str  # "request", "notification", "response" or "error"
    method: str | None  # JSON-RPC method; for responses, the method of the matching request if seen
    id: str | int | None  # JSON-RPC id (None for notifications)
    is_notification: bool
    session_id: str | None  # Mcp-Session-Id header, or the legacy endpoint's sessionId
    tool_name: str | None  # params.name of tools/call (also for its response, when matched)
    error_code: int | None  # error.code of an error response
    transport: str  # "streamable_http" or "sse" (the 2024-11-05 HTTP+SSE transport)
    authority: str | None
    path: str  # request path, credentials in the query masked


def is_jsonrpc(obj: Any) -> bool:
    """A JSON-RPC 2.0 message, or a non-empty batch whose first element is one."""
    if isinstance(obj, list):
        return bool(obj) and isinstance(obj[0], dict) and obj[0].get("jsonrpc") == "2.0"
    return isinstance(obj, dict) and obj.get("jsonrpc") == "2.0"


def _short(v: Any) -> str | None:
    return v[:_MAX_STR] if isinstance(v, str) else None


def _id(v: Any) -> str | int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    return _short(v)


def mcp_messages(
    obj: Any,
    *,
    ts_ns: int,
    stream: int,
    direction: str,
    session_id: str | None,
    transport: str,
    authority: str | None,
    path: str,
    pending: dict[tuple[str, str | int], tuple[str | None, str | None]],
) -> list[McpMessageInfo]:
    """Records for each JSON-RPC message in ``obj`` (a message or a batch); others are skipped.

    ``pending`` maps (direction of the request, id) to (method, tool name) so a response names
    what it answers; the caller bounds it.
    """
    items = obj[:_MAX_BATCH] if isinstance(obj, list) else [obj]
    out: list[McpMessageInfo] = []
    for m in items:
        if not isinstance(m, dict) or m.get("jsonrpc") != "2.0":
            continue
        mid = _id(m.get("id"))
        method = _short(m.get("method"))
        tool: str | None = None
        error_code: int | None = None
        if method is not None:
            notification = "id" not in m
            kind = "notification" if notification else "request"
            params = m.get("params")
            if method == "tools/call" and isinstance(params, dict):
                tool = _short(params.get("name"))
            if not notification and mid is not None:
                pending[(direction, mid)] = (method, tool)
        else:
            notification = False
            err = m.get("error")
            if isinstance(err, dict):
                kind = "error"
                code = err.get("code")
                error_code = code if isinstance(code, int) and not isinstance(code, bool) else None
            elif "result" in m:
                kind = "response"
            else:
                continue
            other = SERVER_TO_CLIENT if direction == CLIENT_TO_SERVER else CLIENT_TO_SERVER
            if mid is not None:
                method, tool = pending.pop((other, mid), (None, None))
        out.append(McpMessageInfo(
            ts_ns=ts_ns, stream=stream, direction=direction, kind=kind, method=method, id=mid,
            is_notification=notification, session_id=session_id, tool_name=tool, error_code=error_code,
            transport=transport, authority=authority, path=path,
        ))
    return out
