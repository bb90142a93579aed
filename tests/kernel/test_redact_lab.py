"""One redaction for every output (issue 17 item 11), end to end: a real curl in the lab sends an LLM
call whose URL carries credential query parameters, whose User-Agent carries ``token=<32 chars>`` and
whose prompt carries a password; with content capture on, neither the Monitor's ``LlmCall`` (the
Python API) nor ``busted monitor --json`` (stdout, the table's source) holds any of them."""

import json
import os
import select
import signal
import subprocess
import sys
import time

from clients import wait_ready

import busted
from busted import LlmCall

PY = sys.executable
SECRETS = {"subscription-key": "SubKeyLab0001", "x-api-key": "XApiKeyLab0002", "access-token": "AccessTokLab0003",
           "auth_token": "AuthTokLab0004"}
UA_TOKEN = "Qw7Er2Ty9Ui4Op6As1Df3Gh5Jk8Lz0Xc"
PROMPT_PW = "hunter2-lab-prompt"
URL = "https://api.openai.com/v1/chat/completions?" + "&".join(f"{k}={v}" for k, v in SECRETS.items())
BODY = json.dumps({"model": "gpt-4o", "max_tokens": 3,
                   "messages": [{"role": "user", "content": f"log in with password: {PROMPT_PW} now"}]})
CURL = ["curl", "-sf", "--http1.1", "-m", "10", "-H", "content-type: application/json",
        "-A", f"MyApp/1.0 (linux; token={UA_TOKEN})", "-d", BODY, URL]


def _leaks(text: str) -> list[str]:
    return [s for s in (*SECRETS.values(), UA_TOKEN, PROMPT_PW) if s in text]


def _curl(lab) -> int:
    p = lab.spawn_client(CURL)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode()[-2000:]
    return p.pid


def test_monitor_api_and_json_hold_no_query_or_user_agent_secret(lab):
    # the Python API
    with busted.Monitor(preexisting=False, capture_content=4096) as mon:
        pid = _curl(lab)
        got, end = [], time.monotonic() + 10
        while time.monotonic() < end and not got:
            got = [ev for ev in mon.events(timeout=0.2) if isinstance(ev, LlmCall) and ev.pid == pid]
    assert len(got) == 1, got
    c = got[0]
    assert c.path.startswith("/v1/chat/completions?subscription-key=[REDACTED]&x-api-key=[REDACTED]"), c.path
    assert c.user_agent and "token=[REDACTED]" in c.user_agent
    assert c.prompt and "password: [REDACTED]" in c.prompt  # captured, with the password masked
    assert _leaks(json.dumps(c.to_dict())) == [] and _leaks(repr(c)) == []

    # busted monitor --json
    proc = subprocess.Popen([PY, "-m", "busted.cli", "monitor", "--json", "--capture-content", "4096", "-c", "curl",
                             "--duration", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_ready(proc)
        pid = _curl(lab)
        out, fd, end = b"", proc.stdout.fileno(), time.monotonic() + 15
        while time.monotonic() < end and b'"llm_call"' not in out:
            if select.select([fd], [], [], 0.2)[0]:
                out += os.read(fd, 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, err = proc.communicate()
    out += rest
    calls = [d for d in map(json.loads, (ln for ln in out.decode().splitlines() if ln.startswith("{")))
             if d.get("kind") == "llm_call" and d.get("pid") == pid]
    assert len(calls) == 1, out.decode(errors="replace")[-3000:]
    assert calls[0]["path"] == c.path and calls[0]["user_agent"] == c.user_agent
    assert _leaks(out.decode(errors="replace")) == [] and _leaks(err.decode(errors="replace")) == []
