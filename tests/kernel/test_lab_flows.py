"""The lab with real BPF: a flow that crosses network namespaces keeps exact attribution and bytes;
each LLM demo client (curl, the openai and anthropic SDKs, python, openssl, gnutls, node, Ollama
over plain HTTP) yields its LlmCall with the tokens the client was told, the non-LLM one none; and
``busted lab`` prints a row per call."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Peer, collect

import busted
from busted import Direction, FlowClosed, FlowOpened, LlmCall


@pytest.fixture(scope="module")
def lab():
    from busted.lab import Lab

    with Lab() as lab:
        yield lab
    # torn down: no namespace of this lab remains
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.client_ns not in names and lab.server_ns not in names


@pytest.mark.parametrize("family", [4, 6])
def test_root_ns_client_to_lab_server(lab, family):
    n, m = 50_001, 7_777
    host = lab.hosts["api.openai.com"]
    addr = host.ipv4 if family == 4 else host.ipv6
    port = 9100 + family
    with busted.Monitor(port=port) as mon:
        sink = lab.start_tcp_sink(port, reply_bytes=m)
        client = Peer("client", addr, port, n, "bst-labcli")
        assert client.wait().split() == ["GOT", str(m)]
        evs = collect(mon, lambda e: sum(isinstance(x, FlowClosed) for x in e) >= 2, timeout=10)
        lab.stop_tcp_sink(sink)
    out = {(type(e), e.direction): e for e in evs if isinstance(e, FlowOpened | FlowClosed)}
    cc = out[(FlowClosed, Direction.CONNECT)]
    ac = out[(FlowClosed, Direction.ACCEPT)]
    assert (cc.pid, cc.comm, cc.daddr, cc.dport, cc.family) == (client.pid, "bst-labcli", addr, port, family)
    assert (cc.bytes_sent, cc.bytes_received) == (n, m)
    # the server side: the sink's own pid, inside the lab's namespace
    assert ac.pid == sink and ac.saddr == addr and ac.sport == port and ac.daddr == cc.saddr
    assert (ac.bytes_sent, ac.bytes_received) == (m, n)
    root_ns = os.stat("/proc/self/ns/net").st_ino
    assert cc.netns == root_ns and ac.netns not in (None, root_ns)
    assert out[(FlowOpened, Direction.ACCEPT)].netns == ac.netns


# -- the demo's LLM calls ------------------------------------------------------------------------

# name -> (provider, api, request_model, stream): what each LLM demo client asks (busted/lab/traffic.py)
DEMO_CALLS = {
    "curl-openai": ("openai", "openai.chat", "gpt-4o-mini", False),
    "openai-sdk": ("openai", "openai.chat", "gpt-4o-mini", False),
    "openai-sdk-stream": ("openai", "openai.chat", "gpt-4o-mini", True),
    "curl-anthropic": ("anthropic", "anthropic.messages", "claude-3-5-sonnet-latest", False),
    "anthropic-sdk-stream": ("anthropic", "anthropic.messages", "claude-3-5-haiku-latest", True),
    "python-gemini": ("google-gemini", "gemini.generate_content", "gemini-1.5-flash", False),
    "openssl-openai": ("openai", "openai.chat", "gpt-4o", False),
    "gnutls-azure": ("azure-openai", "openai.chat", "gpt-4o-mini", False),  # the deployment in the path
    "node-openai": ("openai", "openai.chat", "gpt-4o-mini", False),
    "curl-ollama": ("ollama", "ollama.generate", "llama3", False),
    "agent-claude": ("anthropic", "anthropic.messages", "claude-3-5-sonnet-latest", False),  # its curl's call
}


def _by_client(c, pid):
    """The call was made by the client started as ``pid``: itself, or a process below it (the
    agent stand-in's curl is its grandchild)."""
    return c.pid == pid or pid in {a.pid for a in c.ancestry or ()}


def reported_usage(stdout: bytes) -> tuple[int, int]:
    """(input, output) tokens as the client was told: the SDK clients print them, the others print
    the provider's JSON answer (after the status or the raw HTTP head)."""
    text = stdout.decode()
    if text.split() and all(w.isdigit() for w in text.split()):
        a, b = map(int, text.split())
        return a, b
    body = json.loads(text[text.index("{"): text.rindex("}") + 1])
    if "usageMetadata" in body:
        u = body["usageMetadata"]
        return u["promptTokenCount"], u["candidatesTokenCount"]
    if "eval_count" in body:
        return body["prompt_eval_count"], body["eval_count"]
    u = body["usage"]
    if "prompt_tokens" in u:
        return u["prompt_tokens"], u["completion_tokens"]
    # Anthropic: OTel input = input + cache read + cache creation
    return (u["input_tokens"] + u.get("cache_read_input_tokens", 0) + u.get("cache_creation_input_tokens", 0),
            u["output_tokens"])


def test_each_llm_demo_client_yields_its_call(lab):
    from busted.lab import demo_traffic
    from busted.lab.traffic import CLIENT_NAMES, LAB_ANTHROPIC_KEY, LAB_GOOGLE_KEY, LAB_OPENAI_KEY, LLM_CLIENTS

    assert set(LLM_CLIENTS) == set(DEMO_CALLS) and set(CLIENT_NAMES) - set(LLM_CLIENTS) == {"curl-nonllm"}
    results: list = []
    events: list = []
    with busted.Monitor() as mon:
        t = threading.Thread(target=lambda: results.extend(demo_traffic(lab, rounds=1, timeout=20)))
        t.start()
        while t.is_alive():
            events.extend(mon.events(timeout=0.3))
        t.join()
        by = {r.name: r for r in results}
        pids = {r.pid for r in results}
        # until every LLM client's call is in (each announces itself as an event), bounded
        end = time.monotonic() + 10
        while time.monotonic() < end:
            have = [e for e in events if isinstance(e, LlmCall)]
            if all(any(_by_client(c, by[n].pid) for c in have) for n in LLM_CLIENTS):
                break
            events.extend(mon.events(timeout=0.3))
        stats = mon.stats()
    for r in results:
        assert r.ok, (r.name, r.skipped, r.stdout[-300:], r.stderr[-500:])
    calls = [e for e in events if isinstance(e, LlmCall) and any(_by_client(e, p) for p in pids)]
    assert not [e for e in calls if e.pid == by["curl-nonllm"].pid]
    for name, (provider, api, model, stream) in DEMO_CALLS.items():
        r = by[name]
        mine = [c for c in calls if _by_client(c, r.pid)]
        assert len(mine) == 1, (name, mine, [e for e in events if getattr(e, "pid", None) == r.pid], stats)
        c = mine[0]
        assert (c.provider, c.api, c.request_model, c.stream, c.status, c.direction) == (
            provider, api, model, stream, 200, Direction.CONNECT), (name, c)
        assert (c.input_tokens, c.output_tokens) == reported_usage(r.stdout), (name, c, r.stdout[-500:])
        assert c.daddr in {a for h in lab.hosts.values() for a in h.addresses} and c.flow_id
        assert c.duration_ns and c.duration_ns > 0 and c.time_to_first_token_ns is not None
        assert c.complete, (name, c)  # nothing was cut: curl's HTTP/2 calls end at their content-length
        # a local model has no price; every cloud model of the demo has one (genai-prices)
        assert (c.cost_usd is None) == (provider == "ollama"), (name, c.cost_usd)
    sdk = {n: next(c for c in calls if c.pid == by[n].pid) for n in ("openai-sdk", "anthropic-sdk-stream")}
    assert sdk["openai-sdk"].user_agent.startswith("OpenAI/Python")
    assert sdk["anthropic-sdk-stream"].user_agent.startswith("Anthropic/Python")
    dumped = "\n".join(json.dumps(e.to_dict(), default=str) for e in events)
    for key in (LAB_OPENAI_KEY, LAB_ANTHROPIC_KEY, LAB_GOOGLE_KEY):
        assert key not in dumped


def test_busted_lab_command_prints_a_row_per_call(tmp_path):
    """The main job (``busted lab``): NDJSON on stdout (not a terminal), the calls table on stderr."""
    from busted.lab.traffic import LLM_CLIENTS

    exe = Path(sys.executable).with_name("busted")
    p = subprocess.run([str(exe), "lab", "--rounds", "1"], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    calls = [r for r in rows if r["kind"] == "llm_call" and r["direction"] == "connect"]
    assert len(calls) == len(LLM_CLIENTS), p.stderr[-3000:]
    err = p.stderr
    assert f"LLM calls: {len(LLM_CLIENTS)}\n" in err and "COST USD" in err
    table = {ln.split()[0]: ln for ln in err.splitlines()
             if len(ln.split()) > 1 and ln.split()[0] in LLM_CLIENTS and ln.split()[1].isdigit()}  # not the agents
    assert set(table) == set(LLM_CLIENTS), err[-3000:]
    by_pid = {c["pid"]: c for c in calls}
    for name, line in table.items():
        c = by_pid[int(line.split()[1])]
        assert f" {c['input_tokens']} " in line and f" {c['output_tokens']} " in line, (name, line)
        assert (f"{c['cost_usd']:.6f}" if c["cost_usd"] is not None else " -") in line
        assert c["complete"] and " 200 " in line and "200*" not in line, (name, line)  # no `*`: nothing was cut
    assert "total openai: 5 calls" in err and "total anthropic: 3 calls" in err
    assert "Agents behind flows: 1\nagent-claude " in err and "agent claude-code (pid " in err
    assert re.search(r"chain curl\[\d+\] <- bash\[\d+\] <- claude\[\d+\]", err), err[-3000:]
    assert "curl-nonllm" not in table and f"{len(LLM_CLIENTS) + 1}/{len(LLM_CLIENTS) + 1} demo clients" in err
