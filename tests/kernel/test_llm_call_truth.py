"""What an LlmCall claims is what happened, with real clients in the lab (issue 19):

* ``complete`` is True when the response's end was on the wire (curl over HTTP/2 stops reading at
  Content-Length, before the lab's END_STREAM in an empty DATA frame of its own; an HTTP/1.0 body
  ends at close) and False when the client walked away mid-stream;
* no provider from a generic port: an OpenAI-compatible gateway on :8000 whose name is only in
  /etc/hosts is named by the request's Host header, provider None; an MCP server on :8000 is no
  provider either.
"""

import json
import sys
import time

import pytest

import busted
from busted import Evidence, FlowClassified, FlowOpened, LlmCall, McpMessage
from busted.lab.core import GATEWAY_NAME, GATEWAY_PORT

PY = sys.executable
KEY = "sk-lab-truth-0123456789abcdef"
BODY = '{"model":"gpt-4o","max_tokens":3,"messages":[{"role":"user","content":"hello"}]}'
HDR = ["-H", "content-type: application/json", "-H", f"authorization: Bearer {KEY}"]


@pytest.fixture(scope="module")
def mon(lab):
    with busted.Monitor(preexisting=False) as m:
        yield m


def events_of(mon, pid, done, timeout=10.0) -> list:
    """Events of process ``pid`` until ``done(events)`` (bounded wait)."""
    got, end = [], time.monotonic() + timeout
    while time.monotonic() < end and not done(got):
        got += [e for e in mon.events(timeout=0.2) if getattr(e, "pid", None) == pid]
    return got


def calls(events) -> list[LlmCall]:
    return [e for e in events if isinstance(e, LlmCall)]


def run(lab, argv, timeout=30):
    p = lab.spawn_client(argv)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err.decode()[-2000:]
    return p.pid, out.decode()


def test_curl_http2_stopping_at_content_length_is_complete(lab, mon):
    url = "https://api.openai.com/v1/chat/completions"
    pid, out = run(lab, ["curl", "-sf", "--http2", "-m", "10", *HDR, "-d", BODY, url, url])
    assert out.count('"completion_tokens": 3') == 2 or out.count('"completion_tokens":3') == 2, out
    got = calls(events_of(mon, pid, lambda ev: len(calls(ev)) >= 2))
    assert [(c.http_version, c.status, c.output_tokens, c.complete) for c in got] == [("2", 200, 3, True)] * 2


def test_http10_close_delimited_answer_is_complete(lab, mon):
    url = "https://api.openai.com/v1/chat/completions"
    pid, out = run(lab, ["curl", "-sf", "--http1.0", "-m", "10", *HDR, "-H", "x-busted-lab-no-length: 1",
                         "-d", BODY, url])
    assert json.loads(out)["usage"]["completion_tokens"] == 3
    (c,) = calls(events_of(mon, pid, lambda ev: len(calls(ev)) >= 1))
    assert (c.http_version, c.status, c.output_tokens, c.complete) == ("1.0", 200, 3, True)
    log = [r for r in lab.http_requests() if r["http_version"] == "1.0" and r["path"] == "/v1/chat/completions"]
    assert log  # the server answered an HTTP/1.0 request (without a length: close-delimited)


ABORT = f"""
import http.client, json, ssl
c = http.client.HTTPSConnection("api.openai.com", 443, context=ssl.create_default_context())
body = json.dumps({{"model": "gpt-4o-mini", "stream": True, "max_tokens": 20,
                    "messages": [{{"role": "user", "content": "hi"}}]}})
c.request("POST", "/v1/chat/completions", body=body, headers={{"content-type": "application/json",
          "authorization": "Bearer {KEY}", "x-busted-lab-chunk-delay-ms": "100"}})
r = c.getresponse()
print(r.status, r.read1(64)[:8], flush=True)
c.sock.close()  # walks away mid-stream: the rest of the answer is never read
"""


def test_client_abort_mid_stream_is_incomplete(lab, mon):
    pid, out = run(lab, [PY, "-c", ABORT])
    assert out.startswith("200")
    (c,) = calls(events_of(mon, pid, lambda ev: len(calls(ev)) >= 1))
    assert (c.status, c.stream, c.complete) == (200, True, False)


