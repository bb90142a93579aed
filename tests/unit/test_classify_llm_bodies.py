"""Realistic request/response bodies of each LLM API shape, and a helper that turns an exchange into
HTTP events (independent of busted.classify.http). Written from the providers' public API references.
"""

from __future__ import annotations

import base64
import json

from busted.classify.eventstream import encode_message
from busted.classify.httpevents import RequestData, RequestEnd, RequestHead, ResponseData, ResponseEnd, ResponseHead
from busted.classify.llm import CallTracker

T0 = 1_000_000
STEP = 1000  # response chunk i arrives at T0 + STEP * (i + 1)


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def sse(*events, done: bool = False, named: bool = False) -> bytes:
    """SSE body; with named=True each event carries `event: <type>` (Anthropic, OpenAI Responses)."""
    out = []
    for e in events:
        head = f"event: {e['type']}\n" if named else ""
        out.append(f"{head}data: {json.dumps(e)}\n\n")
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def events(method, path, body, status, resp_headers, chunks, *, stream=0, authority="api.example.test",
           req_headers=(), complete=True, version="1.1", t0=T0, end=True):
    evs = [RequestHead(stream, t0, method, path, authority, tuple(req_headers), version)]
    if body:
        evs.append(RequestData(stream, t0 + 1, body))
    evs.append(RequestEnd(stream, t0 + 2, len(body)))
    evs.append(ResponseHead(stream, t0 + 100, status, tuple(resp_headers), version))
    for i, c in enumerate(chunks):
        evs.append(ResponseData(stream, t0 + STEP * (i + 1), c))
    if end:
        evs.append(ResponseEnd(stream, t0 + STEP * (len(chunks) + 1), sum(map(len, chunks)), complete))
    return evs


def run(evs, close_ts=None, **kw):
    t = CallTracker(**kw)
    out = []
    for e in evs:
        out += t.feed(e)
    if close_ts is not None:
        out += t.close(close_ts)
    assert t.stats["internal_errors"] == 0
    return out, t


JSON = (("content-type", "application/json"),)
SSE = (("content-type", "text/event-stream; charset=utf-8"),)
NDJSON = (("content-type", "application/x-ndjson"),)
EVENTSTREAM = (("content-type", "application/vnd.amazon.eventstream"),)

# --- OpenAI Chat Completions -------------------------------------------------------------------

OPENAI_CHAT_REQ = j({"model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Weather in Paris?"}],
                     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]})
OPENAI_CHAT_RESP = j({
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion", "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_def", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}},
    ], "refusal": None}, "logprobs": None, "finish_reason": "tool_calls"}],
    "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
              "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "service_tier": "default", "system_fingerprint": "fp_fc9f1d7035"})

OPENAI_CHAT_STREAM_REQ = j({"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "Say hi"}]})


def _chunk(delta, finish=None, usage=None, choices=True, model="gpt-4o-mini-2024-07-18"):
    c = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": model,
         "system_fingerprint": "fp_44709d6fcb",
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
    c["usage"] = usage
    return c


OPENAI_CHAT_STREAM_RESP = [
    sse(_chunk({"role": "assistant", "content": ""})),
    sse(_chunk({"content": "Hi"})),
    sse(_chunk({"content": " there"})),
    sse(_chunk({}, finish="stop")),
    sse(_chunk(None, choices=False, usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
                                           "prompt_tokens_details": {"cached_tokens": 0},
                                           "completion_tokens_details": {"reasoning_tokens": 0}}), done=True),
]

OPENAI_CHAT_TOOLS_STREAM = [
    sse(_chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]})),
    sse(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]})),
    sse(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})),
    sse(_chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                "function": {"name": "g", "arguments": "{}"}}]})),
    sse(_chunk({}, finish="tool_calls"), done=True),
]

