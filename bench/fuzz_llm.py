"""Fuzz the LLM/MCP extractors with random and mutated inputs; count anything that escapes.

    .venv/bin/python bench/fuzz_llm.py [--inputs 1000000] [--procs N] [--seed 1]
    .venv/bin/python bench/fuzz_llm.py --throughput     # parse speed of each streamed shape instead

Each input is one of (round robin):
  tracker-mutated  a realistic exchange of one API shape (tests/unit/test_classify_llm_bodies.py), request
                   and response bodies mutated (byte flips, inserts, deletes, splices of two shapes,
                   truncation), split at random points, fed through a CallTracker and closed
  tracker-random   random bytes as the body under a random content type and API path
  tracker-order    a random sequence of HTTP events (heads, data, ends, errors) on random streams
  sse              SseParser on mutated SSE documents, random splits
  eventstream      EventStreamDecoder on mutated AWS event-stream frames, random splits
  handlers         a random JSON value into every shape's response handler
An escape is an exception out of feed()/close() or out of a parser; "internal" counts exceptions the
tracker caught itself (its last-resort guard). Both must be 0. Prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "unit"))
sys.path.insert(0, str(ROOT))

import test_classify_llm_bodies as B  # noqa: E402

from busted.classify import llm_shapes as shapes  # noqa: E402
from busted.classify.eventstream import EventStreamDecoder  # noqa: E402
from busted.classify.httpevents import (  # noqa: E402
    HttpProtocolError,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
)
from busted.classify.llm import CallTracker  # noqa: E402
from busted.classify.sse import SseParser  # noqa: E402

CASES = [
    ("/v1/chat/completions", B.OPENAI_CHAT_STREAM_REQ, B.SSE, B.OPENAI_CHAT_STREAM_RESP),
    ("/v1/chat/completions", B.OPENAI_CHAT_STREAM_REQ, B.SSE, B.OPENAI_CHAT_TOOLS_STREAM),
    ("/v1/chat/completions", B.OPENAI_CHAT_REQ, B.JSON, [B.OPENAI_CHAT_RESP]),
    ("/v1/responses", B.RESPONSES_REQ, B.SSE, B.RESPONSES_STREAM),
    ("/v1/responses", B.RESPONSES_REQ, B.JSON, [B.RESPONSES_RESP]),
    ("/v1/embeddings", B.EMB_REQ, B.JSON, [B.EMB_RESP]),
    ("/v1/completions", B.COMPL_REQ, B.JSON, [B.COMPL_RESP]),
    ("/v1/messages", B.ANTH_STREAM_REQ, B.SSE, B.ANTH_STREAM),
    ("/v1/messages", B.ANTH_REQ, B.JSON, [B.ANTH_RESP]),
    ("/v1beta/models/g:streamGenerateContent?alt=sse", B.GEMINI_REQ, B.SSE, B.GEMINI_SSE),
    ("/v1beta/models/g:streamGenerateContent", B.GEMINI_REQ, B.JSON, B.GEMINI_ARRAY),
    ("/v1beta/models/g:generateContent", B.GEMINI_REQ, B.JSON, [B.GEMINI_RESP]),
    ("/api/chat", B.OLLAMA_CHAT_REQ, B.NDJSON, B.OLLAMA_CHAT_STREAM),
    ("/api/generate", B.OLLAMA_GEN_REQ, B.JSON, [B.OLLAMA_GEN_RESP]),
    ("/model/m/converse", B.BEDROCK_CONVERSE_REQ, B.JSON, [B.BEDROCK_CONVERSE_RESP]),
    ("/model/m/converse-stream", B.BEDROCK_CONVERSE_REQ, B.EVENTSTREAM, B.BEDROCK_CONVERSE_STREAM),
    ("/model/m/invoke-with-response-stream", B.BEDROCK_INVOKE_REQ, B.EVENTSTREAM, B.BEDROCK_INVOKE_STREAM),
    ("/mcp", B.MCP_CALL, B.SSE, [B.MCP_CALL_SSE]),
    ("/mcp", B.MCP_INIT, B.JSON, [B.MCP_INIT_RESULT]),
]
CASES = [(p, r, h, b"".join(c)) for p, r, h, c in CASES]
CTYPES = ["text/event-stream", "application/json", "application/x-ndjson", "application/vnd.amazon.eventstream",
          "text/plain", ""]
PATHS = sorted({c[0] for c in CASES}) + ["/", "/api/embed", "/openai/deployments/d/chat/completions"]
KINDS = ["tracker-mutated", "tracker-random", "tracker-order", "sse", "eventstream", "handlers"]
ES_FRAMES = b"".join(B.BEDROCK_CONVERSE_STREAM + B.BEDROCK_INVOKE_STREAM)
SSE_DOCS = [c[3] for c in CASES if c[2] == B.SSE]
TOKENS = [b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"\n", b"\r", b"\r\n", b"\n\n", b"data: ", b"event: ",
          b"[DONE]", b"null", b"true", b"1e999", b"-1", b"\x00", b"\xff", b"\xef\xbb\xbf", b'"usage":', b'"type":']


def mutate(rnd: random.Random, data: bytes, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        op = rnd.randrange(7)
        i = rnd.randrange(len(b) + 1) if b else 0
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rnd.randrange(256)
        elif op == 1:
            b[i:i] = rnd.choice(TOKENS)
        elif op == 2 and b:
            del b[i : i + rnd.randrange(1, 64)]
        elif op == 3 and b:  # duplicate a slice
            j = rnd.randrange(len(b))
            b[i:i] = b[j : j + rnd.randrange(1, 200)]
        elif op == 4:  # splice another shape's body
            other = rnd.choice(CASES)[3]
            j = rnd.randrange(len(other))
            b[i:i] = other[j : j + rnd.randrange(1, 400)]
        elif op == 5 and b:
            del b[i:]
        else:
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 16)))
    return bytes(b)


def splits(rnd: random.Random, data: bytes) -> list[bytes]:
    if not data:
        return [b""]
    k = rnd.choice((0, 1, 2, 4, 16, len(data) if len(data) < 300 else 32))
    cuts = sorted(rnd.randrange(len(data) + 1) for _ in range(k))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def tracker_run(rnd: random.Random, evs) -> tuple[int, int]:
    t = CallTracker(capture_content=rnd.choice((0, 64)), request_body_cap=rnd.choice((4096, 256 * 1024)),
                    response_body_cap=rnd.choice((2048, 1 << 20)), stream_event_cap=rnd.choice((512, 1 << 20)))
    n = 0
    for e in evs:
        n += len(t.feed(e))
    n += len(t.close(10**12))
    return n, t.stats["internal_errors"]


def exchange(path, req, hdrs, parts, status=200, complete=True):
    evs = [RequestHead(0, 1, "POST", path, "h", (), "1.1")]
    evs += [RequestData(0, 2, p) for p in parts[0]]
    evs += [RequestEnd(0, 3, len(req)), ResponseHead(0, 4, status, hdrs, "1.1")]
    evs += [ResponseData(0, 5 + i, p) for i, p in enumerate(parts[1])]
    evs.append(ResponseEnd(0, 100, sum(map(len, parts[1])), complete))
    return evs


def rand_json(rnd: random.Random, depth: int = 0):
    r = rnd.random()
    if depth > 4 or r < 0.35:
        return rnd.choice([None, True, False, 0, -1, 2**60, 1.5, float("nan"), "", "x", "stop", "tool_use",
                           "message_start", "content_block_start", "response.completed", "2.0", "[DONE]"])
    if r < 0.6:
        return [rand_json(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    keys = ["type", "usage", "choices", "delta", "message", "content", "model", "index", "tool_calls", "finish_reason",
            "input_tokens", "output_tokens", "usageMetadata", "candidates", "parts", "response", "error", "done",
            "prompt_eval_count", "output", "bytes", "stopReason", "start", "functionCall", "jsonrpc", "id"]
    return {rnd.choice(keys): rand_json(rnd, depth + 1) for _ in range(rnd.randrange(5))}


def one(rnd: random.Random, kind: str) -> tuple[int, int]:
    if kind == "tracker-mutated":
        path, req, hdrs, body = rnd.choice(CASES)
        if rnd.random() < 0.2:
            req = mutate(rnd, req, rnd.randrange(1, 4))
        body = mutate(rnd, body, rnd.randrange(1, 12))
        return tracker_run(rnd, exchange(path, req, hdrs, (splits(rnd, req), splits(rnd, body)),
                                         status=rnd.choice((200, 200, 200, 400, 429, 500)),
                                         complete=rnd.random() < 0.9))
    if kind == "tracker-random":
        path, req, _, _ = rnd.choice(CASES)
        body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(400)))
        hdrs = (("content-type", rnd.choice(CTYPES)),)
        return tracker_run(rnd, exchange(rnd.choice(PATHS), req, hdrs, ([req], splits(rnd, body))))
    if kind == "tracker-order":
        evs = []
        for _ in range(rnd.randrange(30)):
            s = rnd.randrange(4)
            d = rnd.choice(CASES)[rnd.choice((1, 3))][: rnd.randrange(300)]
            k = rnd.randrange(7)
            evs.append([
                RequestHead(s, 1, rnd.choice(("POST", "GET")), rnd.choice(PATHS), "h", (), "2"),
                RequestData(s, 2, d), RequestEnd(s, 3, len(d)),
                ResponseHead(s, 4, rnd.choice((200, 202, 100, 404)), (("content-type", rnd.choice(CTYPES)),), "2"),
                ResponseData(s, 5, d), ResponseEnd(s, 6, len(d), rnd.random() < 0.5), HttpProtocolError(s, 7, "x"),
            ][k])
        return tracker_run(rnd, evs)
    if kind == "sse":
        p = SseParser(max_event=rnd.choice((64, 4096)))
        n = sum(len(p.feed(c)) for c in splits(rnd, mutate(rnd, rnd.choice(SSE_DOCS), rnd.randrange(1, 20))))
        return n, 0
    if kind == "eventstream":
        d = EventStreamDecoder(max_message=rnd.choice((64, 1 << 20)))
        n = sum(len(d.feed(c)) for c in splits(rnd, mutate(rnd, ES_FRAMES, rnd.randrange(0, 6))))
        return n, 0
    obj = rand_json(rnd)
    for api in shapes.HANDLERS:
        shapes.handle(api, shapes.Usage(8), obj, 1, rnd.choice((None, "chunk", "metadata", "contentBlockStart")))
    shapes.recognise("POST", rnd.choice(PATHS), "", obj)
    shapes.prompt_text(obj, 64)
    return 0, 0


def worker(args: tuple[int, int]) -> dict:
    seed, count = args
    rnd = random.Random(seed)
    res = {k: [0, 0, 0, 0] for k in KINDS}  # inputs, escapes, internal, records
    first: str | None = None
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        r = res[kind]
        r[0] += 1
        try:
            recs, internal = one(rnd, kind)
            r[2] += internal
            r[3] += recs
        except Exception:
            r[1] += 1
            if first is None:
                first = traceback.format_exc()
    return {"res": res, "first": first}


def throughput() -> None:
    """MB/s of one CallTracker over ~1 MB streamed answers cut in 4 KiB chunks (one core)."""
    import json

    g = json.dumps(B.gemini_obj("hello world", {"promptTokenCount": 5})).encode()
    shapes_ = [
        ("OpenAI chat SSE", "/v1/chat/completions", B.OPENAI_CHAT_STREAM_REQ, B.SSE, B.OPENAI_CHAT_STREAM_RESP[1]),
        ("Anthropic SSE", "/v1/messages", B.ANTH_STREAM_REQ, B.SSE, B.ANTH_STREAM[3]),
        ("Gemini JSON array", "/v1beta/models/g:streamGenerateContent", B.GEMINI_REQ, B.JSON, g + b","),
        ("Ollama NDJSON", "/api/chat", B.OLLAMA_CHAT_REQ, B.NDJSON, B.OLLAMA_CHAT_STREAM[1]),
        ("Bedrock event-stream", "/model/m/converse-stream", B.BEDROCK_CONVERSE_REQ, B.EVENTSTREAM,
         B.BEDROCK_CONVERSE_STREAM[1]),
    ]
    print("| stream | MB | events | ms | MB/s | events/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, path, req, hdrs, unit in shapes_:
        n = 1_000_000 // len(unit)
        body = unit * n
        if hdrs == B.JSON:
            body = b"[" + body[:-1] + b"]"
        parts = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        best = float("inf")
        for _ in range(5):
            evs = exchange(path, req, hdrs, ([req], parts))
            t0 = time.perf_counter()
            recs, internal = tracker_run(random.Random(0), evs)
            best = min(best, time.perf_counter() - t0)
            assert recs == 1 and internal == 0
        print(f"| {name} | {len(body) / 1e6:.2f} | {n:,} | {best * 1000:.0f} | {len(body) / 1e6 / best:.1f} | "
              f"{n / best:,.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--throughput", action="store_true", help="measure parse speed instead of fuzzing")
    a = ap.parse_args(argv)
    if a.throughput:
        throughput()
        return 0
    jobs = 64
    per = [a.inputs // jobs + (1 if i < a.inputs % jobs else 0) for i in range(jobs)]
    t0 = time.monotonic()
    with mp.Pool(a.procs) as pool:
        parts = pool.map(worker, [(a.seed * 1000 + i, n) for i, n in enumerate(per)])
    secs = time.monotonic() - t0
    tot = {k: [0, 0, 0, 0] for k in KINDS}
    first = None
    for p in parts:
        for k, v in p["res"].items():
            tot[k] = [x + y for x, y in zip(tot[k], v, strict=True)]
        first = first or p["first"]
    n = sum(v[0] for v in tot.values())
    esc = sum(v[1] for v in tot.values())
    internal = sum(v[2] for v in tot.values())
    print(f"LLM extractor fuzzing: {n:,} inputs in {secs:.1f} s on {a.procs} process(es) "
          f"({platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs), seed {a.seed}")
    print()
    print("| input kind | inputs | escapes | caught by the guard | records/events out |")
    print("|---|---:|---:|---:|---:|")
    for k in KINDS:
        v = tot[k]
        print(f"| {k} | {v[0]:,} | {v[1]} | {v[2]} | {v[3]:,} |")
    print(f"| **total** | **{n:,}** | **{esc}** | **{internal}** | {sum(v[3] for v in tot.values()):,} |")
    if first:
        print("\nfirst escape:\n" + first)
    return 1 if esc or internal else 0


if __name__ == "__main__":
    sys.exit(main())
