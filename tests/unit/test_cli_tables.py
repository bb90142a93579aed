"""The busted command without root: rendering, the top table, filters, outputs and doctor.

The Monitor is replaced by a scripted fake (the CLI only starts it, reads ``events()`` and
``stats()``), so these tests check the CLI's own logic; tests/kernel/test_cli.py runs the real one.
"""

import dataclasses
import inspect
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import needs
import pytest
from events_factory import IDENT, sample_events

import busted
from busted import cli
from busted.cli import HEADER, TopTable, main, render
from busted.events import (
    DnsAnswer,
    DnsRecord,
    Evidence,
    FlowClassified,
    FlowClosed,
    FlowOpened,
    TlsClientHello,
)
from busted.monitor import MonitorStats

EVIL = "\x1b]0;OWNED\x07"
ROOT = Path(__file__).parents[2]


def _has_control(s: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in s)


def opened(flow_id=1, comm="curl", provider="openai", pid=100, **kw):
    ident = {**IDENT, "flow_id": flow_id, "comm": comm, "pid": pid, "tid": pid}
    return FlowOpened(ts_ns=1, wall_time=1_700_000_000.0, **ident, provider=provider,
                      hostname="api.openai.com" if provider else None, **kw)


def closed(flow_id=1, comm="curl", provider="openai", pid=100, sent=1000, received=3000, **kw):
    ident = {**IDENT, "flow_id": flow_id, "comm": comm, "pid": pid, "tid": pid}
    return FlowClosed(ts_ns=2, wall_time=1_700_000_001.0, **ident, provider=provider,
                      bytes_sent=sent, bytes_received=received, duration_ns=1, **kw)


# -- render: one line, no control character, escaped fields -----------------------------------


def test_render_every_kind_is_one_line():
    for ev in sample_events():
        line = render(ev)
        assert "\n" not in line and not _has_control(line), line
    rows = [render(ev) for ev in sample_events()]
    assert rows[0].split()[1:] == ["dns", "100", "curl", "api.openai.com", "A", "10.231.1.65"]
    assert " close " in rows[4] and "openai api.openai.com (sni)" in rows[4] and rows[4].endswith("811B    2.2K")
    assert "sni=api.openai.com alpn=h2,http/1.1" in rows[2]


def test_render_escapes_attacker_fields_and_keeps_columns():
    comm = EVIL[:15]
    ev = dataclasses.replace(opened(), comm=comm, hostname="x\n12:00:00 close 1 sshd \u202e")
    line = render(ev)
    assert not _has_control(line) and "\u202e" not in line
    assert "\\x1b]0;OWNED\\x" in line  # escaped, then cut to the 15-character column
    assert "x\\x0a12:00:00 close" in line
    # the columns after COMM did not move
    assert line.index("out ") == HEADER.index("DIR")
    hello = TlsClientHello(ts_ns=1, wall_time=1.0, flow_id=1, pid=5, comm="c", saddr="a", sport=1, daddr="b",
                           dport=2, sni=EVIL.lower(), alpn=("h2\x1b[2J",), ja4="t")
    line = render(hello)
    assert "sni=\\x1b]0;owned\\x07" in line and "alpn=h2\\x1b[2J" in line and not _has_control(line)
    dns = DnsAnswer(ts_ns=1, wall_time=1.0, pid=1, comm="\x9bcomm", qname="a\x1b.b", qtype="A", rcode="NOERROR",
                    answers=(DnsRecord("a", "A", "1.2.3.4", 1),), cname_chain=("a", "\u2066evil"))
    line = render(dns)
    assert "\\x9bcomm" in line and "a\\x1b.b" in line and "via \\u2066evil" in line and not _has_control(line)


# -- the top table, root-free ------------------------------------------------------------------


def _top_rows(text):
    return [ln.split() for ln in text.splitlines()[1:]]


