"""LLM calls in every output of `busted monitor`: real BPF, real clients in the lab (curl, the openai
SDK, a Gemini call with its key in the query string), each with a key-shaped secret. The calls must
reach stdout, the store's llm_calls table, the JSONL file and the metrics with the exact token
counts the fake providers answered; the secrets must reach none of them."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter

from clients import free_port, gemini_client, wait_ready

from busted.sinks import Store

OPENAI_KEY = "sk-proj-OUTPUTSSECRET0123456789abcdefXYZ"
GOOGLE_KEY = "AIzaOUTPUTSSECRET0123456789abcdefXYZ0"
PY = sys.executable  # the venv's python: has the openai package
BODY = '{"model":"gpt-4o","max_tokens":3,"messages":[{"role":"user","content":"hello"}]}'

OPENAI = f"""
import openai
c = openai.OpenAI(api_key="{OPENAI_KEY}", base_url="https://api.openai.com/v1", max_retries=0)
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi there"}}],
                              max_tokens=7)
print(r.usage.prompt_tokens, r.usage.completion_tokens)
"""

GEMINI = gemini_client(GOOGLE_KEY, "hello from the outputs test")






def _metric(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` with these labels (over labels not named: agent, container)."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = None
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        base, _, lab = metric.partition("{")
        if base == name and want <= set(lab.rstrip("}").split(",")):
            total = (total or 0.0) + float(value)
    return total


def _calls_in(path) -> list[dict]:
    """The llm_call lines of the monitor's stdout so far (a line still being written is skipped)."""
    out = []
    for ln in path.read_text().splitlines():
        if "llm_call" in ln:  # the JSON's layout is not the contract (--json lines are compact)
            try:
                d = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if d.get("kind") == "llm_call":
                out.append(d)
    return out


def _status_class(c: dict) -> str:
    if not c["complete"]:
        return "incomplete"
    return "unknown" if c["status"] is None else f"{c['status'] // 100}xx"


def _run(lab, argv) -> tuple[int, bytes]:
    """Run a client in the lab; its pid and its stdout."""
    p = lab.spawn_client(argv)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode()[-2000:]
    return p.pid, out