# llama.cpp: the usage chunk still carries a choice (empty delta) and a timings block.
LLAMACPP_STREAM = [
    sse(_chunk({"content": "Hello"}, model="qwen2.5-7b-instruct-q4_k_m.gguf")),
    sse({**_chunk({}, finish="stop", model="qwen2.5-7b-instruct-q4_k_m.gguf"),
         "usage": {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7},
         "timings": {"prompt_n": 5, "predicted_n": 2}}, done=True),
]

# --- OpenAI Responses --------------------------------------------------------------------------

RESPONSES_REQ = j({"model": "gpt-5", "input": "Write a haiku", "reasoning": {"effort": "low"}})
_RESP_OBJ = {
    "id": "resp_67ccd2bed1ec8190", "object": "response", "created_at": 1741476542, "status": "completed",
    "error": None, "incomplete_details": None, "model": "gpt-5-2025-08-07",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Silent pond...", "annotations": []}]},
    ],
    "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 87,
              "output_tokens_details": {"reasoning_tokens": 64}, "total_tokens": 123},
}
RESPONSES_RESP = j(_RESP_OBJ)
_inprog = {**_RESP_OBJ, "status": "in_progress", "output": [], "usage": None}
RESPONSES_STREAM = [
    sse({"type": "response.created", "sequence_number": 0, "response": _inprog}, named=True),
    sse({"type": "response.in_progress", "sequence_number": 1, "response": _inprog}, named=True),
    sse({"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
         "item": {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}},
        named=True),
    sse({"type": "response.output_text.delta", "sequence_number": 3, "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": "Silent"}, named=True),
    sse({"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": " pond"}, named=True),
    sse({"type": "response.completed", "sequence_number": 5, "response": _RESP_OBJ}, named=True),
]

# --- embeddings / legacy completions -----------------------------------------------------------

EMB_REQ = j({"model": "text-embedding-3-small", "input": ["a", "b"], "encoding_format": "float"})
EMB_RESP = j({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]},
                                         {"object": "embedding", "index": 1, "embedding": [0.1, 0.2]}],
              "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}})
COMPL_REQ = j({"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7})
COMPL_RESP = j({"id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7", "object": "text_completion", "created": 1589478378,
                "model": "gpt-3.5-turbo-instruct",
                "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None,
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})

# --- Anthropic Messages ------------------------------------------------------------------------

ANTH_REQ = j({"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": "You are terse.",
              "messages": [{"role": "user", "content": "Hello, Claude"}]})
ANTH_RESP = j({"id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
               "model": "claude-sonnet-4-5-20250929",
               "content": [{"type": "text", "text": "Hi! Checking."},
                           {"type": "tool_use", "id": "toolu_01", "name": "get_time", "input": {}}],
               "stop_reason": "tool_use", "stop_sequence": None,
               "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000,
                         "output_tokens": 25, "service_tier": "standard"}})
ANTH_STREAM_REQ = j({"model": "claude-3-7-sonnet-latest", "max_tokens": 256, "stream": True,
                     "messages": [{"role": "user", "content": "Hello"}]})
ANTH_STREAM = [
    sse({"type": "message_start", "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [],
        "model": "claude-3-7-sonnet-20250219", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 472, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1500,
                  "output_tokens": 2}}}, named=True),
    b"event: ping\ndata: {\"type\": \"ping\"}\n\n",
    sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, named=True),
    sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}}, named=True),
    sse({"type": "content_block_stop", "index": 0}, named=True),
    sse({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_01T1",
                                                                       "name": "get_weather", "input": {}}},
        named=True),
    sse({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        named=True),
    sse({"type": "content_block_stop", "index": 1}, named=True),
    # Two message_delta events (server tools can cause several): output_tokens is cumulative.
    sse({"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
         "usage": {"output_tokens": 40}}, named=True),
    sse({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 89}}, named=True),
    sse({"type": "message_stop"}, named=True),
]
ANTH_OVERLOADED = [
    sse({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                              "model": "claude-3-7-sonnet-20250219",
                                              "usage": {"input_tokens": 10, "output_tokens": 1}}}, named=True),
    sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, named=True),
]
ANTH_429 = j({"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens..."}})