def test_top_groups_by_command_and_provider_and_sorts_by_traffic():
    t = TopTable()
    for i, pid in enumerate((10, 11, 12)):
        t.add(opened(flow_id=i, pid=pid))
        t.add(closed(flow_id=i, pid=pid, sent=1024, received=2048))
    t.add(opened(flow_id=9, comm="python3", provider=None, pid=20))
    t.add(closed(flow_id=9, comm="python3", provider=None, pid=20, sent=10, received=20))
    text = t.text()
    assert text.splitlines()[0].split() == ["COMM", "PROVIDER", "PIDS", "CONNS", "TX", "RX", "CALLS", "TOKENS",
                                            "ERR"]
    assert _top_rows(text) == [
        ["curl", "openai", "3", "3", "3.0K", "6.0K", "0", "0", "0"],
        ["python3", "-", "1", "1", "10B", "20B", "0", "0", "0"],
    ]
    assert t.top()[0] == {"comm": "curl", "provider": "openai", "pids": 3, "conns": 3, "tx": 3072, "rx": 6144,
                          "calls": 0, "tokens": 0, "errors": 0}


def test_top_moves_a_flow_to_its_latest_classification():
    t = TopTable()
    t.add(opened(flow_id=1, provider=None))
    ident = {**IDENT, "flow_id": 1}
    t.add(FlowClassified(ts_ns=2, wall_time=2.0, **ident, provider="anthropic", hostname="api.anthropic.com",
                         evidence=Evidence.SNI, confidence=0.95))
    t.add(closed(flow_id=1, provider="anthropic", sent=100, received=200))
    rows = {(r["comm"], r["provider"]): r for r in t.top()}
    assert rows[("curl", "anthropic")]["conns"] == 1 and rows[("curl", "anthropic")]["tx"] == 100
    assert rows[("curl", "-")]["conns"] == 0


def test_top_counts_llm_calls():
    from busted import Direction, LlmCall

    def call(**kw):
        base = dict(ts_ns=1, wall_time=1.0, flow_id=9, direction=Direction.CONNECT, pid=7, tid=7, uid=0,
                    comm="node", family=4, saddr="10.0.0.1", sport=1, daddr="10.0.0.2", dport=443,
                    provider="openai", api="openai.chat", input_tokens=10, output_tokens=5, status=200)
        return LlmCall(**{**base, **kw})

    t = TopTable()
    t.add(call())
    t.add(call(status=429, error_type="rate_limit_exceeded"))
    t.add(call(input_tokens=None, output_tokens=None))  # unknown counts add nothing
    assert _top_rows(t.text()) == [["node", "openai", "1", "0", "0B", "0B", "3", "30", "1"]]


def test_top_escapes_names_and_limits_rows():
    t = TopTable()
    t.add(opened(flow_id=1, comm=EVIL[:15]))
    for i in range(40):
        t.add(opened(flow_id=100 + i, comm=f"c{i}"))
    text = t.text(limit=5)
    assert len(text.splitlines()) == 6 and not any(_has_control(ln) for ln in text.splitlines())
    assert "\\x1b]0;OWNED" in t.text()


def test_top_by_agent_and_container():
    from events_factory import sample_calls

    cid = "ab12" * 16
    claude = dict(agent="claude-code", container_id=cid, container_runtime="docker")
    evs = [opened(flow_id=1, pid=10, **claude), closed(flow_id=1, pid=10, sent=100, received=200, **claude),
           opened(flow_id=2, pid=11, comm="python3", **claude),
           opened(flow_id=3, pid=12, provider=None)]  # no agent, no container
    call = dataclasses.replace(sample_calls()[0], flow_id=2, pid=11, **claude)
    by_agent, by_container, by_comm = TopTable(by="agent"), TopTable(by="container"), TopTable()
    for t in (by_agent, by_container, by_comm):
        for ev in [*evs, call]:
            t.add(ev)
    assert by_agent.text().splitlines()[0].split()[0] == "AGENT"
    assert _top_rows(by_agent.text()) == [
        ["claude-code", "openai", "2", "2", "100B", "200B", "1", "165", "0"],  # curl + python3 add up
        ["-", "-", "1", "1", "0B", "0B", "0", "0", "0"],
    ]
    assert by_container.top()[0] == {"container": cid[:12], "provider": "openai", "pids": 2, "conns": 2,
                                     "tx": 100, "rx": 200, "calls": 1, "tokens": 165, "errors": 0}
    assert by_container.text().splitlines()[0].split()[0] == "CONTAINER"
    assert {r["comm"] for r in by_comm.top()} == {"curl", "python3"}  # the default is unchanged
    with pytest.raises(busted.UsageError, match="top --by 'pid'"):
        TopTable(by="pid")


