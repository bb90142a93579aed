"""The parsers' memory bomb (issue 17, item 9) against a real monitor: peak RSS, this tree vs another.

    sudo .venv/bin/python bench/parser_bomb.py [--conns 6] [--streams 256] [--mb 1] [--base DIR]

``--conns`` h2c (cleartext HTTP/2) connections on loopback each open ``--streams`` LLM API calls;
the server answers every stream with a gzip body that expands to ``--mb`` MiB and never ends (no
END_STREAM), and the client reads it 16 KiB at a time. A ``Monitor()`` child of this tree (and,
with ``--base``, of another checkout, e.g. ``git worktree add /tmp/base fa61c69``) watches; its
VmRSS before, its VmHWM while every stream is still open (once its CPU went idle: all parsed), and
the losses it reported are printed.
Wire bytes are small (gzip of a repeated byte); what the monitor keeps is what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import hpack

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CLK = os.sysconf("SC_CLK_TCK")

MONITOR = """
import json, re, sys, threading, busted
lost = {}
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
with busted.Monitor(preexisting=False) as m:
    print("ready", flush=True)
    while not stop.is_set():
        for ev in m.events(timeout=0.2):
            if isinstance(ev, busted.EventsLost):
                key = ev.where.name + ": " + re.sub(r"[0-9]+", "N", ev.detail)[:90]
                lost[key] = lost.get(key, 0) + ev.count
print(json.dumps(lost), flush=True)
"""


def frame(typ: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([typ, flags]) + sid.to_bytes(4, "big") + payload


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out


def serve(lsock: socket.socket, streams: int, blob: bytes, done: threading.Event) -> None:
    conns = []
    while not done.is_set():
        try:
            c, _ = lsock.accept()
        except OSError:
            return
        enc = hpack.Encoder()  # one per connection: HPACK tables are per connection
        conns.append(c)
        c.settimeout(10)
        need = len(PREFACE)
        got = b""
        while len(got) < need:  # the preface; the rest of the client's frames are not needed
            got += c.recv(65536)
        out = frame(4, 0, 0, b"")
        for i in range(streams):
            sid = 1 + 2 * i
            out += frame(1, 4, sid, enc.encode([(":status", "200"), ("content-type", "application/json"),
                                                ("content-encoding", "gzip")]))
            out += b"".join(frame(0, 0, sid, blob[k : k + 16384]) for k in range(0, len(blob), 16384))
        c.sendall(out)


def client(port: int, streams: int, expect: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    enc = hpack.Encoder()
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    out = PREFACE + frame(4, 0, 0, b"")
    for i in range(streams):
        sid = 1 + 2 * i
        out += frame(1, 4, sid, enc.encode([(":method", "POST"), (":path", "/v1/chat/completions"),
                                            (":scheme", "http"), (":authority", "api.openai.com"),
                                            ("content-type", "application/json")]))
        out += frame(0, 1, sid, body)
    s.sendall(out)
    n = 0
    s.settimeout(10)
    while n < expect:  # read as a client would, 16 KiB at a time
        d = s.recv(16384)
        if not d:
            break
        n += len(d)
    return s


def one(tree: Path, conns: int, streams: int, mb: int) -> dict[str, Any]:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = z.compress(b'{"model":"gpt-4o","x":"' + b"a" * (mb << 20)) + z.flush(zlib.Z_SYNC_FLUSH)  # never ends
    mon = subprocess.Popen([PY, "-c", MONITOR], cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert mon.stdin is not None and mon.stdout is not None
    assert mon.stdout.readline().strip() == "ready"
    before = status(mon.pid)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    port = lsock.getsockname()[1]
    done = threading.Event()
    srv = threading.Thread(target=serve, args=(lsock, streams, blob, done), daemon=True)
    srv.start()
    per_conn = 9  # the SETTINGS frame (HEADERS frames are counted loosely: the read stops on time-out)
    expect = streams * (len(blob) + 9 * (len(blob) // 16384 + 1)) + per_conn
    wire = 0
    socks = []
    for _ in range(conns):
        socks.append(client(port, streams, expect))
        wire += expect
    last, end = cpu_s(mon.pid), time.monotonic() + 120
    while time.monotonic() < end:  # until the monitor has parsed everything (its CPU goes idle)
        time.sleep(1.0)
        now = cpu_s(mon.pid)
        if now - last < 0.05:
            break
        last = now
    peak = status(mon.pid)
    mon.stdin.write("stop\n")
    mon.stdin.flush()
    out, _ = mon.communicate(timeout=120)
    for s in socks:
        s.close()
    done.set()
    lsock.close()
    return {"rss_before_mb": round(before["VmRSS"], 1), "peak_rss_mb": round(peak["VmHWM"], 1),
            "wire_mb": round(wire / 2**20, 2), "offered_decoded_mb": conns * streams * mb,
            "lost": json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--conns", type=int, default=6)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--mb", type=int, default=1, help="decoded MiB offered per stream")
    ap.add_argument("--base", type=Path)
    a = ap.parse_args()
    report: dict[str, Any] = {"conns": a.conns, "streams": a.streams, "mb_per_stream": a.mb,
                              "this": one(ROOT, a.conns, a.streams, a.mb)}
    if a.base:
        report["base"] = one(a.base.resolve(), a.conns, a.streams, a.mb)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
