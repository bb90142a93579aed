"""Fake LLM provider endpoints: HTTPS on 443, plain HTTP on 80, an Ollama-like API on 11434.

Run as ``python -m busted.lab.http_server --config <json>`` inside the servers netns. Config::

    {"cert": "/tmp/.../server.pem", "key": "/tmp/.../server.key", "max_seconds": 3600,
     "tls": [["10.231.7.65", 443], ["fd6c:...", 443]],
     "plain": [["10.231.7.65", 80]],
     "ollama": [["10.231.7.70", 11434]]}

Every listener is a ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive; for TLS the
handshake happens in the connection's own thread (so a silent client cannot stall ``accept``), the
context offers ALPN ``http/1.1``. Request bodies are read fully (Content-Length, or chunked) before
the answer is sent. Routes:

* ``POST /v1/chat/completions``  OpenAI-style completion with ``usage`` (SSE if ``"stream": true``)
* ``POST /v1/messages``          Anthropic-style message with ``usage`` (SSE if ``"stream": true``)
* ``POST /v1beta/models/<m>:generateContent``  Gemini-style with ``usageMetadata``
* Ollama flavour: ``POST /api/chat``, ``POST /api/generate``, ``GET /api/tags``
* anything else: 200 with a small JSON describing the request.

One JSON line per request goes to stdout; the first line is ``READY`` once every socket is bound.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 16 * 1024 * 1024
IDLE_SECONDS = 10.0
OUT_LOCK = threading.Lock()
GEMINI_PREFIX = "/v1beta/models/"
GEMINI_SUFFIX = ":generateContent"


def log(**kw: object) -> None:
    with OUT_LOCK:
        sys.stdout.write(json.dumps(kw, sort_keys=True) + "\n")
        sys.stdout.flush()


def _words(n: int) -> str:
    return " ".join(["lab"] * max(1, n))


def _prompt_tokens(body: bytes) -> int:
    return max(1, len(body) // 4)


def openai_reply(req: dict, body: bytes) -> tuple[str, bytes]:
    model = str(req.get("model", "gpt-lab"))
    text = "Hello from the busted lab (openai)."
    usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": 8, "total_tokens": 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    created = int(time.time())
    if req.get("stream"):
        chunks = []
        for i, word in enumerate(text.split(" ")):
            delta = {"content": word + " "} if i else {"role": "assistant", "content": word + " "}
            chunks.append(
                {"id": "chatcmpl-lab", "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            )
        chunks.append(
            {"id": "chatcmpl-lab", "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
        )
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return "text/event-stream", sse.encode()
    out = {
        "id": "chatcmpl-lab",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }
    return "application/json", json.dumps(out).encode()


def anthropic_reply(req: dict, body: bytes) -> tuple[str, bytes]:
    model = str(req.get("model", "claude-lab"))
    text = "Hello from the busted lab (anthropic)."
    usage = {"input_tokens": _prompt_tokens(body), "output_tokens": 9}
    if req.get("stream"):
        events = [
            ("message_start", {"type": "message_start", "message": {
                "id": "msg_lab", "type": "message", "role": "assistant", "model": model, "content": [],
                "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": text}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": usage["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        sse = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events)
        return "text/event-stream", sse.encode()
    out = {
        "id": "msg_lab",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": usage,
    }
    return "application/json", json.dumps(out).encode()


def gemini_reply(model: str, body: bytes) -> tuple[str, bytes]:
    out = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "Hello from the busted lab (gemini)."}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": _prompt_tokens(body),
            "candidatesTokenCount": 7,
            "totalTokenCount": _prompt_tokens(body) + 7,
        },
        "modelVersion": model,
    }
    return "application/json", json.dumps(out).encode()


def ollama_reply(path: str, req: dict, body: bytes) -> tuple[str, bytes]:
    model = str(req.get("model", "llama-lab"))
    common = {"model": model, "created_at": "2024-01-01T00:00:00Z", "done": True,
              "prompt_eval_count": _prompt_tokens(body), "eval_count": 6}
    if path == "/api/chat":
        out = dict(common, message={"role": "assistant", "content": "Hello from the busted lab (ollama)."})
    else:
        out = dict(common, response="Hello from the busted lab (ollama).")
    return "application/json", json.dumps(out).encode()


class LabHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "busted-lab/1"
    timeout = IDLE_SECONDS  # bounds idle keep-alive connections

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # one JSON line per request instead, see _answer

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            total = 0
            for _ in range(100_000):
                line = self.rfile.readline(1024)
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(100):  # trailers, until the blank line
                        if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                            break
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _answer(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(413)
            return
        try:
            req = json.loads(body) if body else {}
            if not isinstance(req, dict):
                req = {}
        except ValueError:
            req = {}
        path = self.path.split("?", 1)[0]
        flavour = self.server.flavour  # type: ignore[attr-defined]
        status = 200
        if flavour == "ollama" and path in ("/api/chat", "/api/generate") and self.command == "POST":
            ctype, out = ollama_reply(path, req, body)
        elif flavour == "ollama" and path == "/api/tags":
            ctype, out = "application/json", json.dumps({"models": [{"name": "llama-lab:latest"}]}).encode()
        elif self.command == "POST" and path == "/v1/chat/completions":
            ctype, out = openai_reply(req, body)
        elif self.command == "POST" and path == "/v1/messages":
            ctype, out = anthropic_reply(req, body)
        elif self.command == "POST" and path.startswith(GEMINI_PREFIX) and path.endswith(GEMINI_SUFFIX):
            ctype, out = gemini_reply(path[len(GEMINI_PREFIX) : -len(GEMINI_SUFFIX)], body)
        else:
            ctype = "application/json"
            out = json.dumps(
                {"lab": True, "method": self.command, "path": self.path,
                 "host": self.headers.get("Host"), "received_bytes": len(body)}
            ).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Busted-Lab", flavour)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)
        log(
            flavour=flavour,
            peer=self.client_address[0],
            local=self.connection.getsockname()[0],
            method=self.command,
            path=self.path,
            host=self.headers.get("Host"),
            status=status,
            received_bytes=len(body),
            sent_bytes=len(out),
        )

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer


class LabHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], flavour: str, tls: ssl.SSLContext | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.flavour = flavour
        self.tls = tls
        super().__init__(addr, LabHandler)

    def finish_request(self, request: socket.socket, client_address: tuple) -> None:
        # Runs in the connection's thread (ThreadingMixIn), so the TLS handshake does too.
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(IDLE_SECONDS)
        try:
            tls_sock = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log(flavour=self.flavour, peer=client_address[0], tls_error=str(exc))
            return
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            # Send close_notify like a real server does, so clients see a clean TLS EOF.
            try:
                tls_sock.settimeout(1.0)
                tls_sock.unwrap().close()
            except (OSError, ValueError, ssl.SSLError):
                tls_sock.close()

    def handle_error(self, request: object, client_address: tuple) -> None:
        pass  # client resets and timeouts are normal for a lab server


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    with open(args.config, encoding="utf-8") as fh:
        cfg = json.load(fh)
    ctx = make_tls_context(cfg["cert"], cfg["key"])
    servers: list[LabHTTPServer] = []
    for host, port in cfg.get("tls", []):
        servers.append(LabHTTPServer((host, port), "tls", ctx))
    for host, port in cfg.get("plain", []):
        servers.append(LabHTTPServer((host, port), "plain", None))
    for host, port in cfg.get("ollama", []):
        servers.append(LabHTTPServer((host, port), "ollama", None))
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.25}, daemon=True)
               for s in servers]
    for t in threads:
        t.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait(float(cfg.get("max_seconds", 3600)))
    for s in servers:
        s.server_close()
    sys.stdout.flush()
    os._exit(0)  # do not wait for keep-alive connection threads


if __name__ == "__main__":
    sys.exit(main())
