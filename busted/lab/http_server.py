"""Fake LLM provider endpoints: HTTPS on 443 (HTTP/2 or HTTP/1.1 by ALPN), plain HTTP on 80 and 11434.

This module only does I/O: what to answer comes from ``busted.lab.llm_answers.answer`` (pure).
HTTP/1.1 is ``h11`` (keep-alive, Content-Length or chunked bodies, ``Expect: 100-continue``),
HTTP/2 is ``h2`` (multiplexed streams answered concurrently, flow control respected). TLS listeners
offer ALPN ``h2`` and ``http/1.1``; a client offering no ALPN gets HTTP/1.1. Plain listeners speak
HTTP/1.1, and HTTP/2 with prior knowledge (h2c) when the connection opens with the HTTP/2 preface.

In-process (tests, no root needed)::

    srv = LabHTTPServer([Listener("tls", "127.0.0.1", 0)], tls=make_tls_context(cert, key)).start()
    port = srv.bound[0][2]
    ...
    srv.requests()   # one dict per request: method, path, http_version, stream_id, alpn, status, ...
    srv.close()

As the lab's server process: ``python -m busted.lab.http_server --config <json>`` inside the servers
netns, config ``{"cert", "key", "max_seconds", "tls": [[ip, port]...], "plain": [...], "ollama": [...]}``.
It prints ``READY`` once every socket is bound, then one JSON line per request.

A request is logged when its answer is about to be sent, so a client that has read the answer
always finds its request in ``requests()``. The log is bounded (``log_size`` newest entries).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email.utils
import http
import itertools
import json
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11

from busted.lab.llm_answers import LabAnswer, LabRequest, answer

__all__ = ["Listener", "LabHTTPServer", "make_tls_context", "main"]

MAX_BODY = 16 * 1024 * 1024
IDLE_SECONDS = 10.0
LOG_SIZE = 10_000
MAX_REQUESTS_PER_CONNECTION = 10_000
READ_SIZE = 65536
SERVER_NAME = "busted-lab/2"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FLAVOURS = ("tls", "plain", "ollama")
# Per-request options a test client sets (docs/lab.md): a delay before the answer's head, and a
# non-streamed answer without Content-Length (close-delimited to HTTP/1.0, chunked to HTTP/1.1).
DELAY_HEADER = "x-busted-lab-delay-ms"
CHUNK_DELAY_HEADER = "x-busted-lab-chunk-delay-ms"
MAX_DELAY_MS = 10_000
NO_LENGTH_HEADER = "x-busted-lab-no-length"
_QUIET = (OSError, TimeoutError, ssl.SSLError, h11.ProtocolError, h2.exceptions.ProtocolError,
          asyncio.IncompleteReadError)


@dataclass(frozen=True)
class Listener:
    flavour: str  # "tls" (needs the server's TLS context), "plain" or "ollama" (both plain HTTP)
    host: str
    port: int  # 0: an ephemeral port, see LabHTTPServer.bound


@dataclass
class _Conn:
    flavour: str
    peer: str
    local: str
    conn_id: int
    alpn: str | None


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _Stream:
    """A connection's bytes, TLS done here with ``ssl.MemoryBIO`` rather than by asyncio.

    asyncio's TLS transport closes the whole connection when the client sends close_notify, so a
    client that half-closes after its request (``gnutls-cli`` with stdin at EOF) never got its
    answer. Here close_notify is only the end of the client's data; the answer still goes out,
    then our own close_notify, like a real server.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tls: ssl.SSLContext | None) -> None:
        self.reader, self.writer, self.tls = reader, writer, tls
        self.alpn: str | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = tls.wrap_bio(self._in, self._out, server_side=True) if tls is not None else None
        self._eof = False

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.writer.write(data)

    async def _fill(self) -> bool:
        """Feed more ciphertext to the TLS object; False at the peer's TCP EOF."""
        raw = await self.reader.read(READ_SIZE)
        if raw:
            self._in.write(raw)
            return True
        self._in.write_eof()
        return False

    async def handshake(self) -> None:
        assert self._ssl is not None
        for _ in range(64):  # a handful of flights; bounded against a peer trickling bytes
            try:
                self._ssl.do_handshake()
                self._flush()
                await self.writer.drain()
                self.alpn = self._ssl.selected_alpn_protocol()
                return
            except ssl.SSLWantReadError:
                self._flush()
                await self.writer.drain()
                if not await self._fill():
                    raise ConnectionResetError("EOF during the TLS handshake") from None
        raise ssl.SSLError("TLS handshake did not finish")

    async def read(self) -> bytes:
        """Up to READ_SIZE bytes of the peer's data; b"" at its end (TCP FIN or TLS close_notify)."""
        if self._ssl is None:
            return await self.reader.read(READ_SIZE)
        for _ in range(1_000_000):  # each turn reads; the caller's idle timeout bounds the time
            if self._eof:
                return b""
            try:
                data = self._ssl.read(READ_SIZE)
                self._flush()
                return data
            except ssl.SSLWantReadError:
                self._flush()  # e.g. session tickets, key updates
                if not await self._fill():
                    self._eof = True
            except ssl.SSLZeroReturnError:
                self._eof = True
        return b""

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._ssl is None:
            self.writer.write(data)
            return
        self._ssl.write(data)
        self._flush()

    async def drain(self) -> None:
        await self.writer.drain()

    async def aclose(self) -> None:
        try:
            if self._ssl is not None:
                try:
                    self._ssl.unwrap()  # queues our close_notify
                except (ssl.SSLError, ValueError):
                    pass
                self._flush()
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (*_QUIET, asyncio.CancelledError):
            pass


