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
--old CHECKOUT: every configuration twice in the one workload, with this checkout's busted and with
CHECKOUT's (PYTHONPATH set to it for that process), the order alternating by configuration; rows
say which ("tree": new/old). --repeat N runs the list N times (for medians).
"""

from __future__ import annotations

import argparse
import json
import os
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


def run(configs: list[str], seconds: float = 20.0, rate: float = 500.0, old: str | None = None,
        repeat: int = 1) -> list[dict[str, Any]]:
    out = []
    runs = [(c, "new") for c in configs] * repeat
    if old:
        runs = [x for i, (c, _) in enumerate(runs) for x in ([(c, "new"), (c, "old")] if i % 2 == 0
                                                             else [(c, "old"), (c, "new")])]
    with Workload(procs=2, rate=rate, max_seconds=len(runs) * (seconds + 90) + 60) as w:
        w.start_clients()
        try:
            for c, tree in runs:
                d = tempfile.mkdtemp(prefix="busted-bench-")
                before = os.environ.get("PYTHONPATH")
                if tree == "old":
                    os.environ["PYTHONPATH"] = str(Path(old).resolve())  # type: ignore[arg-type]
                try:
                    t = Tracer(c, workdir=d).start()
                except Unsupported as exc:
                    print(f"cpu500: {c} skipped: {exc}", file=sys.stderr, flush=True)
                    out.append({"config": c, "tree": tree, "skipped": str(exc)})
                    shutil.rmtree(d, ignore_errors=True)
                    continue
                finally:
                    if before is None:
                        os.environ.pop("PYTHONPATH", None)
                    else:
                        os.environ["PYTHONPATH"] = before
                try:
                    c0, t0 = w.count(), time.monotonic()
                    time.sleep(seconds)
                    conn = (w.count() - c0) / (time.monotonic() - t0)
                    time.sleep(1.0)  # what the window produced is delivered (sinks flush on their own timers)
                finally:
                    r = t.stop()
                    shutil.rmtree(d, ignore_errors=True)
                ev = r["events"]
                row = {"config": c, "tree": tree, "conn_per_s": conn, "events": ev, "lost": r["lost"],
                       "cpu_steady_s": r["cpu_steady_s"], "rusage_cpu_s": r["rusage_cpu_s"],
                       "us_per_event": r["cpu_steady_s"] / ev * 1e6 if ev else None,
                       "us_per_event_whole": r["rusage_cpu_s"] / ev * 1e6 if ev else None,
                       "cpu_cores": r["cpu_steady_s"] / (seconds + 1.0)}
                print(f"cpu500: {c} ({tree}): {row['us_per_event']:.1f} µs/event ({ev} events, {conn:.0f} conn/s, "
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
    ap.add_argument("--old", help="another checkout of busted: each configuration with it too, in the same workload")
    ap.add_argument("--repeat", type=int, default=1, help="run the list this many times")
    a = ap.parse_args()
    rows = run(a.configs.split(","), a.seconds, a.rate, a.old, a.repeat)
    print(json.dumps(rows, indent=1))
    if a.old or a.repeat > 1:
        import statistics

        for c in a.configs.split(","):
            for tree in ("new", "old") if a.old else ("new",):
                v = sorted(r["us_per_event"] for r in rows if r["config"] == c and r.get("tree") == tree
                           and r.get("us_per_event"))
                if v:
                    print(f"cpu500: {c} {tree}: median {statistics.median(v):.1f} µs/event over {len(v)} "
                          f"(min {v[0]:.1f}, max {v[-1]:.1f})", file=sys.stderr)


if __name__ == "__main__":
    main()
