"""Fuzzing: malformed JSON, SSE, NDJSON, event-stream and odd event orders never raise or leak state."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_classify_llm import STREAMS
from test_classify_llm_bodies import (
    ANTH_REQ,
    ANTH_RESP,
    BEDROCK_CONVERSE_REQ,
    BEDROCK_CONVERSE_RESP,
    GEMINI_REQ,
    GEMINI_RESP,
    JSON,
    MCP_CALL,
    MCP_CALL_SSE,
    OPENAI_CHAT_REQ,
    OPENAI_CHAT_RESP,
    RESPONSES_REQ,
    RESPONSES_RESP,
    SSE,
    events,
)

from busted.classify import llm_shapes as shapes
from busted.classify.httpevents import (
    HttpProtocolError,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
)
from busted.classify.llm import CallTracker, LlmCallInfo

CASES = [(p, r, h, b"".join(c)) for p, r, h, c in STREAMS.values()] + [
    ("/v1/chat/completions", OPENAI_CHAT_REQ, JSON, OPENAI_CHAT_RESP),
    ("/v1/responses", RESPONSES_REQ, JSON, RESPONSES_RESP),
    ("/v1/messages", ANTH_REQ, JSON, ANTH_RESP),
    ("/v1beta/models/g:generateContent", GEMINI_REQ, JSON, GEMINI_RESP),
    ("/model/m/converse", BEDROCK_CONVERSE_REQ, JSON, BEDROCK_CONVERSE_RESP),
    ("/mcp", MCP_CALL, SSE, MCP_CALL_SSE),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(
        st.sampled_from(["type", "usage", "choices", "delta", "message", "content", "model", "index", "tool_calls",
                         "finish_reason", "input_tokens", "output_tokens", "usageMetadata", "candidates", "parts",
                         "response", "error", "done", "prompt_eval_count", "output", "bytes", "stopReason",
                         "jsonrpc", "id", "method", "params", "name", "x"]), kids, max_size=6),
    max_leaves=30)


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for op, pos, val in edits:
        if not b:
            b.append(val)
            continue
        i = pos % len(b)
        if op == 0:
            b[i] = val
        elif op == 1:
            b.insert(i, val)
        else:
            del b[i : i + 1 + val % 8]
    return bytes(b)


def check_tracker(evs, close=True):
    t = CallTracker(capture_content=64, request_body_cap=4096, response_body_cap=4096, stream_event_cap=2048)
    out = []
    for e in evs:
        out += t.feed(e)
    if close:
        out += t.close(10**12)
    assert t.stats["internal_errors"] == 0, t.stats
    for r in out:
        if isinstance(r, LlmCallInfo):
            for f in ("input_tokens", "output_tokens", "total_tokens", "tool_calls"):
                v = getattr(r, f)
                assert v is None or (isinstance(v, int) and v >= 0)
    if close:
        assert t._open == 0 and not t._streams
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(CASES))),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       st.lists(st.integers(0, 4000), max_size=6), st.booleans())
def test_mutated_bodies_never_raise(case, edits, req_edits, cuts, complete):
    path, req, hdrs, body = CASES[case]
    body = mutate(body, edits)
    req = mutate(req, req_edits)
    cuts = sorted(c for c in cuts if c <= len(body))
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    check_tracker(events("POST", path, req, 200, hdrs, parts, complete=complete))


def _event(kind, stream, data, status):
    return [
        RequestHead(stream, 1, "POST" if status % 2 else "GET", "/v1/chat/completions", "h", (), "2"),
        RequestData(stream, 2, data),
        RequestEnd(stream, 3, len(data)),
        ResponseHead(stream, 4, status, (("content-type", ["text/event-stream", "application/json",
                                                           "application/x-ndjson",
                                                           "application/vnd.amazon.eventstream"][status % 4]),), "2"),
        ResponseData(stream, 5, data),
        ResponseEnd(stream, 6, len(data), bool(status % 3)),
        HttpProtocolError(stream, 7, "x"),
    ][kind]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.binary(max_size=200),
                          st.integers(100, 599)), max_size=40), st.booleans())
def test_any_event_order_never_raises(seq, close):
    check_tracker([_event(k, s, d, st_) for k, s, d, st_ in seq], close=close)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(sorted(shapes.HANDLERS)), json_values,
       st.sampled_from([None, "", "chunk", "metadata", "messageStop", "contentBlockStart", "contentBlockDelta"]))
def test_handlers_accept_any_json(api, obj, event):
    u = shapes.Usage(text_limit=16)
    shapes.handle(api, u, obj, 1, event)
    assert u.input_total() is None or u.input_total() >= 0
    shapes.prompt_text(obj, 100)
    shapes.recognise("POST", "/v1/chat/completions", "", obj)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_regex_fallbacks_never_raise(head, tail):
    for api in shapes.HANDLERS:
        shapes.handle(api, shapes.Usage(), shapes.regex_usage(api, head, tail), 1)
    shapes.regex_request(head)


@settings(max_examples=400, deadline=None)
@given(st.lists(json_values, max_size=6), st.sampled_from([None, 0, 2]), st.lists(st.integers(0, 3000), max_size=8))
def test_json_array_splitter_matches_json_loads(values, indent, cuts):
    import json

    from busted.classify.llm import _JsonValues

    doc = json.dumps(values, indent=indent).encode()
    cuts = sorted(c for c in cuts if c <= len(doc))
    sp = _JsonValues(1 << 20)
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(doc)], strict=True):
        got += [json.loads(e) for e in sp.feed(doc[a:b])]
    assert json.dumps(got) == json.dumps(values)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["openai.chat", "openai.responses", "anthropic.messages", "gemini.generate_content",
                        "bedrock.invoke"]),
       st.one_of(st.text(max_size=200), st.binary(max_size=60).map(lambda b: b.decode("latin-1")), json_values))
def test_any_response_id_is_kept_only_as_a_bounded_plain_token(api, rid):
    """Whatever a server puts where the answer's id goes, what is kept is None or a plain token of at
    most 128 characters (nothing a terminal interprets), the server's own string."""
    import re

    objs = {"openai.chat": {"id": rid, "choices": []}, "openai.responses": {"id": rid, "output": []},
            "anthropic.messages": {"type": "message", "id": rid}, "gemini.generate_content": {"responseId": rid},
            "bedrock.invoke": {"type": "message_start", "message": {"id": rid}}}
    u = shapes.Usage()
    shapes.handle(api, u, objs[api], 1)
    assert u.response_id is None or (u.response_id == rid and re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", rid))
