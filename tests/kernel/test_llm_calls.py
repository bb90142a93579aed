"""LLM calls read from TLS plaintext and plain HTTP, joined to their flows: real BPF (uprobes on the
TLS libraries), real clients (official SDKs, curl over HTTP/1.1 and HTTP/2, node, GnuTLS, MCP) in
the lab, against fake providers that answer with exact usage numbers (docs/lab.md: input tokens =
max(1, len(body) // 4), output = the request's max tokens, clamped to 1..64, else 8)."""

import json
import subprocess
import sys
import time

import pytest

import busted
from busted import FlowClosed, LlmCall, McpMessage

SECRET = "sk-proj-BUSTEDSECRET0123456789abcdefXYZ"
PY = sys.executable  # the venv's python: has the openai, anthropic and mcp packages


@pytest.fixture(scope="module")
def mon(lab):
    with busted.Monitor(preexisting=False) as m:
        yield m


def calls_of(mon, pid, n=1, timeout=10.0, kind=LlmCall):
    """The first ``n`` events of ``kind`` from process ``pid`` (bounded wait)."""
    got, end = [], time.monotonic() + timeout
    while time.monotonic() < end and len(got) < n:
        for ev in mon.events(timeout=0.2):
            if isinstance(ev, kind) and ev.pid == pid:
                got.append(ev)
    return got


def run(lab, argv, env=None, timeout=30):
    p = lab.spawn_client(argv, env=env)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err.decode()[-2000:]
    return p.pid, out.decode()


def no_secret(events):
    for ev in events:
        assert SECRET not in json.dumps(ev.to_dict()), ev


OPENAI = f"""
import openai, sys
c = openai.OpenAI(api_key="{SECRET}", base_url="https://api.openai.com/v1", max_retries=0)
if sys.argv[1] == "stream":
    s = c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi there"}}],
                                  max_tokens=5, stream=True, stream_options={{"include_usage": True}})
    usage = [ch.usage for ch in s if ch.usage][-1]
else:
    r = c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi there"}}],
                                  max_tokens=7)
    usage = r.usage
print(usage.prompt_tokens, usage.completion_tokens)
"""


@pytest.mark.parametrize("mode", ["plain", "stream"])
def test_openai_sdk(lab, mon, mode):
    pid, out = run(lab, [PY, "-c", OPENAI, mode])
    want_in, want_out = map(int, out.split())
    (c,) = calls_of(mon, pid)
    assert (c.api, c.operation, c.provider, c.hostname) == ("openai.chat", "chat", "openai", "api.openai.com")
    assert (c.request_model, c.stream, c.status, c.complete) == ("gpt-4o-mini", mode == "stream", 200, True)
    assert (c.input_tokens, c.output_tokens) == (want_in, want_out)
    assert c.output_tokens == (5 if mode == "stream" else 7)
    assert c.response_model and c.path == "/v1/chat/completions" and c.method == "POST"
    assert c.daddr in lab.hosts["api.openai.com"].addresses and c.dport == 443 and c.flow_id
    assert c.user_agent and c.user_agent.startswith("OpenAI/Python")
    assert c.duration_ns > 0 and c.time_to_first_token_ns is not None
    no_secret([c])


ANTHROPIC = f"""
import anthropic
c = anthropic.Anthropic(api_key="{SECRET}", base_url="https://api.anthropic.com", max_retries=0)
with c.messages.stream(model="claude-3-5-haiku-latest", max_tokens=6,
                       messages=[{{"role": "user", "content": "hello"}}]) as s:
    m = s.get_final_message()
print(m.usage.input_tokens, m.usage.output_tokens)
"""


def test_anthropic_sdk_streaming(lab, mon):
    pid, out = run(lab, [PY, "-c", ANTHROPIC])
    want_in, want_out = map(int, out.split())
    (c,) = calls_of(mon, pid)
    assert (c.api, c.provider, c.stream, c.status) == ("anthropic.messages", "anthropic", True, 200)
    assert (c.request_model, c.input_tokens, c.output_tokens) == ("claude-3-5-haiku-latest", want_in, want_out)
    assert c.finish_reason and c.complete
    no_secret([c])


BODY = '{"model":"gpt-4o","max_tokens":3,"messages":[{"role":"user","content":"hello"}]}'


