"""MCP over HTTP: Streamable HTTP and the 2024-11-05 HTTP+SSE transport, recognised by shape."""

from __future__ import annotations

import dataclasses

import needs
from test_classify_llm_bodies import (
    JSON,
    MCP_CALL,
    MCP_CALL_SSE,
    MCP_ERROR,
    MCP_INIT,
    MCP_INIT_RESULT,
    MCP_INITIALIZED,
    SSE,
    STEP,
    T0,
    events,
    j,
    run,
)

from busted.classify.mcp import CLIENT_TO_SERVER, SERVER_TO_CLIENT, McpMessageInfo

SID = "1868a90c-5f2e-4c5b-9d1a-6e2d1c1b2a3f"


def rows(out):
    assert all(isinstance(m, McpMessageInfo) for m in out)
    return [(m.direction, m.kind, m.method, m.id, m.is_notification, m.session_id, m.tool_name, m.error_code,
             m.transport) for m in out]


def test_streamable_http_session():
    evs = (events("POST", "/mcp", MCP_INIT, 200, JSON + (("mcp-session-id", SID),), [MCP_INIT_RESULT],
                  authority="127.0.0.1:8931")
           + events("POST", "/mcp", MCP_INITIALIZED, 202, (), [], req_headers=[("mcp-session-id", SID)],
                    t0=T0 + 10**6)
           + events("POST", "/mcp", MCP_CALL, 200, SSE, [MCP_CALL_SSE[:50], MCP_CALL_SSE[50:]],
                    req_headers=[("mcp-session-id", SID)], t0=T0 + 2 * 10**6)
           + events("POST", "/mcp", j({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                       "params": {"name": "invalid_tool_name", "arguments": {}}}),
                    200, JSON, [MCP_ERROR], req_headers=[("mcp-session-id", SID)], t0=T0 + 3 * 10**6))
    out, t = run(evs)
    assert rows(out) == [
        (CLIENT_TO_SERVER, "request", "initialize", 1, False, None, None, None, "streamable_http"),
        (SERVER_TO_CLIENT, "response", "initialize", 1, False, SID, None, None, "streamable_http"),
        (CLIENT_TO_SERVER, "notification", "notifications/initialized", None, True, SID, None, None,
         "streamable_http"),
        (CLIENT_TO_SERVER, "request", "tools/call", 2, False, SID, "get_weather", None, "streamable_http"),
        (SERVER_TO_CLIENT, "notification", "notifications/progress", None, True, SID, None, None, "streamable_http"),
        (SERVER_TO_CLIENT, "response", "tools/call", 2, False, SID, "get_weather", None, "streamable_http"),
        (CLIENT_TO_SERVER, "request", "tools/call", 3, False, SID, "invalid_tool_name", None, "streamable_http"),
        (SERVER_TO_CLIENT, "error", "tools/call", 3, False, SID, "invalid_tool_name", -32602, "streamable_http"),
    ]
    assert out[0].authority == "127.0.0.1:8931" and out[0].path == "/mcp" and out[0].ts_ns == T0 + 2
    assert out[1].ts_ns == T0 + STEP  # first body byte of the JSON answer
    assert t.stats["calls"] == 0 and t.stats["mcp_messages"] == 8


def test_sse_messages_come_out_as_they_arrive():
    cut = MCP_CALL_SSE.index(b"\n\n") + 2  # right after the first event
    evs = events("POST", "/mcp", MCP_CALL, 200, SSE, [MCP_CALL_SSE[:cut], MCP_CALL_SSE[cut:]], end=False)
    out, _ = run(evs)
    assert [m.kind for m in out] == ["request", "notification", "response"]
    assert [m.ts_ns for m in out] == [T0 + 2, T0 + STEP, T0 + 2 * STEP]