def test_openai_compatible_gateway_on_a_generic_port_named_by_its_host_header(lab, mon):
    code = f"""
import openai
c = openai.OpenAI(api_key="{KEY}", base_url="http://{GATEWAY_NAME}:{GATEWAY_PORT}/v1", max_retries=0)
r = c.chat.completions.create(model="qwen2.5-coder", messages=[{{"role": "user", "content": "hi"}}], max_tokens=4)
print(r.usage.prompt_tokens, r.usage.completion_tokens)
"""
    pid, out = run(lab, [PY, "-c", code])
    want_in, want_out = map(int, out.split())
    evs = events_of(mon, pid, lambda ev: len(calls(ev)) >= 1)
    (c,) = calls(evs)
    assert c.daddr == lab.gateway.ipv4 and c.dport == GATEWAY_PORT
    assert (c.api, c.request_model, c.input_tokens, c.output_tokens) == ("openai.chat", "qwen2.5-coder", want_in,
                                                                        want_out)
    assert (c.provider, c.hostname, c.evidence) == (None, GATEWAY_NAME, Evidence.HTTP_HOST)
    opened = [e for e in evs if isinstance(e, FlowOpened) and e.flow_id == c.flow_id]
    classified = [e for e in evs if isinstance(e, FlowClassified) and e.flow_id == c.flow_id]
    assert [(e.provider, e.hostname) for e in opened] == [(None, None)]  # no guess from the port
    assert [(e.provider, e.hostname, e.evidence) for e in classified] == [(None, GATEWAY_NAME, Evidence.HTTP_HOST)]


MCP_SERVER = """
import sys
from mcp.server.mcpserver import MCPServer
app = MCPServer("lab")
@app.tool()
def add(a: int, b: int) -> int:
    return a + b
app.run(transport="streamable-http", host=sys.argv[1], port=8000)
"""

MCP_CLIENT = """
import asyncio, socket, sys, time
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
end = time.monotonic() + 20
while True:
    try:
        socket.create_connection((sys.argv[1], 8000), timeout=0.5).close()
        break
    except OSError:
        if time.monotonic() > end:
            raise
        time.sleep(0.1)
async def main():
    async with streamable_http_client(f"http://{sys.argv[1]}:8000/mcp") as (r, w, *_):
        async with ClientSession(r, w) as s:
            await s.initialize()
            res = await s.call_tool("add", {"a": 2, "b": 3})
            print(res.content[0].text)
asyncio.run(main())
"""


def test_mcp_server_on_port_8000_is_no_provider(lab, mon):
    import subprocess

    ip = lab.hosts["www.example-nonllm.test"].ipv4  # by address: no DNS name, only the port could speak
    server = subprocess.Popen(lab.server_cmd([PY, "-c", MCP_SERVER, ip]), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        pid, out = run(lab, [PY, "-c", MCP_CLIENT, ip], timeout=60)
        assert out.strip() == "5"
        evs = events_of(mon, pid, lambda ev: any(isinstance(e, McpMessage) and e.jsonrpc_method == "tools/call"
                                                 for e in ev))
    finally:
        server.terminate()
        server.wait(10)
    msgs = [e for e in evs if isinstance(e, McpMessage) and e.dport == 8000]
    assert ("tools/call", "add") in [(m.jsonrpc_method, m.tool) for m in msgs]
    flows = [e for e in evs if isinstance(e, FlowOpened | FlowClassified) and e.dport == 8000]
    assert flows and all(e.provider is None for e in [*flows, *msgs])
    assert not calls(evs)


LATE_READER = f"""
import http.client, json, ssl, sys, time
url = sys.argv[1]
host, port = url.split("//")[1].split(":") if url.count(":") == 2 else (url.split("//")[1], None)
if url.startswith("https"):
    c = http.client.HTTPSConnection(host, int(port or 443), context=ssl.create_default_context())
else:
    c = http.client.HTTPConnection(host, int(port or 80))
body = json.dumps({{"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{{"role": "user", "content": "hi"}}]}})
for delay in ("300", "0"):  # two calls on one connection: the first answer is "thought about" for 300 ms
    c.request("POST", "/v1/chat/completions", body=body, headers={{"content-type": "application/json",
              "authorization": "Bearer {KEY}", "x-busted-lab-delay-ms": delay}})
    time.sleep(1.0)  # an application busy elsewhere: it reads the answer a second after it came
    r = c.getresponse()
    print(r.status, json.loads(r.read())["usage"]["completion_tokens"], flush=True)
"""


@pytest.mark.parametrize("url", ["https://api.openai.com", f"http://{GATEWAY_NAME}:{GATEWAY_PORT}"])
def test_ttft_is_the_arrival_not_the_late_read(lab, mon, url):
    pid, out = run(lab, [PY, "-c", LATE_READER, url])
    assert out.split() == ["200", "4", "200", "4"]
    got = calls(events_of(mon, pid, lambda ev: len(calls(ev)) >= 2))
    assert len(got) == 2 and got[0].flow_id == got[1].flow_id
    slow, fast = got
    # The server waited 300 ms (then ~0) before answering; the client read each answer ~1 s after
    # its request. The read's time would say ~1000 ms for both.
    assert (slow.ttft_source, fast.ttft_source) == ("socket", "socket")
    assert 300 * 1_000_000 <= slow.time_to_first_token_ns < 700 * 1_000_000, slow.time_to_first_token_ns
    assert fast.time_to_first_token_ns < 400 * 1_000_000, fast.time_to_first_token_ns