def test_curl_http11_and_http2_multiplexed(lab, mon):
    url = "https://api.openai.com/v1/chat/completions"
    hdr = ["-H", "content-type: application/json", "-H", f"authorization: Bearer {SECRET}"]
    pid, _ = run(lab, ["curl", "-sf", "--http1.1", "-m", "10", *hdr, "-d", BODY, url])
    (c,) = calls_of(mon, pid)
    assert (c.http_version, c.request_model, c.output_tokens, c.input_tokens) == ("1.1", "gpt-4o", 3, len(BODY) // 4)
    # two requests on one HTTP/2 connection (streams 1 and 3)
    pid, _ = run(lab, ["curl", "-sf", "--http2", "-m", "10", *hdr, "-d", BODY, url, url])
    a, b = calls_of(mon, pid, n=2)
    assert a.http_version == b.http_version == "2" and a.flow_id == b.flow_id
    assert {a.stream_id, b.stream_id} == {1, 3} and a.output_tokens == b.output_tokens == 3
    no_secret([a, b, c])


def test_keep_alive_three_calls_on_one_connection(lab, mon):
    code = f"""
import http.client, json, ssl
c = http.client.HTTPSConnection("api.anthropic.com", 443, context=ssl.create_default_context())
for n in (1, 2, 3):
    c.request("POST", "/v1/messages", body=json.dumps({{"model": "claude-x", "max_tokens": n,
              "messages": [{{"role": "user", "content": "hi"}}]}}),
              headers={{"x-api-key": "{SECRET}", "content-type": "application/json"}})
    assert c.getresponse().read()
"""
    pid, _ = run(lab, ["/usr/bin/python3", "-c", code])
    got = calls_of(mon, pid, n=3)
    assert [c.output_tokens for c in got] == [1, 2, 3] and len({c.flow_id for c in got}) == 1
    assert all(c.api == "anthropic.messages" and c.http_version == "1.1" for c in got)


def test_node_fetch(lab, mon):
    js = ("fetch('https://api.openai.com/v1/chat/completions',{method:'POST',headers:{'content-type':"
          "'application/json'},body:JSON.stringify({model:'gpt-4.1',max_tokens:4,messages:[]})})"
          ".then(r=>r.json()).then(j=>console.log(j.usage.prompt_tokens, j.usage.completion_tokens))")
    pid, out = run(lab, ["node", "-e", js])
    want_in, want_out = map(int, out.split())
    (c,) = calls_of(mon, pid)
    assert (c.request_model, c.input_tokens, c.output_tokens, c.provider) == ("gpt-4.1", want_in, want_out, "openai")


def test_gnutls_client(lab, mon):
    body = '{"model":"llama3","prompt":"hi","stream":false}'
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\ncontent-type: application/json\r\n"
           f"content-length: {len(BODY)}\r\nconnection: close\r\n\r\n{BODY}").encode()
    assert body
    p = lab.spawn_client(["gnutls-cli", "--x509cafile", str(lab.ca_path), "-p", "443", "api.openai.com"],
                         stdin=__import__("subprocess").PIPE)
    p.communicate(req, timeout=20)
    (c,) = calls_of(mon, p.pid)
    assert (c.request_model, c.output_tokens, c.status) == ("gpt-4o", 3, 200)


def test_plain_http_ollama(lab, mon):
    url = f"http://{lab.hosts['ollama.lab.test'].ipv4}:11434/api/chat"
    pid, out = run(lab, ["curl", "-sf", "-m", "10", "-d",
                         '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":4}}',
                         url])
    last = json.loads(out.strip().splitlines()[-1])
    (c,) = calls_of(mon, pid)
    assert (c.api, c.stream, c.request_model) == ("ollama.chat", True, "llama3.2")
    assert (c.input_tokens, c.output_tokens) == (last["prompt_eval_count"], last["eval_count"])
    assert c.cost_usd is None  # a local model costs nothing we can price


def test_non_llm_https_yields_no_call_and_stops_in_the_kernel(lab, mon):
    code = """
import http.client, ssl, sys
c = http.client.HTTPSConnection("www.example-nonllm.test", 443, context=ssl.create_default_context())
for i in range(20):
    c.request("GET", "/index.html?i=%d" % i)
    c.getresponse().read()
    if i == 0:
        print("FIRST", flush=True)
        sys.stdin.readline()  # the test says when the verdict is in the kernel (no fixed sleep)
"""
    before = mon.stats().plaintext_records
    p = lab.spawn_client(["/usr/bin/python3", "-c", code], stdin=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"FIRST"
    deadline = time.monotonic() + 10
    skipped = 0
    while time.monotonic() < deadline and not skipped:
        list(mon.events(timeout=0.05))
        skipped = len(mon._program.maps["pt_skip"])
    p.communicate(b"go\n", timeout=20)
    got, end = [], time.monotonic() + 10  # until the client's connection is seen closed
    while time.monotonic() < end and not any(isinstance(e, FlowClosed) for e in got):
        got += [e for e in mon.events(timeout=0.05) if isinstance(e, LlmCall | FlowClosed) and e.pid == p.pid]
    assert skipped >= 1  # the verdict reached the kernel while the connection was open
    assert not [e for e in got if isinstance(e, LlmCall)]
    # the 19 later exchanges were not copied to user space
    assert mon.stats().plaintext_records - before < 10


MCP_SERVER = """
import sys
from mcp.server.mcpserver import MCPServer
app = MCPServer("lab")
@app.tool()
def add(a: int, b: int) -> int:
    return a + b
app.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
"""

MCP_CLIENT = """
import asyncio, sys
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
async def main():
    async with streamable_http_client(f"http://127.0.0.1:{sys.argv[1]}/mcp") as (r, w, *_):
        async with ClientSession(r, w) as s:
            await s.initialize()
            res = await s.call_tool("add", {"a": 2, "b": 3})
            print(res.content[0].text)
asyncio.run(main())
"""


def test_mcp_client_server_over_streamable_http(mon, tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([PY, "-c", MCP_SERVER, str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        client = subprocess.run([PY, "-c", MCP_CLIENT, str(port)], capture_output=True, timeout=60)
        assert client.returncode == 0 and client.stdout.strip() == b"5", client.stderr[-2000:]
        got, end = [], time.monotonic() + 10
        want = {("initialize", None), ("tools/call", "add")}
        while time.monotonic() < end and not want <= {(m.jsonrpc_method, m.tool) for m in got if m.dport == port}:
            got += [e for e in mon.events(timeout=0.05) if isinstance(e, McpMessage)]
    finally:
        server.terminate()
        server.wait(10)
    methods = [(m.jsonrpc_method, m.tool) for m in got if m.dport == port]
    assert ("initialize", None) in methods and ("tools/call", "add") in methods
    call = next(m for m in got if m.jsonrpc_method == "tools/call" and m.dport == port)
    assert call.session_id and call.direction_sent and not call.is_notification

