"""LLM calls at agent sizes (issue 19): a request body far over the kernel's per-call copy limit,
then a small call on the same connection, from real clients in the lab. The kernel copies each
write's head and tail with its full length; the parsers skip the gap and go on: two LlmCalls with
the right model, tokens and status, and nothing lost. The lab answers with exact usage
(docs/lab.md: input tokens = len(body) // 4, output = the request's max tokens)."""

import json
import sys
import time

import pytest

import busted
from busted import EventsLost, LlmCall

SECRET = "sk-proj-BUSTEDSECRET0123456789abcdefXYZ"
PY = sys.executable  # the venv's python: openai, anthropic, requests, aiohttp
KB = 1024


@pytest.fixture(scope="module")
def mon(lab):
    with busted.Monitor(preexisting=False) as m:
        yield m


def events_of(mon, pid, n, timeout=20.0):
    """LlmCalls of ``pid`` (until ``n`` or the timeout) and every EventsLost seen meanwhile."""
    calls, lost, end = [], [], time.monotonic() + timeout
    while time.monotonic() < end and len(calls) < n:
        for ev in mon.events(timeout=0.2):
            if isinstance(ev, LlmCall) and ev.pid == pid:
                calls.append(ev)
            elif isinstance(ev, EventsLost):
                lost.append(ev)
    return calls, lost


# Each client: a call with a prompt of SIZE bytes (model BIG, max tokens 7), then a small one (model
# SMALL, max tokens 3) on the same connection; prints the usage each answer carried.
_PY_CLIENTS = {
    "openai-sdk": f"""
import openai, sys
c = openai.OpenAI(api_key="{SECRET}", base_url="https://api.openai.com/v1", max_retries=0)
for model, text, mt in (("gpt-4o", "x" * int(sys.argv[1]), 7), ("gpt-4o-mini", "hi", 3)):
    r = c.chat.completions.create(model=model, messages=[{{"role": "user", "content": text}}], max_tokens=mt)
    print(r.usage.prompt_tokens, r.usage.completion_tokens)
""",
    "anthropic-sdk": f"""
import anthropic, sys
c = anthropic.Anthropic(api_key="{SECRET}", base_url="https://api.anthropic.com", max_retries=0)
for model, text, mt in (("claude-sonnet-4-5", "x" * int(sys.argv[1]), 7), ("claude-3-5-haiku-latest", "hi", 3)):
    m = c.messages.create(model=model, max_tokens=mt, messages=[{{"role": "user", "content": text}}])
    print(m.usage.input_tokens, m.usage.output_tokens)
""",
    "requests": f"""
import requests, sys
s = requests.Session()
for model, text, mt in (("gpt-4o", "x" * int(sys.argv[1]), 7), ("gpt-4o-mini", "hi", 3)):
    r = s.post("https://api.openai.com/v1/chat/completions", headers={{"authorization": "Bearer {SECRET}"}},
               json={{"model": model, "max_tokens": mt, "messages": [{{"role": "user", "content": text}}]}})
    u = r.json()["usage"]
    print(u["prompt_tokens"], u["completion_tokens"])
""",
    "aiohttp": f"""
import aiohttp, asyncio, sys
async def main():
    async with aiohttp.ClientSession() as s:
        for model, text, mt in (("gpt-4o", "x" * int(sys.argv[1]), 7), ("gpt-4o-mini", "hi", 3)):
            async with s.post("https://api.openai.com/v1/chat/completions",
                              headers={{"authorization": "Bearer {SECRET}"}},
                              json={{"model": model, "max_tokens": mt,
                                    "messages": [{{"role": "user", "content": text}}]}}) as r:
                u = (await r.json())["usage"]
                print(u["prompt_tokens"], u["completion_tokens"])
asyncio.run(main())
""",
    "ollama-plain-http": """
import http.client, json, sys
host = sys.argv[2]
c = http.client.HTTPConnection(host, 11434)
for model, text, mt in (("llama3.2", "x" * int(sys.argv[1]), 7), ("qwen2.5", "hi", 3)):
    c.request("POST", "/api/chat", body=json.dumps({"model": model, "stream": False, "options": {"num_predict": mt},
              "messages": [{"role": "user", "content": text}]}), headers={"content-type": "application/json"})
    j = json.loads(c.getresponse().read())
    print(j["prompt_eval_count"], j["eval_count"])
""",
    # plain HTTP written with sendmsg([head, body]): the kernel copies the first buffer only and
    # says the call's whole length, so the body is a gap of known length
    "ollama-sendmsg": """
import json, socket, sys
s = socket.create_connection((sys.argv[2], 11434))
for model, text, mt in (("llama3.2", "x" * int(sys.argv[1]), 7), ("qwen2.5", "hi", 3)):
    body = json.dumps({"model": model, "stream": False, "options": {"num_predict": mt},
                       "messages": [{"role": "user", "content": text}]}).encode()
    head = (b"POST /api/chat HTTP/1.1\\r\\nHost: ollama\\r\\nContent-Type: application/json\\r\\n"
            b"Content-Length: %d\\r\\n\\r\\n" % len(body))
    assert s.sendmsg([head, body]) == len(head) + len(body)
    buf = b""
    while b"\\r\\n\\r\\n" not in buf:
        buf += s.recv(65536)
    h, _, rest = buf.partition(b"\\r\\n\\r\\n")
    n = int([x for x in h.split(b"\\r\\n") if x.lower().startswith(b"content-length:")][0].split(b":")[1])
    while len(rest) < n:
        rest += s.recv(65536)
    j = json.loads(rest[:n])
    print(j["prompt_eval_count"], j["eval_count"])
""",
}

