"""What the web page costs the monitor: CPU per event and RSS at 500 connections/s, same run, A/B.

    sudo flock /tmp/busted-kernel.lock .venv/bin/python bench/ui.py [--seconds 60] [--rounds 3]

Configurations, in turn within each round (each its own ``busted monitor --json`` process):
  cli-json      no page
  cli-ui        ``--ui 127.0.0.1:0``, no tab open
  cli-import    no page, but Starlette, uvicorn and busted.web.app imported (modules loaded, no server)
  cli-ui-tab    ``--ui``, one headless Chromium tab (Debian's, driven by Playwright) open on the flows
                view, which reloads its table every 3 s, plus the live event stream
CPU per event = the monitor's CPU (every thread) from its ready line to the stop / events it
delivered; ``--ui`` serves the page from a child process, whose CPU in the same window is reported
beside it (``page_us_per_event``, and the ratio of both together to no page). RSS is sampled every
5 s in the tab's window: flat means the last sample is within a few MB of the first. The workload
is bench/harness.py's paced loopback churn (2 clients, 250 conn/s each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import Tracer, Workload, machine, mem_mb  # noqa: E402

CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


def _one(config: str, w: Workload, seconds: float) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="busted-bench-")
    pw = browser = None
    rss: list[float] = []
    try:
        t = Tracer("cli-ui" if config.startswith("cli-ui") else config, workdir=d).start()
        try:
            if config == "cli-ui-tab":
                from playwright.sync_api import sync_playwright

                pw = sync_playwright().start()
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROME_ARGS)
                page = browser.new_page()
                page.goto(t.res["ui_url"])
                page.click("#tabs button[data-view=flows]")
            c0, t0 = w.count(), time.monotonic()
            end = t0 + seconds
            while time.monotonic() < end:  # bounded by the window
                rss.append(mem_mb(t.pid)["VmRSS"])
                time.sleep(min(5.0, max(0.0, end - time.monotonic())))
            rss.append(mem_mb(t.pid)["VmRSS"])
            conn = (w.count() - c0) / (time.monotonic() - t0)
            time.sleep(1.0)
        finally:
            if browser is not None:
                browser.close()
            if pw is not None:
                pw.stop()
            r = t.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    ev = r["events"]
    return {"config": config, "conn_per_s": conn, "events": ev, "lost": r["lost"],
            "us_per_event": r["cpu_steady_s"] / ev * 1e6 if ev else None,
            # --ui: the page's own process (a child of the monitor), per monitor event
            "page_us_per_event": r.get("cpu_children_steady_s", 0.0) / ev * 1e6 if ev else None,
            "rss_first_mb": rss[0], "rss_last_mb": rss[-1], "rss_max_mb": max(rss)}


CONFIGS = ("cli-json", "cli-ui", "cli-ui-tab", "cli-import")
DEFAULT = ("cli-json", "cli-ui", "cli-ui-tab")  # cli-import only when asked (--configs)


def run(seconds: float, rounds: int, rate: float = 500.0, configs: list[str] | None = None) -> dict[str, Any]:
    configs = list(configs or DEFAULT)
    if "cli-json" not in configs:
        configs.insert(0, "cli-json")  # the baseline every ratio is taken against
    rows: list[dict[str, Any]] = []
    with Workload(procs=2, rate=rate, max_seconds=rounds * len(configs) * (seconds + 60) + 60) as w:
        w.start_clients()
        try:
            for i in range(rounds):
                for c in (configs if i % 2 == 0 else configs[::-1]):  # alternate the order: drift cancels
                    row = _one(c, w, seconds)
                    row["round"] = i
                    print(f"ui: round {i} {c}: {row['us_per_event']:.1f} µs/event, RSS {row['rss_first_mb']:.0f}"
                          f" -> {row['rss_last_mb']:.0f} MB, lost {row['lost']}", file=sys.stderr, flush=True)
                    rows.append(row)
        finally:
            w.stop()
    out: dict[str, Any] = {"machine": machine(), "seconds": seconds, "rounds": rounds, "rows": rows}
    for c in configs:
        us = [r["us_per_event"] for r in rows if r["config"] == c and r["us_per_event"]]
        page = [r["page_us_per_event"] or 0.0 for r in rows if r["config"] == c and r["us_per_event"]]
        out[c] = {"us_per_event_median": statistics.median(us), "min": min(us), "max": max(us),
                  "page_us_per_event_median": statistics.median(page)}
    for c in [c for c in configs if c != "cli-json"]:  # ratio to no page, round by round
        ratios = [a["us_per_event"] / b["us_per_event"] for a in rows for b in rows
                  if a["config"] == c and b["config"] == "cli-json" and a["round"] == b["round"]]
        out[c]["ratio_to_cli_json_median"] = statistics.median(ratios)
        out[c]["ratios"] = ratios
        # the monitor and its page's process together, against no page
        both = [(a["us_per_event"] + (a["page_us_per_event"] or 0.0)) / b["us_per_event"] for a in rows for b in rows
                if a["config"] == c and b["config"] == "cli-json" and a["round"] == b["round"]]
        out[c]["ratio_with_page_process_median"] = statistics.median(both)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--configs", default=",".join(DEFAULT), help="a subset of " + ",".join(CONFIGS))
    a = ap.parse_args()
    configs = [c for c in a.configs.split(",") if c]
    if unknown := set(configs) - set(CONFIGS):
        ap.error(f"unknown configurations {sorted(unknown)}")
    print(json.dumps(run(a.seconds, a.rounds, a.rate, configs), indent=1))


if __name__ == "__main__":
    main()
