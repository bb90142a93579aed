"""Per-call records of LLM API and MCP traffic, from the HTTP events of one connection.

``CallTracker`` is fed the ``busted.classify.httpevents`` events of one connection, in order
(``feed(ev) -> list[LlmCallInfo | McpMessageInfo]``), and ``close(ts_ns)`` when the connection
ends. It tracks each exchange by stream (HTTP/1.1 pipelined requests queue on stream 0), decides
from the request (method, path, body keys; never the host) whether it is an LLM API call or MCP,
and parses the answer incrementally: SSE, NDJSON, Gemini's JSON-array stream and AWS
event-stream bodies are never accumulated, only small counters are kept. When the response ends
(or the connection ends first: ``complete=False``) it returns one ``LlmCallInfo``. MCP messages
are returned as they are read.

Gaps (``RequestGap``/``ResponseGap``: body bytes not captured): a request is judged from its
body's head, read by a streaming scan of the top-level JSON keys (``scan_request``), and from its
tail; a JSON answer keeps its head and tail (usage sits at the end); a stream drops the line the
gap cut and goes on counting.

Memory is bounded per connection, whatever the number of exchanges: bytes held for all of them
(request heads, answers kept for parsing, partial stream events) stay under ``max_held``; the
exchange that would go over stops being read and is counted (``losses``, ``stats``).

Sans-I/O, no clock (timestamps come with the events), bounded memory, never raises: anything
unexpected is counted in ``stats`` and the exchange is dropped.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from busted.classify import llm_shapes as shapes
from busted.classify.eventstream import EventStreamDecoder
from busted.classify.httpevents import (
    HttpEvent,
    HttpProtocolError,
    RequestData,
    RequestEnd,
    RequestGap,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseGap,
    ResponseHead,
)
from busted.classify.mcp import CLIENT_TO_SERVER, SERVER_TO_CLIENT, McpMessageInfo, is_jsonrpc, mcp_messages
from busted.classify.sse import LineSplitter, SseParser
from busted.redact import redact_id, redact_text, redact_url

__all__ = ["CallTracker", "LlmCallInfo", "McpMessageInfo", "redact_secrets", "sanitize_path", "scan_request"]

REQUEST_BODY_CAP = 256 * 1024  # request bodies parsed as JSON up to this; beyond, regex over the prefix
RESPONSE_BODY_CAP = 1 << 20  # non-streamed answers parsed up to this; beyond, regex over head + tail
RESPONSE_TAIL = 8192  # usage blocks sit at the end of big answers (embeddings): keep this much of the end
STREAM_EVENT_CAP = 1 << 20  # one SSE event / NDJSON line / array element / event-stream frame
MAX_EXCHANGES = 256  # open exchanges per connection (HTTP/2 streams, pipelined requests)
MAX_PENDING_IDS = 1024  # JSON-RPC ids remembered to name responses
REQUEST_SCAN = 64 * 1024  # head of a request body too large (or gapped) to parse: scanned for top-level keys
REQUEST_TAIL = 4096  # ... and its end, where SDKs put "model" and "stream" after the messages
MAX_HELD = 8 << 20  # bytes held per connection for all its exchanges (bodies kept to parse, partial events)
_JSON_SPECIAL = re.compile(rb'["\\\[\]{},]')


@dataclass(frozen=True, slots=True)
class LlmCallInfo:
    """One LLM API call. None = not known (never 0 for unknown). Token names follow OTel gen_ai.usage."""

    api: str  # shape: "openai.chat", "anthropic.messages", "gemini.generate_content", "bedrock.converse", ...
    operation: str  # OTel gen_ai.operation.name: chat, text_completion, embeddings, generate_content
    method: str
    path: str  # credentials in the query masked
    authority: str | None
    request_model: str | None
    response_model: str | None
    stream: bool | None
    status: int | None  # HTTP status; None when no response head was seen
    error_type: str | None  # provider error type ("rate_limit_error", "RESOURCE_EXHAUSTED", ...) else "http_<status>"
    input_tokens: int | None  # all input tokens, cache reads and writes included
    output_tokens: int | None  # reasoning tokens included
    cache_read_tokens: int | None
    cache_write_tokens: int | None
    reasoning_tokens: int | None
    total_tokens: int | None
    finish_reason: str | None  # provider's word: "stop", "end_turn", "STOP", "tool_use", ...
    tool_calls: int | None  # tool invocations in the answer; 0 when the answer was read and had none
    request_body_bytes: int
    response_body_bytes: int
    ts_ns: int  # request start
    time_to_first_token_ns: int | None  # request start -> first content delta (streams) / first body byte
    duration_ns: int | None  # request start -> end of response (or of the connection)
    user_agent: str | None  # as sent, secret-looking parts masked, cut to 256 characters
    complete: bool  # the response ended normally
    stream_id: int  # HTTP/2 stream id, 0 for HTTP/1.x
    http_version: str
    prompt_text: str | None = None  # only with capture_content > 0; secrets masked
    completion_text: str | None = None
    # the provider's id of the answer (chatcmpl-..., resp_..., msg_..., Gemini's responseId); None when
    # the answer has none (Ollama, Bedrock Converse, embeddings) or it is not a plain token of at most
    # 128 characters; key-shaped strings masked
    response_id: str | None = None


# The one redaction of every output (busted.redact): the sinks apply the same functions again.
def redact_secrets(s: str) -> str:
    """Mask credentials in free text (a user agent, captured content): ``busted.redact.redact_text``."""
    return redact_text(s)


def sanitize_path(path: str) -> str:
    """The path with credential query values (``key=``, ``subscription-key=``, signatures, tokens) and
    key-shaped segments masked: ``busted.redact.redact_url``."""
    return redact_url(path)


def _header(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


class _JsonValues:
    """Splits a body into JSON values: each element of a top-level array (Gemini's stream without
    ``alt=sse``), else each top-level value. Bounded: an element over ``cap`` bytes is skipped."""

    __slots__ = ("_buf", "_cap", "_depth", "_in_str", "_esc", "_array", "_started", "_skip", "overlong")

    def __init__(self, cap: int) -> None:
        self._buf = bytearray()
        self._cap = cap
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._array = False  # the body is a top-level array
        self._started = False
        self._skip = False
        self.overlong = 0

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        n = len(data)
        i = 0
        if not self._started:
            while i < n and data[i] in b" \t\r\n":
                i += 1
            if i == n:
                return out
            self._started = True
            if data[i] == 0x5B:  # "["
                self._array = True
                i += 1
        pos = i  # bytes before pos are in the buffer (or dropped as separators)
        esc_at = i if self._esc else -1  # a byte escaped by a backslash that ended the previous chunk
        self._esc = False
        # Only these bytes change state; the regex jumps over the rest (a per-byte loop was 5x slower).
        for m in _JSON_SPECIAL.finditer(data, i):
            k = m.start()
            if k == esc_at:
                continue
            ch = data[k]
            if self._in_str:
                if ch == 0x5C:
                    esc_at = k + 1
                    self._esc = k + 1 == n
                elif ch == 0x22:
                    self._in_str = False
                continue
            if ch == 0x22:
                self._in_str = True
            elif ch == 0x7B or ch == 0x5B:
                self._depth += 1
            elif ch == 0x7D or ch == 0x5D:
                if self._depth == 0 and self._array and ch == 0x5D:
                    self._put(data[pos:k])  # end of the top-level array
                    pos = k + 1
                    self._array = False
                    self._emit(out)
                    continue
                self._depth = max(0, self._depth - 1)
                if self._depth == 0 and not self._array:
                    self._put(data[pos : k + 1])
                    pos = k + 1
                    self._emit(out)
            elif ch == 0x2C and self._depth == 0 and self._array:
                self._put(data[pos:k])
                pos = k + 1
                self._emit(out)
        self._put(data[pos:])
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _put(self, piece: bytes) -> None:
        if self._skip or not piece:
            return
        if len(self._buf) + len(piece) > self._cap:
            self._skip = True
            self._buf.clear()
            return
        self._buf += piece

    def _emit(self, out: list[bytes]) -> None:
        if self._skip:
            self.overlong += 1
            self._skip = False
        elif self._buf.strip():
            out.append(bytes(self._buf))
        self._buf.clear()


# A whole string (unrolled, possessive: linear, no backtracking), a structural byte, or a lone quote: a string
# the prefix cut, past which nothing is structure.
_JSON_TOKEN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[{}\[\]:,]|"')
_RX_TAIL_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.){1,256}")')
_RX_TAIL_STREAM = re.compile(rb'"stream"\s*:\s*(true|false)')


def scan_request(head: bytes, tail: bytes = b"") -> dict[str, Any]:
    """``model`` and ``stream`` of a JSON request body known only in part: a streaming scan of the
    top-level keys of its ``head`` (strings are skipped whole, so a "model" inside the messages is
    not taken), then, for a key not found there, the last occurrence in its ``tail`` (the bytes
    after a gap: SDKs write these keys after the messages). Not a parse: bounded, never raises."""
    out: dict[str, Any] = {"\0truncated": True}
    depth = 0
    key: bytes | None = None
    expect_key = after_colon = False
    for m in _JSON_TOKEN.finditer(head):
        tok = m.group()
        c = tok[0]
        if tok == b'"':
            break  # an unterminated string: the rest of the head is inside it
        if c == 0x22:  # a string
            if depth == 1 and expect_key:
                key, expect_key = tok[1:-1], False
            elif depth == 1 and after_colon and key == b"model" and len(tok) <= 258:
                out["model"] = _json_str(tok)
            after_colon = False
        elif c == 0x3A:  # ":"
            after_colon = depth == 1
            if after_colon and key == b"stream":
                rest = head[m.end() : m.end() + 16].lstrip()
                if rest.startswith((b"true", b"false")):
                    out["stream"] = rest.startswith(b"true")
        elif c == 0x7B or c == 0x5B:  # "{" "["
            depth += 1
            expect_key = depth == 1 and c == 0x7B
            after_colon = False
        elif c == 0x7D or c == 0x5D:
            depth -= 1
            after_colon = False
        elif depth == 1:  # "," at the top level: a key follows
            expect_key, key, after_colon = True, None, False
    if tail:
        if "model" not in out:
            found = list(_RX_TAIL_MODEL.finditer(tail))
            if found:
                out["model"] = _json_str(found[-1].group(1))
        if "stream" not in out:
            found = list(_RX_TAIL_STREAM.finditer(tail))
            if found:
                out["stream"] = found[-1].group(1) == b"true"
    if out.get("model") is None:
        out.pop("model", None)
    return out


def _json_str(tok: bytes) -> str | None:
    try:
        v = json.loads(tok)
    except ValueError:
        return None
    return v if isinstance(v, str) else None


class _Exchange:
    __slots__ = ("stream", "ts", "method", "path", "raw_path", "query", "authority", "req_headers", "version",
                 "req_body", "req_truncated", "req_bytes", "req_ended", "req_done", "kind", "info", "usage",
                 "status", "resp_headers", "mode", "parser", "resp_head", "resp_tail", "resp_truncated",
                 "resp_bytes", "first_byte_ts", "session", "transport", "prompt", "req_tail", "req_gap",
                 "resp_gap", "to_newline", "held")

    def __init__(self, h: RequestHead) -> None:
        self.stream = h.stream
        self.ts = h.ts_ns
        self.method = h.method
        self.raw_path = h.path
        base, _, self.query = h.path.partition("?")
        self.path = base
        self.authority = h.authority
        self.req_headers = h.headers
        self.version = h.http_version
        self.req_body = bytearray()
        self.req_truncated = False
        self.req_bytes = 0
        self.req_ended = False
        self.req_done = False  # request classified
        self.kind = "unknown"  # "llm", "mcp", "maybe_mcp" (a GET, until its answer shows), "other"
        self.info: shapes.RequestInfo | None = None
        self.usage: shapes.Usage | None = None
        self.status: int | None = None
        self.resp_headers: tuple[tuple[str, str], ...] = ()
        self.mode = ""  # "json", "sse", "ndjson", "array", "eventstream", "skip"
        self.parser: Any = None
        self.resp_head = bytearray()
        self.resp_tail = bytearray()
        self.resp_truncated = False
        self.resp_bytes = 0
        self.first_byte_ts: int | None = None
        self.session: str | None = None
        self.transport = "streamable_http"
        self.prompt: str | None = None
        self.req_tail = bytearray()  # request body bytes after a gap (its last REQUEST_TAIL)
        self.req_gap = False  # body bytes of the request were not captured
        self.resp_gap = False  # ... of the response
        self.to_newline = False  # a stream after a gap: drop the line the gap cut
        self.held = 0  # bytes this exchange holds (counted in the tracker's total)


Record = LlmCallInfo | McpMessageInfo


class CallTracker:
    """Feed it one connection's HTTP events; get LLM call and MCP message records back."""

    def __init__(self, *, capture_content: int = 0, request_body_cap: int = REQUEST_BODY_CAP,
                 response_body_cap: int = RESPONSE_BODY_CAP, stream_event_cap: int = STREAM_EVENT_CAP,
                 max_held: int = MAX_HELD) -> None:
        self.capture_content = max(0, capture_content)
        self._max_held = max_held
        self.held = 0  # bytes held for all open exchanges
        self.losses: list[str] = []  # exchanges not read in full because of the memory bound, and why
        self._req_cap = request_body_cap
        self._resp_cap = response_body_cap
        self._event_cap = stream_event_cap
        self._streams: dict[int, deque[_Exchange]] = {}
        self._open = 0
        self._pending: dict[tuple[str, str | int], tuple[str | None, str | None]] = {}
        self._session: str | None = None  # last MCP session seen on this connection
        # Exchanges by what they were judged to be ("llm", "mcp", "maybe_mcp", "other"): how the
        # monitor decides that a flow carries neither (and stops copying its plaintext).
        self.kinds: dict[str, int] = {}
        self.stats: dict[str, int] = {
            "calls": 0, "mcp_messages": 0, "internal_errors": 0, "json_errors": 0, "overlong": 0,
            "request_truncated": 0, "response_truncated": 0, "dropped_exchanges": 0, "protocol_errors": 0,
            "eventstream_broken": 0, "orphan_events": 0, "request_gaps": 0, "response_gaps": 0,
            "over_budget": 0,
        }

    # --- public -----------------------------------------------------------------------------------

    def feed(self, ev: HttpEvent) -> list[Record]:
        out: list[Record] = []
        try:
            self._feed(ev, out)
        except Exception:  # never out of the monitor; counted so tests and fuzzing can see it
            self.stats["internal_errors"] += 1
            self._streams.pop(getattr(ev, "stream", -1), None)
            self._recount()
        return out

    def close(self, ts_ns: int) -> list[Record]:
        """The connection ended: every open exchange is finished with ``complete=False``."""
        out: list[Record] = []
        try:
            for q in list(self._streams.values()):
                for ex in q:
                    self._finish(ex, ts_ns, complete=False, out=out)
        except Exception:
            self.stats["internal_errors"] += 1
        self._streams.clear()
        self._open = 0
        self.held = 0
        return out

    # --- events -----------------------------------------------------------------------------------

    def _feed(self, ev: HttpEvent, out: list[Record]) -> None:
        if isinstance(ev, RequestHead):
            if self._open >= MAX_EXCHANGES:
                self._drop_oldest()
            self._streams.setdefault(ev.stream, deque()).append(_Exchange(ev))
            self._open += 1
            return
        q = self._streams.get(ev.stream)
        if not q:
            self.stats["orphan_events"] += 1
            return
        if isinstance(ev, RequestData | RequestEnd | RequestGap):
            ex = next((x for x in q if not x.req_ended), None)
            if ex is None:
                self.stats["orphan_events"] += 1
                return
            if isinstance(ev, RequestData):
                self._request_data(ex, ev.data)
                self._account(ex)
            elif isinstance(ev, RequestGap):
                ex.req_bytes += ev.size
                if not ex.req_gap:
                    self.stats["request_gaps"] += 1
                ex.req_gap = True
            else:
                ex.req_ended = True
                ex.req_bytes = max(ex.req_bytes, ev.body_bytes)
                self._classify(ex, ev.ts_ns, out)
            return
        ex = q[0]  # responses come in request order
        if isinstance(ev, ResponseHead):
            if 100 <= ev.status < 200 and ev.status != 101:
                return  # 100 Continue and friends: the real head follows
            self._classify(ex, ev.ts_ns, out)
            self._response_head(ex, ev)
        elif isinstance(ev, ResponseData):
            self._classify(ex, ev.ts_ns, out)
            self._response_data(ex, ev.data, ev.ts_ns, out)
            self._account(ex)
        elif isinstance(ev, ResponseGap):
            self._classify(ex, ev.ts_ns, out)
            self._response_gap(ex, ev.size)
            self._account(ex)
        elif isinstance(ev, ResponseEnd):
            self._classify(ex, ev.ts_ns, out)
            ex.resp_bytes = max(ex.resp_bytes, ev.body_bytes)
            q.popleft()
            self._open -= 1
            self.held -= ex.held
            ex.held = 0
            if not q:
                del self._streams[ev.stream]
            self._finish(ex, ev.ts_ns, complete=ev.complete, out=out)
        elif isinstance(ev, HttpProtocolError):
            self.stats["protocol_errors"] += 1
            for x in q:
                self._finish(x, ev.ts_ns, complete=False, out=out)
            del self._streams[ev.stream]
            self._recount()

    def _recount(self) -> None:
        self._open = sum(len(q) for q in self._streams.values())
        self.held = sum(x.held for q in self._streams.values() for x in q)

    def _account(self, ex: _Exchange) -> None:
        """Update the connection's held bytes for ``ex``; past the bound, ``ex`` stops being read."""
        parser = ex.parser
        held = len(ex.req_body) + len(ex.req_tail) + len(ex.resp_head) + len(ex.resp_tail)
        if parser is not None:
            held += parser.buffered
        self.held += held - ex.held
        ex.held = held
        if self.held <= self._max_held:
            return
        # Over the bound: this exchange's buffers go; it is reported with what was read so far.
        self.stats["over_budget"] += 1
        self.losses.append(f"stream {ex.stream}: over {self._max_held} bytes held on the connection; "
                           "the rest of this exchange's bodies not parsed")
        ex.req_body = bytearray()
        ex.req_tail = bytearray()
        if not ex.req_done:
            ex.req_truncated = True
        ex.resp_head = bytearray()
        ex.resp_tail = bytearray()
        ex.resp_truncated = True
        ex.parser = None
        ex.mode = "skip"
        self.held -= ex.held
        ex.held = 0

    def _drop_oldest(self) -> None:
        for sid, q in self._streams.items():
            if q:
                q.popleft()
                self.stats["dropped_exchanges"] += 1
                if not q:
                    del self._streams[sid]
                break
        self._recount()

    # --- request ------------------------------------------------------------------------------------

    def _request_data(self, ex: _Exchange, data: bytes) -> None:
        ex.req_bytes += len(data)
        if ex.req_done:
            return
        if ex.req_gap or ex.req_truncated:  # past the head: only the end is kept
            ex.req_tail += data
            if len(ex.req_tail) > REQUEST_TAIL:
                del ex.req_tail[: len(ex.req_tail) - REQUEST_TAIL]
            return
        room = self._req_cap - len(ex.req_body)
        if len(data) > room:
            if not ex.req_truncated:
                self.stats["request_truncated"] += 1
            ex.req_truncated = True
            data = data[: max(0, room)]
        ex.req_body += data

    def _classify(self, ex: _Exchange, ts: int, out: list[Record]) -> None:
        """Decide what the exchange is, once: at the request's end (or when the answer starts first)."""
        if ex.req_done:
            return
        ex.req_done = True
        body = bytes(ex.req_body)
        ex.req_body = bytearray()
        if ex.req_gap:
            ex.req_truncated = True
        obj: Any = None
        if ex.req_truncated:
            obj = scan_request(body[:REQUEST_SCAN], bytes(ex.req_tail))
            ex.req_tail = bytearray()
        elif body:
            obj = self._loads(body)
        hdr_session = _header(ex.req_headers, "mcp-session-id")
        if ex.method == "POST" and not ex.req_truncated and is_jsonrpc(obj):
            ex.kind = "mcp"
            self._count_kind("mcp")
            self._mcp_session(ex, hdr_session)
            self._mcp(ex, obj, ts, CLIENT_TO_SERVER, out)
            return
        info = shapes.recognise(ex.method, ex.path, ex.query, obj)
        if info is not None:
            ex.kind, ex.info = "llm", info
            self._count_kind("llm")
            ex.usage = shapes.Usage(self.capture_content)
            if self.capture_content and isinstance(obj, dict) and not ex.req_truncated:
                ex.prompt = redact_secrets(shapes.prompt_text(obj, self.capture_content))
            return
        # GETs may open an MCP server->client SSE stream (either transport); decided by the answer.
        ex.kind = "maybe_mcp" if ex.method == "GET" else "other"
        self._count_kind(ex.kind)
        if ex.kind == "maybe_mcp":
            self._mcp_session(ex, hdr_session)

    def _count_kind(self, kind: str, n: int = 1) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + n

    def _mcp_session(self, ex: _Exchange, hdr: str | None) -> None:
        if hdr:
            ex.session = hdr[:256]
            return
        for k, v in parse_qsl(ex.query, keep_blank_values=False)[:32]:
            if k in ("sessionId", "session_id"):
                ex.session = v[:256]
                ex.transport = "sse"
                return

    def _loads(self, b: bytes | str) -> Any:
        try:
            return json.loads(b)
        except (ValueError, RecursionError):
            self.stats["json_errors"] += 1
            return None

    # --- response -----------------------------------------------------------------------------------

    def _response_head(self, ex: _Exchange, ev: ResponseHead) -> None:
        ex.status = ev.status
        ex.resp_headers = ev.headers
        ctype = (_header(ev.headers, "content-type") or "").lower()
        sid = _header(ev.headers, "mcp-session-id")
        if sid and ex.kind in ("mcp", "maybe_mcp"):
            ex.session = sid[:256]
        if ex.kind == "other":
            ex.mode = "skip"
            return
        if ex.kind == "maybe_mcp":
            if "text/event-stream" in ctype:
                ex.mode, ex.parser = "sse", SseParser(self._event_cap)
            else:
                ex.mode, ex.kind = "skip", "other"
                self._count_kind("maybe_mcp", -1)
                self._count_kind("other")
            return
        if "text/event-stream" in ctype:
            ex.mode, ex.parser = "sse", SseParser(self._event_cap)
        elif "ndjson" in ctype or "jsonl" in ctype or (
                ex.info is not None and ex.info.api.startswith("ollama") and ex.info.stream
                and ev.status < 400 and "json" not in ctype):
            ex.mode, ex.parser = "ndjson", LineSplitter(self._event_cap)
        elif "amazon.eventstream" in ctype:
            ex.mode, ex.parser = "eventstream", EventStreamDecoder(self._event_cap)
        elif ex.info is not None and ex.info.api == "gemini.generate_content" and ex.info.stream:
            ex.mode, ex.parser = "array", _JsonValues(self._event_cap)
        else:
            ex.mode = "json"

    def _response_gap(self, ex: _Exchange, size: int) -> None:
        """Body bytes of the answer not captured: keep the head, read on after them."""
        ex.resp_bytes += size
        if not ex.resp_gap:
            self.stats["response_gaps"] += 1
        ex.resp_gap = True
        mode = ex.mode
        if mode == "json":
            if not ex.resp_truncated:
                self.stats["response_truncated"] += 1
            ex.resp_truncated = True
            ex.resp_tail = bytearray()  # what preceded the gap is no tail
        elif mode == "sse":
            ex.parser = SseParser(self._event_cap)
            ex.to_newline = True
        elif mode == "ndjson":
            ex.parser = LineSplitter(self._event_cap)
            ex.to_newline = True
        elif mode in ("array", "eventstream"):
            ex.mode, ex.parser = "skip", None  # no place to resume framing: the rest is not read

    def _response_data(self, ex: _Exchange, data: bytes, ts: int, out: list[Record]) -> None:
        if not data:
            return
        ex.resp_bytes += len(data)
        if ex.first_byte_ts is None:
            ex.first_byte_ts = ts
        mode = ex.mode
        if mode == "skip" or mode == "":
            return
        if ex.to_newline:  # the line a gap cut is dropped: resume at the next one
            nl = data.find(b"\n")
            if nl < 0:
                return
            ex.to_newline = False
            data = data[nl + 1 :]
            if not data:
                return
        if mode == "json":
            if ex.resp_gap:
                ex.resp_tail += data
                if len(ex.resp_tail) > RESPONSE_TAIL:
                    del ex.resp_tail[: len(ex.resp_tail) - RESPONSE_TAIL]
                return
            room = self._resp_cap - len(ex.resp_head)
            if len(data) <= room:
                ex.resp_head += data
            else:
                if room > 0:
                    ex.resp_head += data[:room]
                if not ex.resp_truncated:
                    self.stats["response_truncated"] += 1
                ex.resp_truncated = True
                ex.resp_tail += data
                if len(ex.resp_tail) > RESPONSE_TAIL:
                    del ex.resp_tail[: len(ex.resp_tail) - RESPONSE_TAIL]
            return
        if mode == "sse":
            before = ex.parser.overlong
            for sev in ex.parser.feed(data):
                self._sse_event(ex, sev.event, sev.data, ts, out)
            self.stats["overlong"] += ex.parser.overlong - before
            return
        if mode == "ndjson":
            for line in ex.parser.feed(data):
                if line is None:
                    self.stats["overlong"] += 1
                elif line.strip():
                    self._obj(ex, self._loads(line), ts, None, out)
            return
        if mode == "array":
            before = ex.parser.overlong
            for el in ex.parser.feed(data):
                self._obj(ex, self._loads(el), ts, None, out)
            self.stats["overlong"] += ex.parser.overlong - before
            return
        if mode == "eventstream":
            dec: EventStreamDecoder = ex.parser
            for msg in dec.feed(data):
                mtype = msg.header(":message-type")
                if mtype == "exception" or mtype == "error":
                    err = msg.header(":exception-type") or msg.header(":error-code") or "exception"
                    if ex.usage is not None:
                        ex.usage.error(err if isinstance(err, str) else "exception")
                    continue
                et = msg.header(":event-type")
                self._obj(ex, self._loads(msg.payload), ts, et if isinstance(et, str) else "", out)
            if dec.broken is not None and ex.mode == "eventstream":
                self.stats["eventstream_broken"] += 1
                ex.mode = "skip"

    def _sse_event(self, ex: _Exchange, event: str, data: str, ts: int, out: list[Record]) -> None:
        if ex.kind == "llm":
            if data.strip() == "[DONE]":
                if ex.usage is not None:
                    ex.usage.done = True
                return
            obj = self._loads(data)
            self._obj(ex, obj, ts, event if event != "message" else None, out)
            return
        # MCP: an "endpoint" event marks the 2024-11-05 HTTP+SSE transport.
        if event == "endpoint":
            ex.kind, ex.transport = "mcp", "sse"
            _, _, q = data.partition("?")
            for k, v in parse_qsl(q)[:32]:
                if k in ("sessionId", "session_id"):
                    ex.session = v[:256]
            return
        if not data.startswith(("{", "[")):
            return
        obj = self._loads(data)
        if is_jsonrpc(obj):
            ex.kind = "mcp"
            self._mcp(ex, obj, ts, SERVER_TO_CLIENT, out)

    def _obj(self, ex: _Exchange, obj: Any, ts: int, event: str | None, out: list[Record]) -> None:
        if obj is None or ex.usage is None or ex.info is None:
            return
        shapes.handle(ex.info.api, ex.usage, obj, ts, event)

    def _mcp(self, ex: _Exchange, obj: Any, ts: int, direction: str, out: list[Record]) -> None:
        if ex.session is None and direction == SERVER_TO_CLIENT:
            ex.session = self._session
        if ex.session is not None:
            self._session = ex.session
        msgs = mcp_messages(obj, ts_ns=ts, stream=ex.stream, direction=direction, session_id=ex.session,
                            transport=ex.transport, authority=ex.authority, path=sanitize_path(ex.raw_path),
                            pending=self._pending)
        while len(self._pending) > MAX_PENDING_IDS:
            del self._pending[next(iter(self._pending))]
        self.stats["mcp_messages"] += len(msgs)
        out.extend(msgs)

    # --- end ----------------------------------------------------------------------------------------

    def _finish(self, ex: _Exchange, ts: int, complete: bool, out: list[Record]) -> None:
        if not ex.req_done:
            self._classify(ex, ts, out)
        if ex.kind == "mcp" and ex.mode == "json" and ex.resp_head and not ex.resp_truncated:
            obj = self._loads(bytes(ex.resp_head))
            if is_jsonrpc(obj):
                self._mcp(ex, obj, ex.first_byte_ts or ts, SERVER_TO_CLIENT, out)
            return
        if ex.kind != "llm" or ex.info is None or ex.usage is None:
            return
        u = ex.usage
        info = ex.info
        if ex.mode == "json" and (ex.resp_head or ex.resp_tail):
            if ex.resp_truncated:
                tools = u.tool_calls
                shapes.handle(info.api, u, shapes.regex_usage(info.api, bytes(ex.resp_head), bytes(ex.resp_tail)),
                              ex.first_byte_ts or ts)
                u.tool_calls = tools  # the regex cannot see the answer's items: still unknown
            else:
                obj = self._loads(bytes(ex.resp_head))
                if isinstance(obj, list):  # a JSON-array stream answered as application/json
                    for el in obj[:10_000]:
                        shapes.handle(info.api, u, el, ex.first_byte_ts or ts)
                elif obj is not None:
                    shapes.handle(info.api, u, obj, ex.first_byte_ts or ts)
        elif ex.mode == "ndjson":
            tail = ex.parser.pending()  # last line without a newline
            if tail.strip():
                self._obj(ex, self._loads(tail), ts, None, out)
        if info.api == "bedrock.invoke":
            _bedrock_headers(u, ex.resp_headers)
        stream = info.stream
        ctype = (_header(ex.resp_headers, "content-type") or "").lower()
        if "text/event-stream" in ctype or "eventstream" in ctype or "ndjson" in ctype:
            stream = True
        error = u.error_type
        if error is None and ex.status is not None and ex.status >= 400:
            error = f"http_{ex.status}"
        ttft = None
        first = u.first_content_ts if stream and u.first_content_ts is not None else ex.first_byte_ts
        if first is not None:
            ttft = max(0, first - ex.ts)
        inp, outp = u.input_total(), u.output
        total = u.total
        if total is None and inp is not None and outp is not None:
            total = inp + outp
        ua = _header(ex.req_headers, "user-agent")
        self.stats["calls"] += 1
        out.append(LlmCallInfo(
            api=info.api, operation=info.operation, method=ex.method, path=sanitize_path(ex.raw_path),
            authority=ex.authority, request_model=info.request_model, response_model=u.response_model,
            stream=stream, status=ex.status, error_type=error, input_tokens=inp, output_tokens=outp,
            cache_read_tokens=u.cache_read, cache_write_tokens=u.cache_write, reasoning_tokens=u.reasoning,
            total_tokens=total, finish_reason=u.finish_reason, tool_calls=u.tool_calls,
            request_body_bytes=ex.req_bytes, response_body_bytes=ex.resp_bytes, ts_ns=ex.ts,
            time_to_first_token_ns=ttft, duration_ns=max(0, ts - ex.ts), user_agent=redact_secrets(ua)[:256] if ua
            else None, complete=complete or u.done, stream_id=ex.stream, http_version=ex.version,
            prompt_text=ex.prompt, completion_text=redact_secrets("".join(u.text)) if self.capture_content else None,
            response_id=redact_id(u.response_id) if u.response_id else None,
        ))


def _bedrock_headers(u: shapes.Usage, headers: tuple[tuple[str, str], ...]) -> None:
    # InvokeModel answers carry Bedrock's own counts in headers, whatever the model's body says.
    for name, attr in (("x-amzn-bedrock-input-token-count", "input"), ("x-amzn-bedrock-output-token-count", "output")):
        v = _header(headers, name)
        if v is not None and v.strip().isdigit() and len(v) < 16:
            if getattr(u, attr) is None:
                setattr(u, attr, int(v))
