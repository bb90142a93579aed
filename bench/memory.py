"""Monitor process memory over time and start-up time, cold and warm.

    sudo .venv/bin/python bench/memory.py [--minutes 0.5] [--rate 500]      # --minutes 10 for the issue

Start-up: a counting ``Monitor()`` consumer (bench/busted_consumer.py) is started twice, back to back:
"cold" is the first start of this run (caches of earlier runs, e.g. the page cache or a bytecode
cache, are not cleared: say so when quoting it), "warm" the second. Each reports ``Monitor()`` ->
``start()`` returned, and process spawn -> ready (imports included).
RSS: the warm monitor then runs under ``--rate`` loopback conn/s for ``--minutes``; its VmRSS and
VmHWM are sampled every second. Reported: peak VmHWM, VmRSS at the start, at the end, and its
growth over the second half of the window (flat = no growth with the number of connections).
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
from harness import Tracer, Workload, mem_mb  # noqa: E402


def run(minutes: float = 0.5, rate: float = 500.0, config: str = "busted") -> dict[str, Any]:
    cold = Tracer(config).start()
    cold_res = cold.stop()
    window = minutes * 60
    samples: list[tuple[float, float, float]] = []
    with Workload(procs=2, rate=rate, max_seconds=window + 120) as w:
        warm = Tracer(config).start()
        try:
            w.start_clients()
            t0 = time.monotonic()
            for i in range(int(window) + 1):  # bounded: one sample a second, on the second
                time.sleep(max(0.0, t0 + i - time.monotonic()))
                m = mem_mb(warm.pid)
                samples.append((round(time.monotonic() - t0, 1), round(m["VmRSS"], 1), round(m["VmHWM"], 1)))
        finally:
            w.stop()
            warm_res = warm.stop()
    half = [s for s in samples if s[0] >= window / 2]
    return {
        "config": config, "minutes": minutes, "rate": rate,
        "startup_cold_s": cold_res["startup_monitor_s"], "startup_cold_spawn_s": cold_res["startup_spawn_s"],
        "startup_warm_s": warm_res["startup_monitor_s"], "startup_warm_spawn_s": warm_res["startup_spawn_s"],
        "rss_ready_mb": warm_res["VmRSS_at_ready_mb"], "rss_end_mb": samples[-1][1] if samples else None,
        "hwm_peak_mb": max(warm_res["maxrss_mb"], *(s[2] for s in samples)) if samples else warm_res["maxrss_mb"],
        "rss_growth_second_half_mb": (half[-1][1] - half[0][1]) if len(half) > 1 else None,
        "events": warm_res["events"], "lost": warm_res["lost"], "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=0.5)
    ap.add_argument("--rate", type=float, default=500.0)
    a = ap.parse_args()
    res = run(a.minutes, a.rate)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    print("RSS samples (s, VmRSS MB):", " ".join(f"{t:g}:{r}" for t, r, _h in res["samples"]))


if __name__ == "__main__":
    main()