_NODE = """
const n = parseInt(process.argv[1]);
(async () => {
  for (const [model, text, mt] of [["gpt-4o", "x".repeat(n), 7], ["gpt-4o-mini", "hi", 3]]) {
    const r = await fetch("https://api.openai.com/v1/chat/completions", {method: "POST",
      headers: {"content-type": "application/json"},
      body: JSON.stringify({model, max_tokens: mt, messages: [{role: "user", content: text}]})});
    const j = await r.json();
    console.log(j.usage.prompt_tokens, j.usage.completion_tokens);
  }
})();
"""

MODELS = {"anthropic-sdk": ("claude-sonnet-4-5", "claude-3-5-haiku-latest"),
          "ollama-plain-http": ("llama3.2", "qwen2.5"), "ollama-sendmsg": ("llama3.2", "qwen2.5")}


def _run_client(lab, client, size, tmp_path):
    if client in _PY_CLIENTS:
        argv = [PY, "-c", _PY_CLIENTS[client], str(size)]
        if client.startswith("ollama"):
            argv.append(lab.hosts["ollama.lab.test"].ipv4)
    elif client == "node-fetch":
        argv = ["node", "-e", _NODE, str(size)]
    else:  # curl: two requests on one connection (--next keeps it)
        big = tmp_path / "big.json"
        big.write_text(json.dumps({"model": "gpt-4o", "max_tokens": 7,
                                   "messages": [{"role": "user", "content": "x" * size}]}))
        big.chmod(0o644)
        tmp_path.chmod(0o755)
        small = json.dumps({"model": "gpt-4o-mini", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        url = "https://api.openai.com/v1/chat/completions"
        proto = "--http1.1" if client == "curl-http1.1" else "--http2"
        hdr = ["-H", "content-type: application/json", "-H", f"authorization: Bearer {SECRET}"]
        argv = ["curl", "-sf", proto, "-m", "20", "-w", "\\n", *hdr, "--data-binary", f"@{big}", url,
                "--next", "-sf", proto, "-m", "20", "-w", "\\n", *hdr, "-d", small, url]
    p = lab.spawn_client(argv)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()[-2000:]
    lines = [x for x in out.decode().splitlines() if x.strip()]
    if client.startswith("curl"):
        return p.pid, [(j["usage"]["prompt_tokens"], j["usage"]["completion_tokens"]) for j in map(json.loads, lines)]
    return p.pid, [tuple(map(int, x.split())) for x in lines]


CLIENTS = ["openai-sdk", "anthropic-sdk", "requests", "aiohttp", "node-fetch", "curl-http1.1", "curl-http2",
           "ollama-plain-http", "ollama-sendmsg"]


# The 2 MB prompt is run by one client per path (TLS HTTP/1.1, HTTP/2, plain HTTP).
CASES = [pytest.param(c, 300 * KB, id=f"{c}-300KB") for c in CLIENTS] + [
    pytest.param(c, 2048 * KB, id=f"{c}-2MB") for c in ("openai-sdk", "curl-http2", "ollama-plain-http")]


@pytest.mark.parametrize(("client", "size"), CASES)
def test_large_prompt_then_small_call_on_one_connection(lab, mon, client, size, tmp_path):
    pid, usage = _run_client(lab, client, size, tmp_path)
    assert len(usage) == 2 and usage[0][0] > size // 4 - 100  # the server saw the whole prompt
    calls, lost = events_of(mon, pid, 2)
    big_model, small_model = MODELS.get(client, ("gpt-4o", "gpt-4o-mini"))
    got = [(c.request_model or c.response_model, c.input_tokens, c.output_tokens, c.status, c.complete)
           for c in sorted(calls, key=lambda c: c.ts_ns)]
    assert got == [(big_model, *usage[0], 200, True), (small_model, *usage[1], 200, True)], (got, lost)
    assert len({c.flow_id for c in calls}) == 1  # one connection
    assert calls[0].request_bytes >= size
    assert not [e for e in lost if e.where in (busted.LossPlace.PLAINTEXT, busted.LossPlace.PARSE)], lost


STREAM_EVENTS = 5000


@pytest.mark.parametrize("proto", ["--http1.1", "--http2"])
def test_a_5000_event_stream_is_one_complete_call_with_every_token(lab, mon, proto):
    """A streamed answer of 5,000 SSE events (one token each, the lab's clamp lifted for this
    request): one call, complete, with the usage of the last event, and nothing lost."""
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": STREAM_EVENTS, "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "a long answer, please"}]})
    p = lab.spawn_client(["curl", "-sf", proto, "-m", "30", "-H", "Content-Type: application/json",
                          "-H", f"Authorization: Bearer {SECRET}", "-H", f"x-busted-lab-max-output: {STREAM_EVENTS}",
                          "-d", body, "https://api.openai.com/v1/chat/completions"])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()[-2000:]
    chunks = [json.loads(x[6:]) for x in out.decode().splitlines() if x.startswith("data: {")]
    usage = [c["usage"] for c in chunks if c.get("usage")][-1]
    assert usage["completion_tokens"] == STREAM_EVENTS and len(chunks) >= STREAM_EVENTS
    calls, lost = events_of(mon, p.pid, 1)
    assert len(calls) == 1, lost
    c = calls[0]
    assert (c.request_model, c.stream, c.status, c.complete) == ("gpt-4o-mini", True, 200, True)
    assert (c.input_tokens, c.output_tokens) == (usage["prompt_tokens"], STREAM_EVENTS)
    assert c.response_bytes and c.response_bytes > STREAM_EVENTS * 100
    assert not [e for e in lost if e.where == busted.LossPlace.PLAINTEXT], lost
