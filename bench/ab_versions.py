"""Two busted checkouts A/B'd slice by slice in one churn workload: is one slower than the other?

    sudo .venv/bin/python bench/ab_versions.py --old /path/to/old/checkout [--new .] [--rounds 10] [--slice 4]

bench/ab.py compares the tracer attached and detached within one run, but two versions of busted
can only be compared across runs, minutes apart on a shared machine. Here one workload
(bench/churn.py's clients, as in bench/ab.py) runs throughout, and each round attaches the old and
the new checkout's ``Monitor()`` consumer (bench/busted_consumer.py, PYTHONPATH set to the
checkout) in turn, order alternating by round. Each attached slice has a detached slice before and
after it; ratio = attached conn/s / the mean of the two. Per slice it also records the monitor's
CPU (cores), CPU per event, threads and context switches, the workload's user and system CPU per
connection, and per BPF program (bpftool) the runs and run time (run time only while
``sysctl kernel.bpf_stats_enabled=1``). One JSON line per attached slice on stdout; medians on
stderr. Every loop is bounded (--rounds; the workload stops on its own deadline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import Tracer, Workload, cpu_s  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def ustime(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / CLK, int(f[12]) / CLK


def ctx(pid):
    v = n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            for line in open(f"/proc/{pid}/task/{t}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    v += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    n += int(line.split()[1])
        except OSError:
            pass
    return v, n, len(os.listdir(f"/proc/{pid}/task"))


def progs():
    out = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout)
    return {p["id"]: p for p in out}


def wl_cpu(pids):
    u = s = 0.0
    for p in pids:
        a, b = ustime(p)
        u += a
        s += b
    return u, s


def window(w, pids, seconds, tracer=None, before_ids=None):
    p0 = progs() if tracer else {}
    e0 = tracer.stats()['events'] if tracer else 0
    c0 = ctx(tracer.pid) if tracer else (0, 0, 0)
    m0 = cpu_s(tracer.pid) if tracer else 0
    u0, s0 = wl_cpu(pids)
    n0, t0 = w.count(), time.monotonic()
    time.sleep(seconds)
    n1, t1 = w.count(), time.monotonic()
    u1, s1 = wl_cpu(pids)
    m1 = cpu_s(tracer.pid) if tracer else 0
    c1 = ctx(tracer.pid) if tracer else (0, 0, 0)
    p1 = progs() if tracer else {}
    e1 = tracer.stats()['events'] if tracer else 0
    dt = t1 - t0
    conns = n1 - n0
    r = {"rate": conns / dt, "wl_user_us": (u1 - u0) / conns * 1e6, "wl_sys_us": (s1 - s0) / conns * 1e6}
    if tracer:
        r["mon_cores"] = (m1 - m0) / dt
        r["events_per_s"] = (e1 - e0) / dt
        r["cpu_per_event_us"] = (m1 - m0) / max(1, e1 - e0) * 1e6
        r["mon_vcs"] = (c1[0] - c0[0]) / dt
        r["mon_ivcs"] = (c1[1] - c0[1]) / dt
        r["threads"] = c1[2]
        bp = {}
        for pid_, p in p1.items():
            if pid_ in before_ids:
                continue
            q = p0.get(pid_)
            if q is None:
                continue
            dc = p.get("run_cnt", 0) - q.get("run_cnt", 0)
            dtm = p.get("run_time_ns", 0) - q.get("run_time_ns", 0)
            key = f'{p.get("type")}:{p.get("name", "?")}'
            a = bp.setdefault(key, [0, 0, 0])
            a[0] += dc
            a[1] += dtm
            a[2] += 1
        r["bpf"] = {k: {"per_s": v[0] / dt, "ns_per_run": (v[1] / v[0] if v[0] else 0), "n": v[2],
                        "ns_per_conn": v[1] / conns} for k, v in sorted(bp.items())}
        r["bpf_ns_per_conn"] = sum(v[1] for v in bp.values()) / conns
    return r


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the old checkout (a git worktree of the commit to compare)")
    ap.add_argument("--new", default=os.path.dirname(HERE))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--slice", type=float, default=4.0)
    a = ap.parse_args()
    rounds, sl = a.rounds, a.slice
    old, new = os.path.abspath(a.old), os.path.abspath(a.new)
    res = []
    with Workload(procs=4, max_seconds=rounds * 2 * (3 * sl + 30) + 60) as w:
        w.start_clients()
        pids = [w._srv.pid] + [p.pid for p in w._clients]
        time.sleep(1.0)
        for i in range(rounds):
            order = [("old", old), ("new", new)] if i % 2 == 0 else [("new", new), ("old", old)]
            for name, co in order:
                os.environ["PYTHONPATH"] = co
                before = set(progs())
                base1 = window(w, pids, sl)
                t = Tracer("busted", extra=["--control"]).start()
                try:
                    time.sleep(1.0)
                    att = window(w, pids, sl, t, before)
                finally:
                    t.stop()
                time.sleep(0.5)
                base2 = window(w, pids, sl)
                base = (base1["rate"] + base2["rate"]) / 2
                att.update(who=name, round=i, base=base, ratio=att["rate"] / base,
                           base_wl_sys_us=(base1["wl_sys_us"] + base2["wl_sys_us"]) / 2,
                           base_wl_user_us=(base1["wl_user_us"] + base2["wl_user_us"]) / 2)
                res.append(att)
                print(json.dumps(att), flush=True)
        w.stop()
    for who in ("old", "new"):
        x = [r for r in res if r["who"] == who]
        print(f"{who}: {len(x)} slices, ratio median {statistics.median(r['ratio'] for r in x):.3f}, "
              f"CPU per event median {statistics.median(r['cpu_per_event_us'] for r in x):.2f} us", file=sys.stderr)
    paired = [n["ratio"] / o["ratio"] for o in res for n in res
              if o["who"] == "old" and n["who"] == "new" and o["round"] == n["round"]]
    print(f"new/old per round: median {statistics.median(paired):.3f}, new higher in {sum(p > 1 for p in paired)} "
          f"of {len(paired)}", file=sys.stderr)


if __name__ == "__main__":
    main()
