"""The lab's fake provider answers (busted/lab/llm_answers.py): every shape parsed back, exact usage."""

import base64
import gzip
import json
import struct

import pytest

from busted.lab.llm_answers import (
    DEFAULT_OUTPUT_TOKENS,
    MAX_OUTPUT_TOKENS,
    RATE_LIMIT_MODEL,
    LabRequest,
    answer,
    input_tokens,
    output_tokens,
)

NOW = 1_700_000_000
TEXT8 = "Hello from the busted lab fake provider answer"


def post(target: str, body: object, *headers: tuple[str, str]) -> tuple[bytes, object]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw, answer(LabRequest("POST", target, tuple(headers), raw), now=NOW)


def sse(body: bytes) -> list[tuple[str | None, str]]:
    """(event, data) per SSE event; accepts LF and CRLF line ends like a real SSE parser."""
    out = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        if not block:
            continue
        event, data = None, []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        out.append((event, "\n".join(data)))
    return out


def hdr(ans, name: str) -> str | None:
    return dict(ans.headers).get(name)


# ------------------------------------------------------------------------------------ usage rule
def test_usage_rule():
    assert input_tokens(b"") == 1 and input_tokens(b"abc") == 1 and input_tokens(b"x" * 41) == 10
    assert output_tokens({}) == DEFAULT_OUTPUT_TOKENS == 8
    assert output_tokens({"max_tokens": 3}) == 3
    assert output_tokens({"max_completion_tokens": 5}) == 5
    assert output_tokens({"max_output_tokens": 1000}) == MAX_OUTPUT_TOKENS
    assert output_tokens({"generationConfig": {"maxOutputTokens": 2}}) == 2
    assert output_tokens({"options": {"num_predict": 4}}) == 4
    assert output_tokens({"max_tokens": True}) == 8 and output_tokens({"max_tokens": 0}) == 8  # not limits


def test_same_request_same_bytes():
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    assert post("/v1/chat/completions", body)[1] == post("/v1/chat/completions", body)[1]