def test_calls_reach_every_output_and_secrets_none(lab, tmp_path):
    db, jsonl, stdout = tmp_path / "calls.db", tmp_path / "calls.jsonl", tmp_path / "stdout"
    port = free_port()
    with open(stdout, "wb") as so:
        proc = subprocess.Popen([PY, "-m", "busted.cli", "monitor", "--json", "--store", str(db), "--jsonl",
                                 str(jsonl), "--metrics", f"127.0.0.1:{port}", "--duration", "60",
                                 "-c", "curl", "-c", "python", "-c", "python3", "-c", "python3.11"],
                                stdout=so, stderr=subprocess.PIPE)
    try:
        err = wait_ready(proc)
        want: dict[int, tuple[int, int]] = {}
        url = "https://api.openai.com/v1/chat/completions"
        pid, out = _run(lab, ["curl", "-sf", "--http1.1", "-m", "10", "-H", "content-type: application/json",
                              "-H", f"Authorization: Bearer {OPENAI_KEY}", "-d", BODY, url])
        usage = json.loads(out)["usage"]
        want[pid] = (usage["prompt_tokens"], usage["completion_tokens"])
        pid, out = _run(lab, [PY, "-c", OPENAI])
        want[pid] = tuple(map(int, out.split()))
        pid, out = _run(lab, ["/usr/bin/python3", "-c", GEMINI])
        want[pid] = tuple(map(int, out.split()))
        # The lab's fake providers are processes too: their side of each exchange (comm "python",
        # direction accept) is a call as well. Wait until the metrics count exactly the calls
        # stdout shows (the CLI feeds its outputs before it prints), all clients' among them.
        text, deadline = "", time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = _calls_in(stdout)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            n = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                    if ln.startswith("busted_llm_calls_total{"))
            if {c["pid"] for c in seen} >= set(want) and n == len(seen):
                break
            time.sleep(0.3)
        # the store while the monitor still writes it: its rows committed, the -wal file in use
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with Store.open_readonly(db) as r:
                if {c["pid"] for c in r.calls()} >= set(want):
                    break
            time.sleep(0.3)
        live = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(db.name)}
    finally:
        proc.send_signal(signal.SIGTERM)  # the CLI's clean stop: outputs flushed and closed
        try:
            _, rest = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    err += rest
    assert proc.returncode == 0, err.decode(errors="replace")
    rows = [json.loads(ln) for ln in stdout.read_text().splitlines() if ln.startswith("{")]
    calls = {r["pid"]: r for r in rows if r["kind"] == "llm_call" and r["pid"] in want}

    # stdout: one call per client, exact tokens, joined to its flow
    assert sorted(calls) == sorted(want), rows
    for pid, (tin, tout) in want.items():
        c = calls[pid]
        assert (c["input_tokens"], c["output_tokens"], c["status"], c["complete"]) == (tin, tout, 200, True)
        assert c["flow_id"] and c["dport"] == 443
    assert {c["provider"] for c in calls.values()} == {"openai", "google-gemini"}
    gem = next(c for c in calls.values() if c["provider"] == "google-gemini")
    assert gem["path"].startswith("/v1beta/models/gemini-1.5-flash:generateContent?key=")

    # the store: every event written, the calls in llm_calls with the same values
    assert f"busted: store {db}: {len(rows)} events written, 0 lost".encode() in err.splitlines(), err
    with Store.open_readonly(db) as r:
        stored = {c["pid"]: c for c in r.calls() if c["pid"] in want}
    assert sorted(stored) == sorted(want)
    for pid, c in calls.items():
        s = stored[pid]
        for k in ("flow_id", "provider", "request_model", "response_model", "input_tokens", "output_tokens",
                  "status", "path", "user_agent", "cost_usd", "time_to_first_token_ns", "comm", "sport"):
            assert s[k] == c[k], (k, s[k], c[k])
    q = subprocess.run([PY, "-m", "busted.cli", "query", "--store", str(db), "--table", "llm_calls"],
                       capture_output=True, text=True, timeout=30)
    assert sorted(json.loads(ln)["pid"] for ln in q.stdout.splitlines() if json.loads(ln)["pid"] in want) == \
        sorted(want)

    # JSONL: the same lines as stdout
    assert [json.loads(ln) for ln in jsonl.read_text().splitlines()] == rows

    # metrics: exact token counts per provider/model/comm, over every call stdout showed
    expect: Counter = Counter()
    for c in seen:
        labels = (c["provider"] or "none", c["response_model"] or c["request_model"] or "?", c["comm"])
        for kind in ("input", "output"):
            if c[f"{kind}_tokens"] is not None:
                expect[(*labels, kind)] += c[f"{kind}_tokens"]
        expect[(*labels, "calls:" + _status_class(c))] += 1
    assert sum(n for k, n in expect.items() if k[3].startswith("calls:")) == len(seen) >= len(want)
    for (prov, model, comm, kind), n in expect.items():
        if kind.startswith("calls:"):
            got = _metric(text, "busted_llm_calls_total", provider=prov, model=model, comm=comm,
                          status_class=kind[6:])
        else:
            got = _metric(text, "busted_llm_tokens_total", provider=prov, model=model, comm=comm, type=kind)
        assert got == n, (prov, model, comm, kind, got, n)
    # the clients' own calls: their tokens are in those sums (curl and python3 are theirs alone)
    for c in calls.values():
        if c["comm"] in ("curl", "python3"):
            assert _metric(text, "busted_llm_tokens_total", provider=c["provider"], model=c["response_model"],
                           comm=c["comm"], type="output") == want[c["pid"]][1]

    # the keys: in no output at all
    files = [stdout, jsonl, *(p for p in tmp_path.iterdir() if p.name.startswith(db.name))]
    assert any(p.name == "calls.db" for p in files)
    for key in (OPENAI_KEY, GOOGLE_KEY):
        k = key.encode()
        assert k not in err, "stderr"
        assert k not in text.encode(), "metrics"
        for p in files:
            assert k not in p.read_bytes(), p
        for name, data in live.items():
            assert k not in data, name
    assert "calls.db-wal" in live  # the live store was read with its write-ahead log