# --- Gemini ------------------------------------------------------------------------------------

GEMINI_REQ = j({"contents": [{"role": "user", "parts": [{"text": "Explain AI"}]}],
                "generationConfig": {"thinkingConfig": {"thinkingBudget": 1024}}})


def gemini_obj(text, usage=None, finish=None, fc=False):
    parts = [{"functionCall": {"name": "f", "args": {}}}] if fc else [{"text": text}]
    cand = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    o = {"candidates": [cand], "modelVersion": "gemini-2.5-flash", "responseId": "mAitaLmkHPPlz7IPvtfUqQ4"}
    if usage:
        o["usageMetadata"] = usage
    return o


GEMINI_USAGE = {"promptTokenCount": 1200, "candidatesTokenCount": 50, "totalTokenCount": 1350,
                "cachedContentTokenCount": 1024, "thoughtsTokenCount": 100,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}]}
GEMINI_RESP = j(gemini_obj("AI is...", GEMINI_USAGE, "STOP"))
_g1 = gemini_obj("AI", {"promptTokenCount": 1200, "totalTokenCount": 1200})
_g2 = gemini_obj(" is", {"promptTokenCount": 1200, "candidatesTokenCount": 20, "totalTokenCount": 1320,
                         "thoughtsTokenCount": 100, "cachedContentTokenCount": 1024})
_g3 = gemini_obj(" neat.", GEMINI_USAGE, "STOP")
GEMINI_SSE = [f"data: {json.dumps(o)}\r\n\r\n".encode() for o in (_g1, _g2, _g3)]
# Without alt=sse: one JSON array, elements streamed as they are generated.
_arr = ("[" + json.dumps(_g1, indent=2) + "\r\n,\r\n" + json.dumps(_g2) + ",\n" + json.dumps(_g3) + "]").encode()
GEMINI_ARRAY = [_arr[:37], _arr[37:400], _arr[400:]]
GEMINI_429 = j({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
                          "status": "RESOURCE_EXHAUSTED"}})

# --- Ollama ------------------------------------------------------------------------------------

