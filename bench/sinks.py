"""CPU per event of `busted monitor`'s output paths, offline (no kernel, no root).

    .venv/bin/python bench/sinks.py [--connections 20000] [--rounds 5] [--batch 40] [--rate 0] [--no-orjson]
    .venv/bin/python bench/sinks.py --calls --paths json,json+otlp   # CPU per call exported over OTLP

Feeds synthetic connections (FlowOpened, TlsClientHello, FlowClassified, FlowClosed; a DnsAnswer
every 5th connection, as a resolver cache would), stamped from the time the run starts (the
store's 7-day retention keeps them, as it keeps live events), through the very loop `busted
monitor` runs (busted.cli._run_monitor with the CLI's own _Sinks, built from the same argv) with
stdout going to /dev/null, and reports process CPU (time.process_time: every thread, so the
store's writer and the JSONL timer count) per event, closing the outputs included. --batch is how many events the loop
takes from the Monitor at once: the Monitor's reader queues a drain's worth (every 20 ms; 40
events at 500 connections/s); --batch 1 is one event at a time. --rate N paces the feed at N
events/s (batches spaced in time, as the Monitor hands them out; 0: as fast as the loop takes
them). --no-orjson measures the standard library's encoder. Median and spread over --rounds.
What the Monitor itself costs (decoding, classification) is not in these figures: add the counting
consumer's figure (docs/benchmarks.md) for the whole process. The "feed" line is the harness alone
(building nothing, sleeping between batches when paced): subtract it from the others.
--calls adds an LlmCall (every field an OpenAI chat call has) to each connection; json+otlp exports
them (--otlp, http/protobuf, busted[otlp]) to an OTLP receiver in a child process that reads and
discards each request, so its CPU is not ours; (json+otlp - json) x events / calls is the CPU per
exported call, the SDK's batch threads (joining, sending) included. --interleave runs the paths
in turn within each round (order reversed every other round) and gives the CPU per exported call
as the median of the rounds' own differences: on a shared, noisy VM a difference of two medians
taken minutes apart can swing by more than the figure itself.
--old CHECKOUT compares two versions of busted in one run: each round runs every path once with
this checkout's busted and once with CHECKOUT's (a child process each, importing busted from its
tree; the order alternates by round), and prints both medians and the median of the rounds'
new/old ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# --tree DIR (set by --old for its children): import busted from that checkout, not this one's
_HERE = str(Path(__file__).resolve().parent.parent)
_TREE = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv[:-1] else _HERE
sys.path.insert(0, _TREE)

from busted.events import (  # noqa: E402
    Ancestor,
    Direction,
    DnsAnswer,
    DnsRecord,
    Event,
    Evidence,
    FlowClassified,
    FlowClosed,
    FlowOpened,
    LlmCall,
    TlsClientHello,
)

PATHS: dict[str, list[str] | None] = {
    "feed": None,  # the harness alone: the same batches, paced the same, into a loop doing nothing
    "json": ["--json"],
    "json+jsonl": ["--json", "--jsonl", "{d}/events.jsonl"],
    "json+store": ["--json", "--store", "{d}/busted.db"],
    "json+jsonl+store": ["--json", "--jsonl", "{d}/events.jsonl", "--store", "{d}/busted.db"],
    "json+otlp": ["--json", "--otlp", "{otlp}"],
}
# An OTLP/HTTP endpoint that answers 200 to every POST and keeps nothing (child process: its CPU
# is not the exporter's). Prints its port.
_RECEIVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""

def connections(n: int, t0: float = 1_700_000_000.0, calls: bool = False) -> list[Event]:
    """``n`` connections' events, in the order a Monitor yields them (``calls``: one LlmCall each)."""
    evs: list[Event] = []
    anc = (Ancestor(pid=0, comm="python3", exe="/usr/bin/python3.11"), Ancestor(pid=900, comm="bash", exe="/bin/bash"),
           Ancestor(pid=1, comm="systemd", exe="/usr/lib/systemd/systemd"))
    for i in range(n):
        pid = 20000 + i % 64
        t = t0 + i * 0.002
        ident = dict(flow_id=(i * 2654435761) & 0xFFFFFFFFFFFF, direction=Direction.CONNECT, pid=pid, tid=pid,
                     uid=1000, comm="python3", ppid=900, exe="/usr/bin/python3.11",
                     cmdline=("python3", "client.py", "--rounds", "100"), cgroup_id=4242, netns=4026531840,
                     family=4, saddr="127.0.0.1", sport=30000 + i % 30000, daddr="127.0.0.1", dport=8443,
                     ancestry=(Ancestor(pid=pid, comm="python3", exe="/usr/bin/python3.11"), *anc[1:]))
        if i % 5 == 0:
            evs.append(DnsAnswer(ts_ns=i * 4, wall_time=t, pid=pid, tid=pid, comm="python3", netns=4026531840,
                                 server="127.0.0.53", qname="api.openai.com", qtype="A", rcode="NOERROR",
                                 answers=(DnsRecord("api.openai.com", "A", "127.0.0.1", 60),),
                                 cname_chain=("api.openai.com",), provider="openai"))
        evs.append(FlowOpened(ts_ns=i * 4 + 1, wall_time=t, **ident, hostname="api.openai.com",
                              provider="openai", evidence=Evidence.DNS, confidence=0.8))
        evs.append(TlsClientHello(ts_ns=i * 4 + 2, wall_time=t + 0.0001, flow_id=ident["flow_id"], pid=pid,
                                  comm="python3", saddr="127.0.0.1", sport=ident["sport"], daddr="127.0.0.1",
                                  dport=8443, sni="api.openai.com", alpn=("h2", "http/1.1"),
                                  versions=("TLS1.3", "TLS1.2"), ja4="t13d1516h2_8daaf6152771_e5627efa2ab1",
                                  hostname="api.openai.com", provider="openai"))
        evs.append(FlowClassified(ts_ns=i * 4 + 3, wall_time=t + 0.0001, **ident, hostname="api.openai.com",
                                  provider="openai", evidence=Evidence.SNI, confidence=0.95))
        if calls:
            evs.append(LlmCall(ts_ns=i * 4 + 3, wall_time=t + 0.0009, **ident, hostname="api.openai.com",
                               provider="openai", evidence=Evidence.SNI, confidence=0.95, api="openai.chat",
                               operation="chat", method="POST", path="/v1/chat/completions", http_version="1.1",
                               request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18",
                               stream=i % 2 == 0, status=200, input_tokens=120 + i % 50, output_tokens=40 + i % 30,
                               cache_read_tokens=0, total_tokens=160 + i % 80, finish_reason="stop",
                               request_bytes=300, response_bytes=900, time_to_first_token_ns=150_000_000,
                               duration_ns=800_000, user_agent="OpenAI/Python 1.54.0", cost_usd=0.00004,
                               price_source="genai-prices", response_id=f"chatcmpl-B9MH{i:08d}slfkBeAs8l4beb"))
        evs.append(FlowClosed(ts_ns=i * 4 + 4, wall_time=t + 0.001, **ident, hostname="api.openai.com",
                              provider="openai", evidence=Evidence.SNI, confidence=0.95, bytes_sent=517,
                              bytes_received=4096, duration_ns=1_000_000))
    return evs