def test_top_by_agent_moves_a_flow_with_its_classification():
    t = TopTable(by="agent")
    t.add(opened(flow_id=1, provider=None, agent="aider"))
    t.add(FlowClassified(ts_ns=2, wall_time=2.0, **{**IDENT, "flow_id": 1}, provider="anthropic",
                         hostname="api.anthropic.com", evidence=Evidence.SNI, confidence=0.95, agent="aider"))
    rows = {(r["agent"], r["provider"]): r["conns"] for r in t.top()}
    assert rows == {("aider", "-"): 0, ("aider", "anthropic"): 1}


# -- the CLI with a fake Monitor ---------------------------------------------------------------


_MONITOR_OPTIONS = busted.MonitorOptions  # the real one, taken before any test patches busted.Monitor


class FakeMonitor:
    """Stands in for busted.Monitor: records how it was made and started, yields scripted events.
    Its keywords build the real ``MonitorOptions`` (what ``Monitor(**kw)`` does first), so a
    keyword the CLI passes that the Monitor does not take, or a value its checks refuse, fails here
    as it would for real (issue 20: a ``**kw`` fake hid CLI/Monitor drift)."""

    made: list = []
    script: list = []
    budget_rows: list = []
    fail_start: BaseException | None = None

    def __init__(self, options=None, /, **kw):
        # TypeError for an unexpected keyword, as Monitor(**kw)
        self.options = dataclasses.replace(options, **kw) if options is not None else _MONITOR_OPTIONS(**kw)
        default = _MONITOR_OPTIONS()
        self.kw = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)
                   if getattr(self.options, f.name) != getattr(default, f.name)}  # what was asked for
        self.started = False
        self.closed = False
        FakeMonitor.made.append(self)

    def start(self):
        if FakeMonitor.fail_start is not None:
            raise FakeMonitor.fail_start
        self.started = True
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.closed = True

    def stats(self):
        return MonitorStats(events=len(FakeMonitor.script), startup_s=1.25,
                            plan={"lifecycle": "tracepoint", "bytes": "tracepoint"})

    def events(self, timeout=None, stop_event=None):
        yield from FakeMonitor.script
        FakeMonitor.script = []

    def budgets(self):
        return FakeMonitor.budget_rows


def test_the_fake_monitor_refuses_what_the_real_one_refuses():
    with pytest.raises(TypeError, match="no_such_option"):
        FakeMonitor(no_such_option=1)
    with pytest.raises(TypeError):
        busted.Monitor(no_such_option=1)
    assert FakeMonitor(pid=[1]).kw == {"pid": [1]}


@pytest.fixture
def fake(monkeypatch):
    FakeMonitor.made, FakeMonitor.script, FakeMonitor.fail_start, FakeMonitor.budget_rows = [], [], None, []
    monkeypatch.setattr(busted, "Monitor", FakeMonitor)
    return FakeMonitor


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_monitor_prints_the_ready_line_then_escaped_rows(fake, capsys):
    fake.script = [dataclasses.replace(opened(), comm=EVIL[:15])]
    out = Tty()
    assert main(["monitor", "--duration", "0.3", "-c", "curl", "-p", "5", "-p", "6", "-4", "-P", "443"],
                out=out) == 0
    err = capsys.readouterr().err
    assert err.startswith("busted: monitoring (probes attached in 1.25 s; plan lifecycle=tracepoint "
                          "bytes=tracepoint)\n")
    text = out.getvalue()
    assert text.splitlines()[0] == HEADER and "\\x1b]0;OWNED" in text and "\x1b" not in text
    assert fake.made[0].kw == {"pid": [5, 6], "comm": ["curl"], "port": [443], "family": 4}


