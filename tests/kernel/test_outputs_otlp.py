"""`busted monitor --otlp`: real BPF, real clients in the lab (curl, the openai SDK, a Gemini call),
a real OTLP receiver on loopback (tests/unit/otlp_receiver.py, opentelemetry-proto + grpcio). The
calls arrive as CLIENT spans `chat <model>` (Gemini: `generate_content <model>`) with the exact tokens
the fake providers answered, the GenAI metrics count them, and no key reaches the collector. A dead
collector holds nothing up."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clients import gemini_client, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the receivers live with the unit tests
from otlp_receiver import GrpcReceiver, HttpReceiver  # noqa: E402

OPENAI_KEY = "sk-proj-OTLPSECRET0123456789abcdefXYZ0"
GOOGLE_KEY = "AIzaOTLPSECRET0123456789abcdefXYZ0123"
PY = sys.executable
BODY = '{"model":"gpt-4o","max_tokens":3,"messages":[{"role":"user","content":"hello"}]}'
OPENAI = f"""
import openai
c = openai.OpenAI(api_key="{OPENAI_KEY}", base_url="https://api.openai.com/v1", max_retries=0)
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi there"}}],
                              max_tokens=7)
print(r.model, r.usage.prompt_tokens, r.usage.completion_tokens, r.id)
"""
GEMINI = gemini_client(GOOGLE_KEY, "hello from the otlp test")
CLIENT = 3  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_CLIENT




def _run(lab, argv) -> tuple[int, bytes]:
    p = lab.spawn_client(argv)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode()[-2000:]
    return p.pid, out


def _clients(lab) -> dict[int, tuple[str, str, str | None, int, int, str | None]]:
    """Run the three clients; pid -> (provider, request model, response model or None, tokens in, out,
    the answer's id as the client received it, or None where it did not print it)."""
    want = {}
    pid, out = _run(lab, ["curl", "-sf", "--http1.1", "-m", "10", "-H", "content-type: application/json",
                          "-H", f"Authorization: Bearer {OPENAI_KEY}", "-d", BODY,
                          "https://api.openai.com/v1/chat/completions"])
    d = json.loads(out)
    want[pid] = ("openai", "gpt-4o", d["model"], d["usage"]["prompt_tokens"], d["usage"]["completion_tokens"],
                 d["id"])
    pid, out = _run(lab, [PY, "-c", OPENAI])
    model, tin, tout, rid = out.split()
    want[pid] = ("openai", "gpt-4o-mini", model.decode(), int(tin), int(tout), rid.decode())
    pid, out = _run(lab, ["/usr/bin/python3", "-c", GEMINI])
    tin, tout = map(int, out.split())
    want[pid] = ("gcp.gemini", "gemini-1.5-flash", None, tin, tout, None)  # operation generate_content
    return want


def _stop(proc) -> bytes:
    proc.send_signal(signal.SIGTERM)  # the CLI's clean stop: outputs flushed and closed
    try:
        _, rest = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return rest


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_monitor_otlp_exports_calls_as_genai_spans(lab, tmp_path, protocol):
    recv = (HttpReceiver if protocol == "http/protobuf" else GrpcReceiver)()
    stdout = tmp_path / "stdout"
    try:
        with open(stdout, "wb") as so:
            proc = subprocess.Popen([PY, "-m", "busted.cli", "monitor", "--json", "--otlp", recv.endpoint,
                                     "--otlp-protocol", protocol, "--duration", "90", "-c", "curl", "-c", "python",
                                     "-c", "python3", "-c", "python3.11"], stdout=so, stderr=subprocess.PIPE)
        err = b""
        try:
            err = wait_ready(proc)
            want = _clients(lab)
            recv.wait(lambda: {s["attrs"].get("process.pid") for s in recv.spans()} >= set(want), timeout=30)
        finally:
            err += _stop(proc)
        assert proc.returncode == 0, err.decode(errors="replace")
        spans = recv.spans()
        body = recv.all_bytes()
        metrics = recv.metrics()
    finally:
        recv.close()
    rows = [json.loads(ln) for ln in stdout.read_text().splitlines() if ln.startswith("{")]
    calls = [r for r in rows if r["kind"] == "llm_call"]
    by_pid = {s["attrs"]["process.pid"]: s for s in spans if s["kind"] == CLIENT and s["attrs"]["process.pid"] in want}
    assert sorted(by_pid) == sorted(want), [(s["name"], s["attrs"].get("process.pid")) for s in spans]
    rows_by_pid = {c["pid"]: c for c in calls if c["direction"] == "connect"}
    for pid, (prov, req_model, resp_model, tin, tout, rid) in want.items():
        s = by_pid[pid]
        a = s["attrs"]
        # the answer's id, as the client got it (and as --json printed it): the lab answers
        # chatcmpl-<24 hex> (OpenAI) and a 16-hex responseId (Gemini)
        assert a["gen_ai.response.id"] == rows_by_pid[pid]["response_id"], (a, rows_by_pid[pid])
        if rid is not None:
            assert a["gen_ai.response.id"] == rid and rid.startswith("chatcmpl-")
        else:
            assert re.fullmatch(r"[0-9a-f]{16}", a["gen_ai.response.id"]), a
        op = "generate_content" if prov == "gcp.gemini" else "chat"
        assert s["name"] == f"{op} {req_model}", s["name"]
        assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.request.model"]) == (
            op, prov, req_model)
        if resp_model:
            assert a["gen_ai.response.model"] == resp_model
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (tin, tout)
        assert a["http.response.status_code"] == 200 and a["server.port"] == 443
        assert s["start"] < s["end"]
        assert s["resource"]["service.name"] == "busted"
    # every call the CLI printed went out as a span (the fake providers' own side: SERVER spans)
    assert len(spans) == len(calls), (len(spans), len(calls))
    usage = metrics["gen_ai.client.token.usage"]
    for kind, idx in (("input", 3), ("output", 4)):
        pts = [p for p in usage if p["attrs"]["gen_ai.token.type"] == kind]
        assert sum(p["count"] for p in pts) == len([c for c in calls if c[f"{kind}_tokens"] is not None])
        assert sum(p["sum"] for p in pts) == sum(c[f"{kind}_tokens"] or 0 for c in calls)
        assert sum(p["sum"] for p in pts if p["attrs"].get("gen_ai.provider.name") == "gcp.gemini") >= sum(
            w[idx] for w in want.values() if w[0] == "gcp.gemini")
    assert sum(p["count"] for p in metrics["gen_ai.client.operation.duration"]) == len(calls)
    assert OPENAI_KEY.encode() not in body and GOOGLE_KEY.encode() not in body
    assert b"otlp " in err and b"0 lost" in err, err.decode(errors="replace")