def _batches(evs: list[Event], size: int, rate: float) -> Iterator[object]:
    start = time.monotonic()
    for i in range(0, len(evs), max(1, size)):
        if rate:  # the arrival time of this batch's first event
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        yield evs[i] if size <= 1 else evs[i:i + size]  # size 1: one event at a time, as events() gives

def run_once(flags: list[str] | None, evs: list[Event], batch: int, rate: float = 0.0, otlp: str = "") -> float:
    """Process CPU seconds for the CLI's output loop over ``evs``, outputs opened and closed
    (``flags`` None: only the feed)."""
    import busted

    if flags is None:
        c0 = time.process_time()
        for _ in _batches(evs, batch, rate):
            pass
        return time.process_time() - c0
    from busted.cli import _parser, _run_monitor, _Sinks

    with tempfile.TemporaryDirectory() as d, open(os.devnull, "w") as out:
        args = _parser().parse_args(["monitor", *(f.format(d=d, otlp=otlp) for f in flags)])
        mon = busted.Monitor()  # not started: only its stats() is read by the loop, as in the CLI
        c0 = time.process_time()
        with contextlib.redirect_stderr(io.StringIO()) as err:  # the outputs' closing report lines
            sinks = _Sinks(args)
            _run_monitor(args, out, _batches(evs, batch, rate), mon, sinks)
        cpu = time.process_time() - c0
        for line in err.getvalue().splitlines():  # what the exporter says it sent and lost
            if line.startswith("busted: otlp "):
                print("  " + line)
        return cpu

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=40, help="events taken from the Monitor at once (1: one by one)")
    ap.add_argument("--rate", type=float, default=0.0, help="events/s to feed (0: unpaced)")
    ap.add_argument("--no-orjson", action="store_true", help="encode with the standard library")
    ap.add_argument("--calls", action="store_true", help="one LlmCall per connection (for json+otlp)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS))
    ap.add_argument("--interleave", action="store_true",
                    help="every path in each round (alternating order); per call: median of round differences")
    ap.add_argument("--old", help="another checkout of busted: A/B against it, round by round")
    ap.add_argument("--tree", help=argparse.SUPPRESS)  # read before the imports (see _TREE)
    ap.add_argument("--machine", action="store_true", help=argparse.SUPPRESS)  # one JSON line: path -> µs/event
    a = ap.parse_args(argv)
    if a.old:
        return _ab(a, argv if argv is not None else sys.argv[1:])
    from busted.sinks import _codec

    if a.no_orjson and hasattr(_codec, "_orjson"):
        _codec._orjson = None
    enc = "orjson" if getattr(_codec, "_orjson", None) is not None else "json"
    evs = connections(a.connections, t0=time.time(), calls=a.calls)  # current: retention keeps them
    ncalls = sum(1 for e in evs if isinstance(e, LlmCall))
    otlp = ""
    recv = None
    if "json+otlp" in a.paths.split(","):
        import subprocess

        recv = subprocess.Popen([sys.executable, "-I", "-c", _RECEIVER], stdout=subprocess.PIPE, text=True)
        otlp = f"http://127.0.0.1:{int(recv.stdout.readline())}"  # type: ignore[union-attr]
    print(f"{len(evs)} events ({a.connections} connections, {ncalls} calls), batch {a.batch}, "
          f"rate {a.rate or 'unpaced'}, {a.rounds} rounds, encoder {enc}, python {sys.version.split()[0]}")

    med = {}
    names = a.paths.split(",")
    per_round: list[dict[str, float]] = []
    try:
        if a.interleave:
            for r in range(a.rounds):
                got = {}
                for name in (names if r % 2 == 0 else names[::-1]):
                    got[name] = run_once(PATHS[name], evs, a.batch, a.rate, otlp) / len(evs) * 1e6
                per_round.append(got)
        for name in names:
            per = sorted(g[name] for g in per_round) if a.interleave else sorted(
                run_once(PATHS[name], evs, a.batch, a.rate, otlp) / len(evs) * 1e6 for _ in range(a.rounds))
            med[name] = statistics.median(per)
            if not a.machine:
                print(f"{name:<18} {med[name]:6.1f} µs/event  (min {per[0]:.1f}, max {per[-1]:.1f})")
        if a.machine:
            print("RESULT " + json.dumps(med), flush=True)
    finally:
        if recv is not None:
            recv.kill()
            recv.wait()
    if ncalls and "json+otlp" in med and "json" in med:
        print(f"otlp per exported call: {(med['json+otlp'] - med['json']) * len(evs) / ncalls:.1f} µs "
              "((json+otlp - json) x events / calls)")
        if a.interleave:
            diffs = sorted((g["json+otlp"] - g["json"]) * len(evs) / ncalls for g in per_round)
            print(f"otlp per exported call, median of the {len(diffs)} rounds' differences: "
                  f"{statistics.median(diffs):.1f} µs (min {diffs[0]:.1f}, max {diffs[-1]:.1f})")
    return 0

def _ab(a: argparse.Namespace, argv: list[str]) -> int:
    """--old: both checkouts, one child process per checkout per round, order alternating."""
    import subprocess

    rest: list[str] = []
    skip = False
    for x in argv:  # this run's options but --old and --rounds, for the children
        if skip:
            skip = False
        elif x in ("--old", "--rounds"):
            skip = True
        elif not x.startswith(("--old=", "--rounds=")):
            rest.append(x)
    trees = {"new": _TREE, "old": str(Path(a.old).resolve())}
    got: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
    for r in range(a.rounds):
        for which in (("new", "old") if r % 2 == 0 else ("old", "new")):
            out = subprocess.run([sys.executable, __file__, *rest, "--rounds", "1", "--tree", trees[which],
                                  "--machine"], check=True, capture_output=True, text=True, timeout=3600).stdout
            line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
            got[which].append(json.loads(line[len("RESULT "):]))
        print(f"round {r + 1}: " + "; ".join(f"{w} " + ", ".join(f"{k} {v:.1f}" for k, v in got[w][-1].items())
                                              for w in ("new", "old")), flush=True)
    print(f"new: {trees['new']}\nold: {trees['old']}\nmedians of {a.rounds} rounds (µs/event; ratio: median of "
          "the rounds' new/old):")
    for name in got["new"][0]:
        new = sorted(g[name] for g in got["new"])
        old = sorted(g[name] for g in got["old"])
        ratios = sorted(n[name] / o[name] for n, o in zip(got["new"], got["old"], strict=True) if o[name])
        print(f"{name:<18} new {statistics.median(new):6.1f} ({new[0]:.1f}-{new[-1]:.1f})  old "
              f"{statistics.median(old):6.1f} ({old[0]:.1f}-{old[-1]:.1f})  new/old "
              f"{statistics.median(ratios) if ratios else float('nan'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
