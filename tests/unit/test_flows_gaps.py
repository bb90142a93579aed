"""The flow table over plaintext records as the kernel writes them for calls larger than its copy
limit (a head of PT_PIECES-1 chunks, then the call's last chunk, each with the call's full length):
the gap is bridged, the call and the next one on the connection are reported, nothing is lost
silently."""

from __future__ import annotations

import json
import socket

from busted import EventsLost, LlmCall, LossPlace
from busted.pipeline.enrich import Enricher
from busted.pipeline.flows import FlowTable
from busted.pipeline.llmreader import CallReader
from busted.wire.layout import FL, FLOW, PT_HDR, REC_HDR, REC_OPEN, REC_PLAIN

CHUNK, PIECES = 16384, 4
SK = 0x1234


class _NoPrices:
    def cost(self, **_kw):
        return None


def opened() -> bytes:
    return REC_HDR.pack(type=REC_OPEN, ts_ns=1_000, sk=SK) + FLOW.pack(
        open_ns=1_000, pid=10, tid=10, family=socket.AF_INET, sport=40000, dport=443, direction=1,
        flags=FL.ATTRIBUTED | FL.HAVE_TUPLE | FL.OPEN_SENT, saddr=bytes([10, 0, 0, 1]),
        daddr=bytes([10, 9, 9, 9]), comm=b"python")


def call_records(data: bytes, sent: bool, ts: int, chunk: int = CHUNK, pieces: int = PIECES,
                 first: int | None = None, ssl: int = 0x99) -> list[bytes]:
    """The records plaintext.c's pt_copy_part() emits for one call that moved ``data``, of which the
    first ``first`` bytes were in its first buffer (a plain-HTTP writev/sendmsg: only those are copied)."""
    out = []
    wire = len(data)
    total = wire if first is None else first
    for i in range(pieces):
        off = i * chunk
        if off >= total:
            break
        cut = 0
        if i == pieces - 1 and total > pieces * chunk:
            off, cut = total - chunk, 1
        piece = data[off : min(off + chunk, total)]
        if off + len(piece) >= total and off + len(piece) < wire:
            cut |= 2
        out.append(PT_HDR.pack(type=REC_PLAIN, len=len(piece), ts_ns=ts, sk=SK, ssl=ssl, pid=10, tid=10,
                               wire_len=wire, offset=off, direction=0 if sent else 1, source=1 if ssl else 3,
                               cut=cut) + piece)
    return out


def table() -> FlowTable:
    return FlowTable(enricher=Enricher(), salt=1,
                     reader=lambda flow, wall: CallReader(flow, wall, prices=_NoPrices()))


def request(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def response(model: str, pt: int, ct: int, pad: int = 0) -> bytes:
    body = json.dumps({"id": "c", "object": "chat.completion", "model": model, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "y" * pad}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def run(t: FlowTable, records: list[bytes]) -> list:
    out = []
    for r in records:
        out.extend(t.feed(r))
    return out


def test_a_300k_prompt_then_a_small_call_on_the_same_connection_are_two_calls():
    t = table()
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 300_000}], "model": "gpt-4o",
                      "stream": False}).encode()
    small = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    recs = [opened(), *call_records(request(big), True, 2_000), *call_records(response("gpt-4o", 75_010, 9, 100_000),
                                                                               False, 3_000),
            *call_records(request(small), True, 4_000), *call_records(response("gpt-4o-mini", 8, 2), False, 5_000)]
    out = run(t, recs)
    calls = [e for e in out if isinstance(e, LlmCall)]
    assert [(c.request_model, c.response_model, c.input_tokens, c.output_tokens, c.status, c.complete)
            for c in calls] == [("gpt-4o", "gpt-4o", 75_010, 9, 200, True), ("gpt-4o-mini", "gpt-4o-mini", 8, 2, 200,
                                                                                 True)]
    assert calls[0].request_bytes == len(big)
    assert not [e for e in out if isinstance(e, EventsLost)]


def test_a_2mb_prompt_with_a_small_chunk_size():
    t = table()
    big = json.dumps({"model": "claude-x", "messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode()
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(big))
    ans = json.dumps({"id": "m", "type": "message", "model": "claude-x", "stop_reason": "end_turn",
                      "content": [{"type": "text", "text": "ok"}],
                      "usage": {"input_tokens": 500_000, "output_tokens": 1}}).encode()
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ans) + ans
    out = run(t, [opened(), *call_records(head + big, True, 2_000, chunk=1024),
                  *call_records(resp, False, 3_000, chunk=1024)])
    (call,) = [e for e in out if isinstance(e, LlmCall)]
    assert (call.request_model, call.input_tokens, call.output_tokens, call.status) == ("claude-x", 500_000, 1, 200)


def test_a_gap_the_parser_cannot_bridge_is_a_counted_loss_with_its_reason():
    t = table()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 200_000 + b"\r\n\r\n{}"
    out = run(t, [opened(), *call_records(head, True, 2_000)])
    lost = [e for e in out if isinstance(e, EventsLost)]
    assert len(lost) == 1 and lost[0].where is LossPlace.PLAINTEXT and "request head" in lost[0].detail
    assert t.lost["PLAINTEXT"] == 1


def test_a_piece_lost_from_the_ring_is_a_gap_too():
    t = table()
    big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    recs = call_records(request(big), True, 2_000)
    del recs[1]  # a ring-full drop of the second piece: its bytes are a gap of known length
    out = run(t, [opened(), *recs, *call_records(response("gpt-4o", 3, 4), False, 3_000)])
    (call,) = [e for e in out if isinstance(e, LlmCall)]
    assert (call.request_model, call.output_tokens) == ("gpt-4o", 4)


def test_a_gathered_plain_http_write_whose_other_buffers_are_not_copied_is_a_gap_at_once():
    """sendmsg([head, body]) on plain HTTP: the kernel copies the first buffer and says the call's
    length; the body is a gap fed right away (no later piece comes), so the answer pairs with it."""
    t = table()
    body = json.dumps({"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "x" * 200_000}]})
    head = (b"POST /api/chat HTTP/1.1\r\nHost: ollama\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    ans = json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": "ok"}, "done": True,
                      "prompt_eval_count": 50_000, "eval_count": 2}).encode()
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ans) + ans
    out = run(t, [opened(), *call_records(head + body.encode(), True, 2_000, first=len(head), ssl=0),
                  *call_records(resp, False, 3_000, ssl=0)])
    (call,) = [e for e in out if isinstance(e, LlmCall)]
    assert (call.api, call.input_tokens, call.output_tokens, call.status) == ("ollama.chat", 50_000, 2, 200)
    assert call.request_bytes == len(body) and not [e for e in out if isinstance(e, EventsLost)]