OLLAMA_CHAT_REQ = j({"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue?"}]})
OLLAMA_CHAT_STREAM = [
    j({"model": "llama3.2", "created_at": "2023-08-04T08:52:19.385406455-07:00",
       "message": {"role": "assistant", "content": "The"}, "done": False}) + b"\n",
    j({"model": "llama3.2", "created_at": "2023-08-04T08:52:19.4Z",
       "message": {"role": "assistant", "content": " sky"}, "done": False}) + b"\n",
    j({"model": "llama3.2", "created_at": "2023-08-04T19:22:45.499127Z",
       "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
       "total_duration": 4883583458, "load_duration": 1334875, "prompt_eval_count": 26,
       "prompt_eval_duration": 342546000, "eval_count": 282, "eval_duration": 4535599000}) + b"\n",
]
OLLAMA_GEN_REQ = j({"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False})
OLLAMA_GEN_RESP = j({"model": "llama3.2", "created_at": "2023-08-04T19:22:45.499127Z",
                     "response": "The sky is blue because...", "done": True, "done_reason": "stop",
                     "context": [1, 2, 3], "total_duration": 5043500667, "prompt_eval_count": 26,
                     "eval_count": 290})

# --- Bedrock -----------------------------------------------------------------------------------

BEDROCK_CONVERSE_REQ = j({"messages": [{"role": "user", "content": [{"text": "Hello"}]}],
                          "inferenceConfig": {"maxTokens": 512}})
BEDROCK_CONVERSE_RESP = j({"output": {"message": {"role": "assistant", "content": [
    {"text": "Let me check."}, {"toolUse": {"toolUseId": "t1", "name": "top_song", "input": {"sign": "WZPZ"}}}]}},
    "stopReason": "tool_use",
    "usage": {"inputTokens": 30, "outputTokens": 38, "totalTokens": 1668, "cacheReadInputTokens": 1600,
              "cacheWriteInputTokens": 0},
    "metrics": {"latencyMs": 302}})


def es(event_type, payload, mtype="event"):
    return encode_message({":event-type": event_type, ":content-type": "application/json",
                           ":message-type": mtype}, j(payload))


BEDROCK_CONVERSE_STREAM = [
    es("messageStart", {"role": "assistant", "p": "abcd"}),
    es("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}, "p": "ab"}),
    es("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo"}, "p": "ab"}),
    es("contentBlockStop", {"contentBlockIndex": 0, "p": "ab"}),
    es("messageStop", {"stopReason": "end_turn", "p": "ab"}),
    es("metadata", {"usage": {"inputTokens": 4, "outputTokens": 38, "totalTokens": 42},
                    "metrics": {"latencyMs": 302}, "p": "ab"}),
]


def chunk(obj):
    return es("chunk", {"bytes": base64.b64encode(j(obj)).decode(), "p": "abcdef"})


BEDROCK_INVOKE_REQ = j({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 200,
                        "messages": [{"role": "user", "content": "hi"}]})
BEDROCK_INVOKE_STREAM = [
    chunk({"type": "message_start", "message": {"id": "msg_bdrk_01", "type": "message", "role": "assistant",
                                                "model": "claude-3-5-sonnet-20241022", "content": [],
                                                "usage": {"input_tokens": 14, "output_tokens": 1}}}),
    chunk({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
    chunk({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
    chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": 14, "outputTokenCount": 9, "invocationLatency": 500, "firstByteLatency": 300}}),
]
BEDROCK_THROTTLED = [
    es("messageStart", {"role": "assistant"}),
    encode_message({":message-type": "exception", ":exception-type": "throttlingException",
                    ":content-type": "application/json"}, j({"message": "Too many requests"})),
]

# --- MCP ---------------------------------------------------------------------------------------

MCP_INIT = j({"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "example-client", "version": "1.0.0"}}})
MCP_INIT_RESULT = j({"jsonrpc": "2.0", "id": 1, "result": {"protocolVersion": "2025-06-18",
                                                           "capabilities": {"tools": {"listChanged": True}},
                                                           "serverInfo": {"name": "srv", "version": "0.1"}}})
MCP_INITIALIZED = j({"jsonrpc": "2.0", "method": "notifications/initialized"})
MCP_CALL = j({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "get_weather", "arguments": {"location": "New York"}}})
MCP_CALL_SSE = (
    b"event: message\ndata: " + j({"jsonrpc": "2.0", "method": "notifications/progress",
                                   "params": {"progressToken": 2, "progress": 0.5}}) + b"\n\n"
    b"id: 7\nevent: message\ndata: " + j({"jsonrpc": "2.0", "id": 2, "result": {
        "content": [{"type": "text", "text": "72F"}], "isError": False}}) + b"\n\n")
MCP_ERROR = j({"jsonrpc": "2.0", "id": 3, "error": {"code": -32602, "message": "Unknown tool: invalid_tool_name"}})


def test_helper_builds_ordered_events():
    evs = events("POST", "/v1/x", b"{}", 200, JSON, [b"a", b"bc"])
    assert [type(e).__name__ for e in evs] == ["RequestHead", "RequestData", "RequestEnd", "ResponseHead",
                                               "ResponseData", "ResponseData", "ResponseEnd"]
    assert evs[-1].body_bytes == 3 and evs[-1].ts_ns == T0 + 3 * STEP


def test_event_stream_frames_round_trip():
    from busted.classify.eventstream import EventStreamDecoder
    frames = b"".join(BEDROCK_CONVERSE_STREAM)
    msgs = EventStreamDecoder().feed(frames)
    assert [m.header(":event-type") for m in msgs] == ["messageStart", "contentBlockDelta", "contentBlockDelta",
                                                       "contentBlockStop", "messageStop", "metadata"]
    assert json.loads(msgs[-1].payload)["usage"]["totalTokens"] == 42
