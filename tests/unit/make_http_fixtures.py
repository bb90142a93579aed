"""Regenerate the recorded HTTP exchanges in fixtures/http/: real curl against real local servers
(Python's http.server for HTTP/1.x, an h2-library server for cleartext HTTP/2), through a
recording TCP proxy that writes each connection's chunks, per direction, in the order it relayed
them. Loopback only; every loop has a deadline. No root needed.

    .venv/bin/python tests/unit/make_http_fixtures.py

Each fixture is JSON: {"name", "alpn", "command", "chunks": [["c"|"s", hex], ...]}, one TCP
connection. The bodies the servers send are fixed here (BODIES) so tests can check them.
"""

from __future__ import annotations

import gzip
import http.server
import json
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import brotli
import h2.config
import h2.connection
import h2.events

OUT = Path(__file__).with_name("fixtures") / "http"
DEADLINE_S = 5.0

BODIES = {
    "/one": b"first response\n",
    "/two": b"second response, a bit longer\n",
    "/three": b"third\n",
    "/chunked-gzip": b"".join(b"line %d of a chunked gzip body\n" % i for i in range(200)),
    "/close": b"close-delimited body: no content-length, ends at FIN\n" * 5,
    "/br": b"brotli body " * 100,
    "/two/a": b"A" * 3000,
    "/two/b": b"B" * 3000,
    "/padded": b"padded data frames\n" * 10,
    "/big-headers": b"after a header block split over CONTINUATION\n",
    "/trailers": b"body then trailers\n",
    "/gzip": b"gzip over h2 " * 300,
    "/reset": b"partial " * 200,
}
BIG_HEADER = "x" * 20000  # > 16384: h2 splits the HEADERS into HEADERS + CONTINUATION
# Node's http2 client (nghttp2): h2c with prior knowledge; paths in argv, "+" between concurrent
# groups: "a b + c" requests a and b together, then c once both ended. (curl 7.88 does not send a
# second request on a reused prior-knowledge connection.)
NODE_H2 = """
const http2 = require('http2');
const [port, ...paths] = process.argv.slice(1);
const groups = paths.join(' ').split(' + ').map(g => g.split(' '));
const s = http2.connect('http://127.0.0.1:' + port);
s.on('error', () => {});
setTimeout(() => process.exit(3), 3000);
async function run() {
  for (const g of groups) {
    await Promise.all(g.map(p => new Promise(res => {
      const r = s.request({':path': p, 'user-agent': 'node-h2-test'});
      r.on('data', () => {}); r.on('end', res); r.on('error', res); r.on('close', res); r.end();
    })));
  }
  s.close(() => process.exit(0));
}
run();
"""
POST_BODY = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "' + b"hi " * 700 + b'"}]}'


class H1Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # quiet
        pass

    def do_HEAD(self):
        self._reply(head_only=True)

    def do_GET(self):
        self._reply()

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        data = self.rfile.read(n)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _reply(self, head_only=False):
        body = BODIES.get(self.path, b"not found\n")
        if self.path == "/chunked-gzip":
            z = gzip.compress(body)
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-encoding", "gzip")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(0, len(z), 500):  # several chunks
                part = z[i : i + 500]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/close":
            self.protocol_version = "HTTP/1.0"  # no length: the body ends when the server closes
            self.close_connection = True
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/br":
            body = brotli.compress(body)
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        if self.path == "/br":
            self.send_header("content-encoding", "br")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)


