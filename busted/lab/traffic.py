"""Demo traffic: a bounded set of real, different TLS/HTTP clients run in the lab's client netns.

``demo_traffic(lab, rounds=1)`` runs, in order, once per round:

=================  ==========================================================================
curl-openai        curl POST https://api.openai.com/v1/chat/completions (Bearer sk-lab-...)
curl-anthropic     curl POST https://api.anthropic.com/v1/messages with ``x-api-key: sk-lab-...``
python-gemini      /usr/bin/python3 http.client+ssl POST .../v1beta/models/<m>:generateContent
openssl-openai     ``openssl s_client -quiet`` GET / on api.openai.com (request fed on stdin)
gnutls-azure       ``gnutls-cli`` GET / on x.openai.azure.com (a CNAME chain; request on stdin)
node-openai        node ``https.request`` POST https://api.openai.com/v1/chat/completions
curl-ollama        plain HTTP POST http://ollama.lab.test:11434/api/generate
curl-nonllm        curl GET https://www.example-nonllm.test/ (not an LLM provider)
=================  ==========================================================================

Every client resolves names through the lab DNS and trusts the lab CA (``lab.env()``); each run
is bounded by ``timeout`` seconds and killed if it overruns. Clients whose binary is missing are
reported with ``returncode=None`` and ``skipped`` set, not raised.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field

__all__ = ["CLIENT_NAMES", "ClientResult", "demo_clients", "demo_traffic"]

LAB_OPENAI_KEY = "sk-lab-openai-0000000000000000"
LAB_ANTHROPIC_KEY = "sk-lab-ant-0000000000000000"
LAB_GOOGLE_KEY = "lab-google-key-0000"

CLIENT_NAMES = (
    "curl-openai",
    "curl-anthropic",
    "python-gemini",
    "openssl-openai",
    "gnutls-azure",
    "node-openai",
    "curl-ollama",
    "curl-nonllm",
)

_PY_GEMINI = r"""
import http.client, json, ssl, sys
ctx = ssl.create_default_context()  # honours SSL_CERT_FILE
c = http.client.HTTPSConnection("generativelanguage.googleapis.com", 443, context=ctx, timeout=10)
body = json.dumps({"contents": [{"parts": [{"text": "hello from the lab"}]}]})
c.request("POST", "/v1beta/models/gemini-1.5-flash:generateContent", body=body,
          headers={"Content-Type": "application/json", "x-goog-api-key": sys.argv[1]})
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
            'Authorization': 'Bearer ' + process.argv[1]}, timeout: 10000}, (res) => {
  let data = '';
  res.on('data', (d) => { data += d; });
  res.on('end', () => { console.log(res.statusCode, data); process.exit(res.statusCode === 200 ? 0 : 1); });
});
req.on('timeout', () => { req.destroy(new Error('timeout')); });
req.on('error', (e) => { console.error(e.message); process.exit(2); });
req.end(body);
"""


def _http_get(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lab\r\nConnection: close\r\n\r\n".encode()


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
    curl = ["curl", "-sS", "--fail", "-m", t]
    return [
        ("curl-openai", [*curl, "-X", "POST", "https://api.openai.com/v1/chat/completions",
                         "-H", "Content-Type: application/json",
                         "-H", f"Authorization: Bearer {LAB_OPENAI_KEY}", "-d", chat], None),
        ("curl-anthropic", [*curl, "-X", "POST", "https://api.anthropic.com/v1/messages",
                            "-H", "Content-Type: application/json", "-H", f"x-api-key: {LAB_ANTHROPIC_KEY}",
                            "-H", "anthropic-version: 2023-06-01", "-d", msg], None),
        ("python-gemini", ["/usr/bin/python3", "-c", _PY_GEMINI, LAB_GOOGLE_KEY], None),
        ("openssl-openai", ["openssl", "s_client", "-connect", "api.openai.com:443",
                            "-servername", "api.openai.com", "-CAfile", ca, "-verify_return_error",
                            "-quiet"], _http_get("api.openai.com")),
        ("gnutls-azure", ["gnutls-cli", "--x509cafile", ca, "-p", "443", "x.openai.azure.com"],
         _http_get("x.openai.azure.com")),
        ("node-openai", ["node", "-e", _NODE_OPENAI, LAB_OPENAI_KEY], None),
        ("curl-ollama", [*curl, "-X", "POST", "http://ollama.lab.test:11434/api/generate",
                         "-H", "Content-Type: application/json", "-d", gen], None),
        ("curl-nonllm", [*curl, "https://www.example-nonllm.test/"], None),
    ]


def run_one(lab, name: str, argv: list[str], stdin: bytes | None, timeout: float) -> ClientResult:
    if shutil.which(argv[0]) is None:
        return ClientResult(name, argv, None, None, skipped=f"{argv[0]} not installed")
    start = time.monotonic()
    proc = lab.spawn_client(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
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
