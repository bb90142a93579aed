"""The busted command, run as people run it: in a real terminal (pty), against lab traffic."""

import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from busted.cli import main

BUSTED = [sys.executable, "-m", "busted.cli"]
READY = rb"busted: monitoring \(probes attached in [0-9.]+ s; plan "


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

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the CLI says its probes are attached (its ready line on stderr)."""
        assert self.read_until(READY, timeout), self.buf.decode("utf-8", "replace")

    def stop(self) -> str:
        """SIGTERM (the CLI stops cleanly on it), then collect the rest."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.finish()

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
    t.wait_ready()
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
    t.wait_ready()
    assert t.read_until(rb"PROVIDER/HOST", 10)
    _curl(lab, "api.anthropic.com")
    out = t.finish()
    h = lab.hosts["api.anthropic.com"]
    rows = [ln for ln in out.splitlines() if " close " in ln and (f"{h.ipv4}:443" in ln or f"[{h.ipv6}]:443" in ln)]
    assert rows and "curl" in rows[0], out


def test_top_in_a_terminal(lab):
    t = Pty([*BUSTED, "top", "--comm", "curl", "--interval", "1", "--duration", "10"])
    t.wait_ready()
    for _ in range(3):
        _curl(lab)
    out = t.finish()
    last = out.split("busted top")[-1]
    # the host is shared: other curl rows (other providers) may be there too; ours is curl x openai
    row = [ln.split() for ln in last.splitlines() if ln.split()[:2] == ["curl", "openai"]]
    assert row, out[-3000:]
    pids, conns = row[0][2:4]
    assert int(pids) == 3 and int(conns) == 3, out[-3000:]


# -- terminal injection: names from the kernel and the wire are shown escaped, never obeyed -----

EVIL = b"\x1b]0;OWNED\x07"  # OSC 0: set the terminal title; BEL ends it


def client_hello(sni: bytes) -> bytes:
    """A minimal TLS 1.3 ClientHello carrying ``sni`` verbatim (no TLS library sends control bytes)."""
    names = b"\x00" + len(sni).to_bytes(2, "big") + sni
    ext_sni = b"\x00\x00" + (len(names) + 2).to_bytes(2, "big") + len(names).to_bytes(2, "big") + names
    ext_versions = b"\x00\x2b\x00\x03\x02\x03\x04"
    exts = ext_sni + ext_versions
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(exts).to_bytes(2, "big") + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def test_the_crafted_hello_parses_with_the_evil_sni():
    from busted.classify.tls import ClientHelloInfo, ClientHelloParser

    info = ClientHelloParser().feed(client_hello(EVIL))
    assert isinstance(info, ClientHelloInfo) and info.sni == EVIL.decode().lower()


class Listener:
    """A loopback TCP listener that reads and drops what clients send (bounded)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.done = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        end = time.monotonic() + 120
        while not self.done and time.monotonic() < end:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            with c:
                c.settimeout(1)
                try:
                    c.recv(65536)
                except OSError:
                    pass

    def close(self):
        self.done = True
        self.thread.join(5)
        self.sock.close()


RENAMED_CLIENT = """
import ctypes, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(15, ctypes.c_char_p(sys.argv[2].encode("latin-1")), 0, 0, 0) == 0  # PR_SET_NAME
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"hi")
s.close()
"""


def _renamed_client(port: int) -> None:
    r = subprocess.run([sys.executable, "-c", RENAMED_CLIENT, str(port), EVIL.decode("latin-1")],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


def _evil_hello(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(client_hello(EVIL))


ESCAPED_COMM = re.escape(b"\\x1b]0;OWNED\\x0")  # escaped, then cut to the 15-wide COMM column
ESCAPED_SNI = re.escape(b"sni=\\x1b]0;owned\\x07")


def test_monitor_table_escapes_a_renamed_process_and_a_hostile_sni():
    srv = Listener()
    try:
        t = Pty([*BUSTED, "monitor", "--port", str(srv.port), "--duration", "40"])
        t.wait_ready()
        _renamed_client(srv.port)
        _evil_hello(srv.port)
        seen = t.read_until(ESCAPED_COMM, 15) and t.read_until(ESCAPED_SNI, 15)
        out = t.stop()
    finally:
        srv.close()
    assert seen, out
    raw = t.buf
    assert b"\x1b" not in raw and b"\x07" not in raw, raw[-3000:]  # the table never emits them itself
    rows = [ln for ln in out.splitlines() if f":{srv.port} " in ln]
    assert any(" open " in ln and " \\x1b]0;OWNED\\x0 out " in ln for ln in rows), out
    assert any("classified" in ln and "\\x1b]0;owned\\x07 (sni)" in ln for ln in rows), out


def test_top_escapes_a_renamed_process():
    srv = Listener()
    try:
        t = Pty([*BUSTED, "top", "--port", str(srv.port), "--interval", "0.5", "--duration", "40"])
        t.wait_ready()
        _renamed_client(srv.port)
        _evil_hello(srv.port)
        seen = t.read_until(ESCAPED_COMM, 15)
        out = t.stop()
    finally:
        srv.close()
    assert seen, out
    # top's own escape sequences (home, clear) are the only ones on the screen
    assert re.sub(rb"\x1b\[H\x1b\[2J", b"", t.buf).count(b"\x1b") == 0 and b"\x07" not in t.buf, t.buf[-3000:]
    last = out.split("busted top")[-1]
    assert any(ln.startswith("\\x1b]0;OWNED\\x0 ") for ln in last.splitlines()), last


def test_a_bad_output_fails_before_the_probes_load(tmp_path):
    store = tmp_path / "s.db"
    r = subprocess.run([*BUSTED, "monitor", "--store", str(store), "--jsonl", str(tmp_path / "no" / "x.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "busted: --jsonl" in r.stderr and "does not exist" in r.stderr
    assert "busted: monitoring" not in r.stderr  # the probes never loaded
    assert list(tmp_path.iterdir()) == []  # no store, no -wal/-shm
