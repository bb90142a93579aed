"""`busted doctor`'s LLM-call line and `busted lab`'s calls table, without root (fake
Capabilities, synthetic events); tests/kernel/test_cli.py and test_lab_flows.py run the real ones."""

import io
import json
import re

from events_factory import IDENT

from busted.cli import LabCalls, main
from busted.events import Direction, LlmCall, McpMessage

EVIL = "\x1b]0;OWNED\x07"


def _caps(uprobes: bool):
    from busted.ebpf.probe import TRACEPOINTS, Capabilities

    tps = {tp: True for group in TRACEPOINTS.values() for tp in group}
    return Capabilities(kernel_release="6.1.0-test", kernel_version=(6, 1), btf=True, tracefs="/sys/kernel/tracing",
                        tracepoints=tps, ringbuf=True, uprobes=uprobes, bcc_version="0.26.0", privileged=True)


def _fake(monkeypatch, uprobes: bool, files: dict[str, str] | None = None):
    import busted.ebpf.probe
    import busted.ebpf.tlslibs

    monkeypatch.setattr(busted.ebpf.probe, "probe", lambda: _caps(uprobes))
    scanned = []

    def scan():
        scanned.append(1)
        return dict(files or {})

    monkeypatch.setattr(busted.ebpf.tlslibs, "scan", scan)
    return scanned


def test_doctor_without_uprobes_says_what_the_user_still_sees(monkeypatch):
    scanned = _fake(monkeypatch, uprobes=False)
    out = io.StringIO()
    assert main(["doctor"], out=out) == 0  # a plan without plaintext is still a plan
    text = out.getvalue()
    line = next(ln for ln in text.splitlines() if ln.startswith("LLM calls"))
    assert "no uprobes" in line and "flows + SNI classification only" in line
    assert re.search(r"plaintext\s+off", text) and not scanned  # nothing to probe: no scan
    out = io.StringIO()
    assert main(["doctor", "--json"], out=out) == 0
    d = json.loads(out.getvalue())["llm_calls"]
    assert d["uprobes"] is False and d["plaintext"] == "off" and "no uprobes" in d["why_not"]
    assert d["tls_files"] is None and d["without"].startswith("flows + SNI classification only")


def test_doctor_with_uprobes_lists_a_bounded_set_of_tls_files(monkeypatch):
    files = {f"/opt/venv{i}/lib/libssl.so.3": "openssl" for i in range(11)}
    files["/usr/lib/libgnutls.so.30" + EVIL] = "gnutls"
    _fake(monkeypatch, uprobes=True, files=files)
    out = io.StringIO()
    assert main(["doctor"], out=out) == 0
    text = out.getvalue()
    assert re.search(r"LLM calls\s+plaintext uprobe", text) and "TLS files to probe: 12" in text
    assert len(re.findall(r"^  openssl   /opt/venv\d+/lib/libssl\.so\.3$", text, re.M)) == 8
    assert "... and 4 more" in text and "\x1b" not in text
    out = io.StringIO()
    assert main(["doctor", "--json"], out=out) == 0
    d = json.loads(out.getvalue())["llm_calls"]
    assert (d["plaintext"], d["why_not"], d["tls_files_total"], len(d["tls_files"])) == ("uprobe", None, 12, 8)


def test_doctor_plaintext_forced_off(monkeypatch):
    _fake(monkeypatch, uprobes=True)
    out = io.StringIO()
    assert main(["doctor", "--probes", "plaintext=off"], out=out) == 0
    assert re.search(r"LLM calls\s+off: turned off \(--probes plaintext=off\); you see flows \+ SNI", out.getvalue())


def test_doctor_lists_lineage_tiers_and_the_chosen_one(monkeypatch):
    """The default lineage tier registers no syscall tracepoint; the execve tier is there, opt-in."""
    _fake(monkeypatch, uprobes=False)
    out = io.StringIO()
    assert main(["doctor"], out=out) == 0
    text = out.getvalue()
    assert re.search(r"^  lineage   tracepoint  available \(argv from /proc", text, re.M)
    assert re.search(r"^  lineage   syscall     available \(opt-in: argv copied at execve", text, re.M)
    assert re.search(r"^chosen plan\n(  .*\n)*  lineage   tracepoint$", text, re.M)
    out = io.StringIO()
    assert main(["doctor", "--probes", "lineage=syscall"], out=out) == 0
    assert re.search(r"^  lineage   syscall$", out.getvalue(), re.M)


def _call(**kw):
    base = dict(ts_ns=10, wall_time=1.0, **IDENT, provider="openai", hostname="api.openai.com",
                api="openai.chat", operation="chat", method="POST", path="/v1/chat/completions",
                http_version="2", request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18",
                stream=True, status=200, input_tokens=12, output_tokens=5, time_to_first_token_ns=3_250_000,
                duration_ns=4_500_000, cost_usd=0.0000048, price_source="genai-prices")
    base.update(kw)
    return LlmCall(**base)


