"""Whole-process CPU per delivered event at a fixed 500 connections/s (~2,000 events/s).

    sudo .venv/bin/python bench/cpu500.py [--seconds 20] [--configs busted,cli-json,cli-jsonl,cli-store]

Configurations (each its own process, started and attached before the window):
  busted        a counting ``Monitor()`` consumer (bench/busted_consumer.py)
  cli-json      ``busted monitor --json``, stdout to /dev/null
  cli-jsonl     the same with ``--jsonl FILE``
  cli-store     the same with ``--store FILE`` (SQLite)
  busted-busyhost / cli-busyhost   the busy-host mode, skipped with a message if this busted has none
CPU per event = the process's CPU (every thread) from its ready line to the stop / events it
delivered in that time. The whole-process figure (os.wait4 rusage, start-up and shutdown included)
is printed beside it. The workload is paced: 2 client processes, 250 conn/s each, loopback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import Tracer, Unsupported, Workload  # noqa: E402

DEFAULT = "busted,cli-json,cli-jsonl,cli-store,busted-busyhost"


def run(configs: list[str], seconds: float = 20.0, rate: float = 500.0) -> list[dict[str, Any]]:
    out = []
    with Workload(procs=2, rate=rate, max_seconds=len(configs) * (seconds + 90) + 60) as w:
        w.start_clients()
        try:
            for c in configs:
                d = tempfile.mkdtemp(prefix="busted-bench-")
                try:
                    t = Tracer(c, workdir=d).start()
                except Unsupported as exc:
                    print(f"cpu500: {c} skipped: {exc}", file=sys.stderr, flush=True)
                    out.append({"config": c, "skipped": str(exc)})
                    shutil.rmtree(d, ignore_errors=True)
                    continue
                try:
                    c0, t0 = w.count(), time.monotonic()
                    time.sleep(seconds)
                    conn = (w.count() - c0) / (time.monotonic() - t0)
                    time.sleep(1.0)  # what the window produced is delivered (sinks flush on their own timers)
                finally:
                    r = t.stop()
                    shutil.rmtree(d, ignore_errors=True)
                ev = r["events"]
                row = {"config": c, "conn_per_s": conn, "events": ev, "lost": r["lost"],
                       "cpu_steady_s": r["cpu_steady_s"], "rusage_cpu_s": r["rusage_cpu_s"],
                       "us_per_event": r["cpu_steady_s"] / ev * 1e6 if ev else None,
                       "us_per_event_whole": r["rusage_cpu_s"] / ev * 1e6 if ev else None,
                       "cpu_cores": r["cpu_steady_s"] / (seconds + 1.0)}
                print(f"cpu500: {c}: {row['us_per_event']:.1f} µs/event ({ev} events, {conn:.0f} conn/s, "
                      f"lost {r['lost']})", file=sys.stderr, flush=True)
                out.append(row)
        finally:
            w.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--configs", default=DEFAULT)
    a = ap.parse_args()
    print(json.dumps(run(a.configs.split(","), a.seconds, a.rate), indent=1))


if __name__ == "__main__":
    main()
