"""What the cheap filters ahead of /proc and classification save: Python CPU per filtered flow.

    .venv/bin/python bench/prefilter.py [--rounds 7] [--conns 4000] [--tls]

Loopback churn records (bench/events.py's: client open, server open, [ClientHello], closes) go
through a ``FlowTable`` with classification (``Enricher``) and the Monitor's /proc cache
(``ProcCache``, reading this process's real /proc entry: the client and server records carry our
own pid), then through ``Filters.match`` as the Monitor does, three ways in alternating rounds:
  none       no filter
  after      ``comm`` matching no record, applied to the events only (before issue 20's second item)
  table      the same filter also in the table (``FlowTable.admit = Filters.admits``)
Reported: CPU µs per record (time.process_time), the median of the rounds, and the events kept.
No root, no kernel; every loop is bounded by --rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _records(conns: int, tls: bool) -> list[bytes]:
    from events import records

    from busted.wire.layout import FLOW, REC_CLOSE, REC_HDR, REC_OPEN

    pid = os.getpid().to_bytes(4, "little")  # the records name this process: /proc has a live entry
    at = {REC_HDR.size + FLOW.offsets()[f] for f in ("pid", "tid")}
    out = []
    for raw in records(conns, "tls" if tls else "churn"):
        if int.from_bytes(raw[:4], "little") in (REC_OPEN, REC_CLOSE):
            b = bytearray(raw)
            for o in at:
                b[o:o + 4] = pid
            raw = bytes(b)
        out.append(raw)
    return out


def _one(recs: list[bytes], way: str) -> dict[str, Any]:
    from busted.host.procinfo import ProcCache
    from busted.pipeline.enrich import Enricher
    from busted.pipeline.filters import Filters
    from busted.pipeline.flows import FlowTable

    kw = {"pid": None, "uid": None, "comm": None, "cgroup": None, "port": None, "netns": None, "family": None}
    filters = Filters.build(**{**kw, "comm": None if way == "none" else "no-such-comm"})
    proc = ProcCache()
    table = FlowTable(enricher=Enricher(), proc=proc.get, salt=0x5A17)
    if way == "table":
        table.admit = filters.admits
    match, feed = filters.match, table.feed
    kept = 0
    t0 = time.process_time()
    for r in recs:
        for ev in feed(r):
            kept += match(ev)
    cpu = time.process_time() - t0
    return {"us_per_record": cpu / len(recs) * 1e6, "kept": kept, "proc_reads": proc.reads}


def run(rounds: int = 7, conns: int = 4000, tls: bool = False) -> dict[str, Any]:
    recs = _records(conns, tls)
    ways = ["none", "after", "table"]
    got: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
    for i in range(rounds):
        for w in ways[i % 3:] + ways[:i % 3]:  # rotate the order: a drifting machine favours none
            got[w].append(_one(recs, w))
    return {"records": len(recs), "rounds": rounds, "tls": tls, **{
        w: {"us_per_record_median": round(statistics.median(x["us_per_record"] for x in got[w]), 3),
            "us_per_record": [round(x["us_per_record"], 3) for x in got[w]], "kept": got[w][0]["kept"]}
        for w in ways}}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--conns", type=int, default=4000)
    ap.add_argument("--tls", action="store_true")
    a = ap.parse_args()
    print(json.dumps(run(a.rounds, a.conns, a.tls), indent=1))


if __name__ == "__main__":
    main()
