"""LLM API shapes: which request is which API call, and how its answer reports usage.

Recognition is by shape (method, path, body keys), never by host, so a gateway or a local server
speaking a known dialect yields a call. Each shape has one response handler fed decoded JSON
objects: the whole body for a non-streamed answer, or each SSE event / NDJSON line / JSON-array
element / event-stream payload for a streamed one. Handlers keep only counters in ``Usage``; they
never keep the body. All of this is pure and must not raise on any JSON value (callers guard it
anyway and count what escapes).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

__all__ = ["RequestInfo", "Usage", "recognise", "handle", "regex_request", "regex_usage", "prompt_text"]

_MAX_STR = 256  # model names, finish reasons and error types are cut to this
_MAX_TOOL_IDS = 1024
MAX_RESPONSE_ID = 128
# A response id is the server's choice (attacker-controlled): kept only if it is a plain token of
# this alphabet (what every provider's ids use: chatcmpl-..., resp_..., msg_..., base64url), else dropped.
_RESPONSE_ID = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_RESPONSE_ID}}}")


@dataclass(frozen=True, slots=True)
class RequestInfo:
    api: str  # e.g. "openai.chat"
    operation: str  # OTel gen_ai.operation.name
    request_model: str | None
    stream: bool | None


def _s(v: Any) -> str | None:
    return v[:_MAX_STR] if isinstance(v, str) and v else None


def _n(v: Any) -> int | None:
    """A token count: a non-negative int (not bool); anything else is unknown."""
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 53:
        return v
    return None


def _b(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


# --- request side -----------------------------------------------------------------------------

_GEMINI = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent|embedContent|batchEmbedContents)$")
_BEDROCK = re.compile(r"/model/([^/]+)/(invoke|invoke-with-response-stream|converse|converse-stream)$")
_AZURE_DEP = re.compile(r"/openai/deployments/([^/]+)/")


def recognise(method: str, path: str, query: str, body: Any) -> RequestInfo | None:
    """The API call a request is, from its path (query excluded) and parsed JSON body; None if not one.

    ``body`` is the parsed object, or a ``dict`` rebuilt by ``regex_request`` from a truncated
    body (with only "model"/"stream" keys and the marker key ``"\\0truncated"``).
    """
    if method != "POST" or not isinstance(body, dict):
        return None
    truncated = "\0truncated" in body
    p = path.rstrip("/")
    model = _s(body.get("model"))
    stream = _b(body.get("stream"))

    m = _GEMINI.search(p)
    if m:
        action = m.group(2)
        if not truncated and action in ("generateContent", "streamGenerateContent") and "contents" not in body:
            return None
        op = "embeddings" if "mbed" in action else "generate_content"
        api = "gemini.embed_content" if op == "embeddings" else "gemini.generate_content"
        return RequestInfo(api, op, _s(unquote(m.group(1))), action == "streamGenerateContent")

    m = _BEDROCK.search(p)
    if m:
        action = m.group(2)
        api = "bedrock.converse" if action.startswith("converse") else "bedrock.invoke"
        if api == "bedrock.converse" and not truncated and "messages" not in body:
            return None
        op = "chat" if api == "bedrock.converse" else _bedrock_invoke_op(body)
        return RequestInfo(api, op, _s(unquote(m.group(1))), action.endswith("stream"))

    dep = _AZURE_DEP.search(p)
    if model is None and dep:
        model = _s(unquote(dep.group(1)))

    def has(*keys: str) -> bool:
        return truncated or any(k in body for k in keys)

    if p.endswith("/chat/completions"):
        return RequestInfo("openai.chat", "chat", model, bool(stream)) if has("messages") else None
    if p.endswith("/completions"):
        return RequestInfo("openai.completions", "text_completion", model, bool(stream)) if has("prompt") else None
    if p.endswith("/embeddings") and not p.endswith("/api/embeddings"):
        return RequestInfo("openai.embeddings", "embeddings", model, False) if has("input") else None
    if p.endswith("/responses"):
        if not has("input", "model", "prompt", "previous_response_id"):
            return None
        return RequestInfo("openai.responses", "chat", model, bool(stream))
    if p.endswith("/messages") and not p.endswith("/count_tokens"):
        return RequestInfo("anthropic.messages", "chat", model, bool(stream)) if has("messages") else None
    # Ollama streams unless told not to ("stream": false).
    if p.endswith("/api/chat"):
        return RequestInfo("ollama.chat", "chat", model, stream is not False) if has("messages", "model") else None
    if p.endswith("/api/generate"):
        return RequestInfo("ollama.generate", "text_completion", model, stream is not False) if has("model") else None
    if p.endswith("/api/embed") or p.endswith("/api/embeddings"):
        return RequestInfo("ollama.embed", "embeddings", model, False) if has("model") else None
    return None


def _bedrock_invoke_op(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "chat"
    if "inputText" in body and "textGenerationConfig" not in body:
        return "embeddings"
    return "text_completion"


_RX_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_RX_STREAM = re.compile(rb'"stream"\s*:\s*(true|false)')


def regex_request(prefix: bytes) -> dict[str, Any]:
    """What can be read from the first bytes of a body too large to parse: "model" and "stream"."""
    out: dict[str, Any] = {"\0truncated": True}
    m = _RX_MODEL.search(prefix)
    if m:
        out["model"] = m.group(1).decode("utf-8", "replace")
    m = _RX_STREAM.search(prefix)
    if m:
        out["stream"] = m.group(1) == b"true"
    return out


_TEXT_KEYS = frozenset(("content", "text", "prompt", "input", "system", "instructions"))


def prompt_text(body: Any, limit: int) -> str:
    """Text of a request (message contents, prompts), in order, up to ``limit`` characters."""
    parts: list[str] = []
    size = 0
    stack: list[tuple[Any, bool]] = [(body, False)]
    steps = 0
    while stack and size < limit and steps < 100_000:
        steps += 1
        v, texty = stack.pop()
        if isinstance(v, str):
            if texty:
                parts.append(v)
                size += len(v) + 1
        elif isinstance(v, dict):
            for k in reversed(list(v)):
                stack.append((v[k], k in _TEXT_KEYS or (texty and k != "type" and k != "role")))
        elif isinstance(v, list):
            for x in reversed(v):
                stack.append((x, texty))
    return "\n".join(parts)[:limit]


# --- response side ----------------------------------------------------------------------------


class Usage:
    """Counters of one call's answer; None = not reported."""

    __slots__ = ("response_model", "response_id", "input", "output", "cache_read", "cache_write", "reasoning", "total",
                 "input_excludes_cache", "finish_reason", "tool_calls", "error_type", "first_content_ts",
                 "text", "text_limit", "done", "_tool_ids")

    def __init__(self, text_limit: int = 0) -> None:
        self.response_model: str | None = None
        self.response_id: str | None = None  # the provider's id of this answer (first seen wins)
        self.input: int | None = None
        self.output: int | None = None
        self.cache_read: int | None = None
        self.cache_write: int | None = None
        self.reasoning: int | None = None
        self.total: int | None = None
        self.input_excludes_cache = False  # Anthropic/Bedrock: input_tokens leaves cache tokens out
        self.finish_reason: str | None = None
        self.tool_calls: int | None = None
        self.error_type: str | None = None
        self.first_content_ts: int | None = None
        self.text: list[str] = []
        self.text_limit = text_limit
        self.done = False  # the stream's own end marker was seen ([DONE], response.completed, done: true)
        self._tool_ids: set[tuple[int, int]] = set()

    def content(self, ts: int, text: Any = None) -> None:
        if self.first_content_ts is None:
            self.first_content_ts = ts
        if self.text_limit and isinstance(text, str) and text:
            have = sum(len(t) for t in self.text)
            if have < self.text_limit:
                self.text.append(text[: self.text_limit - have])

    def add_tools(self, n: int) -> None:
        self.tool_calls = (self.tool_calls or 0) + n

    def seen_choices(self) -> None:
        if self.tool_calls is None:
            self.tool_calls = 0

    def set(self, name: str, v: Any) -> None:
        n = _n(v)
        if n is not None:
            setattr(self, name, n)

    def model(self, v: Any) -> None:
        s = _s(v)
        if s is not None:
            self.response_model = s

    def rid(self, v: Any) -> None:
        if self.response_id is None and isinstance(v, str) and _RESPONSE_ID.fullmatch(v):
            self.response_id = v

    def error(self, v: Any) -> None:
        s = _s(v) if not isinstance(v, int) or isinstance(v, bool) else str(v)
        if s is not None:
            self.error_type = s

    def finish(self, v: Any) -> None:
        s = _s(v)
        if s is not None:
            self.finish_reason = s

    def input_total(self) -> int | None:
        """OTel gen_ai.usage.input_tokens: all input tokens, cached ones included."""
        if self.input is None:
            return None
        if self.input_excludes_cache:
            return self.input + (self.cache_read or 0) + (self.cache_write or 0)
        return self.input