def test_legacy_http_sse_transport():
    stream = (b"event: endpoint\ndata: /messages/?session_id=0b4e5d2c9a\n\n"
              b"event: message\ndata: " + MCP_INIT_RESULT + b"\n\n"
              b": keep-alive\n\n"
              b"event: message\ndata: " + j({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}) + b"\n\n")
    get = events("GET", "/sse", b"", 200, SSE, [stream], req_headers=[("accept", "text/event-stream")], end=False)
    out, t = run(get)
    assert rows(out) == [
        (SERVER_TO_CLIENT, "response", None, 1, False, "0b4e5d2c9a", None, None, "sse"),
        (SERVER_TO_CLIENT, "notification", "notifications/tools/list_changed", None, True, "0b4e5d2c9a", None, None,
         "sse"),
    ]
    # the POST to the endpoint: answered 202, the answer arrives on the GET stream
    post = events("POST", "/messages/?session_id=0b4e5d2c9a", MCP_CALL, 202, (), [b"Accepted"], t0=T0 + 10**6)
    out2, _ = run(post)
    assert rows(out2) == [(CLIENT_TO_SERVER, "request", "tools/call", 2, False, "0b4e5d2c9a", "get_weather", None,
                           "sse")]


def test_batch_and_non_jsonrpc():
    batch = j([{"jsonrpc": "2.0", "id": "a", "method": "ping"},
               {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "x"}},
               {"not": "rpc"}])
    out, _ = run(events("POST", "/rpc", batch, 200, JSON, [j([{"jsonrpc": "2.0", "id": "a", "result": {}}])]))
    assert [(m.kind, m.method, m.id) for m in out] == [("request", "ping", "a"),
                                                       ("notification", "notifications/cancelled", None),
                                                       ("response", "ping", "a")]
    out, _ = run(events("POST", "/rpc", j({"jsonrpc": "1.0", "method": "x"}), 200, JSON, [b"{}"]))
    assert out == []


def test_plain_sse_stream_that_is_not_mcp():
    body = b"event: update\ndata: {\"price\": 3}\n\ndata: hello\n\n"
    out, t = run(events("GET", "/ticker", b"", 200, SSE, [body]))
    assert out == [] and t.stats["internal_errors"] == 0


def test_record_fields():
    out, _ = run(events("POST", "/mcp?token=s3cr3t", MCP_CALL, 202, (), []))
    (m,) = out
    assert dataclasses.asdict(m) == dict(
        ts_ns=T0 + 2, stream=0, direction=CLIENT_TO_SERVER, kind="request", method="tools/call", id=2,
        is_notification=False, session_id=None, tool_name="get_weather", error_code=None,
        transport="streamable_http", authority="api.example.test", path="/mcp?token=[REDACTED]")


def test_fixtures_and_sdk_built_messages_are_valid_mcp():
    """The official SDK's types accept our fixtures, and messages it builds are recognised."""

    types = needs.module("mcp.types")
    pydantic = needs.module("pydantic")
    ta = pydantic.TypeAdapter(types.JSONRPCMessage)
    got = [type(ta.validate_json(b)).__name__ for b in (MCP_INIT, MCP_INIT_RESULT, MCP_INITIALIZED, MCP_CALL,
                                                         MCP_ERROR)]
    assert got == ["JSONRPCRequest", "JSONRPCResponse", "JSONRPCNotification", "JSONRPCRequest", "JSONRPCError"]
    for line in MCP_CALL_SSE.split(b"\n"):
        if line.startswith(b"data: "):
            ta.validate_json(line[6:])
    req = types.CallToolRequest(method="tools/call",
                                params=types.CallToolRequestParams(name="search_docs", arguments={"q": "x"}))
    body = types.JSONRPCRequest(jsonrpc="2.0", id=9, **req.model_dump(by_alias=True, exclude_none=True, mode="json"))
    res = types.CallToolResult(content=[types.TextContent(type="text", text="ok")], isError=False)
    answer = types.JSONRPCResponse(jsonrpc="2.0", id=9, result=res.model_dump(by_alias=True, exclude_none=True,
                                                                              mode="json"))
    out, _ = run(events("POST", "/mcp", body.model_dump_json(by_alias=True, exclude_none=True).encode(), 200, JSON,
                        [answer.model_dump_json(by_alias=True, exclude_none=True).encode()]))
    assert rows(out) == [
        (CLIENT_TO_SERVER, "request", "tools/call", 9, False, None, "search_docs", None, "streamable_http"),
        (SERVER_TO_CLIENT, "response", "tools/call", 9, False, None, "search_docs", None, "streamable_http"),
    ]
