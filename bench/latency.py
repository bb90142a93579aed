"""P5: connect() -> its FlowClassified seen by the consumer, as a latency histogram.

    sudo .venv/bin/python bench/latency.py [--seconds 20] [--rate 200]

Client processes (paced, ``--rate`` conn/s in all) record time.monotonic_ns() just before
connect() and the local port, then send a real TLS ClientHello (SNI api.openai.com, from
tests/unit/fixtures) to a loopback server. A counting ``Monitor()`` consumer in its own process
(bench/busted_consumer.py --arrivals-port) records time.monotonic_ns() when it receives the
FlowOpened and the FlowClassified (the SNI classification) of each such flow. CLOCK_MONOTONIC is
one clock for every process, so latency = arrival - connect, per port. Connections with no
FlowClassified seen are counted, and the FlowOpened latency is reported too.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmath import histogram, percentile  # noqa: E402
from harness import Tracer, Workload  # noqa: E402

EDGES_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200]


def match(clients: list[tuple[int, int]], arrivals: list[tuple[int, int, str]], kind: str) -> list[float]:
    """Latency in ms for each client (port, connect ns) that has an arrival of ``kind`` on its port at
    or after its connect (the first such: a port reused later cannot match an earlier connect)."""
    by_port: dict[int, list[int]] = {}
    for port, ns, k in arrivals:
        if k == kind:
            by_port.setdefault(port, []).append(ns)
    for v in by_port.values():
        v.sort()
    out = []
    for port, t0 in clients:
        v = by_port.get(port)
        if not v:
            continue
        i = bisect.bisect_left(v, t0)
        if i < len(v):
            out.append((v[i] - t0) / 1e6)
    return out


def stats(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "max": max(ms), "histogram_ms": histogram(ms, EDGES_MS)}


def run(seconds: float = 20.0, rate: float = 200.0, config: str = "busted") -> dict[str, Any]:
    fd, path = tempfile.mkstemp(prefix="busted-arrivals-", suffix=".json")
    os.close(fd)
    try:
        with Workload(procs=2, rate=rate, hello=True, max_seconds=seconds + 120) as w:
            t = Tracer(config, extra=["--arrivals-port", str(w.port), "--arrivals", path]).start()
            try:
                w.start_clients()
                time.sleep(seconds)
            finally:
                clients = w.stop()
                time.sleep(1.0)  # the last flows reach the consumer
                res = t.stop()
        arrivals = json.loads(Path(path).read_text())
    finally:
        os.unlink(path)
    classified = match(clients, arrivals, "FlowClassified")
    opened = match(clients, arrivals, "FlowOpened")
    return {"config": config, "connections": len(clients), "rate": rate, "seconds": seconds, "lost": res["lost"],
            "classified": stats(classified), "opened": stats(opened),
            "unclassified": len(clients) - len(classified)}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=200.0)
    a = ap.parse_args()
    print(json.dumps(run(a.seconds, a.rate), indent=1))


if __name__ == "__main__":
    main()
