"""Fuzz the HTTP observer (busted.classify.http): random and mutated inputs, count escapes.

    .venv/bin/python bench/fuzz_http.py [--inputs 1000000] [--seed 1] [--jobs 2]

Inputs are the recorded exchanges in tests/unit/fixtures/http/ damaged by
tests/unit/http_helpers.mutate (flipped, inserted, dropped, reordered, spliced bytes, late joins),
plus random bytes behind HTTP-looking prefixes (and answers: 101, 407, 100, ...), each fed at
random split points, with and without an ALPN hint, some under small limits so the limit paths
run too. An *escape* is an exception out of ``feed``/``close`` (the contract is: never), an event
that is not an HttpEvent, or an ``HttpProtocolError`` marked "internal error" (an unexpected
exception type: a bug in busted that the safety net contained). Input k is rebuilt from
``random.Random(seed * 2**32 + k)``, so an escape printed can be replayed alone with
``--replay k``. Exit status 1 on any escape. No root, no network.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))

from http_helpers import load_fixtures, mutate  # noqa: E402

from busted.classify.http import HttpConnection  # noqa: E402
from busted.classify.http2 import PREFACE  # noqa: E402
from busted.classify.httpevents import HttpEvent, HttpProtocolError, Side  # noqa: E402

ALL = [fx["chunks"] for fx in load_fixtures().values()]
PREFIXES = [b"", PREFACE, b"GET / HTTP/1.1\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
            b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"\x00\x00\x06\x04\x00\x00\x00\x00\x00", PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
            b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"]
# server answers for the prefixes above, so the switch/refusal paths run too
ANSWERS = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n",
           b"HTTP/1.1 407 No\r\nContent-Length: 2\r\n\r\nno", b"HTTP/1.1 100 Continue\r\n\r\n"]


def make_input(seed: int, k: int):
    rng = random.Random(seed * 2**32 + k)
    if rng.random() < 0.8:
        chunks = mutate(rng, rng.choice(ALL), ALL)
    else:
        chunks = [(Side.CLIENT, rng.choice(PREFIXES))]
        if rng.random() < 0.5:
            chunks.append((Side.SERVER, rng.choice(ANSWERS)))
        chunks += [(Side(rng.randint(0, 1)), rng.randbytes(rng.randint(0, 200))) for _ in range(rng.randint(1, 6))]
    split = []
    for side, data in chunks:  # random split points within each chunk
        edges = sorted({0, len(data), *(rng.randint(0, len(data)) for _ in range(rng.randint(0, 3)))})
        split += [(side, data[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
    alpn = rng.choice([None, None, "h2", "http/1.1"])
    small = rng.random() < 0.3
    kw = {"max_buffer": 2048, "max_decoded": 1024} if small else {}
    return split, alpn, kw


def run_one(seed: int, k: int) -> tuple[str | None, int, int]:
    """(escape description or None, events, protocol errors)"""
    split, alpn, kw = make_input(seed, k)
    try:
        c = HttpConnection(alpn, **kw)
        n = 0
        batches = (c.feed(side, data, i) for i, (side, data) in enumerate(split))
        for batch in [*batches, c.close(len(split))]:
            for ev in batch:
                if not isinstance(ev, HttpEvent):
                    return f"non-event {ev!r}", n, c.errors
                if isinstance(ev, HttpProtocolError) and ev.detail.startswith("internal error"):
                    return f"contained bug: {ev.detail}", n, c.errors
                n += 1
        return None, n, c.errors
    except BaseException:  # noqa: BLE001 - counting is the point
        return traceback.format_exc(limit=6), 0, 0


def worker(args: tuple[int, int, int]) -> tuple[int, int, int, int, list[tuple[int, str]]]:
    seed, lo, hi = args
    escapes: list[tuple[int, str]] = []
    events = errors = 0
    for k in range(lo, hi):
        esc, n, e = run_one(seed, k)
        events += n
        errors += e
        if esc is not None:
            escapes.append((k, esc))
    return hi - lo, events, errors, len(escapes), escapes[:5]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=mp.cpu_count())
    ap.add_argument("--replay", type=int, default=None, help="run input k alone and print it")
    a = ap.parse_args(argv)
    if a.replay is not None:
        split, alpn, kw = make_input(a.seed, a.replay)
        print(f"alpn={alpn} limits={kw}")
        for side, data in split:
            print(side.name, data.hex())
        esc, n, e = run_one(a.seed, a.replay)
        print(esc or f"no escape: {n} events, {e} protocol errors")
        return 1 if esc else 0
    step = 5000
    tasks = [(a.seed, lo, min(lo + step, a.inputs)) for lo in range(0, a.inputs, step)]
    t0 = time.perf_counter()
    done = events = errors = escapes = 0
    shown: list[tuple[int, str]] = []
    with mp.Pool(a.jobs) as pool:
        for n, ev, er, esc, ex in pool.imap_unordered(worker, tasks):
            done += n
            events += ev
            errors += er
            escapes += esc
            shown += ex
    dt = time.perf_counter() - t0
    print(f"inputs {done:,}  escapes {escapes}  events {events:,}  protocol errors {errors:,}  "
          f"fixtures {len(ALL)}  seed {a.seed}  jobs {a.jobs}")
    print(f"time {dt:.1f} s  {done / dt:,.0f} inputs/s ({done / dt / a.jobs:,.0f} per process)")
    for k, tb in shown[:5]:
        print(f"--- escape at input {k} (replay: --seed {a.seed} --replay {k})\n{tb}")
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
