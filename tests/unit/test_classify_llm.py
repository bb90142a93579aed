"""CallTracker: every API shape, streamed and not, every field of the record asserted."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from test_classify_llm_bodies import (
    ANTH_429,
    ANTH_OVERLOADED,
    ANTH_REQ,
    ANTH_RESP,
    ANTH_STREAM,
    ANTH_STREAM_REQ,
    BEDROCK_CONVERSE_REQ,
    BEDROCK_CONVERSE_RESP,
    BEDROCK_CONVERSE_STREAM,
    BEDROCK_INVOKE_REQ,
    BEDROCK_INVOKE_STREAM,
    BEDROCK_THROTTLED,
    COMPL_REQ,
    COMPL_RESP,
    EMB_REQ,
    EMB_RESP,
    EVENTSTREAM,
    GEMINI_429,
    GEMINI_ARRAY,
    GEMINI_REQ,
    GEMINI_RESP,
    GEMINI_SSE,
    JSON,
    LLAMACPP_STREAM,
    NDJSON,
    OLLAMA_CHAT_REQ,
    OLLAMA_CHAT_STREAM,
    OLLAMA_GEN_REQ,
    OLLAMA_GEN_RESP,
    OPENAI_CHAT_REQ,
    OPENAI_CHAT_RESP,
    OPENAI_CHAT_STREAM_REQ,
    OPENAI_CHAT_STREAM_RESP,
    OPENAI_CHAT_TOOLS_STREAM,
    RESPONSES_REQ,
    RESPONSES_RESP,
    RESPONSES_STREAM,
    SSE,
    STEP,
    T0,
    events,
    j,
    run,
    sse,
)

from busted.classify.httpevents import (
    HttpProtocolError,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
)
from busted.classify.llm import CallTracker, LlmCallInfo, sanitize_path

UA = "OpenAI/Python 1.54.0"


def base(**kw) -> dict:
    """All fields of a record; each case overrides what it expects."""
    d = dict(api=None, operation=None, method="POST", path=None, authority="api.example.test", request_model=None,
             response_model=None, stream=False, status=200, error_type=None, input_tokens=None, output_tokens=None,
             cache_read_tokens=None, cache_write_tokens=None, reasoning_tokens=None, total_tokens=None,
             finish_reason=None, tool_calls=None, request_body_bytes=None, response_body_bytes=None, ts_ns=T0,
             time_to_first_token_ns=STEP, duration_ns=None, user_agent=None, complete=True, stream_id=0,
             http_version="1.1", prompt_text=None, completion_text=None, response_id=None)
    d.update(kw)
    assert set(d) == {f.name for f in dataclasses.fields(LlmCallInfo)}
    return d


def one(evs, **kw) -> LlmCallInfo:
    out, _ = run(evs, **kw)
    assert len(out) == 1, out
    assert isinstance(out[0], LlmCallInfo)
    return out[0]


def check(evs, expected: dict, **kw) -> LlmCallInfo:
    rec = one(evs, **kw)
    assert dataclasses.asdict(rec) == expected
    return rec


def sizes(req: bytes, chunks: list[bytes]) -> dict:
    return dict(request_body_bytes=len(req), response_body_bytes=sum(map(len, chunks)),
                duration_ns=STEP * (len(chunks) + 1))


# --- OpenAI -------------------------------------------------------------------------------------

def test_openai_chat_tool_calls_non_streamed():
    chunks = [OPENAI_CHAT_RESP[:100], OPENAI_CHAT_RESP[100:]]
    evs = events("POST", "/v1/chat/completions", OPENAI_CHAT_REQ, 200, JSON, chunks,
                 req_headers=[("authorization", "Bearer sk-proj-abcdefghijklmnop"), ("user-agent", UA)])
    rec = check(evs, base(response_id="chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
                          api="openai.chat", operation="chat", path="/v1/chat/completions", request_model="gpt-4o",
                          response_model="gpt-4o-2024-08-06", input_tokens=1117, output_tokens=46,
                          cache_read_tokens=1024, reasoning_tokens=0, total_tokens=1163, finish_reason="tool_calls",
                          tool_calls=2, user_agent=UA, **sizes(OPENAI_CHAT_REQ, chunks)))
    assert "sk-proj" not in repr(rec)


def test_openai_chat_stream_with_include_usage_and_done():
    c = OPENAI_CHAT_STREAM_RESP
    check(events("POST", "/v1/chat/completions", OPENAI_CHAT_STREAM_REQ, 200, SSE, c),
          base(response_id="chatcmpl-123",
               api="openai.chat", operation="chat", path="/v1/chat/completions", request_model="gpt-4o-mini",
               response_model="gpt-4o-mini-2024-07-18", stream=True, input_tokens=9, output_tokens=3,
               cache_read_tokens=0, reasoning_tokens=0, total_tokens=12, finish_reason="stop", tool_calls=0,
               # chunk 0 only sets the role (empty content): the first token is chunk 1
               time_to_first_token_ns=2 * STEP, **sizes(OPENAI_CHAT_STREAM_REQ, c)))


def test_openai_chat_stream_counts_distinct_tool_calls():
    c = OPENAI_CHAT_TOOLS_STREAM
    check(events("POST", "/v1/chat/completions", OPENAI_CHAT_STREAM_REQ, 200, SSE, c),
          base(response_id="chatcmpl-123",
               api="openai.chat", operation="chat", path="/v1/chat/completions", request_model="gpt-4o-mini",
               response_model="gpt-4o-mini-2024-07-18", stream=True, finish_reason="tool_calls", tool_calls=2,
               **sizes(OPENAI_CHAT_STREAM_REQ, c)))


def test_llamacpp_usage_chunk_that_still_has_choices():
    c = LLAMACPP_STREAM
    check(events("POST", "/v1/chat/completions", OPENAI_CHAT_STREAM_REQ, 200, SSE, c, authority="127.0.0.1:8080"),
          base(response_id="chatcmpl-123",
               api="openai.chat", operation="chat", path="/v1/chat/completions", request_model="gpt-4o-mini",
               response_model="qwen2.5-7b-instruct-q4_k_m.gguf", stream=True, input_tokens=5, output_tokens=2,
               total_tokens=7, finish_reason="stop", tool_calls=0, authority="127.0.0.1:8080",
               **sizes(OPENAI_CHAT_STREAM_REQ, c)))


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1", "/openai/v1", "/proxy/groq/openai/v1", ""])
def test_openai_compatible_prefixes(prefix):
    rec = one(events("POST", prefix + "/chat/completions", OPENAI_CHAT_REQ, 200, JSON, [OPENAI_CHAT_RESP]))
    assert (rec.api, rec.request_model, rec.input_tokens, rec.path) == (
        "openai.chat", "gpt-4o", 1117, prefix + "/chat/completions")


def test_openai_responses_non_streamed():
    c = [RESPONSES_RESP]
    check(events("POST", "/v1/responses", RESPONSES_REQ, 200, JSON, c),
          base(response_id="resp_67ccd2bed1ec8190",
               api="openai.responses", operation="chat", path="/v1/responses", request_model="gpt-5",
               response_model="gpt-5-2025-08-07", input_tokens=36, output_tokens=87, cache_read_tokens=4,
               reasoning_tokens=64, total_tokens=123, finish_reason="completed", tool_calls=1,
               **sizes(RESPONSES_REQ, c)))


def test_openai_responses_stream_ends_at_response_completed():
    c = RESPONSES_STREAM
    check(events("POST", "/v1/responses", RESPONSES_REQ, 200, SSE, c),
          base(response_id="resp_67ccd2bed1ec8190",
               api="openai.responses", operation="chat", path="/v1/responses", request_model="gpt-5",
               response_model="gpt-5-2025-08-07", stream=True, input_tokens=36, output_tokens=87,
               cache_read_tokens=4, reasoning_tokens=64, total_tokens=123, finish_reason="completed", tool_calls=1,
               time_to_first_token_ns=4 * STEP, **sizes(RESPONSES_REQ, c)))


def test_openai_responses_incomplete_reason():
    obj = json.loads(RESPONSES_RESP)
    obj.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    rec = one(events("POST", "/v1/responses", RESPONSES_REQ, 200, JSON, [j(obj)]))
    assert rec.finish_reason == "max_output_tokens"


def test_openai_embeddings():
    c = [EMB_RESP]
    check(events("POST", "/v1/embeddings", EMB_REQ, 200, JSON, c),
          base(api="openai.embeddings", operation="embeddings", path="/v1/embeddings",
               request_model="text-embedding-3-small", response_model="text-embedding-3-small", input_tokens=8,
               total_tokens=8, **sizes(EMB_REQ, c)))


def test_openai_embeddings_over_the_cap_read_from_head_and_tail():
    vec = [0.012345678] * 20000
    body = j({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vec}],
              "model": "text-embedding-3-large", "usage": {"prompt_tokens": 5, "total_tokens": 5}})
    chunks = [body[i:i + 16384] for i in range(0, len(body), 16384)]
    out, t = run(events("POST", "/v1/embeddings", EMB_REQ, 200, JSON, chunks), response_body_cap=65536)
    (rec,) = out
    assert t.stats["response_truncated"] == 1
    assert (rec.response_model, rec.input_tokens, rec.total_tokens, rec.response_body_bytes) == (
        "text-embedding-3-large", 5, 5, len(body))


def test_legacy_completions():
    c = [COMPL_RESP]
    check(events("POST", "/v1/completions", COMPL_REQ, 200, JSON, c),
          base(response_id="cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
               api="openai.completions", operation="text_completion", path="/v1/completions",
               request_model="gpt-3.5-turbo-instruct", response_model="gpt-3.5-turbo-instruct", input_tokens=5,
               output_tokens=7, total_tokens=12, finish_reason="length", tool_calls=0, **sizes(COMPL_REQ, c)))


def test_legacy_completions_streamed():
    chunks = [sse({"id": "cmpl-1", "object": "text_completion", "model": "gpt-3.5-turbo-instruct",
                   "choices": [{"text": t, "index": 0, "finish_reason": f}]}) for t, f in (("A", None), ("B", "stop"))]
    chunks[-1] += b"data: [DONE]\n\n"
    rec = one(events("POST", "/v1/completions", j({"model": "m", "prompt": "x", "stream": True}), 200, SSE, chunks))
    assert (rec.api, rec.stream, rec.finish_reason, rec.input_tokens, rec.time_to_first_token_ns) == (
        "openai.completions", True, "stop", None, STEP)


def test_azure_deployment_names_the_model():
    body = j({"messages": [{"role": "user", "content": "hi"}]})
    path = "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
    rec = one(events("POST", path, body, 200, JSON, [OPENAI_CHAT_RESP], authority="contoso.openai.azure.com",
                     req_headers=[("api-key", "0123456789abcdef0123456789abcdef")]))
    assert (rec.api, rec.request_model, rec.response_model, rec.path) == (
        "openai.chat", "my-gpt4o", "gpt-4o-2024-08-06", path)
    assert "0123456789abcdef" not in repr(rec)


# --- Anthropic ----------------------------------------------------------------------------------

def test_anthropic_messages_input_includes_cache_tokens():
    c = [ANTH_RESP]
    check(events("POST", "/v1/messages", ANTH_REQ, 200, JSON, c),
          base(response_id="msg_013Zva2CMHLNnXjNJJKqJ2EF",
               api="anthropic.messages", operation="chat", path="/v1/messages", request_model="claude-sonnet-4-5",
               response_model="claude-sonnet-4-5-20250929", input_tokens=12 + 2000 + 100, output_tokens=25,
               cache_read_tokens=2000, cache_write_tokens=100, total_tokens=2137, finish_reason="tool_use",
               tool_calls=1, **sizes(ANTH_REQ, c)))


def test_anthropic_stream_keeps_latest_cumulative_output():
    c = ANTH_STREAM
    check(events("POST", "/v1/messages", ANTH_STREAM_REQ, 200, SSE, c),
          base(response_id="msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
               api="anthropic.messages", operation="chat", path="/v1/messages",
               request_model="claude-3-7-sonnet-latest", response_model="claude-3-7-sonnet-20250219", stream=True,
               input_tokens=472 + 1500, output_tokens=89, cache_read_tokens=1500, cache_write_tokens=0,
               total_tokens=472 + 1500 + 89, finish_reason="tool_use", tool_calls=1,
               time_to_first_token_ns=4 * STEP, **sizes(ANTH_STREAM_REQ, c)))


def test_anthropic_error_event_inside_200_stream():
    c = ANTH_OVERLOADED
    check(events("POST", "/v1/messages", ANTH_STREAM_REQ, 200, SSE, c),
          base(response_id="msg_1", api="anthropic.messages", operation="chat", path="/v1/messages",
               request_model="claude-3-7-sonnet-latest", response_model="claude-3-7-sonnet-20250219", stream=True,
               error_type="overloaded_error", input_tokens=10, output_tokens=1, total_tokens=11,
               **sizes(ANTH_STREAM_REQ, c)))


def test_anthropic_429_names_the_provider_error():
    c = [ANTH_429]
    check(events("POST", "/v1/messages", ANTH_REQ, 429, JSON, c),
          base(api="anthropic.messages", operation="chat", path="/v1/messages", request_model="claude-sonnet-4-5",
               status=429, error_type="rate_limit_error", **sizes(ANTH_REQ, c)))


def test_http_error_without_a_body_is_http_status():
    rec = one(events("POST", "/v1/messages", ANTH_REQ, 503, (("content-type", "text/html"),), [b"<html>down</html>"]))
    assert (rec.status, rec.error_type, rec.input_tokens) == (503, "http_503", None)


def test_count_tokens_is_not_a_call():
    out, _ = run(events("POST", "/v1/messages/count_tokens", ANTH_REQ, 200, JSON, [j({"input_tokens": 14})]))
    assert out == []


# --- Gemini -------------------------------------------------------------------------------------

GEM = "/v1beta/models/gemini-2.5-flash"
GEMINI_FIELDS = dict(api="gemini.generate_content", operation="generate_content", request_model="gemini-2.5-flash",
                     response_model="gemini-2.5-flash", input_tokens=1200, output_tokens=150, cache_read_tokens=1024,
                     reasoning_tokens=100, total_tokens=1350, finish_reason="STOP", tool_calls=0)


def test_gemini_generate_content_key_param_masked():
    c = [GEMINI_RESP]
    rec = check(events("POST", GEM + ":generateContent?key=AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI", GEMINI_REQ,
                       200, JSON, c),
                base(response_id="mAitaLmkHPPlz7IPvtfUqQ4",
                     path=GEM + ":generateContent?key=[REDACTED]", **GEMINI_FIELDS, **sizes(GEMINI_REQ, c)))
    assert "AIza" not in repr(rec)


def test_gemini_stream_alt_sse():
    c = GEMINI_SSE
    check(events("POST", GEM + ":streamGenerateContent?alt=sse", GEMINI_REQ, 200, SSE, c),
          base(response_id="mAitaLmkHPPlz7IPvtfUqQ4",
               path=GEM + ":streamGenerateContent?alt=sse", stream=True, **GEMINI_FIELDS, **sizes(GEMINI_REQ, c)))


def test_gemini_stream_json_array():
    c = GEMINI_ARRAY
    check(events("POST", GEM + ":streamGenerateContent", GEMINI_REQ, 200, JSON, c),
          base(response_id="mAitaLmkHPPlz7IPvtfUqQ4", path=GEM + ":streamGenerateContent", stream=True,
               **{**GEMINI_FIELDS, "time_to_first_token_ns": 2 * STEP}, **sizes(GEMINI_REQ, c)))


def test_gemini_vertex_path_and_function_call():
    from test_classify_llm_bodies import gemini_obj
    usage = {"promptTokenCount": 10, "candidatesTokenCount": 3, "totalTokenCount": 13}
    body = j(gemini_obj("", usage, "STOP", fc=True))
    path = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash-001:generateContent"
    rec = one(events("POST", path, GEMINI_REQ, 200, JSON, [body], authority="us-central1-aiplatform.googleapis.com"))
    assert (rec.request_model, rec.tool_calls, rec.input_tokens, rec.output_tokens, rec.reasoning_tokens,
            rec.cache_read_tokens) == ("gemini-2.0-flash-001", 1, 10, 3, None, None)


def test_gemini_429():
    c = [GEMINI_429]
    check(events("POST", GEM + ":generateContent", GEMINI_REQ, 429, JSON, c),
          base(api="gemini.generate_content", operation="generate_content", path=GEM + ":generateContent",
               request_model="gemini-2.5-flash", status=429, error_type="RESOURCE_EXHAUSTED", **sizes(GEMINI_REQ, c)))


# --- Ollama -------------------------------------------------------------------------------------

def test_ollama_chat_ndjson_stream_by_default():
    c = OLLAMA_CHAT_STREAM
    check(events("POST", "/api/chat", OLLAMA_CHAT_REQ, 200, NDJSON, c, authority="localhost:11434"),
          base(api="ollama.chat", operation="chat", path="/api/chat", authority="localhost:11434",
               request_model="llama3.2", response_model="llama3.2", stream=True, input_tokens=26, output_tokens=282,
               total_tokens=308, finish_reason="stop", tool_calls=0, **sizes(OLLAMA_CHAT_REQ, c)))


def test_ollama_generate_not_streamed():
    c = [OLLAMA_GEN_RESP]
    check(events("POST", "/api/generate", OLLAMA_GEN_REQ, 200, JSON, c),
          base(api="ollama.generate", operation="text_completion", path="/api/generate", request_model="llama3.2",
               response_model="llama3.2", input_tokens=26, output_tokens=290, total_tokens=316,
               finish_reason="stop", tool_calls=0, **sizes(OLLAMA_GEN_REQ, c)))


def test_ollama_last_line_without_newline():
    c = [OLLAMA_CHAT_STREAM[0], OLLAMA_CHAT_STREAM[2].rstrip(b"\n")]
    rec = one(events("POST", "/api/chat", OLLAMA_CHAT_REQ, 200, NDJSON, c))
    assert (rec.input_tokens, rec.output_tokens, rec.finish_reason) == (26, 282, "stop")


# --- Bedrock ------------------------------------------------------------------------------------

def test_bedrock_converse():
    c = [BEDROCK_CONVERSE_RESP]
    path = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    check(events("POST", path, BEDROCK_CONVERSE_REQ, 200, JSON, c,
                 authority="bedrock-runtime.us-east-1.amazonaws.com"),
          base(api="bedrock.converse", operation="chat", path=path, authority="bedrock-runtime.us-east-1.amazonaws.com",
               request_model="anthropic.claude-3-haiku-20240307-v1:0", input_tokens=30 + 1600, output_tokens=38,
               cache_read_tokens=1600, cache_write_tokens=0, total_tokens=1668, finish_reason="tool_use",
               tool_calls=1, **sizes(BEDROCK_CONVERSE_REQ, c)))


def test_bedrock_converse_stream_event_stream_framing():
    c = BEDROCK_CONVERSE_STREAM
    path = "/model/us.amazon.nova-lite-v1%3A0/converse-stream"
    check(events("POST", path, BEDROCK_CONVERSE_REQ, 200, EVENTSTREAM, c),
          base(api="bedrock.converse", operation="chat", path=path, request_model="us.amazon.nova-lite-v1:0",
               stream=True, input_tokens=4, output_tokens=38, total_tokens=42, finish_reason="end_turn", tool_calls=0,
               time_to_first_token_ns=2 * STEP, **sizes(BEDROCK_CONVERSE_REQ, c)))


def test_bedrock_invoke_with_response_stream_claude_chunks():
    c = BEDROCK_INVOKE_STREAM
    path = "/model/anthropic.claude-3-5-sonnet-20241022-v2%3A0/invoke-with-response-stream"
    check(events("POST", path, BEDROCK_INVOKE_REQ, 200, EVENTSTREAM, c),
          base(response_id="msg_bdrk_01", api="bedrock.invoke", operation="chat", path=path,
               request_model="anthropic.claude-3-5-sonnet-20241022-v2:0",
               response_model="claude-3-5-sonnet-20241022", stream=True, input_tokens=14, output_tokens=9,
               total_tokens=23, finish_reason="end_turn", tool_calls=0, time_to_first_token_ns=3 * STEP,
               **sizes(BEDROCK_INVOKE_REQ, c)))


def test_bedrock_exception_frame_inside_200():
    c = BEDROCK_THROTTLED
    check(events("POST", "/model/m/converse-stream", BEDROCK_CONVERSE_REQ, 200, EVENTSTREAM, c),
          base(api="bedrock.converse", operation="chat", path="/model/m/converse-stream", request_model="m",
               stream=True, error_type="throttlingException", tool_calls=0, **sizes(BEDROCK_CONVERSE_REQ, c)))


def test_bedrock_invoke_tokens_from_headers():
    body = j({"generation": "Hello", "prompt_token_count": None, "generation_token_count": None,
              "stop_reason": "stop"})
    hdrs = JSON + (("x-amzn-bedrock-input-token-count", "11"), ("x-amzn-bedrock-output-token-count", "3"))
    rec = one(events("POST", "/model/meta.llama3-8b-instruct-v1%3A0/invoke", j({"prompt": "hi"}), 200, hdrs, [body]))
    assert (rec.api, rec.operation, rec.request_model, rec.input_tokens, rec.output_tokens, rec.total_tokens,
            rec.finish_reason) == ("bedrock.invoke", "text_completion", "meta.llama3-8b-instruct-v1:0", 11, 3, 14,
                                   "stop")


def test_bedrock_corrupt_frame_stops_decoding_and_is_counted():
    bad = bytearray(BEDROCK_CONVERSE_STREAM[1])
    bad[-1] ^= 0xFF
    c = [BEDROCK_CONVERSE_STREAM[0], bytes(bad), *BEDROCK_CONVERSE_STREAM[2:]]
    out, t = run(events("POST", "/model/m/converse-stream", BEDROCK_CONVERSE_REQ, 200, EVENTSTREAM, c))
    assert t.stats["eventstream_broken"] == 1
    assert (out[0].input_tokens, out[0].finish_reason, out[0].complete) == (None, None, True)


# --- recognition, bounds, connection handling ---------------------------------------------------

def test_non_llm_traffic_yields_nothing():
    evs = (events("GET", "/v1/models", b"", 200, JSON, [j({"data": []})])
           + events("POST", "/upload", b"\x00\x01binary", 200, JSON, [b"{}"], t0=T0 + 10**6)
           + events("POST", "/v1/chat/completions", j({"foo": 1}), 200, JSON, [b"{}"], t0=T0 + 2 * 10**6))
    out, t = run(evs)
    assert out == [] and t._open == 0


def test_truncated_request_body_falls_back_to_regex():
    big = j({"model": "gpt-4.1", "stream": True, "messages": [{"role": "user", "content": "x" * 400_000}]})
    c = OPENAI_CHAT_STREAM_RESP
    out, t = run(events("POST", "/v1/chat/completions", big, 200, SSE, c))
    (rec,) = out
    assert t.stats["request_truncated"] == 1
    assert (rec.api, rec.request_model, rec.stream, rec.request_body_bytes, rec.input_tokens) == (
        "openai.chat", "gpt-4.1", True, len(big), 9)


def test_connection_lost_mid_stream_is_incomplete():
    c = ANTH_STREAM[:4]
    evs = events("POST", "/v1/messages", ANTH_STREAM_REQ, 200, SSE, c, end=False)
    out, _ = run(evs, close_ts=T0 + 10 * STEP)
    (rec,) = out
    assert (rec.complete, rec.duration_ns, rec.input_tokens, rec.output_tokens, rec.finish_reason,
            rec.response_body_bytes) == (False, 10 * STEP, 1972, 2, None, sum(map(len, c)))


def test_response_end_incomplete_flag_is_kept():
    rec = one(events("POST", "/v1/messages", ANTH_STREAM_REQ, 200, SSE, ANTH_STREAM[:2], complete=False))
    assert rec.complete is False


def test_request_without_response_reported_on_close():
    evs = events("POST", "/v1/chat/completions", OPENAI_CHAT_REQ, 200, JSON, [])[:3]
    out, _ = run(evs, close_ts=T0 + 5)
    (rec,) = out
    assert (rec.status, rec.complete, rec.time_to_first_token_ns, rec.duration_ns, rec.response_body_bytes) == (
        None, False, None, 5, 0)


def test_protocol_error_finishes_the_stream():
    evs = events("POST", "/v1/chat/completions", OPENAI_CHAT_STREAM_REQ, 200, SSE, OPENAI_CHAT_STREAM_RESP[:2],
                 end=False)
    out, t = run([*evs, HttpProtocolError(0, T0 + 9 * STEP, "bad chunk size")])
    (rec,) = out
    assert (rec.complete, rec.duration_ns, t.stats["protocol_errors"]) == (False, 9 * STEP, 1)


def test_http1_pipelined_requests_answer_in_order():
    a = events("POST", "/v1/chat/completions", OPENAI_CHAT_REQ, 200, JSON, [OPENAI_CHAT_RESP])
    b = events("POST", "/v1/embeddings", EMB_REQ, 200, JSON, [EMB_RESP], t0=T0 + 50)
    evs = a[:3] + b[:3] + a[3:] + b[3:]
    out, _ = run(evs)
    assert [(r.api, r.input_tokens, r.ts_ns) for r in out] == [("openai.chat", 1117, T0), ("openai.embeddings", 8,
                                                                                            T0 + 50)]


def test_http2_interleaved_streams():
    a = events("POST", "/v1/messages", ANTH_STREAM_REQ, 200, SSE, ANTH_STREAM, stream=1, version="2")
    b = events("POST", GEM + ":streamGenerateContent?alt=sse", GEMINI_REQ, 200, SSE, GEMINI_SSE, stream=3,
               version="2")
    evs = [e for pair in zip(a, b, strict=False) for e in pair] + a[len(b):] + b[len(a):]
    out, t = run(evs)
    got = {r.stream_id: (r.api, r.input_tokens, r.output_tokens, r.http_version) for r in out}
    assert got == {1: ("anthropic.messages", 1972, 89, "2"), 3: ("gemini.generate_content", 1200, 150, "2")}
    assert t._open == 0


def test_100_continue_is_skipped():
    evs = events("POST", "/v1/embeddings", EMB_REQ, 200, JSON, [EMB_RESP])
    evs.insert(3, ResponseHead(0, T0 + 50, 100, (), "1.1"))
    assert one(evs).status == 200


def test_open_exchanges_are_bounded():
    t = CallTracker()
    for i in range(1000):
        t.feed(RequestHead(2 * i + 1, i, "POST", "/v1/chat/completions", None, (), "2"))
    assert t._open == 256 and t.stats["dropped_exchanges"] == 744


def test_user_agent_and_path_redaction():
    ua = "my-tool/1.0 key=sk-ant-api03-abcdefghijklmnopqrstuvwx"
    rec = one(events("POST", "/v1/messages?api_key=hunter2&x=1", ANTH_REQ, 200, JSON, [ANTH_RESP],
                     req_headers=[("user-agent", ua), ("x-api-key", "sk-ant-api03-zzzzzzzzzzzzzzzz")]))
    assert rec.user_agent == "my-tool/1.0 key=[REDACTED]"
    assert rec.path == "/v1/messages?api_key=[REDACTED]&x=1"
    assert "zzzz" not in repr(rec) and "hunter2" not in repr(rec)


def test_sanitize_path_forms():
    assert sanitize_path("/a?key=AIzaX&alt=sse") == "/a?key=[REDACTED]&alt=sse"
    assert sanitize_path("/m?X-Amz-Signature=abc&X-Amz-Credential=AKIA/x") == (
        "/m?X-Amz-Signature=[REDACTED]&X-Amz-Credential=[REDACTED]")
    # busted.redact's key shapes (a short "sk-" key has a digit: "sk-learn-intelex" is a name)
    assert sanitize_path("/v1/sk-abc1defghijklmnop/chat") == "/v1/[REDACTED]/chat"
    assert sanitize_path("/plain") == "/plain"
    # issue 17 item 11: the parameter names the old local list missed, and a random token alone
    assert sanitize_path("/v1/chat/completions?subscription-key=s1&x-api-key=k2&access-token=t3&auth_token=a4"
                         "&api-version=2024-02-01") == (
        "/v1/chat/completions?subscription-key=[REDACTED]&x-api-key=[REDACTED]&access-token=[REDACTED]"
        "&auth_token=[REDACTED]&api-version=2024-02-01")
    assert sanitize_path("/p?Zx8Kq2Lm9Np4Rt6Vw1Yb3Cd5Ef7Gh0Jk") == "/p?[REDACTED]"
    # by segment: a deployment path is not one long random token
    assert sanitize_path("/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21") == (
        "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21")


def test_content_capture_is_off_by_default_and_redacted_when_on():
    req = j({"model": "gpt-4o-mini", "stream": True, "messages": [
        {"role": "user", "content": "my key is sk-proj-AAAAAAAAAAAAAAAAAAAA please"}]})
    evs = events("POST", "/v1/chat/completions", req, 200, SSE, OPENAI_CHAT_STREAM_RESP)
    assert one(evs).prompt_text is None and one(evs).completion_text is None
    rec = one(evs, capture_content=1000)
    assert rec.prompt_text == "my key is [REDACTED] please"
    assert rec.completion_text == "Hi there"
    assert one(evs, capture_content=4).completion_text == "Hi t"


# --- splits -------------------------------------------------------------------------------------

STREAMS = {
    "openai": ("/v1/chat/completions", OPENAI_CHAT_STREAM_REQ, SSE, OPENAI_CHAT_STREAM_RESP),
    "openai_tools": ("/v1/chat/completions", OPENAI_CHAT_STREAM_REQ, SSE, OPENAI_CHAT_TOOLS_STREAM),
    "responses": ("/v1/responses", RESPONSES_REQ, SSE, RESPONSES_STREAM),
    "anthropic": ("/v1/messages", ANTH_STREAM_REQ, SSE, ANTH_STREAM),
    "gemini_sse": (GEM + ":streamGenerateContent?alt=sse", GEMINI_REQ, SSE, GEMINI_SSE),
    "gemini_array": (GEM + ":streamGenerateContent", GEMINI_REQ, JSON, GEMINI_ARRAY),
    "ollama": ("/api/chat", OLLAMA_CHAT_REQ, NDJSON, OLLAMA_CHAT_STREAM),
    "bedrock_converse": ("/model/m/converse-stream", BEDROCK_CONVERSE_REQ, EVENTSTREAM, BEDROCK_CONVERSE_STREAM),
    "bedrock_invoke": ("/model/m/invoke-with-response-stream", BEDROCK_INVOKE_REQ, EVENTSTREAM,
                       BEDROCK_INVOKE_STREAM),
}
_TIMING = ("time_to_first_token_ns", "duration_ns")


def _fields(rec):
    d = dataclasses.asdict(rec)
    for k in _TIMING:
        d.pop(k)
    return d


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_any_split_gives_the_same_record(name):
    path, req, hdrs, chunks = STREAMS[name]
    whole = b"".join(chunks)
    ref = _fields(one(events("POST", path, req, 200, hdrs, [whole])))
    assert ref["input_tokens"] is not None or name == "openai_tools"
    # every byte on its own
    assert _fields(one(events("POST", path, req, 200, hdrs, [bytes([b]) for b in whole]))) == ref
    # every two-way split
    for i in range(1, len(whole)):
        assert _fields(one(events("POST", path, req, 200, hdrs, [whole[:i], whole[i:]]))) == ref, i
    # random splits, request body split too
    rnd = random.Random(name)
    for _ in range(50):
        cuts = sorted(rnd.sample(range(1, len(whole)), 6))
        parts = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
        evs = events("POST", path, req, 200, hdrs, parts)
        k = rnd.randrange(1, len(req))
        evs[1:2] = [RequestData(0, T0 + 1, req[:k]), RequestData(0, T0 + 1, req[k:])]
        assert _fields(one(evs)) == ref


def test_record_is_frozen_with_slots():
    rec = one(events("POST", "/v1/embeddings", EMB_REQ, 200, JSON, [EMB_RESP]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.status = 500  # type: ignore[misc]
    assert not hasattr(rec, "__dict__")


def test_events_for_unknown_streams_are_counted_not_raised():
    t = CallTracker()
    assert t.feed(ResponseData(7, 1, b"x")) == [] and t.feed(RequestEnd(7, 1, 0)) == []
    assert t.feed(ResponseEnd(9, 1, 0, True)) == [] and t.feed(RequestData(9, 1, b"")) == []
    assert t.stats["orphan_events"] == 4 and t.stats["internal_errors"] == 0


def test_truncated_gemini_answer_keeps_usage_and_leaves_tools_unknown():
    from test_classify_llm_bodies import gemini_obj
    obj = gemini_obj("z" * 300_000, {"promptTokenCount": 7, "candidatesTokenCount": 70_000, "totalTokenCount": 70_007},
                     "MAX_TOKENS")
    out, t = run(events("POST", GEM + ":generateContent", GEMINI_REQ, 200, JSON, [j(obj)]), response_body_cap=4096)
    (rec,) = out
    assert (rec.input_tokens, rec.output_tokens, rec.total_tokens, rec.finish_reason, rec.response_model,
            rec.tool_calls) == (7, 70_000, 70_007, "MAX_TOKENS", "gemini-2.5-flash", None)
    assert t.stats["response_truncated"] == 1


def test_openai_responses_failed_event():
    import json as _json
    failed = {**_json.loads(RESPONSES_RESP), "status": "failed", "output": [], "usage": None,
              "error": {"code": "server_error", "message": "The model failed to generate a response."}}
    c = [RESPONSES_STREAM[0], sse({"type": "response.failed", "sequence_number": 1, "response": failed}, named=True)]
    rec = one(events("POST", "/v1/responses", RESPONSES_REQ, 200, SSE, c))
    assert (rec.error_type, rec.finish_reason, rec.tool_calls, rec.input_tokens, rec.status) == (
        "server_error", "failed", 0, None, 200)


def test_embeddings_of_ollama_and_gemini():
    body = j({"model": "all-minilm", "embeddings": [[0.01, -0.002]], "total_duration": 14143917,
              "load_duration": 1019500, "prompt_eval_count": 8})
    rec = one(events("POST", "/api/embed", j({"model": "all-minilm", "input": "hi"}), 200, JSON, [body]))
    assert (rec.api, rec.operation, rec.stream, rec.input_tokens, rec.output_tokens, rec.total_tokens) == (
        "ollama.embed", "embeddings", False, 8, None, None)
    g = one(events("POST", "/v1beta/models/text-embedding-004:embedContent", j({"content": {"parts": [{"text": "x"}]}}),
                   200, JSON, [j({"embedding": {"values": [0.1, 0.2]}})]))
    assert (g.api, g.operation, g.request_model, g.input_tokens) == (
        "gemini.embed_content", "embeddings", "text-embedding-004", None)


def test_overlong_stream_event_is_skipped_and_counted():
    big = sse({"type": "response.output_text.delta", "delta": "x" * 5000}, named=True)
    c = [RESPONSES_STREAM[0], big, RESPONSES_STREAM[-1]]
    out, t = run(events("POST", "/v1/responses", RESPONSES_REQ, 200, SSE, c), stream_event_cap=4096)
    assert t.stats["overlong"] == 1
    # the only delta was dropped: time to first token falls back to the first body byte
    assert (out[0].input_tokens, out[0].output_tokens, out[0].time_to_first_token_ns) == (36, 87, STEP)


# --- the answer's own id (OTel gen_ai.response.id) ------------------------------------------------

RESPONSE_IDS = {"openai": "chatcmpl-123", "openai_tools": "chatcmpl-123", "responses": "resp_67ccd2bed1ec8190",
                "anthropic": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "gemini_sse": "mAitaLmkHPPlz7IPvtfUqQ4",
                "gemini_array": "mAitaLmkHPPlz7IPvtfUqQ4", "ollama": None, "bedrock_converse": None,
                "bedrock_invoke": "msg_bdrk_01"}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_response_id_of_every_stream_byte_at_a_time(name):
    """Every streamed shape gives its id (Ollama and Converse have none), fed one byte at a time."""
    assert set(RESPONSE_IDS) == set(STREAMS)
    path, req, hdrs, chunks = STREAMS[name]
    whole = b"".join(chunks)
    assert one(events("POST", path, req, 200, hdrs, [bytes([b]) for b in whole])).response_id == RESPONSE_IDS[name]


def _chat(*ids) -> bytes:
    return sse(*[{"id": i, "object": "chat.completion.chunk", "model": "m",
                  "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]} for i in ids],
               done=True)


@pytest.mark.parametrize(("ids", "want"), [
    (["chatcmpl-1", "chatcmpl-2"], "chatcmpl-1"),  # the first seen wins
    (["x" * 128], "x" * 128),
    (["x" * 129, "chatcmpl-ok"], "chatcmpl-ok"),  # too long: dropped, not cut
    (["id with spaces"], None),
    (["\x1b]0;pwned\x07", "chatcmpl-ok"], "chatcmpl-ok"),  # a terminal escape is no id
    (["caf\u00e9"], None),
    ([""], None),
    ([7, ["a"], {"a": 1}, None, True], None),  # not a string
    (["chatcmpl-sk-proj-Zq3xW9vT1bN7mK2pL5hR8cY4dF6gJ0sA"], "chatcmpl-[REDACTED]"),  # a key's shape is masked
])
def test_response_id_is_a_bounded_plain_token(ids, want):
    body = _chat(*ids)
    rec = one(events("POST", "/v1/chat/completions", OPENAI_CHAT_STREAM_REQ, 200, SSE, [body]))
    assert rec.response_id == want
    assert rec.output_tokens is None and rec.complete  # the rest of the answer is read as before


def test_response_id_of_truncated_answers_is_the_top_level_one():
    """An answer over the cap is read from its head and tail: the id is taken only as the body's
    first key (OpenAI, Anthropic), never a tool call's or an item's; Gemini's responseId anywhere."""
    pad = "w " * 40000
    openai = j({"id": "chatcmpl-top", "object": "chat.completion", "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": pad}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    nested = j({"object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": pad, "tool_calls": [{"id": "call_1", "type": "function"}]}}],
        "id": "chatcmpl-late", "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    gemini = j({"candidates": [{"content": {"parts": [{"text": pad}]}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}, "modelVersion": "g",
                "responseId": "gem-tail_1"})
    anth = j({"id": "msg_top", "type": "message", "content": [{"type": "text", "text": pad}], "model": "claude",
              "usage": {"input_tokens": 3, "output_tokens": 4}})
    for path, body, want in (("/v1/chat/completions", openai, "chatcmpl-top"),
                             ("/v1/chat/completions", nested, None),
                             (GEM + ":generateContent", gemini, "gem-tail_1"),
                             ("/v1/messages", anth, "msg_top")):
        req = GEMINI_REQ if "models" in path else ANTH_REQ if "messages" in path else OPENAI_CHAT_REQ
        chunks = [body[i:i + 4096] for i in range(0, len(body), 4096)]
        out, t = run(events("POST", path, req, 200, JSON, chunks), response_body_cap=16384)
        (rec,) = out
        assert t.stats["response_truncated"] == 1
        assert (rec.response_id, rec.input_tokens) == (want, 3), path
