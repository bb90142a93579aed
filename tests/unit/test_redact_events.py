"""One redaction for every output (issue 17 item 11): an LlmCall is built with the credentials of its
URL, user agent and captured content masked, so ``to_dict()`` (the Python API and ``--json``), the
table row and the sinks (which apply the same functions again) all show the same masked values."""

import json

from events_factory import IDENT

from busted.cli import render
from busted.events import Evidence, FlowOpened, LlmCall
from busted.pipeline.llmreader import CallReader
from busted.sinks import encode, redact

UA_TOKEN = "Zx8Kq2Lm9Np4Rt6Vw1Yb3Cd5Ef7Gh0Jk"  # token=<32 random characters> in a User-Agent
SECRETS = {
    "subscription-key": "SubKeyPlain0001",
    "x-api-key": "XApiKeyPlain0002",
    "access-token": "AccessTokPlain0003",
    "auth_token": "AuthTokPlain0004",
}
PROMPT_SECRET = "hunter2-prompt-pw"
ANSWER_SECRET = "hunter3-answer-pw"


def _exchange() -> tuple[bytes, bytes]:
    query = "&".join(f"{k}={v}" for k, v in SECRETS.items()) + "&api-version=2024-02-01"
    body = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": f"connect with password: {PROMPT_SECRET} please"}]}).encode()
    req = (f"POST /v1/chat/completions?{query} HTTP/1.1\r\nHost: api.openai.com\r\n"
           f"User-Agent: MyApp/1.0 (linux; token={UA_TOKEN})\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    answer = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": f"use api_key={ANSWER_SECRET} then"}}],
                         "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}).encode()
    resp = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}\r\n\r\n"
            ).encode() + answer
    return req, resp


def _call() -> LlmCall:
    flow = FlowOpened(ts_ns=1, wall_time=1_700_000_000.0, **IDENT, hostname="api.openai.com", provider="openai",
                      evidence=Evidence.DNS, confidence=0.8)
    r = CallReader(flow, lambda ns: 1_700_000_000.0 + ns / 1e9, capture_content=4096)
    req, resp = _exchange()
    evs = r.feed(True, req, 10) + r.feed(False, resp, 20) + r.close(30)
    calls = [e for e in evs if isinstance(e, LlmCall)]
    assert len(calls) == 1, evs
    return calls[0]


def _leaks(text: str) -> list[str]:
    return [s for s in (*SECRETS.values(), UA_TOKEN, PROMPT_SECRET, ANSWER_SECRET) if s in text]


def test_llm_call_is_built_without_the_secrets():
    ev = _call()
    assert ev.path == ("/v1/chat/completions?subscription-key=[REDACTED]&x-api-key=[REDACTED]"
                       "&access-token=[REDACTED]&auth_token=[REDACTED]&api-version=2024-02-01")
    assert ev.user_agent is not None and ev.user_agent.startswith("MyApp/1.0 (linux; token=[REDACTED]")
    assert ev.prompt is not None and "password: [REDACTED]" in ev.prompt
    assert ev.completion is not None and "api_key=[REDACTED]" in ev.completion
    d = ev.to_dict()
    assert _leaks(json.dumps(d)) == []  # the Python API and --json (which prints to_dict())
    assert _leaks(repr(ev)) == [] and _leaks(render(ev)) == []  # the table row
    assert _leaks(encode(ev).line) == []  # JSONL and SQLite


def test_sinks_pass_is_the_same_redaction():
    """The sinks' pass (defence in depth) finds nothing left to mask: the event already had it all,
    so --json and the files print the same values."""
    d = _call().to_dict()
    assert redact(d) == d
