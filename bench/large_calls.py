"""What large LLM requests cost with the plaintext capture, same-run A/B between two busted trees.

    sudo .venv/bin/python bench/large_calls.py [--calls 40] [--size 307200] [--rounds 3] [--base DIR]

A lab client (python http.client over TLS, keep-alive) sends ``--calls`` chat requests with a
prompt of ``--size`` bytes each, written in one SSL_write. Configurations, interleaved per round:
"none" (no monitor), "this" (a ``Monitor()`` of this tree in a child process; only the client's
calls are counted: the lab's servers run in this process and are read too) and, with ``--base``,
"base" (the same from another checkout, e.g. ``git worktree add /tmp/base fa61c69``). Reported per
configuration, median over the rounds: the client's CPU (user+sys: the uprobes' copies run in its
context), the monitor process's CPU over the workload, and the LlmCalls / losses the monitor saw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")

CLIENT = """
import ctypes, http.client, json, ssl, sys
ctypes.CDLL(None).prctl(15, b"bst-bigclient", 0, 0, 0)  # PR_SET_NAME: the monitor follows this comm only
n, size = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPSConnection("api.openai.com", 443, context=ssl.create_default_context())
body = json.dumps({"model": "gpt-4o", "max_tokens": 3, "messages": [{"role": "user", "content": "x" * size}]})
for _ in range(n):
    c.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
    assert c.getresponse().read()
"""

# The monitor child: counts what it sees until stdin closes, then prints it as JSON.
MONITOR = """
import json, sys, threading, busted
counts = {"calls": 0, "lost": {}, "in_tokens": 0}
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
# A 64 MiB ring: the lab's TLS server (in the bench process) reads the same bytes 16 KiB at a time,
# and its records must not crowd the client's out (they are not counted: comm says whose a call is).
with busted.Monitor(preexisting=False, ringbuf_bytes=64 << 20) as m:
    print("ready", flush=True)
    while not stop.is_set():
        for ev in m.events(timeout=0.2):
            if isinstance(ev, busted.LlmCall) and ev.comm == "bst-bigclient":
                counts["calls"] += 1
                counts["in_tokens"] += ev.input_tokens or 0
            elif isinstance(ev, busted.EventsLost):
                counts["lost"][ev.where.name] = counts["lost"].get(ev.where.name, 0) + ev.count
    for ev in m.events(timeout=1.0):
        if isinstance(ev, busted.LlmCall) and ev.comm == "bst-bigclient":
            counts["calls"] += 1
print(json.dumps(counts), flush=True)
"""


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def one(lab: Any, tree: Path | None, calls: int, size: int) -> dict[str, Any]:
    mon = None
    if tree is not None:  # cwd first on sys.path: that tree's busted is imported
        mon = subprocess.Popen([PY, "-c", MONITOR], cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
        assert mon.stdout is not None and mon.stdout.readline().strip() == "ready"
    c0 = cpu_s(mon.pid) if mon else 0.0
    t0 = time.monotonic()
    p = lab.spawn_client([PY, "-c", CLIENT, str(calls), str(size)])
    _, _, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = 0
    res: dict[str, Any] = {"client_cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": wall}
    if mon:
        time.sleep(1.0)  # let the monitor drain the last records
        res["monitor_cpu_s"] = cpu_s(mon.pid) - c0
        out, _ = mon.communicate("", timeout=60)
        res.update(json.loads(out.strip().splitlines()[-1]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--size", type=int, default=300 * 1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", type=Path, help="another busted checkout to compare with (e.g. fa61c69)")
    a = ap.parse_args()
    from busted.lab import Lab

    configs: dict[str, Path | None] = {"none": None, "this": ROOT}
    if a.base:
        configs["base"] = a.base.resolve()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    with Lab() as lab:
        one(lab, None, 2, 1000)  # warm-up: lab, page cache
        for _ in range(a.rounds):
            for name, tree in configs.items():
                runs[name].append(one(lab, tree, a.calls, a.size))
    report: dict[str, Any] = {"calls": a.calls, "size": a.size, "rounds": a.rounds}
    for name, rs in runs.items():
        row = {k: statistics.median(r[k] for r in rs) for k in ("client_cpu_s", "wall_s", "monitor_cpu_s")
               if k in rs[0]}
        if name != "none":
            row["llm_calls"] = [r["calls"] for r in rs]
            row["lost"] = [r["lost"] for r in rs]
        report[name] = row
    none = report["none"]["client_cpu_s"]
    for name in configs:
        if name != "none":
            report[name]["client_cpu_extra_us_per_call"] = round(
                (report[name]["client_cpu_s"] - none) / a.calls * 1e6, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
