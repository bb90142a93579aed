"""Every figure of issue 11's table in one command, printed as markdown for docs/benchmarks.md.

    sudo flock /tmp/busted-kernel.lock .venv/bin/python bench/all.py --quick     # ~3-4 min
    sudo flock /tmp/busted-kernel.lock .venv/bin/python bench/all.py             # ~25 min (10-min RSS soak)

Runs, one after the other: bench/events.py (offline FlowTable microbench and the live per-event CPU),
bench/sustained.py (P2 ramp), bench/cpu500.py (whole-process CPU per event at 500 conn/s for the
consumer and the CLI with each sink), bench/latency.py (P5 histogram), bench/memory.py (RSS over time,
start-up cold and warm) and bench/ab.py (churn A/B in alternating slices, tcplife beside busted).
A part that fails is reported in the table as failed, the others still run. Raw results go to
bench/results/all.json. Other people load BPF on shared machines: hold /tmp/busted-kernel.lock.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ab  # noqa: E402
import cpu500  # noqa: E402
import events  # noqa: E402
import latency  # noqa: E402
import memory  # noqa: E402
import sustained  # noqa: E402
from harness import machine  # noqa: E402

QUICK = {"offline_s": 1.5, "live_s": 8, "p2_rates": [2000, 5000, 10000, 20000], "p2_step": 3, "cpu_s": 6,
         "lat_s": 8, "mem_min": 0.25, "ab_pairs": 3, "ab_slice": 2.5}
FULL = {"offline_s": 3, "live_s": 20, "p2_rates": [2000, 5000, 10000, 15000, 20000, 30000, 40000], "p2_step": 6,
        "cpu_s": 20, "lat_s": 20, "mem_min": 10, "ab_pairs": 12, "ab_slice": 3}


def _try(name: str, fn: Any, *a: Any, **kw: Any) -> Any:
    t = time.monotonic()
    print(f"== {name} ...", file=sys.stderr, flush=True)
    try:
        res = fn(*a, **kw)
    except Exception as exc:
        traceback.print_exc()
        res = {"failed": f"{type(exc).__name__}: {exc}"}
    print(f"== {name} done in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    return res


def collect(p: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    r: dict[str, Any] = {"machine": machine(), "params": p}
    r["offline"] = [_try(f"offline {m}", events.offline, p["offline_s"], m) for m in ("churn", "tls")]
    r["live"] = _try("live per-event CPU", events.live, p["live_s"])
    r["p2"] = _try("P2 ramp", sustained.run, p["p2_rates"], p["p2_step"], c_load=p.get("c_load", False))
    r["cpu500"] = _try("CPU at 500 conn/s", cpu500.run, cpu500.DEFAULT.split(","), p["cpu_s"])
    r["p5"] = _try("P5 latency", latency.run, p["lat_s"])
    r["memory"] = _try("memory and start-up", memory.run, p["mem_min"])
    r["ab"] = _try("churn A/B slices", ab.run, configs, p["ab_pairs"], p["ab_slice"])
    return r


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(r: dict[str, Any], command: str) -> str:
    m = r["machine"]
    p = r["params"]
    out = [f"Command: `{command}`  ",
           f"Machine: {m['nproc']} CPUs, Linux `{m['kernel']}`, Python {m['python']}; busted at {m['commit']}, "
           f"{m['date']}.", ""]
    ab_rows = {x["config"]: x for x in r["ab"].get("table", [])} if "failed" not in r["ab"] else {}

    def ratio(c: str) -> tuple[str, str]:
        x = ab_rows.get(c)
        if x is None:
            return "failed" if "failed" in r["ab"] else "not run", r["ab"].get("failed", "")
        if "skipped" in x:
            return "skipped", x["skipped"]
        return (f"{x['ratio_median']:.3f}",
                f"p10–p90 {x['ratio_p10']:.3f}–{x['ratio_p90']:.3f} over {x['pairs']} pairs of {p['ab_slice']:g} s; "
                f"{x['events_per_s']:.0f} events/s, lost {x['lost']} in slices ({x['lost_total']} incl. start/stop), "
                f"tracer {x['tracer_cpu_cores']:.2f} cores")

    rows = [("figure", "issue: today", "goal", "measured", "spread / detail"), ("---",) * 5]
    for c, label, today, goal in (("busted", "churn ratio, default Monitor (flows, DNS/TLS capture, plaintext on)",
                                   "0.68–0.83", "≥ 0.93"),
                                  ("busted-busyhost", "churn ratio, busy-host mode", "–", "≥ 0.97"),
                                  ("busted-noplaintext", "churn ratio, plaintext capture off", "–", "(reference)"),
                                  ("tcplife", "churn ratio, bcc tcplife-bpfcc (outside reference)", "0.67–0.73", "–")):
        v, d = ratio(c)
        rows.append((label, today, goal, v, d))
    off = r["offline"]
    if all("failed" not in o for o in off):
        rows.append(("Python CPU per event, offline (FlowTable, churn records / with ClientHellos)", "~18 µs", "≤ 4 µs",
                     f"{off[0]['us_per_event']:.1f} / {off[1]['us_per_event']:.1f} µs",
                     f"{off[0]['events']:,} / {off[1]['events']:,} events, ≥ {p['offline_s']:g} s CPU each; no ring, "
                     "queue or thread hand-off"))
    else:
        rows.append(("Python CPU per event, offline", "~18 µs", "≤ 4 µs", "failed", str(off)))
    lv = r["live"]
    rows.append(("Python CPU per event, live (Monitor() counting consumer, churn)", "~18 µs", "≤ 4 µs",
                 "failed" if "failed" in lv else _f(lv.get("us_per_event"), "{:.1f} µs"),
                 lv.get("failed") or f"{lv['events']:,} events in {lv['seconds']:.0f} s ({lv['events_per_s']:.0f}/s), "
                 f"consumer {lv['cpu_cores']:.2f} cores, lost {lv['lost']} in the window ({lv['lost_total']} incl. "
                 f"start/stop: {lv['lost_by_place']})"))
    p2 = r["p2"]
    p2_name = "sustained events/s, 0 lost to ring/queue (P2)"
    if "failed" in p2 or not p2.get("best"):
        rows.append((p2_name, "~30 k", "≥ 150 k", "failed", p2.get("failed", str(p2))))
    else:
        b = p2["best"]
        ceil = b["events_per_s"] / b["cpu_cores"] if b["cpu_cores"] else None
        rows.append((p2_name, "~30 k", "≥ 150 k", f"{b['events_per_s']:,.0f}",
                     f"at {b['conn_per_s']:.0f} conn/s; ramp stopped: {p2['stop_reason']}; consumer "
                     f"{b['cpu_cores']:.2f} cores there (one full core would be ~{_f(ceil, '{:,.0f}')} events/s, "
                     "an extrapolation)"))
    cp = r["cpu500"]
    if isinstance(cp, dict):
        rows.append(("CPU per event at 500 conn/s", "31 / 89 / 146 / 252 µs", "≤ 4 / 10 / 15 / 20 µs", "failed",
                     cp["failed"]))
    else:
        by = {x["config"]: x for x in cp}

        def us(c: str, k: str = "us_per_event") -> str:
            x = by.get(c)
            return "skipped" if x is None or "skipped" in x else _f(x.get(k), "{:.0f}")

        lost = sum(x.get("lost", 0) for x in cp)
        bh = by.get("busted-busyhost", {})
        rows.append(("CPU per event at 500 conn/s, whole process: Monitor() consumer / `--json` / `--json --jsonl F` "
                     "/ `--json --store F`", "31 / 89 / 146 / 252 µs", "≤ 4 / 10 / 15 / 20 µs",
                     " / ".join(us(c) for c in ("busted", "cli-json", "cli-jsonl", "cli-store")) + " µs",
                     f"ready → stop, {p['cpu_s']:g} s windows; with start-up and shutdown (os.wait4): "
                     + " / ".join(us(c, "us_per_event_whole") for c in ("busted", "cli-json", "cli-jsonl", "cli-store"))
                     + f" µs; lost {lost}; busy-host consumer: "
                     + (bh.get("skipped") or _f(bh.get("us_per_event"), "{:.1f} µs"))))
    mem = r["memory"]
    if "failed" in mem:
        rows.append(("monitor RSS / start-up", "146–158 MB / 1.1–1.7 s", "≤ 100 MB, flat / ≤ 1.0 s", "failed",
                     mem["failed"]))
    else:
        rows.append(("monitor process RSS: peak / steady", "146–158 MB", "≤ 100 MB / flat",
                     f"{mem['hwm_peak_mb']:.0f} / {mem['rss_end_mb']:.0f} MB",
                     f"after {mem['minutes']:g} min at {mem['rate']:.0f} conn/s; growth over the second half "
                     f"{_f(mem['rss_growth_second_half_mb'], '{:+.1f}')} MB; at ready {mem['rss_ready_mb']:.0f} MB"))
        rows.append(("`Monitor()` → attached, warm (cold)", "1.1–1.7 s", "≤ 1.0 s",
                     f"{mem['startup_warm_s']:.2f} s ({mem['startup_cold_s']:.2f} s)",
                     f"spawn → ready incl. imports: {mem['startup_warm_spawn_s']:.2f} s "
                     f"({mem['startup_cold_spawn_s']:.2f} s); cold = first start of this run, caches not cleared"))
    p5 = r["p5"]
    if "failed" in p5 or not p5["classified"].get("n"):
        rows.append(("connect → FlowClassified seen, p99 (P5)", "unmeasured", "≤ 20 ms", "failed",
                     p5.get("failed", f"no FlowClassified matched: {p5}")))
    else:
        c = p5["classified"]
        rows.append(("connect → FlowClassified seen, p99 (P5)", "unmeasured", "≤ 20 ms", f"{c['p99']:.1f} ms",
                     f"p50 {c['p50']:.1f} / p90 {c['p90']:.1f} / max {c['max']:.1f} ms over {c['n']:,} connections "
                     f"at {p5['rate']:.0f}/s ({p5['unclassified']} unclassified, lost {p5['lost']})"))
    out += ["| " + " | ".join(row) + " |" for row in rows]
    if ab_rows:
        out += ["", f"Churn A/B, per configuration ({r['ab']['procs']} client processes, detached conn/s median "
                "in brackets), paired ratios:", ""]
        for c, x in ab_rows.items():
            if "skipped" not in x:
                vals = ", ".join(f"{v:.3f}" for v in x["ratios"])
                out.append(f"- {c} ({x['detached_conn_per_s']:.0f} conn/s): {vals}")
    if "failed" not in p5 and p5["classified"].get("n"):
        out += ["", "P5 histogram (ms: FlowClassified / FlowOpened):", "",
                "| bucket | classified | opened |", "|---|---|---|"]
        op = dict(p5["opened"].get("histogram_ms", []))
        for label, n in p5["classified"]["histogram_ms"]:
            out.append(f"| {label} | {n} | {op.get(label, 0)} |")
    if "failed" not in p2:
        steps = [f"{s['rate']:.0f} → {s['conn_per_s']:.0f} conn/s, {s['events_per_s']:,.0f} events/s "
                 f"({s['events_per_conn']:.2f}/conn), lost {s['lost']} ({s.get('lost_drain', s['lost'])} ring/queue)"
                 for s in p2["steps"]]
        out += ["", f"P2 ramp ({p2.get('load', 'python')} clients; asked → got): " + "; ".join(steps)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short windows, few slices (~3-4 min)")
    ap.add_argument("--configs", default=ab.DEFAULT, help="A/B configurations")
    ap.add_argument("--out", default=str(HERE / "results" / "all.json"))
    ap.add_argument("--c-load", action="store_true",
                    help="P2 with bench/churn.c's C clients (needs cc): they go past the Python clients' ~12 k conn/s")
    a = ap.parse_args()
    t = time.monotonic()
    r = collect({**(QUICK if a.quick else FULL), "c_load": a.c_load}, a.configs.split(","))
    r["wall_s"] = time.monotonic() - t
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=1, default=str))
    command = "sudo flock /tmp/busted-kernel.lock .venv/bin/python bench/all.py " + shlex.join(sys.argv[1:])
    print(markdown(r, command.strip()))
    print(f"\n(wall time {r['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