def _d(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _l(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _openai_usage(u: Usage, usage: Any) -> None:
    usage = _d(usage)
    if not usage:
        return
    # Chat/completions/embeddings say prompt_/completion_; Responses (and some servers) input_/output_.
    u.set("input", usage.get("prompt_tokens", usage.get("input_tokens")))
    u.set("output", usage.get("completion_tokens", usage.get("output_tokens")))
    u.set("total", usage.get("total_tokens"))
    pd = _d(usage.get("prompt_tokens_details")) or _d(usage.get("input_tokens_details"))
    u.set("cache_read", pd.get("cached_tokens"))
    cd = _d(usage.get("completion_tokens_details")) or _d(usage.get("output_tokens_details"))
    u.set("reasoning", cd.get("reasoning_tokens"))


def _openai_error(u: Usage, obj: dict[str, Any]) -> bool:
    err = obj.get("error")
    if isinstance(err, dict):
        u.error(err.get("type") or err.get("code") or "error")
        return True
    if isinstance(err, str) and err:  # Ollama and some gateways: {"error": "message"}
        u.error("error")
        return True
    return False


def openai_chat(u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    if not isinstance(obj, dict) or _openai_error(u, obj):
        return
    u.model(obj.get("model"))
    u.rid(obj.get("id"))  # chatcmpl-... (every chunk of a stream repeats it); cmpl-... for completions
    _openai_usage(u, obj.get("usage"))
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return
    u.seen_choices()
    for c in choices[:64]:
        if not isinstance(c, dict):
            continue
        idx = c.get("index")
        idx = idx if isinstance(idx, int) else 0
        fr = c.get("finish_reason")
        if fr is not None and (idx == 0 or u.finish_reason is None):
            u.finish(fr)
        msg = c.get("message")
        if isinstance(msg, dict):  # non-streamed answer
            u.add_tools(len(_l(msg.get("tool_calls"))))
            if isinstance(msg.get("content"), str):
                u.content(ts, msg["content"])
            continue
        delta = c.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if (isinstance(text, str) and text) or delta.get("reasoning_content") or delta.get("reasoning"):
                u.content(ts, text)
            for tc in _l(delta.get("tool_calls"))[:64]:
                # One tool call streams as many deltas with the same index; count distinct ones.
                ti = tc.get("index") if isinstance(tc, dict) else None
                ti = ti if isinstance(ti, int) else 0
                u.content(ts)
                if (idx, ti) not in u._tool_ids and len(u._tool_ids) < _MAX_TOOL_IDS:
                    u._tool_ids.add((idx, ti))
                    u.add_tools(1)
        elif isinstance(c.get("text"), str):  # legacy completions
            if c["text"]:
                u.content(ts, c["text"])


def openai_embeddings(u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    if not isinstance(obj, dict) or _openai_error(u, obj):
        return
    u.model(obj.get("model"))
    usage = _d(obj.get("usage"))
    u.set("input", usage.get("prompt_tokens", usage.get("input_tokens")))
    u.set("total", usage.get("total_tokens"))


_RESP_END = ("response.completed", "response.failed", "response.incomplete")
_RESP_DELTA = ("response.output_text.delta", "response.function_call_arguments.delta",
               "response.reasoning_summary_text.delta", "response.reasoning_text.delta",
               "response.refusal.delta", "response.audio.delta", "response.custom_tool_call_input.delta")


def openai_responses(u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    if not isinstance(obj, dict):
        return
    t = obj.get("type")
    if isinstance(t, str) and t.startswith("response."):
        if t in _RESP_DELTA:
            u.content(ts, obj.get("delta") if t == "response.output_text.delta" else None)
        elif isinstance(obj.get("response"), dict):
            _responses_object(u, obj["response"], final=t in _RESP_END)
            if t in _RESP_END:
                u.done = True
        return
    if t == "error":  # a stream-level error event
        u.error(obj.get("code") or "error")
        return
    if _openai_error(u, obj) and "output" not in obj:
        return
    _responses_object(u, obj, final=True)
    for item in _l(obj.get("output")):
        for part in _l(_d(item).get("content")):
            if _d(part).get("type") == "output_text":
                u.content(ts, _d(part).get("text"))


def _responses_object(u: Usage, r: dict[str, Any], final: bool) -> None:
    u.model(r.get("model"))
    u.rid(r.get("id"))  # resp_...; streams: the response.created event's response
    _openai_usage(u, r.get("usage"))
    err = r.get("error")
    if isinstance(err, dict):
        u.error(err.get("code") or err.get("type") or "error")
    if not final:
        return
    status = r.get("status")
    reason = _d(r.get("incomplete_details")).get("reason")
    u.finish(reason if reason else status)
    out = r.get("output")
    if isinstance(out, list):
        # Every tool the model invoked is an output item of a "*_call" type (function_call, web_search_call, ...).
        u.tool_calls = sum(1 for it in out if isinstance(it, dict) and str(it.get("type", "")).endswith("_call"))


def _anthropic_usage(u: Usage, usage: Any) -> None:
    usage = _d(usage)
    if not usage:
        return
    u.input_excludes_cache = True
    # message_delta usage is cumulative: each value replaces the previous one, never adds.
    u.set("input", usage.get("input_tokens"))
    u.set("output", usage.get("output_tokens"))
    u.set("cache_read", usage.get("cache_read_input_tokens"))
    u.set("cache_write", usage.get("cache_creation_input_tokens"))


_TOOL_BLOCKS = ("tool_use", "server_tool_use", "mcp_tool_use")


def anthropic_messages(u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    if not isinstance(obj, dict):
        return
    t = obj.get("type")
    if t == "error":
        u.error(_d(obj.get("error")).get("type") or "error")
    elif t == "message":  # non-streamed answer (and Bedrock invoke of a Claude model)
        _anthropic_message(u, obj, ts, final=True)
    elif t == "message_start":
        _anthropic_message(u, _d(obj.get("message")), ts, final=False)
    elif t == "content_block_start":
        u.seen_choices()
        if _d(obj.get("content_block")).get("type") in _TOOL_BLOCKS:
            u.add_tools(1)
            u.content(ts)
    elif t == "content_block_delta":
        delta = _d(obj.get("delta"))
        u.content(ts, delta.get("text"))
    elif t == "message_delta":
        u.finish(_d(obj.get("delta")).get("stop_reason"))
        _anthropic_usage(u, obj.get("usage"))
    elif t == "message_stop":
        u.done = True
    metrics = obj.get("amazon-bedrock-invocationMetrics")
    if isinstance(metrics, dict):
        _bedrock_metrics(u, metrics)


def _anthropic_message(u: Usage, m: dict[str, Any], ts: int, final: bool) -> None:
    u.model(m.get("model"))
    u.rid(m.get("id"))  # msg_... (Bedrock: msg_bdrk_...); streams: message_start's message
    _anthropic_usage(u, m.get("usage"))
    u.finish(m.get("stop_reason"))
    content = m.get("content")
    if final and isinstance(content, list):
        u.seen_choices()
        for b in content:
            if isinstance(b, dict):
                if b.get("type") in _TOOL_BLOCKS:
                    u.add_tools(1)
                elif b.get("type") == "text":
                    u.content(ts, b.get("text"))


def gemini(u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    if not isinstance(obj, dict):
        return
    err = obj.get("error")
    if isinstance(err, dict):
        u.error(err.get("status") or err.get("code") or "error")
        return
    u.model(obj.get("modelVersion"))
    u.rid(obj.get("responseId"))
    um = _d(obj.get("usageMetadata"))
    if um:
        # Each streamed chunk repeats the running totals: keep the latest.
        u.set("input", um.get("promptTokenCount"))  # cached content included
        u.set("cache_read", um.get("cachedContentTokenCount"))
        u.set("reasoning", um.get("thoughtsTokenCount"))
        u.set("total", um.get("totalTokenCount"))
        cand, thoughts = _n(um.get("candidatesTokenCount")), _n(um.get("thoughtsTokenCount"))
        if cand is not None or thoughts is not None:
            # Thoughts are billed as output and excluded from candidatesTokenCount: output includes them,
            # as OpenAI's completion_tokens include reasoning tokens.
            u.output = (cand or 0) + (thoughts or 0)
    cands = obj.get("candidates")
    if isinstance(cands, list):
        u.seen_choices()
        for i, c in enumerate(cands[:64]):
            c = _d(c)
            if i == 0 or u.finish_reason is None:
                u.finish(c.get("finishReason"))
            for part in _l(_d(c.get("content")).get("parts"))[:256]:
                part = _d(part)
                if "functionCall" in part:
                    u.add_tools(1)
                    u.content(ts)
                elif isinstance(part.get("text"), str) and part["text"]:
                    u.content(ts, part["text"])
    emb = obj.get("embedding") or obj.get("embeddings")
    if emb is not None:
        u.done = True


def ollama(u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    if not isinstance(obj, dict) or _openai_error(u, obj):
        return
    u.model(obj.get("model"))
    msg = obj.get("message")
    if isinstance(msg, dict):
        u.seen_choices()
        tcs = _l(msg.get("tool_calls"))
        if tcs:
            u.add_tools(len(tcs))
            u.content(ts)
        if (isinstance(msg.get("content"), str) and msg["content"]) or msg.get("thinking"):
            u.content(ts, msg.get("content"))
    elif isinstance(obj.get("response"), str):
        u.seen_choices()
        if obj["response"] or obj.get("thinking"):
            u.content(ts, obj["response"])
    if obj.get("done") is True or "embeddings" in obj:
        u.done = True
        u.finish(obj.get("done_reason"))
        u.set("input", obj.get("prompt_eval_count"))
        u.set("output", obj.get("eval_count"))
        if u.input is not None and u.output is not None:
            u.total = u.input + u.output


def _bedrock_usage(u: Usage, usage: Any) -> None:
    usage = _d(usage)
    if not usage:
        return
    u.input_excludes_cache = True  # inputTokens excludes cacheRead/cacheWrite; totalTokens includes them
    u.set("input", usage.get("inputTokens"))
    u.set("output", usage.get("outputTokens"))
    u.set("total", usage.get("totalTokens"))
    u.set("cache_read", usage.get("cacheReadInputTokens"))
    u.set("cache_write", usage.get("cacheWriteInputTokens"))


def bedrock_converse(u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    """Converse's JSON answer, or one converse-stream payload (``event`` = its :event-type)."""
    if not isinstance(obj, dict):
        return
    if event is None:  # whole answer
        msg = _d(_d(obj.get("output")).get("message"))
        content = msg.get("content")
        if isinstance(content, list):
            u.seen_choices()
            for b in content:
                b = _d(b)
                if "toolUse" in b:
                    u.add_tools(1)
                elif isinstance(b.get("text"), str):
                    u.content(ts, b["text"])
        u.finish(obj.get("stopReason"))
        _bedrock_usage(u, obj.get("usage"))
        if "message" in obj and "output" not in obj and "usage" not in obj:
            u.error("error")  # Bedrock error bodies: {"message": "..."} with a 4xx/5xx
        return
    if event == "messageStart":
        u.seen_choices()
    elif event == "contentBlockStart":
        if "toolUse" in _d(obj.get("start")):
            u.add_tools(1)
            u.content(ts)
    elif event == "contentBlockDelta":
        delta = _d(obj.get("delta"))
        u.content(ts, delta.get("text"))
    elif event == "messageStop":
        u.finish(obj.get("stopReason"))
    elif event == "metadata":
        _bedrock_usage(u, obj.get("usage"))
        u.done = True


def _bedrock_metrics(u: Usage, m: dict[str, Any]) -> None:
    # Bedrock's own count; the model's body (if it reported usage) wins, being more detailed.
    if u.input is None:
        u.set("input", m.get("inputTokenCount"))
    if u.output is None:
        u.set("output", m.get("outputTokenCount"))
    u.done = True


def bedrock_invoke(u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    """InvokeModel: the model's native JSON. ``event`` "chunk" = one decoded stream chunk."""
    if not isinstance(obj, dict):
        return
    if event == "chunk":
        raw = obj.get("bytes")
        if not isinstance(raw, str):
            return
        try:
            obj = json.loads(base64.b64decode(raw, validate=True))
        except (ValueError, binascii.Error, RecursionError):
            return
        if not isinstance(obj, dict):
            return
    t = obj.get("type")
    if isinstance(t, str) and (t.startswith("message") or t.startswith("content_block") or t == "error"):
        anthropic_messages(u, obj, ts)
        return
    if "choices" in obj:  # OpenAI-style models on Bedrock
        openai_chat(u, obj, ts)
    # Meta Llama / Mistral / Titan / Cohere native shapes
    for key in ("generation", "outputText", "completion", "text"):
        if isinstance(obj.get(key), str) and obj[key]:
            u.content(ts, obj[key])
            break
    for r in _l(obj.get("results"))[:16] + _l(obj.get("outputs"))[:16]:
        r = _d(r)
        u.finish(r.get("completionReason") or r.get("stop_reason"))
        if isinstance(r.get("outputText"), str) or isinstance(r.get("text"), str):
            u.content(ts, r.get("outputText") or r.get("text"))
    u.set("input", obj.get("prompt_token_count", obj.get("inputTextTokenCount")))
    u.set("output", obj.get("generation_token_count"))
    u.finish(obj.get("stop_reason"))
    if "message" in obj and len(obj) == 1:
        u.error("error")
    metrics = obj.get("amazon-bedrock-invocationMetrics")
    if isinstance(metrics, dict):
        _bedrock_metrics(u, metrics)


HANDLERS = {
    "openai.chat": openai_chat,
    "openai.completions": openai_chat,
    "openai.embeddings": openai_embeddings,
    "openai.responses": openai_responses,
    "anthropic.messages": anthropic_messages,
    "gemini.generate_content": gemini,
    "gemini.embed_content": gemini,
    "ollama.chat": ollama,
    "ollama.generate": ollama,
    "ollama.embed": ollama,
    "bedrock.converse": bedrock_converse,
    "bedrock.invoke": bedrock_invoke,
}


def handle(api: str, u: Usage, obj: Any, ts: int, event: str | None = None) -> None:
    HANDLERS[api](u, obj, ts, event)


# Truncated non-streamed answers: the usage block is usually at the end, so the caller keeps the
# head and the tail of the body and this rebuilds a small object from what the regexes find.
_RX_NUM = re.compile(rb'"([A-Za-z_]{3,40})"\s*:\s*(\d{1,15})\b')
_RX_STR = re.compile(rb'"(model|modelVersion|stop_reason|finish_reason|done_reason|stopReason|finishReason)"'
                     rb'\s*:\s*"([^"\\]{1,256})"')
# The answer's own id is its first key (OpenAI, Anthropic): only there, not a tool call's or an item's id.
_RX_FIRST_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([^"\\]{1,128})"')
_RX_GEMINI_ID = re.compile(rb'"responseId"\s*:\s*"([^"\\]{1,128})"')


def regex_usage(api: str, head: bytes, tail: bytes) -> dict[str, Any]:
    """A synthetic answer object for ``api`` with the usage numbers found in ``head``/``tail``."""
    nums: dict[str, int] = {}
    strs: dict[str, str] = {}
    for part in (head, tail):  # tail last: its values win
        for m in _RX_NUM.finditer(part):
            nums[m.group(1).decode()] = int(m.group(2))
        for m in _RX_STR.finditer(part):
            strs[m.group(1).decode()] = m.group(2).decode("utf-8", "replace")
    model = strs.get("model")
    if api.startswith("gemini"):
        g = _RX_GEMINI_ID.search(head) or _RX_GEMINI_ID.search(tail)
        return {"modelVersion": strs.get("modelVersion"), "usageMetadata": nums,
                "candidates": [{"finishReason": strs.get("finishReason")}] if "finishReason" in strs else None,
                "responseId": g.group(1).decode("utf-8", "replace") if g else None}
    first = _RX_FIRST_ID.match(head)
    rid = first.group(1).decode("utf-8", "replace") if first else None
    if api.startswith("anthropic"):
        return {"type": "message", "id": rid, "model": model, "stop_reason": strs.get("stop_reason"), "usage": nums}
    if api.startswith("ollama"):
        return {"model": model, "done": True, "done_reason": strs.get("done_reason"), **nums}
    if api == "bedrock.converse":
        return {"stopReason": strs.get("stopReason"), "usage": nums}
    if api == "bedrock.invoke":
        return {"stop_reason": strs.get("stop_reason"), **nums}
    usage: dict[str, Any] = dict(nums)
    usage["prompt_tokens_details"] = {"cached_tokens": nums.get("cached_tokens")}
    usage["completion_tokens_details"] = {"reasoning_tokens": nums.get("reasoning_tokens")}
    out: dict[str, Any] = {"model": model, "usage": usage, "id": rid}
    if api == "openai.responses":
        out["status"] = strs.get("status")
    return out
