"""`model` deny rules enforced in the kernel (issue 22, acceptance 2): the uprobe at the TLS
library's write reads the request's JSON "model", the socket of a denied one is stopped at cgroup
skb egress. Real clients (the openai SDK, curl) in the lab; "reached" is the lab server's own log.
Clients run in a test cgroup (the enforcement scope)."""

import json
import sys
import time
import uuid

import pytest
from conftest import collect
from scopes import scope_cgroup
from test_policy_lab import requests_with, run

import busted
from busted import EventsLost, Policy, PolicyDecision

DENY_GPT4O = {"default": "audit", "rules": [
    {"name": "no-gpt-4o", "action": "deny", "model": "gpt-4o"},
]}
SDK = """
import openai, sys
c = openai.OpenAI(api_key="k", base_url="https://api.openai.com/v1", max_retries=0, timeout=20)
try:
    r = c.chat.completions.create(model=sys.argv[1], messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=5, extra_query={"m": sys.argv[2]})
except Exception as exc:
    print("error", type(exc).__name__, exc)
    sys.exit(3)
print("ok", r.usage.completion_tokens)
"""


def curl_chat(model: str, marker: str, extra=()):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    return ["curl", "-sS", "--fail", "-m", "10", *extra, "-H", "content-type: application/json",
            "-H", "authorization: Bearer k", "--data", body,
            f"https://api.openai.com/v1/chat/completions?m={marker}"]


@pytest.fixture(scope="module")
def cgroup():
    with scope_cgroup("busted-model-test") as path:
        yield path


def model_decisions(evs):
    return [e for e in evs if isinstance(e, PolicyDecision) and e.point == "llm_request"]


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_denied_model_never_reaches_the_server(lab, cgroup, http2):
    """gpt-4o is stopped for the openai SDK (HTTP/1.1, headers and body in separate writes) and
    curl (HTTP/1.1 or HTTP/2); gpt-4o-mini on the same host passes: names are compared whole."""
    m_sdk, m_curl, m_ok, m_ok_curl = (uuid.uuid4().hex for _ in range(4))
    h2 = ("--http2",) if http2 else ("--http1.1",)
    with busted.Monitor(policy=Policy.from_dict(DENY_GPT4O), enforce=True,
                        policy_scope="/" + cgroup.name) as mon:
        t0 = time.monotonic()
        sdk = run(lab, [sys.executable, "-c", SDK, "gpt-4o", m_sdk], cgroup, timeout=60)
        sdk_s = time.monotonic() - t0
        cu = run(lab, curl_chat("gpt-4o", m_curl, h2), cgroup, timeout=60)
        ok = run(lab, [sys.executable, "-c", SDK, "gpt-4o-mini", m_ok], cgroup, timeout=60)
        ok_curl = run(lab, curl_chat("gpt-4o-mini", m_ok_curl, h2), cgroup, timeout=60)
        evs = collect(mon, lambda e: sum(d.enforced for d in model_decisions(e)) >= 2, timeout=15)
    print("sdk:", sdk.returncode, sdk.stdout, sdk.stderr[-400:], f"{sdk_s:.2f}s")
    print("curl:", cu.returncode, cu.stderr)
    assert sdk.returncode == 3 and b"error" in sdk.stdout, (sdk.stdout, sdk.stderr)
    assert cu.returncode != 0, (cu.stdout, cu.stderr)
    assert ok.returncode == 0 and ok.stdout.startswith(b"ok"), (ok.stdout, ok.stderr)
    assert ok_curl.returncode == 0, ok_curl.stderr
    # the server's own log: no gpt-4o request, both gpt-4o-mini ones
    assert requests_with(lab, m_sdk) == [] and requests_with(lab, m_curl) == []
    assert len(requests_with(lab, m_ok)) == 1 and len(requests_with(lab, m_ok_curl)) == 1
    stopped = [d for d in model_decisions(evs) if d.enforced]
    assert {d.comm for d in stopped} >= {"python", "curl"} or len(stopped) >= 2, stopped
    for d in stopped:
        assert (d.rule, d.action) == ("no-gpt-4o", "deny")
        assert ("model", "gpt-4o") in d.matched
        assert d.provider == "openai" and d.dport == 443
        assert d.daddr in lab.hosts["api.openai.com"].addresses
    # user space read the stopped requests' plaintext too: it does not report them again as not enforced
    assert not [d for d in model_decisions(evs) if ("model", "gpt-4o") in d.matched and not d.enforced]
    # gpt-4o-mini was never judged a deny, and nothing was lost
    assert not any(("model", "gpt-4o-mini") in d.matched and d.action == "deny" for d in model_decisions(evs))
    assert not [e for e in evs if isinstance(e, EventsLost) and "model" in (e.detail or "")]


