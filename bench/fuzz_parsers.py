"""Fuzz the wire parsers: count exceptions that escape (the monitor must never see one).

Parsers: ``parse_dns`` (one UDP DNS message), ``TcpDnsFramer`` (a 2-byte-length stream, each
framed message then parsed) and ``ClientHelloParser`` (fed in random splits). Inputs are a mix of
random bytes and mutated seeds: the real captured hellos in tests/unit/fixtures and DNS messages
built with dnspython (A/AAAA/CNAME chains, NXDOMAIN, a query, a class-ANY answer). Mutations: bit
flips, byte overwrites, truncation, insertion, deletion, duplication, splicing two seeds, and
length-field corruption (DNS section counts and rdlengths, TLS record/handshake/vector lengths).

    .venv/bin/python bench/fuzz_parsers.py --n 1000000 --jobs 2
    .venv/bin/python bench/fuzz_parsers.py --n 2000          # smoke

Exit status 1 if any exception escaped or an invariant broke (result type, buffer bounds).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.rrset

from busted.classify.dns import TcpDnsFramer, parse_dns
from busted.classify.tls import MAX_BUFFER, NEED_MORE, ClientHelloInfo, ClientHelloParser, NotTls

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "unit" / "fixtures"
PARSERS = ("parse_dns", "TcpDnsFramer", "ClientHelloParser")


def tls_seeds() -> list[bytes]:
    return [bytes.fromhex(p.read_text().strip()) for p in sorted(FIXTURES.glob("hello_*.hex"))]


def dns_seeds() -> list[bytes]:
    out = []
    for qname, qtype, chain, addrs, rcode in [
        ("x.openai.azure.com", "A", ("x.privatelink.openai.azure.com", "edge.tm.net"), ("10.1.2.3", "10.1.2.4"), 0),
        ("api.anthropic.com", "AAAA", (), ("fd00::1", "fd00::2"), 0),
        ("api.openai.com", "A", ("api.openai.com.cdn.cloudflare.net",), ("104.18.6.192",), 0),
        ("nope.test", "A", (), (), 3),
    ]:
        r = dns.message.make_response(dns.message.make_query(qname, qtype))
        r.set_rcode(rcode)
        names = [n + "." for n in (qname, *chain)]
        r.answer = [dns.rrset.from_text(a, 300, "IN", "CNAME", b) for a, b in zip(names, names[1:], strict=False)]
        if addrs:
            r.answer.append(dns.rrset.from_text(names[-1], 60, "IN", qtype, *addrs))
        out.append(r.to_wire())
    out.append(dns.message.make_query("generativelanguage.googleapis.com", "A", use_edns=True).to_wire())
    out.append(bytes.fromhex("00018180000100010000000003617069066f70656e616903636f6d0000010001"
                             "c00c000100ff0000003c000401020304"))  # A record of class ANY
    return out


def _corrupt_length(b: bytearray, rng: random.Random, kind: str) -> None:
    """Overwrite a length/count field with a boundary or random value."""
    if kind == "dns":
        offs = [4, 6, 8, 10]  # qdcount, ancount, nscount, arcount
    else:
        offs = [3, 6, 7, 5 + 4 + 34, 5 + 4 + 35]  # record length, handshake length, around session id
    offs += [rng.randrange(len(b)) for _ in range(2)]
    pos = rng.choice(offs)
    if pos + 1 >= len(b):
        return
    v = rng.choice([0, 1, 0xFF, 0x100, 0x7FFF, 0xFFFF, rng.randrange(0x10000)])
    b[pos], b[pos + 1] = v >> 8, v & 0xFF


def mutate(seed: bytes, other: bytes, rng: random.Random, kind: str) -> bytes:
    b = bytearray(seed)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        if not b:
            b += rng.randbytes(rng.randrange(1, 16))
        op = rng.randrange(9)
        i = rng.randrange(len(b))
        if op == 0:  # bit flips
            for _ in range(rng.randrange(1, 9)):
                j = rng.randrange(len(b))
                b[j] ^= 1 << rng.randrange(8)
        elif op == 1:  # byte overwrite
            b[i] = rng.randrange(256)
        elif op == 2:  # truncation
            del b[rng.randrange(len(b) + 1) :]
        elif op == 3:  # insertion
            b[i:i] = rng.randbytes(rng.choice((1, 2, 4, rng.randrange(1, 64))))
        elif op == 4:  # deletion
            del b[i : i + rng.randrange(1, 32)]
        elif op == 5:  # duplicate a chunk
            j = rng.randrange(i, len(b) + 1)
            b[j:j] = b[i : i + rng.randrange(1, 64)]
        elif op == 6:  # splice with another seed
            b = b[:i] + bytearray(other[rng.randrange(len(other) + 1) :])
        else:  # length-field corruption (twice as likely: it is what parsers trust)
            _corrupt_length(b, rng, kind)
    return bytes(b)


def make_input(seeds: list[bytes], rng: random.Random, kind: str) -> bytes:
    r = rng.random()
    if r < 0.1:
        return rng.randbytes(rng.randrange(0, 600))
    seed = rng.choice(seeds)
    if r < 0.15:
        return seed[: rng.randrange(len(seed) + 1)]  # plain truncation of a valid input
    return mutate(seed, rng.choice(seeds), rng, kind)


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    if not data or rng.random() < 0.3:
        return [data]
    cuts = sorted({rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 6))})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def check_dns(data: bytes, rng: random.Random) -> str:
    info = parse_dns(data)
    if info is not None and not isinstance(info.qname, str):
        raise AssertionError(f"bad DnsInfo {info!r}")
    return "none" if info is None else "records" if info.records else "parsed"


def check_framer(data: bytes, rng: random.Random) -> str:
    f = TcpDnsFramer()
    parsed = 0
    for part in splits(data, rng):
        for msg in f.feed(part):
            parsed += parse_dns(msg) is not None
        if f.buffered > TcpDnsFramer.MAX:
            raise AssertionError(f"framer buffered {f.buffered} bytes")
    return f"{min(parsed, 2)} parsed"


def check_tls(data: bytes, rng: random.Random) -> str:
    p = ClientHelloParser()
    res: object = NEED_MORE
    for part in splits(data, rng):
        res = p.feed(part)
        if not (res is NEED_MORE or isinstance(res, ClientHelloInfo | NotTls)):
            raise AssertionError(f"unexpected result {res!r}")
    if len(p._buf) > MAX_BUFFER:
        raise AssertionError(f"parser buffered {len(p._buf)} bytes")
    return "hello" if isinstance(res, ClientHelloInfo) else "NotTls" if isinstance(res, NotTls) else "need more"


def _frame(msgs: list[bytes]) -> bytes:
    return b"".join(len(m).to_bytes(2, "big") + m for m in msgs)


def run(parser: str, n: int, seed: int) -> tuple[str, int, Counter[str], list[str], float, Counter[str]]:
    rng = random.Random(seed)
    check: Callable[[bytes, random.Random], str]
    if parser == "parse_dns":
        seeds, kind, check = dns_seeds(), "dns", check_dns
    elif parser == "TcpDnsFramer":
        d = dns_seeds()
        seeds, kind, check = [_frame(d[i : i + 2]) for i in range(len(d))], "dns", check_framer
    else:
        seeds, kind, check = tls_seeds(), "tls", check_tls
    escaped: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    samples: list[str] = []
    t0 = time.perf_counter()
    for _ in range(n):
        data = make_input(seeds, rng, kind)
        try:
            outcomes[check(data, rng)] += 1
        except Exception as exc:  # noqa: BLE001 - counting what escapes is the point
            escaped[type(exc).__name__] += 1
            if len(samples) < 3:
                samples.append(f"{data.hex()}\n{traceback.format_exc(limit=3)}")
    return parser, n, escaped, samples, time.perf_counter() - t0, outcomes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="inputs per parser (default 1,000,000)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (the inputs are split between them)")
    ap.add_argument("--seed", type=int, default=1, help="base random seed (runs are reproducible)")
    ap.add_argument("--parser", choices=PARSERS, action="append", help="only these parsers (repeatable)")
    args = ap.parse_args(argv)
    parsers = args.parser or list(PARSERS)
    tasks = []
    for k, parser in enumerate(parsers):
        share = [args.n // args.jobs + (1 if j < args.n % args.jobs else 0) for j in range(args.jobs)]
        tasks += [(parser, s, args.seed * 1000 + k * 100 + j) for j, s in enumerate(share) if s]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.Pool(args.jobs) as pool:
            results = pool.starmap(run, tasks)
    else:
        results = [run(*t) for t in tasks]
    wall = time.perf_counter() - t0
    failed = False
    print(f"{'parser':<18} {'inputs':>10} {'escaped':>8} {'cpu s':>8} {'inputs/s/core':>14}  exception types")
    for parser in parsers:
        rs = [r for r in results if r[0] == parser]
        n = sum(r[1] for r in rs)
        esc: Counter[str] = sum((r[2] for r in rs), Counter())
        outc: Counter[str] = sum((r[5] for r in rs), Counter())
        cpu = sum(r[4] for r in rs)
        total = sum(esc.values())
        failed |= total > 0
        print(f"{parser:<18} {n:>10,} {total:>8} {cpu:>8.1f} {n / cpu:>14,.0f}  {dict(esc) or '-'}")
        print(f"{'':<18} outcomes: " + ", ".join(f"{k} {v / n:.1%}" for k, v in sorted(outc.items())))
        for s in [s for r in rs for s in r[3]][:3]:
            print(f"  sample input (hex) and traceback:\n  {s}")
    print(f"wall {wall:.1f} s, jobs {args.jobs}, seed {args.seed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
