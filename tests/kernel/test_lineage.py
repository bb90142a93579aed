"""Real BPF: process lineage on flows. An agent-named script -> bash -c -> curl to a loopback server
reports its chain and the agent, also when every process of the chain has exited before user space
decodes the flow (simulated by giving the Monitor a /proc with nothing in it)."""

import http.server
import os
import subprocess
import threading
import time

import pytest
from conftest import collect

import busted
from busted import FlowClosed, FlowOpened


@pytest.fixture
def server():
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            # curl lives 100 ms: the default lineage tier reads argv from /proc when it decodes
            # the exec record (a few ms later); shorter lives need the "syscall" tier (tested below).
            time.sleep(0.1)
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _chain(tmp_path, port):
    """tmp/claude (a bash script) -> bash -c '...; true' (forks) -> curl. Returns the script's pid
    and the pids each process wrote, after all of them exited."""
    script = tmp_path / "claude"
    out = tmp_path / "pids"
    script.write_text(
        "#!/bin/bash\n"
        f"echo claude $$ >> {out}\n"
        f"bash -c 'echo bash $$ >> {out}; curl -s -o /dev/null -H \"Authorization: Bearer sk-secret123456\" "
        f"http://127.0.0.1:{port}/v1/messages; true'\n"
    )
    script.chmod(0o755)
    p = subprocess.run([str(script), "--api-key", "sk-ant-verysecret"], check=True, timeout=30)
    assert p.returncode == 0
    pids = dict(line.split() for line in out.read_text().splitlines())
    return {k: int(v) for k, v in pids.items()}


def _curl_flow(mon, port):
    def done(evs):
        return any(isinstance(e, FlowClosed) and e.dport == port and e.comm == "curl" for e in evs)

    evs = collect(mon, done, timeout=15)
    opened = [e for e in evs if isinstance(e, FlowOpened) and e.dport == port and e.comm == "curl"]
    closed = [e for e in evs if isinstance(e, FlowClosed) and e.dport == port and e.comm == "curl"]
    assert len(opened) == 1 and len(closed) == 1, evs
    return opened[0], closed[0]


def _check(ev, pids, tmp_path):
    anc = ev.ancestry
    assert anc is not None, ev
    assert [a.comm for a in anc[:3]] == ["curl", "bash", "claude"], anc
    assert anc[1].pid == pids["bash"] and anc[2].pid == pids["claude"]
    assert anc[0].exe == "/usr/bin/curl"
    assert anc[2].exe == str(tmp_path / "claude")  # the script, not /usr/bin/bash
    assert ev.ppid == pids["bash"]
    assert ev.exe == "/usr/bin/curl"
    assert ev.cmdline is not None and ev.cmdline[0] == "curl"
    assert "sk-secret123456" not in " ".join(ev.cmdline)  # redacted
    assert (ev.agent, ev.agent_pid, ev.agent_evidence) == ("claude-code", pids["claude"], "exe:claude")
    d = ev.to_dict()
    assert d["agent"] == "claude-code" and d["ancestry"][2] == {"pid": pids["claude"], "comm": "claude",
                                                                "exe": str(tmp_path / "claude")}


@pytest.mark.parametrize("tier", ["tracepoint", "sched-fork", "syscall"])
def test_chain_and_agent_when_everything_exited(tmp_path, server, tier):
    """User space sees no /proc at all: what the flow says came from the kernel's lineage records."""
    empty = tmp_path / "noproc"
    empty.mkdir()
    with busted.Monitor(port=server, classify=False, preexisting=False, probes={"lineage": tier}) as mon:
        assert mon.plan.lineage == tier
        # Swap the /proc source for an empty one: every process counts as already gone.
        mon._proc.__init__(root=str(empty))
        pids = _chain(tmp_path, server)
        opened, closed = _curl_flow(mon, server)
        assert mon._proc.reads > 0  # the /proc source was asked and knew nothing
    for ev in (opened, closed):
        _check(ev, pids, tmp_path)
    # Only the chain the kernel saw: the test's own process predates the monitor and has no /proc.
    assert len(opened.ancestry) == 3


def test_chain_and_agent_real_timing(tmp_path, server):
    with busted.Monitor(port=server, classify=False, preexisting=False) as mon:
        pids = _chain(tmp_path, server)
        opened, _closed = _curl_flow(mon, server)
        st = mon.stats()
    _check(opened, pids, tmp_path)
    # The chain goes on through /proc into processes older than the monitor (this test's python).
    assert len(opened.ancestry) > 3 and opened.ancestry[3].pid == os.getpid()
    assert st.plan["lineage"] in ("tracepoint", "sched-fork")


def test_lineage_off_keeps_the_old_behaviour(tmp_path, server):
    with busted.Monitor(port=server, classify=False, preexisting=False, probes={"lineage": "off"}) as mon:
        assert mon.lineage is None
        _chain(tmp_path, server)
        opened, _closed = _curl_flow(mon, server)
    assert opened.ancestry is None and opened.agent is None


@pytest.mark.parametrize("tier", ["tracepoint", "syscall"])
def test_python_dash_m_agent_from_kernel_argv(tmp_path, server, tier):
    """`python3 -m aider` (a stand-in package) -> curl: the agent is found from the argv of the exec
    record (evidence module:aider), with the flow table's /proc source hidden. Tier "syscall": argv
    the kernel recorded at execve; "tracepoint": argv read from /proc when the exec record was
    decoded (the process still ran)."""
    pkg = tmp_path / "aider"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        "import subprocess\n"
        f"subprocess.run(['curl', '-s', '-o', '/dev/null', 'http://127.0.0.1:{server}/'], check=True)\n")
    empty = tmp_path / "noproc"
    empty.mkdir()
    with busted.Monitor(port=server, classify=False, preexisting=False, probes={"lineage": tier}) as mon:
        mon._proc.__init__(root=str(empty))
        p = subprocess.run(["python3", "-m", "aider", "--model", "x"], cwd=tmp_path, timeout=30, check=True)
        assert p.returncode == 0
        opened, _closed = _curl_flow(mon, server)
    assert [a.comm for a in opened.ancestry] == ["curl", "python3"]
    assert (opened.agent, opened.agent_evidence) == ("aider", "module:aider")
    assert opened.agent_pid == opened.ppid


def test_every_exec_without_kernel_argv_is_read_or_counted(tmp_path, server):
    """Default tier: processes that exit at once after exec (`true`) may lose their argv before the
    exec record is decoded; each such exec is counted (argv_lost), none is silent."""
    with busted.Monitor(port=server, classify=False, preexisting=False) as mon:
        assert mon.plan.lineage in ("tracepoint", "sched-fork")
        subprocess.run(["bash", "-c", "for i in $(seq 30); do /bin/true; done; "
                        f"curl -s -o /dev/null http://127.0.0.1:{server}/"], check=True, timeout=30)
        _curl_flow(mon, server)
        t = mon.lineage
        assert t.execs >= 32  # bash, 30 x true, curl
        assert t.argv_from_proc + t.argv_lost == t.execs
        assert t.argv_from_proc >= 2  # at least bash and curl were still running
        assert mon.stats().argv_lost == t.argv_lost
    with busted.Monitor(port=server, classify=False, preexisting=False, probes={"lineage": "syscall"}) as mon:
        subprocess.run(["bash", "-c", f"/bin/true; curl -s -o /dev/null http://127.0.0.1:{server}/"],
                       check=True, timeout=30)
        _curl_flow(mon, server)
        assert mon.lineage.execs >= 3 and mon.lineage.argv_lost == 0  # the kernel copied every argv
