"""Demo traffic: a bounded set of real, different TLS/HTTP clients run in the lab's client netns.

``demo_traffic(lab, rounds=1)`` runs, in order, once per round:

==================== =======================================================================
curl-openai          curl POST https://api.openai.com/v1/chat/completions (Bearer sk-lab-...)
openai-sdk           the official ``openai`` SDK: ``chat.completions.create`` (prints its usage)
openai-sdk-stream    the same, ``stream=True`` with ``stream_options={"include_usage": True}``
curl-anthropic       curl POST https://api.anthropic.com/v1/messages with ``x-api-key: sk-lab-...``
anthropic-sdk-stream the official ``anthropic`` SDK: ``messages.stream`` (prints its usage)
python-gemini        /usr/bin/python3 http.client+ssl POST .../v1beta/models/<m>:generateContent
openssl-openai       ``openssl s_client -quiet``: POST /v1/chat/completions fed on stdin
gnutls-azure         ``gnutls-cli`` to x.openai.azure.com (a CNAME chain): POST to an Azure
                     deployment's chat/completions, fed on stdin
node-openai          node ``https.request`` POST https://api.openai.com/v1/chat/completions
curl-ollama          plain HTTP POST http://ollama.lab.test:11434/api/generate
curl-nonllm          curl GET https://www.example-nonllm.test/ (not an LLM provider)
agent-claude         an agent's tool call: a script named ``claude`` -> ``bash -c`` -> curl POST
                     https://api.anthropic.com/v1/messages (busted names the agent and the chain)
==================== =======================================================================

Every client but ``curl-nonllm`` makes one LLM API call. The SDK clients run with this Python
(``sys.executable``: the ``openai``/``anthropic`` packages come with the ``lab`` extra). Every
client resolves names through the lab DNS and trusts the lab CA (``lab.env()``); each run is
bounded by ``timeout`` seconds and killed if it overruns. A client whose binary or Python package
is missing is reported with ``returncode=None`` and ``skipped`` set, not raised. Keys are lab
keys, never real ones.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ["CLIENT_NAMES", "LLM_CLIENTS", "ClientResult", "agent_script", "demo_clients", "demo_traffic"]

LAB_OPENAI_KEY = "sk-lab-openai-0000000000000000"
LAB_ANTHROPIC_KEY = "sk-lab-ant-0000000000000000"
LAB_GOOGLE_KEY = "lab-google-key-0000"

CLIENT_NAMES = (
    "curl-openai",
    "openai-sdk",
    "openai-sdk-stream",
    "curl-anthropic",
    "anthropic-sdk-stream",
    "python-gemini",
    "openssl-openai",
    "gnutls-azure",
    "node-openai",
    "curl-ollama",
    "curl-nonllm",
    "agent-claude",
)
# The clients that make an LLM API call (each exactly one per round).
LLM_CLIENTS = tuple(n for n in CLIENT_NAMES if n != "curl-nonllm")
# Keys reach the Python and node clients as real programs get theirs: in the environment (argv
# would put them in every event's cmdline; curl's -H values are masked there by busted.redact).
_KEY_ENV = {"OPENAI_API_KEY": LAB_OPENAI_KEY, "ANTHROPIC_API_KEY": LAB_ANTHROPIC_KEY, "GOOGLE_API_KEY": LAB_GOOGLE_KEY}
# Python packages a client needs (in this interpreter, which runs it): skipped without them.
_NEEDS = {"openai-sdk": "openai", "openai-sdk-stream": "openai", "anthropic-sdk-stream": "anthropic"}

# The SDK clients print "<input tokens> <output tokens>" as the SDK parsed them from the answer.
_PY_OPENAI = r"""
import sys, openai
c = openai.OpenAI(base_url="https://api.openai.com/v1", max_retries=0, timeout=10)
msgs = [{"role": "user", "content": "hello from the openai SDK"}]
if sys.argv[1] == "stream":
    s = c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=12, stream=True,
                                  stream_options={"include_usage": True})
    usage = [ch.usage for ch in s if ch.usage][-1]
else:
    usage = c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=10).usage
