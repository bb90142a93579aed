"""Python CPU per event at each stage of the pipeline, offline (no kernel, no threads): issue 21's
"state the cost per event at each stage".

    .venv/bin/python bench/stages.py [--rounds 5] [--conns 3000] [--mix churn|tls]

Stages, each run over the same kernel records (bench/events.py's: loopback connections as the
kernel emits them), each including the one it builds on, so the difference is that stage's cost:
  decode     the ring record -> ``FlowRecord`` (struct unpack, addresses as text)
  table      + ``FlowTable.feed``: the typed events (classification, /proc answered from a cache)
  encode     + ``busted.sinks.encode``: the redacted dict and its compact JSON line, once per event
             (what ``--json``, ``--jsonl`` and ``--store`` share)
  jsonl      encode + a ``JsonlSink`` writing those lines, 40 events per batch (a drain's worth)
  store      encode + a ``Store`` (SQLite) writing them, 40 per batch
Each round runs every stage once (order rotating by round) for at least ``--seconds`` of process
CPU (``time.process_time``); the figure is the median over rounds of CPU per event. Caches are hot
(a tight loop): a live monitor at low rates pays more per event (docs/benchmarks.md, "Why 500 conn/s
costs more per event than 10 k conn/s").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

STAGES = ("decode", "table", "encode", "jsonl", "store")
BUILDS_ON = {"decode": None, "table": "decode", "encode": "table", "jsonl": "encode", "store": "encode"}
BATCH = 40


def _table() -> Any:
    from busted.host.procinfo import ProcInfo
    from busted.pipeline.enrich import Enricher
    from busted.pipeline.flows import FlowTable

    info = ProcInfo(1, "/usr/bin/python3", ("python3", "client.py"), 4026531840, 12345, "python3")
    return FlowTable(enricher=Enricher(), proc=lambda _pid: info, salt=0x5A17)


def _one(stage: str, recs: list[bytes], seconds: float, workdir: str) -> tuple[float, int]:
    """CPU seconds and events of ``stage`` over passes of ``recs`` for at least ``seconds``."""
    from busted.sinks import JsonlSink, Store, encode
    from busted.wire.layout import REC_CLOSE, REC_OPEN
    from busted.wire.records import decode

    level = STAGES.index(stage)
    sink: Any = None
    if stage == "jsonl":
        sink = JsonlSink(f"{workdir}/events-{time.monotonic_ns()}.jsonl")
    elif stage == "store":
        sink = Store(f"{workdir}/busted-{time.monotonic_ns()}.db")
    events = 0
    try:
        if level == 0:
            flow_types = (REC_OPEN, REC_CLOSE)
            mine = [r for r in recs if r[0] in flow_types]
            t0 = time.process_time()
            while time.process_time() - t0 < seconds:
                for r in mine:
                    decode(r)
                events += len(mine)
            return time.process_time() - t0, events
        table = _table()
        feed = table.feed
        pending: list[Any] = []
        t0 = time.process_time()
        while time.process_time() - t0 < seconds:
            for r in recs:
                for ev in feed(r):
                    events += 1
                    if level >= 2:
                        pending.append(encode(ev))
                        if len(pending) >= BATCH:
                            if sink is not None:
                                sink.write_encoded(pending)
                            pending = []
        return time.process_time() - t0, events
    finally:
        if sink is not None:
            sink.close()


def run(rounds: int, conns: int, mix: str, seconds: float) -> dict[str, Any]:
    from events import records

    recs = records(conns, mix)
    per: dict[str, list[float]] = {s: [] for s in STAGES}
    with tempfile.TemporaryDirectory(prefix="busted-stages-") as d:
        for i in range(rounds):
            order = STAGES[i % len(STAGES):] + STAGES[:i % len(STAGES)]  # rotate: drift spreads out
            for stage in order:
                cpu, n = _one(stage, recs, seconds, d)
                per[stage].append(cpu / n * 1e6)
    med = {s: statistics.median(v) for s, v in per.items()}
    rows = []
    for s in STAGES:
        base = med[BUILDS_ON[s]] if BUILDS_ON[s] else 0.0
        rows.append({"stage": s, "builds_on": BUILDS_ON[s], "us_per_event_cumulative": med[s],
                     "us_per_event_this_stage": med[s] - base, "rounds": per[s]})
    return {"mix": mix, "conns": conns, "rounds": rounds, "seconds_per_stage": seconds, "stages": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--mix", choices=("churn", "tls"), default="churn")
    ap.add_argument("--seconds", type=float, default=1.0, help="process CPU per stage per round")
    a = ap.parse_args()
    out = run(a.rounds, a.conns, a.mix, a.seconds)
    for r in out["stages"]:
        print(f"{r['stage']:8s} {r['us_per_event_this_stage']:6.2f} us/event  (cumulative "
              f"{r['us_per_event_cumulative']:6.2f})", file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