class LabHTTPServer:
    """Every listener on one asyncio loop in a background thread; ``start()`` returns once bound."""

    def __init__(self, listeners: list[Listener], *, tls: ssl.SSLContext | None = None,
                 log_size: int = LOG_SIZE, on_request: Callable[[dict], None] | None = None,
                 idle_seconds: float = IDLE_SECONDS) -> None:
        for lst in listeners:
            if lst.flavour not in FLAVOURS:
                raise ValueError(f"unknown listener flavour {lst.flavour!r}")
            if lst.flavour == "tls" and tls is None:
                raise ValueError("a tls listener needs a TLS context")
        self.listeners = list(listeners)
        self.tls = tls
        self.idle_seconds = idle_seconds
        self.bound: list[tuple[str, str, int]] = []  # (flavour, host, port) once started
        self._on_request = on_request
        self._log: collections.deque[dict] = collections.deque(maxlen=max(1, log_size))
        self._log_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> LabHTTPServer:
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.set_exception_handler(_quiet_handler)
            try:
                loop.run_until_complete(self._bind())
            except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="busted-lab-http", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"lab HTTP server not bound after {timeout}s")
        if failure:
            raise failure[0]
        return self

    def close(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None

    def __enter__(self) -> LabHTTPServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def requests(self) -> list[dict]:
        """The logged requests, oldest first (at most ``log_size``)."""
        with self._log_lock:
            return list(self._log)

    async def _bind(self) -> None:
        for lst in self.listeners:
            async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, _f: str = lst.flavour) -> None:
                await self._connection(_f, r, w)

            srv = await asyncio.start_server(handler, lst.host, lst.port, reuse_address=True, backlog=128)
            self._servers.append(srv)
            port = srv.sockets[0].getsockname()[1]
            self.bound.append((lst.flavour, lst.host, port))

    async def _shutdown(self) -> None:
        for srv in self._servers:
            srv.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2.0)
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except (TimeoutError, OSError):
                pass

    # ------------------------------------------------------------------ connections
    async def _connection(self, flavour: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = writer.get_extra_info("peername") or ("?",)
        local = writer.get_extra_info("sockname") or ("?",)
        io = _Stream(reader, writer, self.tls if flavour == "tls" else None)
        try:
            if io.tls is not None:
                await asyncio.wait_for(io.handshake(), self.idle_seconds)
            c = _Conn(flavour, str(peer[0]), str(local[0]), next(self._ids), io.alpn)
            if io.alpn == "h2":
                await self._serve_h2(c, io, b"")
                return
            first = b"" if io.tls is not None else await self._sniff_preface(io)
            if first.startswith(H2_PREFACE):
                await self._serve_h2(c, io, first)
            else:
                await self._serve_h1(c, io, first)
        except _QUIET:
            pass  # resets, timeouts, failed handshakes and garbage are normal for a lab server
        finally:
            self._conns.discard(task)
            await io.aclose()

    async def _read(self, io: _Stream) -> bytes:
        return await asyncio.wait_for(io.read(), self.idle_seconds)

    async def _sniff_preface(self, io: _Stream) -> bytes:
        """The first bytes of a plain connection: enough to tell the h2c preface from HTTP/1.x."""
        data = b""
        for _ in range(len(H2_PREFACE)):
            chunk = await self._read(io)
            if not chunk:
                break
            data += chunk
            if len(data) >= len(H2_PREFACE) or not H2_PREFACE.startswith(data):
                break
        return data

    def _record(self, c: _Conn, version: str, stream_id: int | None, req: LabRequest, ans: LabAnswer | None,
                status: int, sent: int) -> None:
        rec = {"flavour": c.flavour, "peer": c.peer, "local": c.local, "conn": c.conn_id, "alpn": c.alpn,
               "http_version": version, "stream_id": stream_id, "method": req.method, "path": req.target,
               "host": req.header("host"), "status": status, "route": ans.route if ans else "error",
               "received_bytes": len(req.body), "sent_bytes": sent, "usage": ans.usage if ans else {}}
        with self._log_lock:
            self._log.append(rec)
        if self._on_request is not None:
            self._on_request(rec)

    def _answer(self, c: _Conn, req: LabRequest) -> tuple[LabAnswer, list[tuple[str, str]]]:
        ans = answer(req, now=int(time.time()))
        headers = [*ans.headers, ("server", SERVER_NAME), ("date", email.utils.formatdate(usegmt=True)),
                   ("x-busted-lab", c.flavour)]
        if not ans.streaming and req.header(NO_LENGTH_HEADER) != "1":
            headers.append(("content-length", str(len(ans.body))))
        return ans, headers

    @staticmethod
    async def _delay(req: LabRequest, header: str = DELAY_HEADER) -> None:
        """The request's ``x-busted-lab-delay-ms``: how long the "model" thinks before its answer's
        head (``x-busted-lab-chunk-delay-ms``: before each later chunk of a stream)."""
        v = req.header(header) or ""
        if v.isdigit() and len(v) < 6:
            await asyncio.sleep(min(int(v), MAX_DELAY_MS) / 1000)

    # ------------------------------------------------------------------ HTTP/1.1 (h11)
    async def _serve_h1(self, c: _Conn, io: _Stream,
                        first: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        if first:  # receive_data(b"") would mean EOF
            conn.receive_data(first)
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            head: h11.Request | None = None
            body = bytearray()
            while True:
                try:
                    ev = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._h1_simple(conn, io, exc.error_status_hint)
                    return
                if ev is h11.NEED_DATA:
                    conn.receive_data(await self._read(io))  # b"" is EOF, h11 turns it into an event
                    continue
                if ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                    return
                if isinstance(ev, h11.Request):
                    head = ev
                    if conn.they_are_waiting_for_100_continue:
                        go_on = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                        io.write(conn.send(go_on) or b"")
                elif isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > MAX_BODY:
                        await self._h1_simple(conn, io, 413)
                        return
                elif isinstance(ev, h11.EndOfMessage):
                    break
            assert head is not None
            req = LabRequest(head.method.decode("latin-1"), head.target.decode("latin-1"),
                             tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers),
                             bytes(body))
            ans, headers = self._answer(c, req)
            head_only = req.method == "HEAD"
            await self._delay(req)
            self._record(c, head.http_version.decode(), None, req, ans, ans.status, 0 if head_only else len(ans.body))
            io.write(conn.send(h11.Response(status_code=ans.status, headers=headers,
                                                reason=_reason(ans.status))) or b"")
            for i, chunk in enumerate(() if head_only else ans.chunks):
                if chunk:
                    if i:
                        await self._delay(req, CHUNK_DELAY_HEADER)
                    io.write(conn.send(h11.Data(data=chunk)) or b"")
                    await io.drain()  # one write per chunk: a stream arrives as a stream
            io.write(conn.send(h11.EndOfMessage()) or b"")
            await io.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close, HTTP/1.0, or an unread body
            conn.start_next_cycle()

    async def _h1_simple(self, conn: h11.Connection, io: _Stream, status: int) -> None:
        body = json.dumps({"error": {"message": _reason(status).decode(), "code": status}}).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   ("connection", "close"), ("server", SERVER_NAME)]
        try:
            io.write(conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status))) or b"")
            io.write(conn.send(h11.Data(data=body)) or b"")
            io.write(conn.send(h11.EndOfMessage()) or b"")
            await io.drain()
        except h11.LocalProtocolError:
            pass

    # ------------------------------------------------------------------ HTTP/2 (h2)
    async def _serve_h2(self, c: _Conn, io: _Stream,
                        first: bytes) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
        conn.initiate_connection()
        io.write(conn.data_to_send())
        streams: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        tasks: dict[int, asyncio.Task] = {}
        window = asyncio.Event()  # set whenever the peer grants send window
        data = first
        try:
            while True:
                events = conn.receive_data(data) if data else []
                for ev in events:
                    if isinstance(ev, h2.events.RequestReceived):
                        # h2 types headers as bytes or hpack tuples; header_encoding="latin-1" makes them str
                        streams[ev.stream_id] = (list(ev.headers), bytearray())  # type: ignore[arg-type]
                    elif isinstance(ev, h2.events.DataReceived):
                        try:
                            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        except h2.exceptions.StreamClosedError:
                            pass  # data racing our reset of that stream
                        st = streams.get(ev.stream_id)
                        if st is not None:
                            st[1].extend(ev.data)
                            if len(st[1]) > MAX_BODY:
                                streams.pop(ev.stream_id)
                                conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in streams:
                        hdrs, body = streams.pop(ev.stream_id)
                        tasks[ev.stream_id] = asyncio.create_task(
                            self._h2_stream(c, conn, io, window, ev.stream_id, hdrs, bytes(body)))
                    elif isinstance(ev, h2.events.StreamReset):
                        streams.pop(ev.stream_id, None)
                        task = tasks.pop(ev.stream_id, None)
                        if task is not None:
                            task.cancel()
                    elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                        window.set()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        await self._h2_finish(conn, io, tasks)
                        return
                for sid in [s for s, t in tasks.items() if t.done()]:
                    tasks.pop(sid)
                io.write(conn.data_to_send())
                await io.drain()
                data = await self._read(io)
                if not data:
                    await self._h2_finish(conn, io, tasks)
                    return
        finally:
            for task in tasks.values():
                task.cancel()

    async def _h2_finish(self, conn: h2.connection.H2Connection, io: _Stream, tasks: dict[int, asyncio.Task]) -> None:
        """The peer said goodbye (GOAWAY or EOF): let answers already under way finish, bounded."""
        pending = [t for t in tasks.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.idle_seconds)
        io.write(conn.data_to_send())
        await io.drain()

    async def _h2_stream(self, c: _Conn, conn: h2.connection.H2Connection, io: _Stream,
                         window: asyncio.Event, sid: int, hdrs: list[tuple[str, str]], body: bytes) -> None:
        pseudo = {k: v for k, v in hdrs if k.startswith(":")}
        plain = [(k.lower(), v) for k, v in hdrs if not k.startswith(":")]
        if not any(k == "host" for k, _ in plain) and ":authority" in pseudo:
            plain.append(("host", pseudo[":authority"]))
        req = LabRequest(pseudo.get(":method", "GET"), pseudo.get(":path", "/"), tuple(plain), body)
        ans, headers = self._answer(c, req)
        head_only = req.method == "HEAD"
        await self._delay(req)
        self._record(c, "2", sid, req, ans, ans.status, 0 if head_only else len(ans.body))
        try:
            chunks = [ch for ch in ans.chunks if ch] if not head_only else []
            conn.send_headers(sid, [(":status", str(ans.status)), *headers], end_stream=not chunks)
            io.write(conn.data_to_send())
            for i, chunk in enumerate(chunks):
                if i:
                    await self._delay(req, CHUNK_DELAY_HEADER)
                await self._h2_send(conn, io, window, sid, chunk)
            if chunks:
                conn.end_stream(sid)
                io.write(conn.data_to_send())
            await io.drain()
        except (*_QUIET, h2.exceptions.StreamClosedError):
            pass  # the peer reset the stream or went away

    async def _h2_send(self, conn: h2.connection.H2Connection, io: _Stream,
                       window: asyncio.Event, sid: int, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            size = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(view))
            if size <= 0:
                window.clear()
                await asyncio.wait_for(window.wait(), self.idle_seconds)
                continue
            conn.send_data(sid, view[:size].tobytes())
            view = view[size:]
            io.write(conn.data_to_send())
            await io.drain()


def _quiet_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    if isinstance(context.get("exception"), _QUIET):
        return  # failed TLS handshakes and resets: normal for a lab server
    loop.default_exception_handler(context)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    with open(args.config, encoding="utf-8") as fh:
        cfg = json.load(fh)
    listeners = [Listener(flavour, host, port) for flavour in FLAVOURS for host, port in cfg.get(flavour, [])]
    out_lock = threading.Lock()

    def emit(rec: dict) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(rec, sort_keys=True) + "\n")
            sys.stdout.flush()

    srv = LabHTTPServer(listeners, tls=make_tls_context(cfg["cert"], cfg["key"]), on_request=emit)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    srv.start()
    print("READY", flush=True)
    stop.wait(float(cfg.get("max_seconds", 3600)))
    srv.close(timeout=3.0)
    sys.stdout.flush()
    os._exit(0)  # do not wait for anything still half-open


if __name__ == "__main__":
    sys.exit(main())