print(usage.prompt_tokens, usage.completion_tokens)
"""

_PY_ANTHROPIC = r"""
import sys, anthropic
c = anthropic.Anthropic(base_url="https://api.anthropic.com", max_retries=0, timeout=10)
with c.messages.stream(model="claude-3-5-haiku-latest", max_tokens=16,
                       messages=[{"role": "user", "content": "hello from the anthropic SDK"}]) as s:
    m = s.get_final_message()
print(m.usage.input_tokens, m.usage.output_tokens)
"""

_PY_GEMINI = r"""
import http.client, json, os, ssl, sys
ctx = ssl.create_default_context()  # honours SSL_CERT_FILE
c = http.client.HTTPSConnection("generativelanguage.googleapis.com", 443, context=ctx, timeout=10)
body = json.dumps({"contents": [{"parts": [{"text": "hello from the lab"}]}]})
c.request("POST", "/v1beta/models/gemini-1.5-flash:generateContent", body=body,
          headers={"Content-Type": "application/json", "x-goog-api-key": os.environ["GOOGLE_API_KEY"]})
r = c.getresponse()
data = r.read()
print(r.status, data.decode())
sys.exit(0 if r.status == 200 else 1)
"""

_NODE_OPENAI = r"""
const https = require('https');
const body = JSON.stringify({model: 'gpt-4o-mini', messages: [{role: 'user', content: 'hello from node'}]});
const req = https.request({host: 'api.openai.com', port: 443, path: '/v1/chat/completions', method: 'POST',
  headers: {'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body),
            'Authorization': 'Bearer ' + process.env.OPENAI_API_KEY}, timeout: 10000}, (res) => {
  let data = '';
  res.on('data', (d) => { data += d; });
  res.on('end', () => { console.log(res.statusCode, data); process.exit(res.statusCode === 200 ? 0 : 1); });
});
req.on('timeout', () => { req.destroy(new Error('timeout')); });
req.on('error', (e) => { console.error(e.message); process.exit(2); });
req.end(body);
"""


# A stand-in for a coding agent: an executable named like Claude Code's CLI whose shell tool runs
# curl. bash -c runs two commands, so it forks curl (one command would be exec'd in its place);
# the script waits for it, so each of the three is a process of its own.
_AGENT_SCRIPT = r"""#!/bin/bash
# busted lab: stands in for a coding agent (named like Claude Code's CLI); its "tool" runs curl.
bash -c 'curl -sS --fail -m "$1" -X POST https://api.anthropic.com/v1/messages \
  -H "Content-Type: application/json" -H "x-api-key: $ANTHROPIC_API_KEY" \
  -H "anthropic-version: 2023-06-01" -d "$2"; rc=$?; exit $rc' tool "$1" "$2"
rc=$?
exit $rc
"""


def agent_script(lab) -> str:
    """The lab's agent stand-in (``<lab tmpdir>/agent/claude``), written on first use."""
    path = lab.tmpdir / "agent" / "claude"
    if not path.exists():
        path.parent.mkdir(mode=0o755, exist_ok=True)
        path.write_text(_AGENT_SCRIPT)
        path.chmod(0o755)
    return str(path)


def _http_post(host: str, path: str, body: str, auth: str, agent: str) -> bytes:
    """A whole HTTP/1.1 request for clients fed on stdin (openssl, gnutls-cli); the connection
    closes after the answer, so the client exits."""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\n{auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n"
            f"Connection: close\r\n\r\n{body}").encode()


