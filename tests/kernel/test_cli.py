"""The busted command, run as people run it: in a real terminal (pty), against lab traffic."""

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

from busted.cli import main

BUSTED = [sys.executable, "-m", "busted.cli"]


def test_doctor_states_kprobes_and_chosen_tiers():
    out = io.StringIO()
    assert main(["doctor"], out=out) == 0
    text = out.getvalue()
    assert re.search(r"kprobes\s+unavailable", text)
    assert re.search(r"lifecycle\s+kprobe\s+unavailable", text)
    assert re.search(r"chosen plan\n\s+lifecycle\s+tracepoint\n\s+bytes\s+tracepoint", text)
    out = io.StringIO()
    assert main(["doctor", "--json"], out=out) == 0
    d = json.loads(out.getvalue())
    assert d["kprobes"] is False and d["plan"]["lifecycle"] == "tracepoint"


def test_doctor_ebpf_prints_the_program():
    out = io.StringIO()
    assert main(["doctor", "--ebpf", "--probes", "bytes=syscall"], out=out) == 0
    assert "bst_set_state" in out.getvalue() and "bst_io_out" in out.getvalue()


def test_doctor_forced_impossible_tier_fails_with_reason():
    out = io.StringIO()
    assert main(["doctor", "--probes", "lifecycle=kprobe"], out=out) == 1
    assert "no kprobes" in out.getvalue()


class Pty:
    """A command in a real pseudo-terminal; output is collected (bounded) until it exits."""

    def __init__(self, argv, env=None):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env={**os.environ, **(env or {})})
        os.close(slave)
        self.buf = b""

    def read_until(self, pattern: bytes, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.buf) < 4_000_000:
            if re.search(pattern, self.buf):
                return True
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    self.buf += os.read(self.master, 65536)
                except OSError:
                    break
        return bool(re.search(pattern, self.buf))

    def finish(self, timeout: float = 30) -> str:
        self.read_until(rb"\A\Z(?!x)", 0)  # drain what is there
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self.read_until(rb"(?!x)x", 0.3)
        if self.proc.poll() is None:
            self.proc.kill()
        self.read_until(rb"(?!x)x", 0.5)
        os.close(self.master)
        return self.buf.decode("utf-8", "replace")


def _curl(lab, host="api.openai.com"):
    r = lab.run_client(["curl", "-s", "-m", "5", f"https://{host}/v1/chat/completions", "-d", "{}"])
    assert r.returncode == 0, r.stderr


def test_monitor_json_in_a_terminal(lab):
    t = Pty([*BUSTED, "monitor", "--json", "--comm", "curl", "--duration", "12"])
    assert t.read_until(rb"\x1b|\A", 0) or True
    time.sleep(3)  # BPF compile + attach
    _curl(lab)
    out = t.finish()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    closed = [r for r in rows if r["kind"] == "flow_closed" and r["daddr"] in lab.hosts["api.openai.com"].addresses]
    assert closed, out
    r = closed[0]
    assert r["comm"] == "curl" and r["dport"] == 443 and r["direction"] == "connect"
    assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
    assert (r["provider"], r["hostname"], r["evidence"]) == ("openai", "api.openai.com", "sni")
    kinds = {row["kind"] for row in rows}
    assert {"dns_answer", "tls_client_hello", "flow_opened"} <= kinds
    assert "seen:" in out and "lost: none" in out  # the summary on exit


def test_monitor_table_in_a_terminal(lab):
    t = Pty([*BUSTED, "monitor", "--comm", "curl", "--duration", "12"])
    assert t.read_until(rb"PROVIDER/HOST", 10)
    _curl(lab, "api.anthropic.com")
    out = t.finish()
    h = lab.hosts["api.anthropic.com"]
    rows = [ln for ln in out.splitlines() if " close " in ln and (f"{h.ipv4}:443" in ln or f"[{h.ipv6}]:443" in ln)]
    assert rows and "curl" in rows[0], out


def test_top_in_a_terminal(lab):
    t = Pty([*BUSTED, "top", "--comm", "curl", "--interval", "1", "--duration", "10"])
    assert t.read_until(rb"busted top", 10)
    for _ in range(3):
        _curl(lab)
    out = t.finish()
    last = out.split("busted top")[-1]
    row = [ln.split() for ln in last.splitlines() if ln.startswith("curl ")]
    assert row, out[-3000:]
    comm, provider, pids, conns = row[0][:4]
    assert (comm, provider) == ("curl", "openai")
    assert int(pids) == 3 and int(conns) == 3