def test_lab_calls_table_rows_totals_and_escaping():
    t = LabCalls()
    t.add(_call())
    t.add(_call(ts_ns=11, pid=200, comm="ev" + EVIL, provider="anthropic", api="anthropic.messages",
                request_model="claude-x" + EVIL, response_model=None, stream=False, input_tokens=30,
                output_tokens=None, cache_read_tokens=15, cache_write_tokens=0, cost_usd=None, complete=False))
    t.add(_call(ts_ns=12, provider="openai", input_tokens=8, output_tokens=2, cost_usd=0.000001))
    t.add(_call(ts_ns=14, direction=Direction.ACCEPT, pid=999, comm="python"))  # the fake provider's side
    t.add(McpMessage(ts_ns=13, wall_time=1.0, **IDENT, direction_sent=True, jsonrpc_method="tools/call",
                     jsonrpc_id="2", session_id="s1", tool="add"))
    text = t.text({100: "openai-sdk-stream"})
    assert "\x1b" not in text and "\\x1b]0;OWNED" in text
    lines = text.splitlines()
    assert lines[0] == "LLM calls: 3" and lines[1] == LabCalls.HEAD
    first = lines[2].split()
    assert first[:5] == ["openai-sdk-stream", "100", "openai", "openai.chat", "gpt-4o-mini"]
    assert "gpt-4o-mini -> gpt-4o-mini-2024-07-18" in lines[2]
    assert first[-7:] == ["12", "5", "-", "3.2", "4.5", "200", "0.000005"]
    row2 = lines[3]
    assert row2.startswith("ev\\x1b]0;OWNED") and " 15/0 " in row2 and "200*" in row2
    assert row2.split()[-1] == "-" and " no " in row2  # unpriced, not streamed, incomplete
    assert "total openai: 2 calls, 20 tokens in, 7 out, $0.000006" in text
    assert "total anthropic: 1 calls, 30 tokens in, 0 out, cost unknown (no price for the model)" in text
    assert "(* the response's end was not seen" in text
    assert "MCP messages: 1" in text and re.search(r"openai-sdk-stream\s+100 out\s+tools/call\s+add\s+2\s+s1", text)
    assert "(and 1 calls seen from the lab's fake providers' side" in text and " 999 " not in text
    assert LabCalls().text({}) == "LLM calls: none seen\nAgents: none seen behind the lab's flows"


def test_lab_live_line_for_a_call_is_short_and_escaped():
    line = LabCalls.live(_call(comm="x" + EVIL))
    assert " llm-call " in line and "openai openai.chat gpt-4o-mini -> gpt-4o-mini-2024-07-18" in line
    assert "tokens 12/5 ttft 3.2 ms status 200" in line and "\x1b" not in line and len(line) < 200
    assert LabCalls.live(McpMessage(ts_ns=1, wall_time=1.0, **IDENT, direction_sent=False,
                                    jsonrpc_method="tools/list")).split()[-1] == "tools/list"


def test_lab_shows_the_agent_and_chain_behind_a_flow():
    from busted.events import Ancestor, FlowClosed, FlowOpened

    chain = (Ancestor(302, "curl", "/usr/bin/curl"), Ancestor(301, "bash", "/usr/bin/bash"),
             Ancestor(300, "claude", "/tmp/busted-lab-x/agent/claude"), Ancestor(7, "busted" + EVIL, None))
    who = dict(pid=302, comm="curl", ancestry=chain, agent="claude-code", agent_pid=300,
               agent_evidence="exe:claude", hostname="api.anthropic.com", dport=443)
    t = LabCalls()
    t.add(FlowOpened(ts_ns=1, wall_time=1.0, **{**IDENT, **who}))
    t.add(FlowClosed(ts_ns=2, wall_time=2.0, **{**IDENT, **who}, bytes_sent=1, bytes_received=2, duration_ns=1))
    t.add(FlowOpened(ts_ns=1, wall_time=1.0, **{**IDENT, "flow_id": 77}))  # no agent: not listed
    t.add(_call(pid=302, comm="curl", ancestry=chain, agent="claude-code", provider="anthropic"))
    names = {300: "agent-claude", 100: "openai-sdk"}
    text = t.text(names)
    agents = text.split("Agents behind flows: 1\n")[1]
    assert agents == ("agent-claude         curl -> api.anthropic.com:443  agent claude-code (pid 300, exe:claude)  "
                      "chain curl[302] <- bash[301] <- claude[300] <- busted\\x1b]0;OWNED\\x07[7]")
    # the call's row is the agent client's (its curl is a grandchild of the process the lab started)
    assert re.search(r"^agent-claude\s+302\s+anthropic ", text, re.M), text