@dataclass
class ClientResult:
    name: str
    argv: list[str]
    pid: int | None
    returncode: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    seconds: float = 0.0
    round: int = 0
    skipped: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def demo_clients(lab, timeout: float = 10.0) -> list[tuple[str, list[str], bytes | None]]:
    """(name, argv, stdin) for each demo client; argv runs inside the client netns."""
    ca = str(lab.ca_path)
    t = str(int(max(1, timeout)))
    chat = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello from curl"}]})
    msg = json.dumps({"model": "claude-3-5-sonnet-latest", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "hello from curl"}]})
    gen = json.dumps({"model": "llama3", "prompt": "hello from curl", "stream": False})
    ssl_chat = json.dumps({"model": "gpt-4o", "max_tokens": 6,
                           "messages": [{"role": "user", "content": "hello from openssl"}]})
    azure_chat = json.dumps({"max_tokens": 5, "messages": [{"role": "user", "content": "hello from gnutls"}]})
    azure_path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
    curl = ["curl", "-sS", "--fail", "-m", t]
    py = sys.executable
    return [
        ("curl-openai", [*curl, "-X", "POST", "https://api.openai.com/v1/chat/completions",
                         "-H", "Content-Type: application/json",
                         "-H", f"Authorization: Bearer {LAB_OPENAI_KEY}", "-d", chat], None),
        ("openai-sdk", [py, "-c", _PY_OPENAI, "plain"], None),
        ("openai-sdk-stream", [py, "-c", _PY_OPENAI, "stream"], None),
        ("curl-anthropic", [*curl, "-X", "POST", "https://api.anthropic.com/v1/messages",
                            "-H", "Content-Type: application/json", "-H", f"x-api-key: {LAB_ANTHROPIC_KEY}",
                            "-H", "anthropic-version: 2023-06-01", "-d", msg], None),
        ("anthropic-sdk-stream", [py, "-c", _PY_ANTHROPIC], None),
        ("python-gemini", ["/usr/bin/python3", "-c", _PY_GEMINI], None),
        ("openssl-openai", ["openssl", "s_client", "-connect", "api.openai.com:443",
                            "-servername", "api.openai.com", "-CAfile", ca, "-verify_return_error",
                            "-quiet"],
         _http_post("api.openai.com", "/v1/chat/completions", ssl_chat,
                    f"Authorization: Bearer {LAB_OPENAI_KEY}", "openssl-s_client")),
        ("gnutls-azure", ["gnutls-cli", "--x509cafile", ca, "-p", "443", "x.openai.azure.com"],
         _http_post("x.openai.azure.com", azure_path, azure_chat, f"api-key: {LAB_OPENAI_KEY}", "gnutls-cli")),
        ("node-openai", ["node", "-e", _NODE_OPENAI], None),
        ("curl-ollama", [*curl, "-X", "POST", "http://ollama.lab.test:11434/api/generate",
                         "-H", "Content-Type: application/json", "-d", gen], None),
        ("curl-nonllm", [*curl, "https://www.example-nonllm.test/"], None),
        ("agent-claude", [agent_script(lab), t, json.dumps({
            "model": "claude-3-5-sonnet-latest", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello from an agent's tool"}]})], None),
    ]


def run_one(lab, name: str, argv: list[str], stdin: bytes | None, timeout: float) -> ClientResult:
    if shutil.which(argv[0]) is None:
        return ClientResult(name, argv, None, None, skipped=f"{argv[0]} not installed")
    module = _NEEDS.get(name)
    if module and importlib.util.find_spec(module) is None:
        return ClientResult(name, argv, None, None,
                            skipped=f"Python package {module!r} not installed (pip install 'busted[lab]')")
    start = time.monotonic()
    proc = lab.spawn_client(argv, env=_KEY_ENV, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
        err += f"\n[lab] killed after {timeout}s".encode()
    return ClientResult(name, argv, proc.pid, proc.returncode, out, err, time.monotonic() - start)


def demo_traffic(lab, rounds: int = 1, *, timeout: float = 10.0, pause: float = 0.0,
                 only: tuple[str, ...] | None = None) -> list[ClientResult]:
    """Run every demo client *rounds* times (bounded: at most 100 rounds, *timeout* s per client)."""
    rounds = max(1, min(int(rounds), 100))
    results: list[ClientResult] = []
    for r in range(rounds):
        for name, argv, stdin in demo_clients(lab, timeout):
            if only and name not in only:
                continue
            res = run_one(lab, name, argv, stdin, timeout)
            res.round = r
            results.append(res)
        if pause and r + 1 < rounds:
            time.sleep(min(pause, 60.0))
    return results
