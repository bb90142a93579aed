"""What the lab's fake LLM providers answer: a pure function from a request to an answer.

``answer(LabRequest(...), now=...)`` returns a ``LabAnswer`` (status, headers, body chunks). No I/O,
no clock (``now`` is passed in), no randomness: the same request always gives the same bytes, so
tests can assert exact token counts. ``busted.lab.http_server`` only moves these bytes.

Usage rule (documented in docs/lab.md; tests rely on it):

* input tokens ``T = max(1, len(body) // 4)`` — the raw request body length in bytes, 4 bytes a token.
* output tokens ``N`` = the request's own limit (``max_tokens``, ``max_completion_tokens``,
  ``max_output_tokens``, ``generationConfig.maxOutputTokens``, Ollama ``options.num_predict``) clamped
  to 1..64, else 8. The reply text is ``N`` words and a stream sends one word per content event.
* Anthropic: when the body contains ``"cache_control"``, ``cache_read_input_tokens = T // 2`` and
  ``input_tokens = T - T // 2``; otherwise both cache fields are 0. ``cache_creation_input_tokens``
  is always 0.

Errors: a credential equal to ``bad`` (``Authorization: Bearer bad``, ``x-api-key: bad``,
``api-key: bad``, ``x-goog-api-key: bad`` or ``?key=bad``) gets the provider's 401 (Gemini: its real
400 ``API_KEY_INVALID``); the model ``lab-rate-limit`` gets 429 with ``retry-after: 1``; a body that
is not a JSON object gets 400. All errors use the provider's own error JSON shape.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import json
import struct
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "MAX_OUTPUT_TOKENS",
    "RATE_LIMIT_MODEL",
    "LabAnswer",
    "LabRequest",
    "answer",
    "input_tokens",
    "output_tokens",
]

DEFAULT_OUTPUT_TOKENS = 8
MAX_OUTPUT_TOKENS = 64
RATE_LIMIT_MODEL = "lab-rate-limit"
BAD_CREDENTIAL = "bad"
EMBEDDING_DIMENSIONS = 8
WORDS = ("Hello", "from", "the", "busted", "lab", "fake", "provider", "answer")


@dataclass(frozen=True)
class LabRequest:
    """One HTTP request as the server saw it; header names lower-case, ``host`` set for HTTP/2 too."""

    method: str
    target: str  # path with query, as sent
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))


@dataclass(frozen=True)
class LabAnswer:
    """``streaming``: send each chunk as it comes (chunked / DATA frames), no Content-Length."""

    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[bytes, ...]
    streaming: bool = False
    route: str = "default"
    usage: dict = field(default_factory=dict)  # {"input": T, "output": N, ...} for the log

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


# ------------------------------------------------------------------------------------ usage rule
def input_tokens(body: bytes) -> int:
    return max(1, len(body) // 4)


MAX_OUTPUT_HEADER = "x-busted-lab-max-output"  # a test's request may lift the clamp (long streams)
MAX_OUTPUT_LIMIT = 10_000


def output_cap(req: LabRequest) -> int:
    """The clamp on output tokens: MAX_OUTPUT_TOKENS, or the request's ``x-busted-lab-max-output``
    (at most MAX_OUTPUT_LIMIT), for tests of long streams."""
    v = req.header(MAX_OUTPUT_HEADER)
    if v is not None and v.strip().isdigit():
        return max(1, min(int(v), MAX_OUTPUT_LIMIT))
    return MAX_OUTPUT_TOKENS


def output_tokens(req: dict, cap: int = MAX_OUTPUT_TOKENS) -> int:
    candidates = [req.get("max_tokens"), req.get("max_completion_tokens"), req.get("max_output_tokens")]
    gen = req.get("generationConfig")
    if isinstance(gen, dict):
        candidates.append(gen.get("maxOutputTokens"))
    opts = req.get("options")
    if isinstance(opts, dict):
        candidates.append(opts.get("num_predict"))
    for c in candidates:
        if isinstance(c, int) and not isinstance(c, bool) and c >= 1:
            return min(c, cap)
    return DEFAULT_OUTPUT_TOKENS


def _words(n: int) -> list[str]:
    """``n`` words, one token each; every word after the first carries its leading space."""
    return [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(n)]


# ------------------------------------------------------------------------------------ encoding
def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(data: object, event: str | None = None, eol: str = "\n") -> bytes:
    head = f"event: {event}{eol}" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}{eol}{eol}".encode()


def _id(prefix: str, body: bytes) -> str:
    return prefix + hashlib.sha256(body).hexdigest()[:24]


def _accepts_gzip(req: LabRequest) -> bool:
    for item in (req.header("accept-encoding") or "").split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


def _finish(req: LabRequest, status: int, ctype: str, chunks: list[bytes], *, streaming: bool = False,
            route: str, provider: str, usage: dict | None = None,
            extra: tuple[tuple[str, str], ...] = ()) -> LabAnswer:
    headers = [("content-type", ctype), ("x-busted-lab-route", route), *extra]
    rid = _id("req_", req.body + req.target.encode())
    headers.append(("request-id", rid) if provider == "anthropic" else ("x-request-id", rid))
    if not streaming and _accepts_gzip(req):
        chunks = [gzip.compress(b"".join(chunks), mtime=0)]  # mtime=0: same bytes every time
        headers += [("content-encoding", "gzip"), ("vary", "accept-encoding")]
    return LabAnswer(status, tuple(headers), tuple(chunks), streaming, route, usage or {})


def _error(req: LabRequest, provider: str, status: int, kind: str, message: str, route: str) -> LabAnswer:
    extra: tuple[tuple[str, str], ...] = (("retry-after", "1"),) if status == 429 else ()
    if provider == "anthropic":
        body: object = {"type": "error", "error": {"type": kind, "message": message}}
    elif provider == "gemini":
        body = {"error": {"code": status, "message": message, "status": kind}}
    elif provider == "ollama":
        body = {"error": message}
    else:  # OpenAI and Azure OpenAI
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return _finish(req, status, "application/json", [_json(body)], route=route + ".error", provider=provider,
                   extra=extra)


def _check(req: LabRequest, provider: str, model: str, route: str) -> LabAnswer | None:
    """The provider-shaped error this request earns, or None."""
    creds = [req.header("x-api-key"), req.header("api-key"), req.header("x-goog-api-key"), req.query.get("key")]
    auth = req.header("authorization") or ""
    if auth.lower().startswith("bearer "):
        creds.append(auth[7:].strip())
    if BAD_CREDENTIAL in creds:
        if provider == "gemini":
            return _error(req, provider, 400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                          route)
        kind = {"anthropic": "authentication_error"}.get(provider, "invalid_request_error")
        return _error(req, provider, 401, kind, "Incorrect API key provided: bad.", route)
    if model == RATE_LIMIT_MODEL:
        kind = {"anthropic": "rate_limit_error", "gemini": "RESOURCE_EXHAUSTED"}.get(provider, "requests")
        return _error(req, provider, 429, kind, f"Rate limit reached for {model} (busted lab).", route)
    return None


# ------------------------------------------------------------------------------------ providers
def _openai_chat(req: LabRequest, j: dict, now: int, model: str) -> LabAnswer:
    t, n = input_tokens(req.body), output_tokens(j, output_cap(req))
    words = _words(n)
    cid = _id("chatcmpl-", req.body)
    usage = {"prompt_tokens": t, "completion_tokens": n, "total_tokens": t + n,
             "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
    base = {"id": cid, "created": now, "model": model, "system_fingerprint": "fp_lab"}
    log = {"input": t, "output": n}
    if j.get("stream") is True:
        opts = j.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        extra = {"usage": None} if with_usage else {}
        chunk = dict(base, object="chat.completion.chunk")
        out = [_sse(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}], **extra))]
        out += [_sse(dict(chunk, choices=[{"index": 0, "delta": {"content": w}, "logprobs": None,
                                           "finish_reason": None}], **extra)) for w in words]
        out.append(_sse(dict(chunk, choices=[{"index": 0, "delta": {}, "logprobs": None,
                                              "finish_reason": "stop"}],
                             **extra)))
        if with_usage:
            out.append(_sse(dict(chunk, choices=[], usage=usage)))
        out.append(b"data: [DONE]\n\n")
        return _finish(req, 200, "text/event-stream; charset=utf-8", out, streaming=True, route="openai.chat",
                       provider="openai", usage=log)
    body = dict(base, object="chat.completion", choices=[{
        "index": 0, "message": {"role": "assistant", "content": "".join(words), "refusal": None},
        "logprobs": None, "finish_reason": "stop"}], usage=usage)
    return _finish(req, 200, "application/json", [_json(body)], route="openai.chat", provider="openai", usage=log)


def _openai_responses(req: LabRequest, j: dict, now: int, model: str) -> LabAnswer:
    t, n = input_tokens(req.body), output_tokens(j, output_cap(req))
    words = _words(n)
    rid, mid = _id("resp_", req.body), _id("msg_", req.body)
    usage = {"input_tokens": t, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": t + n}
    part = {"type": "output_text", "text": "".join(words), "annotations": []}
    item = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    resp = {"id": rid, "object": "response", "created_at": now, "status": "completed", "model": model,
            "output": [item], "usage": usage}
    log = {"input": t, "output": n}
    if j.get("stream") is not True:
        return _finish(req, 200, "application/json", [_json(resp)], route="openai.responses", provider="openai",
                       usage=log)
    pending = dict(resp, status="in_progress", output=[], usage=None)
    ids = {"item_id": mid, "output_index": 0, "content_index": 0}
    events: list[tuple[str, dict]] = [
        ("response.created", {"response": pending}),
        ("response.in_progress", {"response": pending}),
        ("response.output_item.added", {"output_index": 0, "item": dict(item, status="in_progress", content=[])}),
        ("response.content_part.added", dict(ids, part=dict(part, text=""))),
        *[("response.output_text.delta", dict(ids, delta=w)) for w in words],
        ("response.output_text.done", dict(ids, text=part["text"])),
        ("response.content_part.done", dict(ids, part=part)),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": resp}),
    ]
    out = [_sse(dict({"type": name, "sequence_number": i}, **data), event=name)
           for i, (name, data) in enumerate(events)]
    return _finish(req, 200, "text/event-stream; charset=utf-8", out, streaming=True, route="openai.responses",
                   provider="openai", usage=log)


def _embedding(text: str, i: int, dims: int) -> list[float]:
    raw = b"".join(hashlib.sha256(f"{i}:{k}:{text}".encode()).digest()[:4] for k in range(dims))
    return [round((v / 0xFFFFFFFF) * 2 - 1, 6) for v in struct.unpack(f">{dims}I", raw)]


def _openai_embeddings(req: LabRequest, j: dict, now: int, model: str) -> LabAnswer:
    inp = j.get("input", "")
    items = inp if isinstance(inp, list) and inp and not all(isinstance(x, int) for x in inp) else [inp]
    items = items[:2048]
    dims = j.get("dimensions")
    dims = dims if isinstance(dims, int) and not isinstance(dims, bool) and 1 <= dims <= 3072 \
        else EMBEDDING_DIMENSIONS
    data = []
    for i, item in enumerate(items):
        vec = _embedding(json.dumps(item), i, dims)
        emb: object = vec
        if j.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    t = input_tokens(req.body)
    body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": t, "total_tokens": t}}
    return _finish(req, 200, "application/json", [_json(body)], route="openai.embeddings", provider="openai",
                   usage={"input": t, "output": 0})


def _anthropic(req: LabRequest, j: dict, now: int, model: str) -> LabAnswer:
    total, n = input_tokens(req.body), output_tokens(j, output_cap(req))
    cached = total // 2 if b'"cache_control"' in req.body else 0
    usage = {"input_tokens": total - cached, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": cached, "output_tokens": n}
    words = _words(n)
    mid = _id("msg_", req.body)
    msg = {"id": mid, "type": "message", "role": "assistant", "model": model,
           "content": [{"type": "text", "text": "".join(words)}],
           "stop_reason": "end_turn", "stop_sequence": None,
           "usage": usage}
    log = {"input": total - cached, "output": n, "cache_read": cached}
    if j.get("stream") is not True:
        return _finish(req, 200, "application/json", [_json(msg)], route="anthropic.messages",
                       provider="anthropic", usage=log)
    events: list[tuple[str, dict]] = [
        ("message_start", {"message": dict(msg, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
        *[("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}}) for w in words],
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                           "usage": {"output_tokens": n}}),
        ("message_stop", {}),
    ]
    out = [_sse(dict({"type": name}, **data), event=name) for name, data in events]
    return _finish(req, 200, "text/event-stream; charset=utf-8", out, streaming=True, route="anthropic.messages",
                   provider="anthropic", usage=log)


def _gemini(req: LabRequest, j: dict, now: int, model: str, method: str) -> LabAnswer:
    t, n = input_tokens(req.body), output_tokens(j, output_cap(req))
    words = _words(n)
    version = model.removeprefix("models/")
    log = {"input": t, "output": n}

    def chunk(text: str, last: bool) -> dict:
        cand: dict = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        meta: dict = {"promptTokenCount": t}
        if last:
            cand["finishReason"] = "STOP"
            meta = {"promptTokenCount": t, "candidatesTokenCount": n, "totalTokenCount": t + n}
        return {"candidates": [cand], "usageMetadata": meta, "modelVersion": version,
                "responseId": _id("", req.body)[:16]}

    if method == "generateContent":
        return _finish(req, 200, "application/json", [_json(chunk("".join(words), True))],
                       route="gemini.generate", provider="gemini", usage=log)
    parts = [chunk(w, i == len(words) - 1) for i, w in enumerate(words)]
    if req.query.get("alt") == "sse":  # Gemini ends SSE events with CRLF CRLF
        out = [_sse(p, eol="\r\n") for p in parts]
        return _finish(req, 200, "text/event-stream", out, streaming=True, route="gemini.stream_sse",
                       provider="gemini", usage=log)
    # Without alt=sse: one JSON array, its elements sent as they are made.
    out = [(b"[" if i == 0 else b",\r\n") + _json(p) for i, p in enumerate(parts)] + [b"]"]
    return _finish(req, 200, "application/json; charset=UTF-8", out, streaming=True, route="gemini.stream_json",
                   provider="gemini", usage=log)


def _ollama(req: LabRequest, j: dict, now: int, model: str, kind: str) -> LabAnswer:
    t, n = input_tokens(req.body), output_tokens(j, output_cap(req))
    words = _words(n)
    created = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000000000Z")
    route = f"ollama.{kind}"
    log = {"input": t, "output": n}

    def piece(text: str) -> dict:
        if kind == "chat":
            return {"model": model, "created_at": created, "message": {"role": "assistant", "content": text}}
        return {"model": model, "created_at": created, "response": text}

    # Durations are fixed fake nanoseconds: deterministic, and eval_duration > 0 like the real server.
    final = dict(piece(""), done=True, done_reason="stop", total_duration=1_000_000 * (t + n),
                 load_duration=1_000_000, prompt_eval_count=t, prompt_eval_duration=500_000 * t,
                 eval_count=n, eval_duration=1_000_000 * n)
    if j.get("stream", True) is False:  # Ollama streams unless told not to
        whole = dict(final, **piece("".join(words)))
        return _finish(req, 200, "application/json; charset=utf-8", [_json(whole)], route=route,
                       provider="ollama", usage=log)
    out = [_json(dict(piece(w), done=False)) + b"\n" for w in words] + [_json(final) + b"\n"]
    return _finish(req, 200, "application/x-ndjson", out, streaming=True, route=route, provider="ollama", usage=log)


# ------------------------------------------------------------------------------------ dispatch
def _route(req: LabRequest) -> tuple[str, str, dict] | None:
    """(provider, route kind, params) for an LLM API request, or None."""
    path = req.path
    if req.method == "GET" and path == "/api/tags":
        return "ollama", "tags", {}
    if req.method != "POST":
        return None
    if path == "/v1/chat/completions":
        return "openai", "chat", {}
    if path == "/v1/responses":
        return "openai", "responses", {}
    if path == "/v1/embeddings":
        return "openai", "embeddings", {}
    if path == "/v1/messages":
        return "anthropic", "messages", {}
    if path in ("/api/chat", "/api/generate"):
        return "ollama", path.rsplit("/", 1)[1], {}
    segs = path.split("/")
    if len(segs) == 5 and segs[:3] == ["", "openai", "deployments"] and segs[3]:
        if segs[4] == "embeddings":
            return "openai", "embeddings", {"model": segs[3]}
        return None
    if len(segs) == 6 and segs[:3] == ["", "openai", "deployments"] and segs[3] and segs[4:] == ["chat",
                                                                                                "completions"]:
        return "openai", "chat", {"model": segs[3]}
    for prefix in ("/v1beta/models/", "/v1/models/"):
        if path.startswith(prefix):
            model, _, method = path[len(prefix):].rpartition(":")
            if model and method in ("generateContent", "streamGenerateContent"):
                return "gemini", method, {"model": model}
    return None


def _describe(req: LabRequest) -> LabAnswer:
    """Anything that is not an LLM API call: a small JSON saying what arrived (tests read it)."""
    body = {"lab": True, "method": req.method, "path": req.target, "host": req.header("host"),
            "received_bytes": len(req.body)}
    return _finish(req, 200, "application/json", [_json(body)], route="default", provider="none")


def answer(req: LabRequest, now: int = 0) -> LabAnswer:
    """The answer a real provider would give *req* (shape-wise), with the lab's usage rule."""
    found = _route(req)
    if found is None:
        return _describe(req)
    provider, kind, params = found
    route = f"{provider}.{kind}"
    if kind == "tags":
        body = {"models": [{"name": "llama-lab:latest", "model": "llama-lab:latest", "size": 1}]}
        return _finish(req, 200, "application/json; charset=utf-8", [_json(body)], route=route, provider=provider)
    try:
        j = json.loads(req.body) if req.body else None
    except ValueError:
        j = None
    if not isinstance(j, dict):
        kind_400 = {"anthropic": "invalid_request_error", "gemini": "INVALID_ARGUMENT"}.get(
            provider, "invalid_request_error")
        return _error(req, provider, 400, kind_400, "The request body is not a JSON object.", route)
    default = {"openai": "gpt-lab", "anthropic": "claude-lab", "ollama": "llama-lab"}.get(provider, "gemini-lab")
    model = params.get("model") or j.get("model")
    model = model if isinstance(model, str) and model else default
    err = _check(req, provider, model.removeprefix("models/"), route)
    if err is not None:
        return err
    if kind == "chat" and provider == "openai":
        return _openai_chat(req, j, now, model)
    if kind == "responses":
        return _openai_responses(req, j, now, model)
    if kind == "embeddings":
        return _openai_embeddings(req, j, now, model)
    if kind == "messages":
        return _anthropic(req, j, now, model)
    if provider == "gemini":
        return _gemini(req, j, now, model, kind)
    return _ollama(req, j, now, model, kind)