def test_monitor_json_is_exact(fake, capsys):
    fake.script = [dataclasses.replace(opened(), comm=EVIL[:15], hostname="h\u202e")]
    out = io.StringIO()
    assert main(["monitor", "--json", "--duration", "0.3"], out=out) == 0
    line = out.getvalue().splitlines()[0]
    assert json.loads(line)["comm"] == EVIL[:15] and json.loads(line)["hostname"] == "h\u202e"
    assert all(0x20 <= ord(c) <= 0x7E for c in line)


def test_top_json_and_filters(fake, capsys):
    fake.script = [opened(flow_id=1), closed(flow_id=1), opened(flow_id=2, provider=None, comm="wget"),
                   closed(flow_id=2, provider=None, comm="wget")]
    out = io.StringIO()
    assert main(["top", "--json", "--interval", "0.05", "--duration", "0.2", "--provider", "openai", "-u", "1000"],
                out=out) == 0
    snap = json.loads(out.getvalue().splitlines()[0])
    assert [(r["comm"], r["provider"], r["conns"]) for r in snap["rows"]] == [("curl", "openai", 1)]
    assert fake.made[0].kw["uid"] == [1000]
    assert "busted: monitoring (probes attached in 1.25 s" in capsys.readouterr().err


def test_top_shows_budgets(fake, tmp_path):
    row = {"budget": "anth", "per": "uid", "scope": "1000", "action": "deny", "enforced": True, "window": "1h",
           "window_start": 0.0, "window_end": 3600.0, "tokens": 40, "usd": 0.0, "calls": 2, "limit_tokens": 30,
           "limit_usd": None, "exceeded": True}
    fake.budget_rows = [row]
    f = tmp_path / "p.toml"
    f.write_text('[[budgets]]\nname = "anth"\nper = "uid"\nlimit_tokens = 30\nwindow = "1h"\naction = "deny"\n')
    out = io.StringIO()
    assert main(["top", "--json", "--policy", str(f), "--interval", "0.05", "--duration", "0.2"], out=out) == 0
    assert json.loads(out.getvalue().splitlines()[0])["budgets"] == [row]
    assert fake.made[0].kw["policy"].budgets[0].name == "anth" and fake.made[0].kw["budget_spend"] == []
    out = io.StringIO()
    assert main(["top", "--interval", "0.05", "--duration", "0.2"], out=out) == 0
    text = out.getvalue()
    assert "BUDGET" in text and "anth" in text and "40/30" in text and "refused" in text


def test_monitor_restores_budget_spend_from_its_store(fake, tmp_path):
    import time

    from busted.events import BudgetSpend
    from busted.policy.budgets import window_of
    from busted.sinks import Store

    now = time.time()
    start, end = window_of(now, 86400)
    db = tmp_path / "s.db"
    with Store(db) as st:
        st.write_many([BudgetSpend(ts_ns=1, wall_time=now, budget="anth", per="uid", scope="1000",
                                   window_start=start, window_end=end, tokens=40, usd=0.0, calls=2),
                       BudgetSpend(ts_ns=1, wall_time=now - 86400, budget="anth", per="uid", scope="1001",
                                   window_start=start - 86400, window_end=end - 86400, tokens=99, usd=0.0, calls=5)])
        st.flush()
    f = tmp_path / "p.toml"
    f.write_text('[[budgets]]\nname = "anth"\nper = "uid"\nlimit_tokens = 30\nwindow = "1d"\naction = "deny"\n')
    assert main(["monitor", "--json", "--policy", str(f), "--store", str(db), "--duration", "0.1"],
                out=io.StringIO()) == 0
    assert [(r["scope"], r["tokens"]) for r in fake.made[0].kw["budget_spend"]] == [("1000", 40)]


