"""Churn A/B in alternating slices: the tracer attached and detached in place, the workload never stops.

    sudo .venv/bin/python bench/ab.py [--pairs 12] [--slice 3] [--procs 4]
                                      [--configs busted,busted-noplaintext,busted-busyhost,tcplife]

The workload is bench/churn.py's server and client processes (connect, 8 bytes each way, close, as
fast as the cores allow), started once and kept running. For each pair and configuration, two slices
of ``--slice`` seconds sit next to each other: one with no tracer ("detached") and one with the
configuration's monitor process attached; their order alternates from pair to pair (so a drifting
machine favours neither), and the configurations rotate. A monitor is started before its slice and
the slice begins 1 s after its ready line (start-up, the compile and the pre-existing dump are not
in the slice); it is stopped after the slice and the next slice starts once it has exited (+0.5 s).
EventsLost are counted inside the attached slices ("lost") and over each monitor's whole life
("lost_total": started and stopped under full load).
Ratio = attached conn/s / detached conn/s of the same pair. Reported per configuration: the median
of the paired ratios and their spread (p10-p90), the events/s the monitor delivered in its slices,
EventsLost in all, and the monitor's CPU (cores) during its slices.

Configurations: busted (``Monitor()`` defaults: flows, DNS/TLS capture, LLM plaintext capture),
busted-noplaintext (``llm_calls=False``), busted-busyhost (``busy_host=True``: skipped with a message
if this busted has no such option), busted-syscallcapture (``probes={"capture": "syscall"}``: the
capture tier of syscall tracepoints), tcplife (bcc's tcplife-bpfcc, the outside reference).
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
from benchmath import paired_ratios, summary  # noqa: E402
from harness import Tracer, Unsupported, Workload, cpu_s  # noqa: E402

DEFAULT = "busted,busted-noplaintext,busted-busyhost,tcplife"
SETTLE = 1.0  # after the ready line: the pre-existing dump and the first drain belong to start-up


def _attached(w: Workload, config: str, seconds: float) -> dict[str, Any]:
    busted = config.startswith("busted")
    t = Tracer(config, extra=["--control"] if busted else []).start()
    try:
        time.sleep(SETTLE)
        s0 = t.stats() if busted else {"events": 0, "lost": 0}
        cpu0, n0, t0 = cpu_s(t.pid), w.count(), time.monotonic()
        time.sleep(seconds)
        n1, t1, cpu1 = w.count(), time.monotonic(), cpu_s(t.pid)
        s1 = t.stats() if busted else {"events": 0, "lost": 0}
    finally:
        r = t.stop()
    time.sleep(0.5)  # its shutdown is not the next slice's business
    return {"rate": (n1 - n0) / (t1 - t0), "events_per_s": (s1["events"] - s0["events"]) / (t1 - t0),
            "lost": s1["lost"] - s0["lost"], "lost_total": r.get("lost", 0), "cpu_cores": (cpu1 - cpu0) / (t1 - t0)}


def run(configs: list[str], pairs: int = 12, seconds: float = 3.0, procs: int = 4) -> dict[str, Any]:
    slices: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    skipped: dict[str, str] = {}
    bound = pairs * len(configs) * (2 * seconds + 90) + 60
    with Workload(procs=procs, max_seconds=bound) as w:
        w.start_clients()
        try:
            time.sleep(1.0)  # clients up
            for i in range(pairs):
                live = [c for c in configs if c not in skipped]
                k = i % len(live) if live else 0
                for j, c in enumerate(live[k:] + live[:k]):
                    try:
                        if (i + j) % 2 == 0:
                            base = w.measure(seconds)
                            att = _attached(w, c, seconds)
                        else:
                            att = _attached(w, c, seconds)
                            base = w.measure(seconds)
                    except Unsupported as exc:
                        skipped[c] = str(exc)
                        print(f"ab: {c} skipped: {exc}", file=sys.stderr, flush=True)
                        continue
                    slices[c].append({"pair": i, "detached": base, **att})
                    print(f"ab pair {i} {c}: detached {base:.0f} attached {att['rate']:.0f} conn/s "
                          f"ratio {att['rate'] / base if base else 0:.3f}", file=sys.stderr, flush=True)
        finally:
            w.stop()
    table = []
    for c in configs:
        if c in skipped:
            table.append({"config": c, "skipped": skipped[c]})
            continue
        rows = slices[c]
        ratios = paired_ratios([(s["detached"], s["rate"]) for s in rows])
        if not ratios:
            continue
        s = summary(ratios)
        table.append({"config": c, "pairs": len(ratios), "ratio_median": s["median"], "ratio_p10": s["p10"],
                      "ratio_p90": s["p90"], "ratios": [round(r, 3) for r in ratios],
                      "detached_conn_per_s": summary([x["detached"] for x in rows])["median"],
                      "events_per_s": summary([x["events_per_s"] for x in rows])["median"],
                      "lost": sum(x["lost"] for x in rows), "lost_total": sum(x["lost_total"] for x in rows),
                      "tracer_cpu_cores": summary([x["cpu_cores"] for x in rows])["median"]})
    return {"pairs": pairs, "slice_s": seconds, "procs": procs, "table": table, "slices": slices}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--slice", type=float, default=3.0)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--configs", default=DEFAULT)
    a = ap.parse_args()
    res = run(a.configs.split(","), a.pairs, a.slice, a.procs)
    print(json.dumps(res["table"], indent=1))


if __name__ == "__main__":
    main()