def node_fetch(model: str, marker: str):
    js = ("fetch('https://api.openai.com/v1/chat/completions?m=MARK',{method:'POST',headers:{'content-type':"
          "'application/json'},body:JSON.stringify({model:'MODEL',max_tokens:4,messages:[]}),"
          "signal:AbortSignal.timeout(20000)}).then(r=>r.json()).then(j=>console.log('ok',j.model))"
          ".catch(e=>{console.log('error',e.cause?e.cause.code:e.name);process.exit(3)})")
    js = js.replace("MARK", marker).replace("MODEL", model)
    return ["node", "-e", js]


def test_node_memory_bio(lab, cgroup):
    """node's OpenSSL writes through a memory BIO: the socket write comes after SSL_write returns,
    still in the same thread, and is the one stopped."""
    m_bad, m_ok = uuid.uuid4().hex, uuid.uuid4().hex
    with busted.Monitor(policy=Policy.from_dict(DENY_GPT4O), enforce=True,
                        policy_scope="/" + cgroup.name) as mon:
        bad = run(lab, node_fetch("gpt-4o", m_bad), cgroup, timeout=60)
        ok = run(lab, node_fetch("gpt-4o-mini", m_ok), cgroup, timeout=60)
        evs = collect(mon, lambda e: any(d.enforced for d in model_decisions(e)), timeout=15)
    print("node:", bad.returncode, bad.stdout, bad.stderr[-300:])
    assert bad.returncode == 3 and bad.stdout.startswith(b"error"), (bad.stdout, bad.stderr)
    assert ok.returncode == 0 and ok.stdout.startswith(b"ok"), (ok.stdout, ok.stderr)
    assert requests_with(lab, m_bad) == [] and len(requests_with(lab, m_ok)) == 1
    (d,) = [d for d in model_decisions(evs) if d.enforced]
    assert d.comm == "node" and d.rule == "no-gpt-4o" and ("model", "gpt-4o") in d.matched


GEMINI = """
import http.client, json, ssl, sys
c = http.client.HTTPSConnection("generativelanguage.googleapis.com", 443, context=ssl.create_default_context(),
                                timeout=20)
body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 5}})
try:
    c.request("POST", f"/v1beta/models/{sys.argv[1]}:generateContent?key=k&m={sys.argv[2]}", body=body,
              headers={"Content-Type": "application/json"})
    print("ok", c.getresponse().status)
except OSError as exc:
    print("error", type(exc).__name__, exc)
    sys.exit(3)
"""


def test_model_in_the_url_path(lab, cgroup):
    """Gemini names the model in the path (HTTP/1.1 request line): read there too."""
    m_bad, m_ok = uuid.uuid4().hex, uuid.uuid4().hex
    pol = {"default": "audit", "rules": [{"name": "no-flash", "action": "deny", "model": "gemini-1.5-flash"}]}
    with busted.Monitor(policy=Policy.from_dict(pol), enforce=True, policy_scope="/" + cgroup.name) as mon:
        bad = run(lab, [sys.executable, "-c", GEMINI, "gemini-1.5-flash", m_bad], cgroup, timeout=60)
        ok = run(lab, [sys.executable, "-c", GEMINI, "gemini-1.5-flash-8b", m_ok], cgroup, timeout=60)
        evs = collect(mon, lambda e: any(d.enforced for d in model_decisions(e)), timeout=15)
    print("gemini:", bad.returncode, bad.stdout, bad.stderr[-300:])
    assert bad.returncode == 3 and bad.stdout.startswith(b"error"), (bad.stdout, bad.stderr)
    assert ok.returncode == 0 and ok.stdout.startswith(b"ok"), (ok.stdout, ok.stderr)
    assert requests_with(lab, m_bad) == [] and len(requests_with(lab, m_ok)) == 1
    (d,) = [d for d in model_decisions(evs) if d.enforced]
    assert d.rule == "no-flash" and ("model", "gemini-1.5-flash") in d.matched and d.provider == "google-gemini"