def test_top_by_agent_on_the_command_line(fake):
    fake.script = [opened(flow_id=1, agent="codex-cli"), closed(flow_id=1, agent="codex-cli"),
                   opened(flow_id=2, comm="wget")]
    out = io.StringIO()
    assert main(["top", "--json", "--by", "agent", "--interval", "0.05", "--duration", "0.2"], out=out) == 0
    snap = json.loads(out.getvalue().splitlines()[0])
    assert [(r["agent"], r["provider"], r["conns"]) for r in snap["rows"]] == [("codex-cli", "openai", 1),
                                                                               ("-", "openai", 1)]
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["top", "--by", "pid"])


def test_one_filter_vocabulary():
    p = cli._parser()
    for cmd in ("monitor", "top", "lab"):
        a = p.parse_args([cmd, "-p", "1", "-u", "2", "-c", "x", "-P", "3", "-6", "--provider", "openai", "--json"])
        assert (a.pid, a.uid, a.comm, a.port, a.family, a.provider, a.json) == ([1], [2], ["x"], [3], 6,
                                                                                  ["openai"], True)
    a = p.parse_args(["query", "--store", "s", "-p", "1", "-u", "2", "-c", "x", "-P", "3", "-4", "--provider", "o",
                      "--json"])
    assert (a.pid, a.uid, a.comm, a.port, a.family, a.provider, a.json) == ([1], [2], ["x"], [3], 4, ["o"], True)
    with pytest.raises(SystemExit):
        p.parse_args(["monitor", "-4", "-6"])


def test_bad_probes_spec_is_a_usage_error(capsys):
    assert main(["doctor", "--probes", "bytes"]) == 2
    assert "--probes wants key=value pairs" in capsys.readouterr().err


# -- outputs are checked before anything loads -------------------------------------------------


def test_bad_jsonl_path_fails_before_the_monitor_and_creates_no_store(fake, tmp_path, capsys):
    store = tmp_path / "s.db"
    rc = main(["monitor", "--store", str(store), "--jsonl", str(tmp_path / "missing" / "x.jsonl")], out=io.StringIO())
    err = capsys.readouterr().err
    assert rc == 2 and "--jsonl" in err and "does not exist" in err
    assert fake.made == [] and not store.exists() and list(tmp_path.iterdir()) == []
    assert "busted: monitoring" not in err


def test_a_directory_as_store_and_a_file_as_directory(fake, tmp_path, capsys):
    assert main(["monitor", "--store", str(tmp_path)], out=io.StringIO()) == 2
    assert "is a directory" in capsys.readouterr().err
    f = tmp_path / "f"
    f.write_text("")
    assert main(["top", "--jsonl", str(f / "x.jsonl")], out=io.StringIO()) == 2
    assert "does not exist" in capsys.readouterr().err
    assert fake.made == [] and list(tmp_path.iterdir()) == [f]