# ------------------------------------------------------------------------------------ OpenAI
def test_chat_completions_json():
    raw, ans = post("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert ans.status == 200 and not ans.streaming and hdr(ans, "content-type") == "application/json"
    j = json.loads(ans.body)
    t = len(raw) // 4
    assert j["object"] == "chat.completion" and j["model"] == "gpt-4o" and j["created"] == NOW
    assert j["choices"][0]["message"] == {"role": "assistant", "content": TEXT8, "refusal": None}
    assert j["usage"]["prompt_tokens"] == t and j["usage"]["completion_tokens"] == 8
    assert j["usage"]["total_tokens"] == t + 8


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_completions_sse(include_usage):
    body = {"model": "gpt-4o", "stream": True, "max_tokens": 3}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    raw, ans = post("/v1/chat/completions", body)
    assert ans.streaming and hdr(ans, "content-type").startswith("text/event-stream")
    assert len(ans.chunks) == len(sse(ans.body))  # one event per chunk: sent as a stream
    events = sse(ans.body)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(d for d in deltas if d) == "Hello from the"
    assert sum(1 for d in deltas if d) == 3  # one token a content delta
    if include_usage:
        *rest, last = chunks
        assert last["choices"] == [] and all(c["usage"] is None for c in rest)
        assert (last["usage"]["prompt_tokens"], last["usage"]["completion_tokens"]) == (len(raw) // 4, 3)
        assert last["usage"]["total_tokens"] == len(raw) // 4 + 3
    else:
        assert all("usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_azure_deployment_is_chat_completions():
    raw, ans = post("/openai/deployments/my-dep/chat/completions?api-version=2024-10-21", {"messages": []},
                    ("api-key", "k"))
    j = json.loads(ans.body)
    assert ans.route == "openai.chat" and j["model"] == "my-dep"
    assert j["usage"]["prompt_tokens"] == len(raw) // 4


def test_responses_json_and_sse():
    raw, ans = post("/v1/responses", {"model": "gpt-4.1", "input": "hello", "max_output_tokens": 2})
    j = json.loads(ans.body)
    assert j["object"] == "response" and j["status"] == "completed"
    assert j["output"][0]["content"][0]["text"] == "Hello from"
    assert j["usage"] == {"input_tokens": len(raw) // 4, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": len(raw) // 4 + 2}
    raw, ans = post("/v1/responses", {"model": "gpt-4.1", "input": "hello", "stream": True})
    events = sse(ans.body)
    names = [e for e, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert all(e is not None for e in names) and b"[DONE]" not in ans.body
    datas = [json.loads(d) for _, d in events]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    assert all(d["type"] == e for (e, _), d in zip(events, datas, strict=True))
    assert "".join(d["delta"] for d in datas if d["type"] == "response.output_text.delta") == TEXT8
    usage = datas[-1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (len(raw) // 4, 8)
    assert datas[0]["response"]["usage"] is None and datas[0]["response"]["status"] == "in_progress"


def test_embeddings():
    raw, ans = post("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]})
    j = json.loads(ans.body)
    assert [d["index"] for d in j["data"]] == [0, 1] and all(len(d["embedding"]) == 8 for d in j["data"])
    assert j["data"][0]["embedding"] != j["data"][1]["embedding"]
    assert all(-1 <= v <= 1 for d in j["data"] for v in d["embedding"])
    assert j["usage"] == {"prompt_tokens": len(raw) // 4, "total_tokens": len(raw) // 4}
    _, ans = post("/v1/embeddings", {"model": "m", "input": "a", "dimensions": 4, "encoding_format": "base64"})
    (item,) = json.loads(ans.body)["data"]
    floats = struct.unpack("<4f", base64.b64decode(item["embedding"]))
    _, plain = post("/v1/embeddings", {"model": "m", "input": "a", "dimensions": 4})
    assert floats == pytest.approx(json.loads(plain.body)["data"][0]["embedding"], abs=1e-6)


# ------------------------------------------------------------------------------------ Anthropic
def test_anthropic_json():
    raw, ans = post("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": []}, ("x-api-key", "k"))
    j = json.loads(ans.body)
    assert j["type"] == "message" and j["content"] == [{"type": "text", "text": "Hello from the busted lab"}]
    assert j["usage"] == {"input_tokens": len(raw) // 4, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0, "output_tokens": 5}
    assert hdr(ans, "request-id") and hdr(ans, "x-request-id") is None  # Anthropic's header name


def test_anthropic_sse_with_cache():
    body = {"model": "claude-x", "stream": True, "max_tokens": 4,
            "system": [{"type": "text", "text": "long", "cache_control": {"type": "ephemeral"}}]}
    raw, ans = post("/v1/messages", body)
    t = len(raw) // 4
    events = sse(ans.body)
    names = [e for e, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_delta") == 4 and "ping" in names
    datas = [json.loads(d) for _, d in events]
    assert all(d["type"] == e for (e, _), d in zip(events, datas, strict=True))
    start = datas[0]["message"]["usage"]
    assert start == {"input_tokens": t - t // 2, "cache_creation_input_tokens": 0,
                     "cache_read_input_tokens": t // 2, "output_tokens": 1}
    assert datas[-2]["usage"] == {"output_tokens": 4}  # cumulative, final
    text = "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta")
    assert text == "Hello from the busted"


# ------------------------------------------------------------------------------------ Gemini
def test_gemini_generate_content():
    raw, ans = post("/v1beta/models/gemini-1.5-flash:generateContent",
                    {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 6}})
    j = json.loads(ans.body)
    t = len(raw) // 4
    assert j["usageMetadata"] == {"promptTokenCount": t, "candidatesTokenCount": 6, "totalTokenCount": t + 6}
    assert j["candidates"][0]["finishReason"] == "STOP" and j["modelVersion"] == "gemini-1.5-flash"


def test_gemini_stream_sse_and_json_array():
    target = "/v1beta/models/gemini-pro:streamGenerateContent"
    raw, ans = post(target + "?alt=sse", {"contents": []})
    assert ans.streaming and hdr(ans, "content-type") == "text/event-stream"
    assert b"\r\n\r\n" in ans.body  # Gemini's SSE line ends
    parts = [json.loads(d) for _, d in sse(ans.body)]
    assert len(parts) == 8 and "".join(p["candidates"][0]["content"]["parts"][0]["text"] for p in parts) == TEXT8
    assert parts[-1]["usageMetadata"]["candidatesTokenCount"] == 8
    assert parts[-1]["usageMetadata"]["promptTokenCount"] == len(raw) // 4
    raw2, arr = post(target, {"contents": []})
    assert arr.streaming and arr.body.startswith(b"[") and arr.body.endswith(b"]")
    assert json.loads(arr.body) == parts  # the same objects, as one JSON array


# ------------------------------------------------------------------------------------ Ollama
@pytest.mark.parametrize("path,key", [("/api/chat", "message"), ("/api/generate", "response")])
def test_ollama_ndjson_by_default(path, key):
    raw, ans = post(path, {"model": "llama3", "prompt": "hi", "options": {"num_predict": 3}})
    assert ans.streaming and hdr(ans, "content-type") == "application/x-ndjson"
    lines = [json.loads(x) for x in ans.body.decode().splitlines()]
    assert len(lines) == 4 and [x["done"] for x in lines] == [False, False, False, True]
    pieces = [x[key]["content"] if key == "message" else x[key] for x in lines]
    assert "".join(pieces) == "Hello from the"
    assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (len(raw) // 4, 3)
    raw, one = post(path, {"model": "llama3", "stream": False})
    j = json.loads(one.body)
    assert not one.streaming and j["done"] is True
    assert (j["prompt_eval_count"], j["eval_count"]) == (len(raw) // 4, 8)


def test_ollama_tags_and_default_answer():
    ans = answer(LabRequest("GET", "/api/tags"))
    assert json.loads(ans.body)["models"][0]["name"] == "llama-lab:latest"
    ans = answer(LabRequest("GET", "/plain?x=1", (("host", "h.test"),), b"abc"))
    assert json.loads(ans.body) == {"lab": True, "method": "GET", "path": "/plain?x=1", "host": "h.test",
                                    "received_bytes": 3}


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("target,headers,status,check", [
    ("/v1/chat/completions", [("authorization", "Bearer bad")], 401,
     lambda j: j["error"]["code"] == "invalid_api_key" and j["error"]["type"] == "invalid_request_error"),
    ("/v1/messages", [("x-api-key", "bad")], 401,
     lambda j: j == {"type": "error", "error": {"type": "authentication_error",
                                               "message": "Incorrect API key provided: bad."}}),
    ("/v1beta/models/g:generateContent?key=bad", [], 400, lambda j: j["error"]["status"] == "INVALID_ARGUMENT"),
    ("/openai/deployments/d/chat/completions", [("api-key", "bad")], 401, lambda j: "error" in j),
])
def test_bad_credential(target, headers, status, check):
    _, ans = post(target, {"model": "m"}, *headers)
    assert ans.status == status and check(json.loads(ans.body))


@pytest.mark.parametrize("target,check", [
    ("/v1/chat/completions", lambda j: j["error"]["code"] == "rate_limit_exceeded"),
    ("/v1/messages", lambda j: j["error"]["type"] == "rate_limit_error"),
    ("/v1beta/models/" + RATE_LIMIT_MODEL + ":generateContent", lambda j: j["error"]["status"] == "RESOURCE_EXHAUSTED"),
    ("/api/chat", lambda j: "Rate limit" in j["error"]),
])
def test_rate_limit_model(target, check):
    _, ans = post(target, {"model": RATE_LIMIT_MODEL, "stream": True})
    assert ans.status == 429 and hdr(ans, "retry-after") == "1" and not ans.streaming
    assert check(json.loads(ans.body))


def test_body_not_json_is_400():
    _, ans = post("/v1/chat/completions", b"not json")
    assert ans.status == 400 and "error" in json.loads(ans.body)


# ------------------------------------------------------------------------------------ gzip
def test_gzip_when_accepted():
    body = {"model": "gpt-4o"}
    _, plain = post("/v1/chat/completions", body)
    _, gz = post("/v1/chat/completions", body, ("accept-encoding", "br, gzip, deflate"))
    assert hdr(gz, "content-encoding") == "gzip" and hdr(plain, "content-encoding") is None
    assert gzip.decompress(gz.body) == plain.body
    _, refused = post("/v1/chat/completions", body, ("accept-encoding", "gzip;q=0"))
    assert hdr(refused, "content-encoding") is None
    _, stream = post("/v1/chat/completions", dict(body, stream=True), ("accept-encoding", "gzip"))
    assert hdr(stream, "content-encoding") is None  # SSE goes uncompressed, event by event