def h2_serve(conn_sock: socket.socket) -> None:
    """One cleartext HTTP/2 connection; behaviour chosen by path (see BODIES)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    conn_sock.sendall(conn.data_to_send())
    waiting: dict[int, str] = {}  # /two/* streams held until both arrived, then interleaved
    end = time.monotonic() + DEADLINE_S
    conn_sock.settimeout(0.5)
    while time.monotonic() < end:
        try:
            data = conn_sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                hs = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
                          for k, v in ev.headers)
                path, sid = hs[":path"], ev.stream_id
                if hs[":method"] == "POST":
                    waiting[sid] = "POST"
                    continue
                if path.startswith("/two/"):
                    waiting[sid] = path
                    if len([p for p in waiting.values() if p.startswith("/two/")]) == 2:
                        two = sorted((s, p) for s, p in waiting.items() if p.startswith("/two/"))
                        for s, p in two:
                            conn.send_headers(s, [(":status", "200"), ("content-type", "text/plain"),
                                                  ("content-length", str(len(BODIES[p])))])
                        for i in range(0, 3000, 1000):  # a1 b1 a2 b2 a3 b3
                            for s, p in two:
                                conn.send_data(s, BODIES[p][i : i + 1000], end_stream=i + 1000 >= 3000)
                        for s, _ in two:
                            del waiting[s]
                    continue
                body = BODIES.get(path, b"not found\n")
                head = [(":status", "200"), ("content-type", "text/plain")]
                if path == "/big-headers":
                    head.append(("x-big", BIG_HEADER))
                if path == "/gzip":
                    body = gzip.compress(body)
                    head.append(("content-encoding", "gzip"))
                if path == "/trailers":
                    conn.send_headers(sid, head)
                    conn.send_data(sid, body)
                    conn.send_headers(sid, [("x-checksum", "abc123")], end_stream=True)
                elif path == "/reset":
                    conn.send_headers(sid, head)
                    conn.send_data(sid, body[:600])
                    conn.reset_stream(sid, error_code=2)
                elif path == "/padded":
                    conn.send_headers(sid, head)
                    for i in range(0, len(body), 50):
                        conn.send_data(sid, body[i : i + 50], pad_length=17)
                    conn.end_stream(sid)
                else:
                    conn.send_headers(sid, head)
                    conn.send_data(sid, body, end_stream=True)
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                posted = getattr(conn, "_posted", {})
                posted.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                conn._posted = posted
            elif isinstance(ev, h2.events.StreamEnded) and waiting.get(ev.stream_id) == "POST":
                echo = bytes(conn._posted.pop(ev.stream_id))
                conn.send_headers(ev.stream_id, [(":status", "200"), ("content-type", "application/json"),
                                                 ("content-length", str(len(echo)))])
                conn.send_data(ev.stream_id, echo, end_stream=True)
                del waiting[ev.stream_id]
            elif isinstance(ev, h2.events.ConnectionTerminated):
                end = 0
        out = conn.data_to_send()
        if out:
            conn_sock.sendall(out)
    conn_sock.close()


def serve_h2(srv: socket.socket, stop: threading.Event) -> None:
    srv.settimeout(0.2)
    while not stop.is_set():
        try:
            c, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=h2_serve, args=(c,), daemon=True).start()


def record(upstream_port: int, argv_for_port, name: str, alpn: str | None, expect_rc=(0,)) -> None:
    """Run the client through a recording proxy; write one fixture per TCP connection."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(8)
    lsn.setblocking(False)
    port = lsn.getsockname()[1]
    sel = selectors.DefaultSelector()
    sel.register(lsn, selectors.EVENT_READ, None)
    conns: list[list[list[str]]] = []
    argv = argv_for_port(port)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + DEADLINE_S
    open_pairs = 0
    while time.monotonic() < end and (proc.poll() is None or open_pairs):
        for key, _ in sel.select(0.05):
            if key.data is None:
                c, _ = lsn.accept()
                u = socket.create_connection(("127.0.0.1", upstream_port))
                chunks: list[list[str]] = []
                conns.append(chunks)
                state = {"open": 2}
                sel.register(c, selectors.EVENT_READ, ("c", c, u, chunks, state))
                sel.register(u, selectors.EVENT_READ, ("s", u, c, chunks, state))
                open_pairs += 1
                continue
            side, src, dst, chunks, state = key.data
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if data:
                chunks.append([side, data.hex()])
                dst.sendall(data)
                continue
            sel.unregister(src)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            state["open"] -= 1
            if state["open"] == 0:
                src.close()
                dst.close()
                open_pairs -= 1
    proc.kill()
    rc = proc.wait()
    sel.close()
    lsn.close()
    if rc not in expect_rc:
        print(f"{name}: client exited {rc}", file=sys.stderr)
    for i, chunks in enumerate(conns):
        suffix = "" if len(conns) == 1 else f"_{i}"
        doc = {"name": name + suffix, "alpn": alpn, "command": " ".join(argv).replace(str(port), "PORT"),
               "chunks": chunks}
        (OUT / f"{name}{suffix}.json").write_text(json.dumps(doc, indent=0) + "\n")
        n = sum(len(h) // 2 for _, h in chunks)
        print(f"{name}{suffix}: {len(chunks)} chunks, {n} bytes, client rc {rc}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    h1 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H1Handler)
    threading.Thread(target=h1.serve_forever, daemon=True).start()
    p1 = h1.server_address[1]
    h2s = socket.socket()
    h2s.bind(("127.0.0.1", 0))
    h2s.listen(8)
    stop = threading.Event()
    threading.Thread(target=serve_h2, args=(h2s, stop), daemon=True).start()
    p2 = h2s.getsockname()[1]
    curl = ["curl", "-s", "-m", "4", "-o", "/dev/null"]

    def u(port, path):
        return f"http://127.0.0.1:{port}{path}"

    record(p1, lambda p: curl + ["--http1.1", u(p, "/one"), "-o", "/dev/null", u(p, "/two"), "-o", "/dev/null",
                                 u(p, "/three")], "h1_keepalive", "http/1.1")
    record(p1, lambda p: curl + ["--http1.1", "--compressed", u(p, "/chunked-gzip")], "h1_chunked_gzip", "http/1.1")
    record(p1, lambda p: curl + ["--http1.1", "-H", "Expect: 100-continue", "-H", "content-type: application/json",
                                 "--data-binary", POST_BODY.decode(), u(p, "/v1/chat/completions")],
           "h1_post_continue", "http/1.1")
    record(p1, lambda p: curl + ["--http1.1", u(p, "/close")], "h1_close_delimited", "http/1.1")
    record(p1, lambda p: curl + ["--http1.1", "-I", u(p, "/one")], "h1_head", "http/1.1")
    record(p1, lambda p: curl + ["--http1.1", "--compressed", u(p, "/br")], "h1_brotli", "http/1.1")
    pk = curl + ["--http2-prior-knowledge"]
    node = ["node", "-e", NODE_H2]
    record(p2, lambda p: node + [str(p), "/two/a", "/two/b", "+", "/one"], "h2_multiplex", "h2")
    record(p2, lambda p: node + [str(p), "/gzip", "+", "/padded", "+", "/big-headers", "+", "/trailers"],
           "h2_features", "h2")
    record(p2, lambda p: pk + ["-H", "content-type: application/json", "--data-binary", POST_BODY.decode(),
                               u(p, "/v1/chat/completions")], "h2_post", "h2")
    record(p2, lambda p: pk + [u(p, "/reset")], "h2_reset", "h2", expect_rc=(92,))
    stop.set()
    h1.shutdown()
    h2s.close()


if __name__ == "__main__":
    main()