def test_metrics_port_in_use_fails_before_the_monitor(fake, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        store = tmp_path / "s.db"
        assert main(["monitor", "--store", str(store), "--metrics", f"127.0.0.1:{port}"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert f"--metrics 127.0.0.1:{port}: cannot listen there" in err
    assert fake.made == [] and list(tmp_path.iterdir()) == []
    assert main(["monitor", "--metrics", "nohost:notaport"], out=io.StringIO()) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_a_failed_monitor_start_removes_the_outputs_it_created(fake, tmp_path, capsys):
    fake.fail_start = busted.PermissionDenied("euid 1000")
    assert main(["monitor", "--store", str(tmp_path / "s.db"), "--jsonl", str(tmp_path / "e.jsonl")],
                out=io.StringIO()) == 2
    assert "needs root" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_survive_a_failed_start(fake, tmp_path, capsys):
    j = tmp_path / "e.jsonl"
    j.write_text('{"kind": "old"}\n')
    fake.fail_start = busted.PermissionDenied()
    assert main(["monitor", "--jsonl", str(j)], out=io.StringIO()) == 2
    assert j.read_text() == '{"kind": "old"}\n'


def _as_nobody(code: str) -> subprocess.CompletedProcess:
    needs.root("to run as uid 65534")
    needs.tool("setpriv")
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    if "Permission denied" in r.stderr and "busted" not in r.stdout + r.stderr:
        needs.skip("the interpreter or checkout is not readable by uid 65534")
    return r


def test_an_unwritable_directory_as_uid_65534(tmp_path):
    d = Path(__import__("tempfile").mkdtemp(prefix="busted-ro-"))
    try:
        d.chmod(0o755)  # root's: not writable by nobody
        code = (f"import sys; from busted.cli import main; "
                f"sys.exit(main(['monitor', '--store', {str(d / 's.db')!r}]))")
        r = _as_nobody(code)
        assert r.returncode == 2, r.stderr
        assert f"directory {d} is not writable by uid 65534" in r.stderr
        assert "busted: monitoring" not in r.stderr and list(d.iterdir()) == []
    finally:
        shutil.rmtree(d)


# -- query -------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    from busted.sinks import Store

    p = tmp_path / "s.db"
    with Store(p) as s:
        s.write_many(sample_events())
        s.write_many(sample_events(flow_id=7, pid=200)[1:5])
    return p


def test_query_json_flag_is_the_json_format(store):
    a, b = io.StringIO(), io.StringIO()
    assert main(["query", "--store", str(store), "--json"], out=a) == 0
    assert main(["query", "--store", str(store), "--format", "json"], out=b) == 0
    assert a.getvalue() == b.getvalue()
    assert sorted(json.loads(ln)["flow_id"] for ln in a.getvalue().splitlines()) == [7, 4242]


def test_query_filters_match_the_monitor_flags(store):
    def q(*args, table="flows"):
        out = io.StringIO()
        assert main(["query", "--store", str(store), "--table", table, *args], out=out) == 0
        return [json.loads(ln) for ln in out.getvalue().splitlines()]

    assert [r["pid"] for r in q("-p", "200")] == [200]
    assert len(q("-p", "200", "-p", "100")) == 2
    assert q("-u", "1000", "-c", "curl", "-P", "443", "-4", "--provider", "openai") != []
    assert q("-6") == [] and q("-P", "80") == [] and q("--provider", "none") == []
    ev = q("-p", "100", "--provider", "openai", table="events")
    assert {r["kind"] for r in ev} == {"flow_opened", "tls_client_hello", "flow_classified", "flow_closed"}


def test_query_json_and_csv_contradict(store, capsys):
    assert main(["query", "--store", str(store), "--json", "--format", "csv"], out=io.StringIO()) == 2
    assert "contradict" in capsys.readouterr().err


def test_query_csv_escapes_only_on_a_terminal(tmp_path):
    from busted.sinks import Store

    p = tmp_path / "s.db"
    with Store(p) as s:
        s.write(closed(flow_id=1, comm=EVIL[:15]))
    plain, tty = io.StringIO(), Tty()
    assert main(["query", "--store", str(p), "--format", "csv"], out=plain) == 0
    assert main(["query", "--store", str(p), "--format", "csv"], out=tty) == 0
    assert EVIL[:15] in plain.getvalue()  # exact in a file or pipe
    assert "\x1b" not in tty.getvalue() and "\\x1b]0;OWNED" in tty.getvalue()


# -- doctor ------------------------------------------------------------------------------------


def _caps(privileged=True, tracefs="/sys/kernel/tracing"):
    from busted.ebpf.probe import TRACEPOINTS, Capabilities

    tps = {tp: tracefs is not None for group in TRACEPOINTS.values() for tp in group}
    return Capabilities(kernel_release="6.1.0-test", kernel_version=(6, 1), btf=True, tracefs=tracefs,
                        tracepoints=tps, ringbuf=True, bcc_version="0.26.0", privileged=privileged)


def test_doctor_without_privileges_says_so_first(monkeypatch):
    import busted.ebpf.probe

    monkeypatch.setattr(busted.ebpf.probe, "probe", lambda: _caps(privileged=False, tracefs=None))
    out = io.StringIO()
    assert main(["doctor"], out=out) == 1
    text = out.getvalue()
    assert text.startswith("NOT PRIVILEGED") and "sudo busted doctor" in text.splitlines()[0]
    assert "MISSING" not in text and "unavailable: missing tracepoint" not in text
    assert re.search(r"tracepoints\s+unknown: not visible without privileges", text)
    out = io.StringIO()
    assert main(["doctor", "--json"], out=out) == 1
    d = json.loads(out.getvalue())
    assert d["privileged"] is False and d["tracepoints"] is None and "CAP_BPF" in d["plan_error"]


def test_doctor_as_uid_65534():
    r = _as_nobody("import sys; from busted.cli import main; sys.exit(main(['doctor']))")
    assert r.returncode == 1, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("NOT PRIVILEGED  uid 65534") and "sudo" in first
    assert "MISSING" not in r.stdout and "NOT mounted" not in r.stdout


def test_doctor_ebpf_prints_what_monitor_loads(monkeypatch):
    import busted.ebpf.probe
    from busted.ebpf.loader import RINGBUF_BYTES, build_source
    from busted.ebpf.plan import choose_plan

    caps = _caps()
    monkeypatch.setattr(busted.ebpf.probe, "probe", lambda: caps)
    out = io.StringIO()
    assert main(["doctor", "--ebpf"], out=out) == 0
    o = busted.MonitorOptions()
    want = build_source(choose_plan(caps, None), ringbuf_bytes=o.ringbuf_bytes, max_flows=o.max_flows)
    assert out.getvalue() == want
    assert f"#define RINGBUF_PAGES {RINGBUF_BYTES // 4096}\n" in want  # the default ring, in pages
    assert RINGBUF_BYTES == 16 << 20  # docs/kernel.md "Transport" says why 16 MiB


def test_monitor_and_loader_share_their_defaults():
    from busted.ebpf import loader

    o = busted.MonitorOptions()
    assert o.ringbuf_bytes == loader.RINGBUF_BYTES
    assert o.max_flows == loader.MAX_FLOWS
    for fn in (loader.build_source, loader.FlowProgram.__init__):
        p = inspect.signature(fn).parameters
        assert (p["ringbuf_bytes"].default, p["max_flows"].default) == (loader.RINGBUF_BYTES, loader.MAX_FLOWS)


def test_doctor_escapes_what_it_prints(monkeypatch):
    import busted.ebpf.probe

    caps = dataclasses.replace(_caps(), kernel_release="6.1\x1b]0;x\x07")
    monkeypatch.setattr(busted.ebpf.probe, "probe", lambda: caps)
    out = io.StringIO()
    main(["doctor"], out=out)
    assert "\x1b" not in out.getvalue() and "6.1\\x1b]0;x\\x07" in out.getvalue()


# -- LLM calls and MCP messages ----------------------------------------------------------------


def test_render_call_and_mcp_rows():
    from events_factory import sample_calls

    call, req, resp = sample_calls()
    line = render(call)
    assert line.split()[1:5] == ["call", "100", "python3", "out"]
    assert ("openai api.openai.com POST /v1/chat/completions stream model=gpt-4o-mini-2024-07-18 "
            "tokens=120/45 ttft=150ms status=200 cost=$0.000044") in line
    unknown = dataclasses.replace(call, input_tokens=None, output_tokens=None, time_to_first_token_ns=None,
                                  cost_usd=None, status=None, complete=False, response_model=None, provider=None)
    assert "- api.openai.com" in render(unknown)
    assert "model=gpt-4o-mini tokens=?/? ttft=? status=? incomplete cost=?" in render(unknown)
    assert render(req).split()[1:5] == ["mcp", "100", "python3", "out"]
    assert render(req).endswith("mcp.lab 10.231.1.65:443 method=tools/call tool=search id=7")
    assert render(resp).endswith("response id=7 error=-32601") and " in " in render(resp)


def test_render_call_escapes_every_wire_string():
    from events_factory import sample_calls

    call, req, _ = sample_calls()
    evil = dataclasses.replace(call, comm=EVIL[:15], hostname=EVIL, method="P\x1b[2J", path="/x\n12:00 close",
                               response_model="m\u202e", error_type="e\x07")
    line = render(evil)
    assert not _has_control(line) and "\u202e" not in line and "\n" not in line
    assert "/x\\x0a12:00 close" in line and "P\\x1b[2J" in line and "e\\x07" in line
    mcp = dataclasses.replace(req, jsonrpc_method="tools/\x1b]0;x\x07", tool="t\u2066", jsonrpc_id="\x9b1")
    line = render(mcp)
    assert not _has_control(line) and "\u2066" not in line and "tools/\\x1b]0;x\\x07" in line


def test_llm_flags_reach_the_monitor(fake, capsys):
    from events_factory import sample_calls

    fake.script = list(sample_calls())
    out = io.StringIO()
    assert main(["monitor", "--json", "--duration", "0.2", "--no-llm-calls", "--capture-content", "512"],
                out=out) == 0
    assert fake.made[0].kw == {"llm_calls": False, "capture_content": 512}
    rows = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert [r["kind"] for r in rows] == ["llm_call", "mcp_message", "mcp_message"]
    assert rows[0]["input_tokens"] == 120 and rows[0]["cache_write_tokens"] is None
    assert main(["top", "--json", "--interval", "0.05", "--duration", "0.1"], out=io.StringIO()) == 0
    assert "llm_calls" not in fake.made[1].kw and "capture_content" not in fake.made[1].kw  # the defaults
    p = cli._parser()
    for cmd in ("monitor", "top", "lab"):
        a = p.parse_args([cmd, "--no-llm-calls", "--capture-content", "64"])
        assert (a.llm_calls, a.capture_content) == (False, 64)
    with pytest.raises(SystemExit):
        p.parse_args(["monitor", "--capture-content", "-1"])


def test_provider_filter_applies_to_calls(fake, capsys):
    from events_factory import sample_calls

    call, req, _ = sample_calls()
    fake.script = [call, dataclasses.replace(call, provider="anthropic"), req]
    out = io.StringIO()
    assert main(["monitor", "--json", "--duration", "0.2", "--provider", "anthropic"], out=out) == 0
    assert [(r["kind"], r["provider"]) for r in map(json.loads, out.getvalue().splitlines())] == [
        ("llm_call", "anthropic")]


def test_query_llm_calls_and_mcp_messages(tmp_path, capsys):
    from events_factory import sample_calls

    from busted.sinks import Store

    p = tmp_path / "c.db"
    call, req, resp = sample_calls()
    with Store(p) as s:
        s.write_many([*sample_events(), call, req, resp, dataclasses.replace(call, pid=300, comm="node")])

    def q(*args):
        out = io.StringIO()
        assert main(["query", "--store", str(p), *args], out=out) == 0
        return [json.loads(ln) for ln in out.getvalue().splitlines()]

    rows = q("--table", "llm_calls")
    assert [(r["pid"], r["input_tokens"], r["request_model"]) for r in rows] == [
        (100, 120, "gpt-4o-mini"), (300, 120, "gpt-4o-mini")]
    assert [r["comm"] for r in q("--table", "llm_calls", "-c", "node")] == ["node"]
    assert [r["jsonrpc_method"] for r in q("--table", "mcp_messages")] == ["tools/call", None]
    assert [r["kind"] for r in q("--table", "events", "--kind", "llm_call")] == ["llm_call", "llm_call"]
    assert {r["kind"] for r in q("--table", "events", "--kind", "llm_call", "--kind", "mcp_message")} == {
        "llm_call", "mcp_message"}
    assert main(["query", "--store", str(p), "--kind", "llm_call"], out=io.StringIO()) == 2
    assert "--kind selects events" in capsys.readouterr().err
    out = io.StringIO()
    assert main(["query", "--store", str(p), "--table", "llm_calls", "--format", "csv"], out=out) == 0
    head = out.getvalue().splitlines()[0].split(",")
    assert head[:3] == ["ts", "ts_ns", "flow_id"] and "output_tokens" in head and "cost_usd" in head