def test_monitor_with_a_dead_collector_keeps_every_call(lab, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    stdout = tmp_path / "stdout"
    with open(stdout, "wb") as so:
        proc = subprocess.Popen([PY, "-m", "busted.cli", "monitor", "--json", "--otlp", f"http://127.0.0.1:{port}",
                                 "--duration", "90", "-c", "curl", "-c", "python", "-c", "python3", "-c",
                                 "python3.11"], stdout=so, stderr=subprocess.PIPE)
    err = b""
    try:
        err = wait_ready(proc)
        want = _clients(lab)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = [json.loads(ln) for ln in stdout.read_text().splitlines() if ln.startswith('{"kind":"llm_call"')]
            if {r["pid"] for r in rows} >= set(want):
                break
            time.sleep(0.3)
        assert proc.poll() is None  # still monitoring
    finally:
        err += _stop(proc)
    text = err.decode(errors="replace")
    assert proc.returncode == 0, text
    rows = [json.loads(ln) for ln in stdout.read_text().splitlines() if ln.startswith("{")]
    calls = {r["pid"]: r for r in rows if r["kind"] == "llm_call" and r["pid"] in want}
    assert sorted(calls) == sorted(want)
    for pid, (_, _, _, tin, tout, _) in want.items():
        assert (calls[pid]["input_tokens"], calls[pid]["output_tokens"]) == (tin, tout)
    # the failed export is reported: what was lost, at the end (and a rate-limited line once an
    # export has failed, which may come after the stop: the SDK retries for its timeout first)
    n = len([r for r in rows if r["kind"] == "llm_call"])
    summary = [ln for ln in text.splitlines() if ln.startswith(f"busted: otlp http://127.0.0.1:{port} (http/protobuf)")]
    assert summary and f"0 spans and 0 log records exported, {n} lost" in summary[-1], text


def test_lab_otlp_every_call_is_a_span(tmp_path):
    """`busted lab --otlp`: every call of the demo (SDK clients, curl, streaming and not, HTTP/2,
    plain-HTTP Ollama, and the fake providers' side) is one span with the call's exact tokens."""
    with HttpReceiver() as recv:
        p = subprocess.run([PY, "-m", "busted.cli", "lab", "--otlp", recv.endpoint, "--json"], capture_output=True,
                           timeout=300)
        spans = recv.spans()
        metrics = recv.metrics()
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0, err
    rows = [json.loads(ln) for ln in p.stdout.decode().splitlines() if ln.startswith("{")]
    calls = [r for r in rows if r["kind"] == "llm_call"]
    assert len(calls) >= 10, err
    by_key = {(s["attrs"]["busted.flow.id"], s["attrs"]["process.pid"], s["start"]): s for s in spans}
    assert len(by_key) == len(spans) == len(calls), (len(spans), len(calls))
    for c in calls:
        end = int(c["wall_time"] * 1e9)
        s = by_key[(c["flow_id"], c["pid"], end - (c["duration_ns"] or 0))]
        a = s["attrs"]
        assert s["kind"] == (CLIENT if c["direction"] == "connect" else 2)
        assert s["name"] == f"{c['operation'] or 'chat'} {c['request_model'] or c['response_model']}"
        for field, attr in (("input_tokens", "gen_ai.usage.input_tokens"),
                            ("output_tokens", "gen_ai.usage.output_tokens"),
                            ("request_model", "gen_ai.request.model"), ("stream", "gen_ai.request.stream")):
            assert a.get(attr) == c[field], (field, c, a)
        assert a.get("gen_ai.response.id") == c["response_id"], (c, a)
    assert {s["attrs"].get("gen_ai.provider.name") for s in spans if s["kind"] == CLIENT} >= {
        "openai", "anthropic", "gcp.gemini", "azure.ai.openai", "ollama"}
    # the fake providers answer realistic ids (chatcmpl-..., msg_..., Gemini's responseId); Ollama has none
    ids = {c["api"]: c["response_id"] for c in calls if c["direction"] == "connect" and c["response_id"]}
    assert ids["openai.chat"].startswith("chatcmpl-") and ids["anthropic.messages"].startswith("msg_"), ids
    assert re.fullmatch(r"[0-9a-f]{16}", ids["gemini.generate_content"]), ids
    assert not any(c["response_id"] for c in calls if c["api"].startswith("ollama")), calls
    n_in = sum(1 for c in calls if c["input_tokens"] is not None)
    assert sum(p["count"] for p in metrics["gen_ai.client.token.usage"]
               if p["attrs"]["gen_ai.token.type"] == "input") == n_in
    assert f"busted: otlp {recv.endpoint} (http/protobuf): {len(calls)} spans" in err
