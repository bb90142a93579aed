"""P2: the highest sustained event rate a counting ``Monitor()`` consumer takes with 0 events lost.

    sudo .venv/bin/python bench/sustained.py [--rates 2000,5000,10000,20000,30000] [--step 6] [--procs 4]

One consumer (bench/busted_consumer.py --control) and one workload (bench/churn.py's server and
clients) run throughout; the clients' connection rate (conn/s in all, paced) steps up through
``--rates``. Per step: events/s the consumer received and EventsLost counted (read after a 1 s
low-rate pause, since losses are reported within 0.5 s). The ramp stops at the first step that loses
events the consumer could have kept (``KERNEL_RING``, ``USER_QUEUE``); a kernel recursion miss
(``KERNEL_MISS``: the kernel skipped a program because another BPF program ran on that CPU) is
counted in ``lost`` and reported, but it is not the consumer's rate. Steps the workload cannot
reach (< 80 % of the asked rate: the machine, not busted, is the limit there) are run and named in
the result. Every connection is ~4 events (open + close, both
ends): a step with clearly fewer events per connection means the consumer fell behind (the kernel
ring holds the backlog), which is not a sustained rate even with 0 lost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import CWorkload, Tracer, Workload  # noqa: E402


def run(rates: list[float], step: float = 6.0, procs: int = 4, config: str = "busted",
        c_load: bool = False) -> dict[str, Any]:
    steps = []
    stop_reason = "end of the ramp"
    short: list[str] = []  # steps the workload could not reach
    load = CWorkload if c_load else Workload
    with load(procs=procs, rate=100, max_seconds=len(rates) * (step + 5) + 120) as w:
        w.start_clients()
        t = Tracer(config, extra=["--control"]).start()
        try:
            st0 = t.stats()
            prev_lost, prev_drain = st0["lost"], st0.get("lost_drain", st0["lost"])
            for r in rates:
                w.rate.value = r
                time.sleep(0.5)  # the clients' pacing settles
                s0, c0 = t.stats(), w.count()
                time.sleep(step)
                s1, c1 = t.stats(), w.count()
                w.rate.value = 100
                time.sleep(1.0)
                s2 = t.stats()
                wall = (s1["ns"] - s0["ns"]) / 1e9
                conn, evs = (c1 - c0) / wall, (s1["events"] - s0["events"]) / wall
                # events_per_conn well under ~4 (open + close at both ends): the consumer fell behind
                # and the kernel ring is holding the rest (not lost yet, not sustained either)
                row = {"rate": r, "conn_per_s": conn, "events_per_s": evs, "events_per_conn": evs / conn if conn else 0,
                       "lost": s2["lost"] - prev_lost, "cpu_cores": (s1["cpu_s"] - s0["cpu_s"]) / wall,
                       # losses a faster consumer would have prevented (ring, queue); the rest are
                       # kernel recursion misses (KERNEL_MISS), reported but not the consumer's rate
                       "lost_drain": s2.get("lost_drain", s2["lost"]) - prev_drain}
                prev_lost, prev_drain = s2["lost"], s2.get("lost_drain", s2["lost"])
                steps.append(row)
                print(f"P2 step {r:.0f} conn/s: {row['conn_per_s']:.0f} conn/s, {row['events_per_s']:.0f} events/s "
                      f"({row['events_per_conn']:.2f}/conn), lost {row['lost']} ({row['lost_drain']} ring/queue), "
                      f"consumer {row['cpu_cores']:.2f} cores", file=sys.stderr, flush=True)
                if row["lost_drain"]:
                    stop_reason = f"events lost (ring/queue) at {r:.0f} conn/s"
                    break
                if row["conn_per_s"] < 0.8 * r:  # noted, not a stop: a neighbour's burst can cause it
                    short.append(f"asked {r:.0f}, got {row['conn_per_s']:.0f}")
        finally:
            w.stop()
            res = t.stop()
    ok = [s for s in steps if s["lost_drain"] == 0]
    best = max(ok, key=lambda s: s["events_per_s"]) if ok else None
    if short:
        stop_reason += "; workload short of the asked rate at " + ", ".join(short) + " conn/s"
    return {"config": config, "load": "c" if c_load else "python", "steps": steps, "best": best,
            "stop_reason": stop_reason, "lost_total": res["lost"]}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="2000,5000,10000,20000,30000,40000")
    ap.add_argument("--step", type=float, default=6.0)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--c-load", action="store_true",
                    help="bench/churn.c's C client threads (needs cc) instead of Python client processes")
    a = ap.parse_args()
    print(json.dumps(run([float(x) for x in a.rates.split(",")], a.step, a.procs, c_load=a.c_load), indent=1))


if __name__ == "__main__":
    main()
